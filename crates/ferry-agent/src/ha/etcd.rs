//! A blocking face on the etcd client: ferry's HA code is threads, etcd's
//! client is async. Every call has a deadline, so a dead or partitioned
//! etcd turns into an error after [`CALL_TIMEOUT`], never into a hang.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use ferry_sys::clock::BootInstant;

use super::HaError;

/// Longest wait for one etcd call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a broken deletion watch waits before it is opened again.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// A flag a loop sleeps on between its ticks, set when a watched key is
/// deleted: the loop then runs at once instead of at its next tick. Also
/// when each host's vouch ([`super::keys::vouch_key`]) was last seen.
#[derive(Debug, Default)]
pub(crate) struct Nudge {
    set: Mutex<bool>,
    cv: Condvar,
    /// Host -> (revision of its vouch, when this agent learned of it).
    vouches: Mutex<std::collections::HashMap<String, (i64, BootInstant)>>,
}

impl Nudge {
    /// When this agent first learned of `host`'s vouch at `revision`
    /// through the watch (None: not through the watch).
    pub(crate) fn vouch_seen(&self, host: &str, revision: i64) -> Option<BootInstant> {
        let v = self.vouches.lock().ok()?;
        v.get(host)
            .filter(|(r, _)| *r == revision)
            .map(|(_, at)| *at)
    }

    fn saw_vouch(&self, host: &str, revision: i64) {
        if let Ok(mut v) = self.vouches.lock() {
            let newer = v.get(host).is_none_or(|(r, _)| *r < revision);
            if newer {
                v.insert(host.to_string(), (revision, BootInstant::now()));
            }
        }
    }

    fn nudge(&self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        *set = true;
        self.cv.notify_all();
    }

    /// Sleeps until nudged or until `timeout` has passed, and clears the
    /// flag; returns whether it was nudged.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let (mut set, _) = self
            .cv
            .wait_timeout_while(set, timeout, |set| !*set)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *set, false)
    }
}

/// One key as read from etcd.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the key's last write.
    pub mod_revision: i64,
    pub lease: i64,
}

/// How ferry reaches etcd: its endpoints and credentials (etcdctl's
/// `--endpoints`, `--cacert`, `--cert`, `--key`, `--user`).
#[derive(Debug, Clone, Default)]
pub struct EtcdAccess {
    /// URLs: `https://` with TLS, `http://` without.
    pub endpoints: Vec<String>,
    /// The CA certificate (PEM) etcd's server certificate is checked
    /// against; needed for `https://` endpoints.
    pub cacert: Option<PathBuf>,
    /// This client's certificate and key (PEM), for an etcd that asks for
    /// one (`--client-cert-auth`). The key must be root-only.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A user of etcd's own authentication, its password in a root-only
    /// file (never on a command line, where any local user reads it).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdAccess {
    /// Endpoints without TLS or a user.
    pub fn plain(endpoints: &[String]) -> EtcdAccess {
        EtcdAccess {
            endpoints: endpoints.to_vec(),
            ..Default::default()
        }
    }

    /// Reads and checks the credentials.
    fn credentials(&self) -> Result<Credentials, HaError> {
        let bad = |what: String| HaError::EtcdAccess { what };
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let tls_files = self.cacert.is_some() || self.cert.is_some() || self.key.is_some();
        if https > 0 && https < self.endpoints.len() {
            return Err(bad(
                "some endpoints are https:// and some not: use one scheme".into(),
            ));
        }
        if https == 0 && tls_files {
            return Err(bad(
                "TLS certificates were given, but the endpoints are not https://".into(),
            ));
        }
        let tls = if https > 0 {
            let Some(ca) = &self.cacert else {
                return Err(bad(
                    "https:// endpoints need the CA certificate that signed etcd's (--etcd-cacert)"
                        .into(),
                ));
            };
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(ca, false)?));
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read(cert, false)?,
                        read(key, true)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(bad(
                        "a client certificate needs its key, and a key its certificate (--etcd-cert with --etcd-key)".into(),
                    ))
                }
            }
            Some(tls)
        } else {
            None
        };
        let user = match (&self.user, &self.password_file) {
            (Some(user), Some(file)) => {
                let password = String::from_utf8(read(file, true)?)
                    .map_err(|_| bad(format!("{} is not UTF-8", file.display())))?;
                Some((user.clone(), password.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "an etcd user needs its password file, and a password file its user (--etcd-user with --etcd-password-file)".into(),
                ))
            }
        };
        Ok(Credentials { tls, user })
    }
}

