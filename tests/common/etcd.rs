//! A real etcd server for the HA tests, on ports of its own, with 1 s
//! leases allowed (election timeout 500 ms); killed when dropped.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::ha::etcd::{Etcd, EtcdAccess};

pub struct EtcdProc {
    child: Option<Child>,
    pub url: String,
    /// How a client reaches it (with the client certificate when TLS).
    pub access: EtcdAccess,
    args: Vec<String>,
    log: PathBuf,
}

/// The PEM files of a TLS etcd: its CA, and a client certificate it
/// accepts.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Runs openssl with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed: run scripts/setup.sh as root (package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA, a certificate for a server at `ip` and one for a client,
/// each an EC P-256 key, valid two days, in `dir`.
fn make_certificates(dir: &Path, ip: IpAddr) -> (EtcdTls, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let req = |name: &str, cn: &str| {
        let (k, csr) = (format!("{name}.key"), format!("{name}.csr"));
        let mut a = vec!["req"];
        a.extend(key);
        a.extend(["-keyout", &k, "-out", &csr, "-subj", cn]);
        openssl(dir, &a);
    };
    let mut ca = vec!["req", "-x509"];
    ca.extend(key);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ferry-test-ca",
    ]);
    openssl(dir, &ca);
    let sign = |name: &str, ext: String| {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    };
    req("server", "/CN=etcd");
    sign(
        "server",
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
    );
    req("client", "/CN=ferry");
    sign("client", "extendedKeyUsage=clientAuth\n".into());
    std::fs::set_permissions(
        dir.join("client.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    (
        EtcdTls {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        },
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl EtcdProc {
    /// Starts etcd with its data in `dir/etcd`, serving clients on `ip`.
    pub fn start(dir: &Path, ip: IpAddr) -> EtcdProc {
        Self::start_with(dir, ip, None)
    }

    /// Starts etcd serving clients over TLS only, asking each for a
    /// certificate its CA signed (`--client-cert-auth`); the certificates
    /// are made in `dir/pki`.
    pub fn start_tls(dir: &Path, ip: IpAddr) -> (EtcdProc, EtcdTls) {
        let (tls, cert, key) = make_certificates(&dir.join("pki"), ip);
        let server = [
            "--cert-file".to_string(),
            cert.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            tls.ca.display().to_string(),
        ];
        let e = Self::start_with(dir, ip, Some((&tls, &server)));
        (e, tls)
    }

    fn start_with(dir: &Path, ip: IpAddr, tls: Option<(&EtcdTls, &[String])>) -> EtcdProc {
        assert!(
            ferry_sys::which("etcd").is_some(),
            "etcd is not installed: run scripts/setup.sh as root (package etcd-server)"
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{ip}:{}", free_port(ip));
        let peer = format!(
            "http://127.0.0.1:{}",
            free_port("127.0.0.1".parse().unwrap())
        );
        let name = format!("ferry-test-{}", std::process::id());
        let args: Vec<String> = [
            "--name",
            &name,
            "--data-dir",
            &dir.join("etcd").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("{name}={peer}"),
            "--election-timeout",
            "500",
            "--heartbeat-interval",
            "50",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(tls.iter().flat_map(|(_, server)| server.iter().cloned()))
        .collect();
        let access = EtcdAccess {
            cacert: tls.map(|(t, _)| t.ca.clone()),
            cert: tls.map(|(t, _)| t.client_cert.clone()),
            key: tls.map(|(t, _)| t.client_key.clone()),
            ..EtcdAccess::plain(std::slice::from_ref(&client))
        };
        let mut e = EtcdProc {
            child: None,
            url: client,
            access,
            args,
            log: dir.join("etcd.log"),
        };
        e.launch();
        e
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let etcd = Etcd::connect(&self.access).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if etcd.get_prefix("/ferry-test-ready").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not answer at {} within 20 s; its log:\n{}",
            self.url,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGSTOP) or continues etcd: it holds its connections and
    /// answers nothing meanwhile, as a stalled server.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, sig).expect("signal etcd");
        }
    }

    /// Kills etcd, waits `down`, starts it again on the same data.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.launch();
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        self.freeze(false);
        self.kill();
    }
}
