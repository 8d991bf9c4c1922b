//! A blocking face on the etcd client: ferry's HA code is threads, etcd's
//! client is async. Every call has a deadline, so a dead or partitioned
//! etcd turns into an error after [`CALL_TIMEOUT`], never into a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use super::HaError;

/// Longest wait for one etcd call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// One key as read from etcd.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the key's last write.
    pub mod_revision: i64,
    pub lease: i64,
}

/// A connection to an etcd cluster, usable from any thread.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Mutex<Client>,
    broken: AtomicBool,
    endpoints: Vec<String>,
    joined: String,
}

async fn new_client(endpoints: &[String], joined: &str) -> Result<Client, HaError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_millis(500), CALL_TIMEOUT);
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
    /// Connects to `endpoints` (URLs). The connection is made lazily: an
    /// etcd that is down now is retried by every call.
    pub fn connect(endpoints: &[String]) -> Result<Etcd, HaError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-etcd")
            .enable_all()
            .build()
            .map_err(HaError::Runtime)?;
        let joined = endpoints.join(",");
        let client = rt.block_on(new_client(endpoints, &joined))?;
        Ok(Etcd {
            rt,
            client: Mutex::new(client),
            broken: AtomicBool::new(false),
            endpoints: endpoints.to_vec(),
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
            match self.rt.block_on(new_client(&self.endpoints, &self.joined)) {
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