/// Reads a credential file; a secret one (a key, a password) must belong
/// to this user and be closed to others, as ssh requires of a private key.
fn read(path: &Path, secret: bool) -> Result<Vec<u8>, HaError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let err = |detail: String| HaError::EtcdAccess {
        what: format!("{}: {detail}", path.display()),
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = f.metadata().map_err(|e| err(e.to_string()))?;
    if secret {
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(err(format!(
                "belongs to uid {}, not to this user (uid {me})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets other users read it: chmod 600 {}",
                meta.mode() & 0o7777,
                path.display()
            )));
        }
    }
    if meta.len() > 1 << 20 {
        return Err(err("larger than 1 MiB: not a certificate or key".into()));
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// The credentials, read once, for every (re)connection.
#[derive(Clone)]
struct Credentials {
    tls: Option<etcd_client::TlsOptions>,
    user: Option<(String, String)>,
}

/// A connection to an etcd cluster, usable from any thread.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Mutex<Client>,
    broken: AtomicBool,
    endpoints: Vec<String>,
    credentials: Credentials,
    joined: String,
}

async fn new_client(
    endpoints: &[String],
    credentials: &Credentials,
    joined: &str,
) -> Result<Client, HaError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_millis(500), CALL_TIMEOUT);
    if let Some(tls) = &credentials.tls {
        opts = opts.with_tls(tls.clone());
    }
    if let Some((user, password)) = &credentials.user {
        opts = opts.with_user(user.clone(), password.clone());
    }
    let fail = |detail: String| HaError::Etcd {
        endpoints: joined.to_string(),
        what: "connect".into(),
        detail,
    };
    tokio::time::timeout(
        CALL_TIMEOUT * 2,
        Client::connect(endpoints.to_vec(), Some(opts)),
    )
    .await
    .map_err(|_| fail("timed out".into()))?
    .map_err(|e| fail(e.to_string()))
}

impl Etcd {
    /// Connects as `access` says. The connection is made lazily: an etcd
    /// that is down now is retried by every call.
    pub fn connect(access: &EtcdAccess) -> Result<Etcd, HaError> {
        let credentials = access.credentials()?;
        let endpoints = &access.endpoints;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-etcd")
            .enable_all()
            .build()
            .map_err(HaError::Runtime)?;
        let joined = endpoints.join(",");
        let client = rt.block_on(new_client(endpoints, &credentials, &joined))?;
        Ok(Etcd {
            rt,
            client: Mutex::new(client),
            broken: AtomicBool::new(false),
            endpoints: endpoints.to_vec(),
            credentials,
            joined,
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.joined
    }

    /// The client, rebuilt first when a call failed: a connection that
    /// died under a cut link is not always brought back by the channel.
    fn client(&self) -> Result<Client, HaError> {
        if self.broken.swap(false, Ordering::Relaxed) {
            match self
                .rt
                .block_on(new_client(&self.endpoints, &self.credentials, &self.joined))
            {
                Ok(c) => {
                    if let Ok(mut g) = self.client.lock() {
                        *g = c;
                    }
                }
                Err(e) => {
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(self
            .client
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone()))
    }

    fn call<T, F>(&self, what: &str, f: F) -> Result<T, HaError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(what, CALL_TIMEOUT, f)
    }

    fn call_within<T, F>(&self, what: &str, timeout: Duration, f: F) -> Result<T, HaError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let fail = |detail: String| {
            self.broken.store(true, Ordering::Relaxed);
            HaError::Etcd {
                endpoints: self.joined.clone(),
                what: what.to_string(),
                detail,
            }
        };
        self.rt
            .block_on(async { tokio::time::timeout(timeout, f).await })
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))
    }

    /// Nudges `nudge` whenever a key under `prefix` is deleted, for as long
    /// as the nudge lives (a lease that etcd revokes deletes its keys: a
    /// standby learns that the leader's key went as soon as etcd says so,
    /// not at its next read), and notes when each host's vouch was seen.
    /// Only hints, on a connection of its own: a watch that breaks is
    /// opened again after [`WATCH_RETRY`], and the caller goes on reading
    /// on its own tick meanwhile.
    pub(crate) fn watch_deletions(&self, prefix: &str, nudge: Weak<Nudge>) {
        let endpoints = self.endpoints.clone();
        let credentials = self.credentials.clone();
        let joined = self.joined.clone();
        let prefix = prefix.to_string();
        self.rt.spawn(async move {
            while nudge.strong_count() > 0 {
                if let Ok(mut client) = new_client(&endpoints, &credentials, &joined).await {
                    let opts = WatchOptions::new().with_prefix();
                    let vouch_prefix = format!("{prefix}vouch/");
                    if let Ok(mut stream) = client.watch(prefix.as_str(), Some(opts)).await {
                        while let Ok(Some(resp)) = stream.message().await {
                            if resp.canceled() {
                                break;
                            }
                            let Some(n) = nudge.upgrade() else { return };
                            for e in resp.events() {
                                match (e.event_type(), e.kv()) {
                                    (EventType::Delete, _) => n.nudge(),
                                    (EventType::Put, Some(kv)) => {
                                        let key = String::from_utf8_lossy(kv.key());
                                        if let Some(host) = key.strip_prefix(&vouch_prefix) {
                                            n.saw_vouch(host, kv.mod_revision());
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(WATCH_RETRY).await;
            }
        });
    }

    /// Writes this host's vouch (`value` at `key`, on `lease`) if every
    /// `(leader key, token)` in `held` still stands: false if one does not
    /// (a standby unseated this host, or a handover moved the service).
    pub(crate) fn vouch(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
        held: &[(String, i64)],
        timeout: Duration,
    ) -> Result<bool, HaError> {
        let mut c = self.client()?;
        let txn = Txn::new()
            .when(
                held.iter()
                    .map(|(k, token)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *token))
                    .collect::<Vec<_>>(),
            )
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = self.call_within(
            "vouch for the lease",
            timeout,
            async move { c.txn(txn).await },
        )?;
        Ok(r.succeeded())
    }

    /// Deletes `leader_key` if it was last written at `token` and
    /// `vouch_key` at `vouch_revision`: the leader's host has written no
    /// vouch since the one the caller saw. Returns whether it did.
    pub(crate) fn unseat(
        &self,
        leader_key: &str,
        token: i64,
        vouch_key: &str,
        vouch_revision: i64,
    ) -> Result<bool, HaError> {
        let mut c = self.client()?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(leader_key, CompareOp::Equal, token),
                Compare::mod_revision(vouch_key, CompareOp::Equal, vouch_revision),
            ])
            .and_then([TxnOp::delete(leader_key, None)]);
        let r = self.call("unseat a silent leader", async move { c.txn(txn).await })?;
        Ok(r.succeeded())
    }

    /// The revision of `key`'s last write (0: no such key).
    pub(crate) fn mod_revision(&self, key: &str) -> Result<i64, HaError> {
        let mut c = self.client()?;
        let key = key.to_string();
        let r = self.call("read a key", async move { c.get(key, None).await })?;
        Ok(r.kvs().first().map_or(0, |kv| kv.mod_revision()))
    }

    /// Grants a lease of `ttl_s` seconds; returns (id, granted ttl).
    pub(crate) fn grant(&self, ttl_s: i64) -> Result<(i64, i64), HaError> {
        let mut c = self.client()?;
        let r = self.call(
            "grant a lease",
            async move { c.lease_grant(ttl_s, None).await },
        )?;
        Ok((r.id(), r.ttl()))
    }

    /// Renews lease `id` once, waiting at most `timeout`; returns whether
    /// the lease still exists (false: it expired).
    pub(crate) fn keep_alive(&self, id: i64, timeout: Duration) -> Result<bool, HaError> {
        let mut c = self.client()?;
        // Opening the keep-alive stream sends the first renewal and reads
        // its answer; etcd answers TTL 0 for an expired lease, which the
        // client reports as "lease not found".
        self.call_within("renew the lease", timeout, async move {
            match c.lease_keep_alive(id).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }

    pub(crate) fn revoke(&self, id: i64) -> Result<(), HaError> {
        let mut c = self.client()?;
        self.call("revoke the lease", async move { c.lease_revoke(id).await })
            .map(|_| ())
    }

    /// Every key under `prefix`, and the store's revision.
    pub fn get_prefix(&self, prefix: &str) -> Result<(Vec<Entry>, i64), HaError> {
        self.get_prefix_within(prefix, CALL_TIMEOUT)
    }

    /// [`Etcd::get_prefix`], waiting at most `timeout`.
    pub(crate) fn get_prefix_within(
        &self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(Vec<Entry>, i64), HaError> {
        let mut c = self.client()?;
        let prefix = prefix.to_string();
        let r = self.call_within("read the cluster state", timeout, async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let entries = r
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
            .collect();
        Ok((entries, revision))
    }

    /// Puts `key`, attached to `lease` when it is not 0.
    pub fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), HaError> {
        let mut c = self.client()?;
        let key = key.to_string();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        self.call("write", async move { c.put(key, value, opts).await })
            .map(|_| ())
    }

    /// Deletes every key under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> Result<(), HaError> {
        let mut c = self.client()?;
        let key = prefix.to_string();
        self.call("delete", async move {
            c.delete(key, Some(etcd_client::DeleteOptions::new().with_prefix()))
                .await
        })
        .map(|_| ())
    }

    pub fn delete(&self, key: &str) -> Result<(), HaError> {
        let mut c = self.client()?;
        let key = key.to_string();
        self.call("delete", async move { c.delete(key, None).await })
            .map(|_| ())
    }

    /// Creates `key` under `lease` only if it does not exist. Returns the
    /// key's revision when this call created it (the fencing token).
    pub fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<Option<i64>, HaError> {
        let mut c = self.client()?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = self.call("create a key", async move { c.txn(txn).await })?;
        Ok(r.succeeded()
            .then(|| r.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Runs `ops` only while `guard` was last written at revision `token`
    /// (the writer still holds what the token names). Returns whether they ran.
    pub(crate) fn fenced(&self, guard: &str, token: i64, ops: Vec<TxnOp>) -> Result<bool, HaError> {
        let mut c = self.client()?;
        let txn = Txn::new()
            .when([Compare::mod_revision(guard, CompareOp::Equal, token)])
            .and_then(ops);
        let r = self.call(
            "write under the fencing token",
            async move { c.txn(txn).await },
        )?;
        Ok(r.succeeded())
    }
}

/// A put for [`Etcd::fenced`].
pub(crate) fn put_op(key: &str, value: Vec<u8>, lease: i64) -> TxnOp {
    TxnOp::put(
        key,
        value,
        (lease != 0).then(|| PutOptions::new().with_lease(lease)),
    )
}

/// A delete for [`Etcd::fenced`].
pub(crate) fn delete_op(key: &str) -> TxnOp {
    TxnOp::delete(key, None)
}

#[cfg(test)]
mod access_tests {
    use super::*;

    fn refused(access: EtcdAccess, why: &str) {
        match access.credentials() {
            Err(e) => assert!(e.to_string().contains(why), "expected '{why}' in: {e}"),
            Ok(_) => panic!("accepted; expected '{why}'"),
        }
    }

    /// Each inconsistent or unsafe combination is refused before any
    /// connection, naming what to fix.
    #[test]
    fn credentials_are_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "secret\n").unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            p
        };
        let https = |cacert: Option<PathBuf>| EtcdAccess {
            cacert,
            ..EtcdAccess::plain(&["https://127.0.0.1:2379".into()])
        };
        refused(https(None), "--etcd-cacert");
        refused(
            EtcdAccess {
                cacert: Some(file("ca.pem", 0o644)),
                ..EtcdAccess::plain(&["http://127.0.0.1:2379".into()])
            },
            "not https://",
        );
        refused(
            EtcdAccess::plain(&["https://a:1".into(), "http://b:1".into()]),
            "one scheme",
        );
        refused(
            EtcdAccess {
                cert: Some(file("c.pem", 0o644)),
                ..https(Some(file("ca.pem", 0o644)))
            },
            "needs its key",
        );
        refused(
            EtcdAccess {
                user: Some("root".into()),
                ..EtcdAccess::plain(&["http://127.0.0.1:2379".into()])
            },
            "password file",
        );
        refused(
            EtcdAccess {
                user: Some("root".into()),
                password_file: Some(file("pw", 0o640)),
                ..EtcdAccess::plain(&["http://127.0.0.1:2379".into()])
            },
            "chmod 600",
        );
        let ok = EtcdAccess {
            user: Some("root".into()),
            password_file: Some(file("pw", 0o600)),
            ..EtcdAccess::plain(&["http://127.0.0.1:2379".into()])
        }
        .credentials()
        .unwrap();
        assert_eq!(ok.user, Some(("root".into(), "secret".into())));
    }
}
