//! The listener: accept, authenticate, dispatch; clean shutdown on SIGTERM.

use ferry_sys::host::{boot_id, hostname};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::session;
use super::store::PageStore;
use super::{AgentConfig, AgentError};
use ferry_transport::{Conn, Msg, Secret};

/// Time a peer has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(50);
/// Connections served at once; more are closed as soon as accepted.
const MAX_CONNECTIONS: usize = 256;
/// Connections from one address still in their handshake; more from it
/// are closed as soon as accepted (so idle or slow peers on one address
/// cannot take every slot from a legitimate migration).
const MAX_HANDSHAKES_PER_PEER: usize = 16;
/// Pause after `accept` fails for want of descriptors or memory, instead
/// of spinning on the connection still queued.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refusals are logged at most this often (with a count).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts of connections now open, and of handshakes in progress per
/// peer address.
#[derive(Default)]
struct Slots {
    open: usize,
    handshaking: HashMap<std::net::IpAddr, usize>,
}

/// One connection's hold on [`Slots`]; its handshake slot is given back by
/// [`Held::authenticated`], its connection slot when dropped.
struct Held {
    slots: Arc<Mutex<Slots>>,
    peer: std::net::IpAddr,
    handshaking: bool,
}

impl Held {
    /// Takes a slot for a connection from `peer`, or says which limit
    /// refuses it.
    fn take(slots: &Arc<Mutex<Slots>>, peer: std::net::IpAddr) -> Result<Held, &'static str> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        if s.open >= MAX_CONNECTIONS {
            return Err("too many connections");
        }
        let pending = s.handshaking.entry(peer).or_default();
        if *pending >= MAX_HANDSHAKES_PER_PEER {
            return Err("too many handshakes from this address");
        }
        *pending += 1;
        s.open += 1;
        Ok(Held {
            slots: Arc::clone(slots),
            peer,
            handshaking: true,
        })
    }

    fn authenticated(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            release_handshake(&mut s, self.peer);
        }
    }
}

fn release_handshake(s: &mut Slots, peer: std::net::IpAddr) {
    if let Some(n) = s.handshaking.get_mut(&peer) {
        *n -= 1;
        if *n == 0 {
            s.handshaking.remove(&peer);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if self.handshaking {
            release_handshake(&mut s, self.peer);
        }
        s.open -= 1;
    }
}

/// Logs refused connections, at most once per [`REFUSAL_LOG_EVERY`].
struct Refusals {
    since_log: u64,
    last: Option<std::time::Instant>,
}

impl Refusals {
    fn note(&mut self, peer: std::net::SocketAddr, why: &str) {
        self.since_log += 1;
        if self.last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            tracing::warn!(%peer, refused = self.since_log, "connection closed unserved: {why}");
            self.since_log = 0;
            self.last = Some(std::time::Instant::now());
        }
    }
}

/// State shared by every connection of an agent.
pub struct Agent {
    pub config: AgentConfig,
    pub store: Arc<PageStore>,
    pub host: String,
    pub boot_id: String,
    /// Sessions open now: id -> pages received on its data streams.
    pub sessions: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Post-copy page-source connections, by session, until its restore
    /// takes them.
    pub page_sources: Mutex<HashMap<String, Conn>>,
    /// The hybrid route's final page maps, by session, until the session's
    /// page relay takes them ([`crate::final_map`]).
    pub(crate) page_maps: crate::page_source::PageMaps,
    /// Each migration's outcome, journaled ([`crate::session::outcome`]).
    pub(crate) outcomes: crate::session::outcome::Outcomes,
    /// Membership of an HA cluster, when the agent joined one.
    pub ha: Option<Arc<crate::ha::Member>>,
    conns: Mutex<HashMap<u64, TcpStream>>,
}

/// Runs an agent until SIGTERM/SIGINT. `ready` receives the bound
/// addresses (useful with port 0).
pub fn run(config: AgentConfig, ready: &mut dyn FnMut(crate::Ready)) -> Result<(), AgentError> {
    let secret = Secret::from_file(&config.key)?;
    let store =
        PageStore::open(&config.store, secret.page_key()).map_err(|source| AgentError::Store {
            path: config.store.clone(),
            source,
        })?;
    let listener = TcpListener::bind(config.listen).map_err(|source| AgentError::Bind {
        addr: config.listen,
        source,
    })?;
    let local = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: config.listen,
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AgentError::Bind {
            addr: config.listen,
            source,
        })?;
    for stale in ferry_core::checkpoint::staging::sweep_stale(
        super::session::STAGING_PREFIX,
        config.staging.as_deref(),
        ferry_core::checkpoint::staging::SWEEP_GRACE,
    ) {
        tracing::info!(dir = %stale.display(), "removed the staging of a dead agent");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(AgentError::Signals)?;
    }
    let ha = match &config.ha {
        Some(ha) => Some(crate::ha::Member::join(
            ha.clone(),
            ha.agent_addr(local),
            config.runc_root.clone(),
            config.store.clone(),
            secret.clone(),
            ferry_criu::Criu::locate(config.criu.as_deref(), config.criu_service.as_deref())?,
            boot_id(),
        )?),
        None => None,
    };
    let ha_threads = ha.as_ref().map(|m| m.start()).unwrap_or_default();
    // Before any migration is served: what a crash left undecided is
    // settled (uncommitted copies removed).
    let outcomes = crate::session::outcome::Outcomes::open(&config.store);
    let agent = Arc::new(Agent {
        outcomes,
        ha,
        host: hostname(),
        boot_id: boot_id(),
        store: Arc::new(store),
        config,
        sessions: Mutex::new(HashMap::new()),
        page_sources: Mutex::new(HashMap::new()),
        page_maps: Default::default(),
        conns: Mutex::new(HashMap::new()),
    });
    let metrics = match agent.config.metrics {
        Some(addr) => {
            let scraped = Arc::clone(&agent);
            let refresh = move || {
                let pages = i64::try_from(scraped.store.len()).unwrap_or(i64::MAX);
                crate::metrics::get().page_store_pages.set(pages);
            };
            let bound = crate::metrics::serve(addr, refresh)
                .map_err(|source| AgentError::Metrics { addr, source })?;
            tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
            Some(bound)
        }
        None => None,
    };
    tracing::info!(%local, store = %agent.config.store.display(), pages = agent.store.len(), "agent listening");
    ready(crate::Ready {
        listen: local,
        metrics,
    });
    let mut threads = Vec::new();
    let mut next_id = 0u64;
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut refusals = Refusals {
        since_log: 0,
        last: None,
    };
    let mut last_gc = Instant::now();
    collect_store(&agent);
    while !stop.load(Ordering::Relaxed) {
        if last_gc.elapsed() >= GC_EVERY {
            last_gc = Instant::now();
            collect_store(&agent);
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let held = match Held::take(&slots, peer.ip()) {
                    Ok(h) => h,
                    Err(why) => {
                        refusals.note(peer, why);
                        continue;
                    }
                };
                let _ = stream.set_nonblocking(false);
                next_id += 1;
                let id = next_id;
                if let (Ok(clone), Ok(mut conns)) = (stream.try_clone(), agent.conns.lock()) {
                    conns.insert(id, clone);
                }
                let served = Arc::clone(&agent);
                let secret = secret.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("ferry-conn-{id}"))
                    .spawn(move || {
                        if let Err(e) = serve(&served, stream, &secret, held) {
                            tracing::warn!(%peer, error = %ferry_image::units::chain(&e), "connection ended with an error");
                        }
                        if let Ok(mut conns) = served.conns.lock() {
                            conns.remove(&id);
                        }
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        // The closure, stream and slot are dropped with it.
                        if let Ok(mut conns) = agent.conns.lock() {
                            conns.remove(&id);
                        }
                        refusals.note(peer, &format!("cannot start a thread for it: {e}"));
                    }
                }
                threads.retain(|t| !t.is_finished());
            }
            // Wait for the next connection, waking at least every POLL to
            // see the stop flag.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        nix::libc::EMFILE
                            | nix::libc::ENFILE
                            | nix::libc::ENOBUFS
                            | nix::libc::ENOMEM
                    )
                ) =>
            {
                tracing::warn!(error = %e, "accept failed for want of resources; backing off");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(POLL);
            }
        }
    }
    if let Some(m) = &agent.ha {
        m.shutdown();
    }
    for t in ha_threads {
        let _ = t.join();
    }
    tracing::info!(open = threads.len(), "shutting down: closing connections");
    if let Ok(conns) = agent.conns.lock() {
        for c in conns.values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("agent stopped");
    Ok(())
}

fn serve(
    agent: &Agent,
    stream: TcpStream,
    secret: &Secret,
    mut held: Held,
) -> Result<(), AgentError> {
    let mut conn = Conn::accept(stream, secret, HANDSHAKE_TIMEOUT)?;
    held.authenticated();
    conn.set_read_timeout(Some(session::IDLE_TIMEOUT))?;
    match conn.recv_msg()? {
        Msg::Begin {
            session,
            target,
            expected_bytes,
            boot_id,
            host,
            gpu,
            kernel_proof,
        } => {
            let kernel_proof = prove_kernel(&boot_id, kernel_proof, &host);
            session::serve_control(
                agent,
                conn,
                session::Begin {
                    id: session,
                    target,
                    expected_bytes,
                    source_host: host,
                    same_kernel: kernel_proof.is_some(),
                    kernel_proof,
                    gpu,
                },
            )
        }
        Msg::Join { session } => session::serve_data(agent, conn, &session),
        Msg::Outcome { session } => {
            let decision = agent.outcomes.decide(&session);
            tracing::info!(session = %session, ?decision, "asked for a migration's outcome");
            let (committed, pid) = match decision {
                session::outcome::Decision::Committed(pid) => (true, pid),
                session::outcome::Decision::Aborted => (false, 0),
            };
            conn.send_msg(&Msg::Decided { committed, pid })?;
            Ok(())
        }
        Msg::PageSource { session } => {
            let known = agent
                .sessions
                .lock()
                .map(|s| s.contains_key(&session))
                .unwrap_or(false);
            if !known {
                conn.send_msg(&Msg::Error {
                    message: format!("no migration session '{session}' here"),
                })?;
                return Ok(());
            }
            // The session's restore takes it from here.
            conn.set_read_timeout(Some(session::IDLE_TIMEOUT))?;
            if let Ok(mut p) = agent.page_sources.lock() {
                p.insert(session, conn);
            }
            Ok(())
        }
        Msg::PageMap { session } => {
            conn.set_read_timeout(Some(session::IDLE_TIMEOUT))?;
            if let Err(e) = crate::final_map::receive(agent, &mut conn, session) {
                tracing::warn!(error = %ferry_image::units::chain(&e), "a final page map was refused");
            }
            Ok(())
        }
        Msg::Offer {
            service,
            checkpoint,
        } => match &agent.ha {
            Some(m) => {
                // Refusals are logged and answered there.
                let _ = crate::ha::replica::serve_offer(m, &mut conn, &service, checkpoint.into());
                Ok(())
            }
            None => {
                conn.send_msg(&Msg::Error {
                    message: "this agent is not a member of an HA cluster".into(),
                })?;
                Ok(())
            }
        },
        other => {
            conn.send_msg(&Msg::Error {
                message: format!(
                    "expected Begin, Join, Outcome, PageSource or Offer, got {}",
                    other.kind()
                ),
            })?;
            Ok(())
        }
    }
}

/// Blocks until `listener` has a connection to accept, a signal arrives,
/// or [`POLL`] passes.
fn wait_readable(listener: &TcpListener) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(POLL.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// One kernel is proved, not assumed from an equal boot id (VMs cloned
/// from one snapshot share it): the source's nonce must be readable here
/// where it says it holds it. Returns the answer to send back.
fn prove_kernel(
    boot: &str,
    locator: Option<ferry_transport::msg::ProofLocator>,
    source_host: &str,
) -> Option<String> {
    if boot.is_empty() || boot != boot_id() {
        return None;
    }
    let Some(at) = locator else {
        tracing::warn!(from = %source_host, "same boot id but no kernel proof offered: treated as another kernel");
        return None;
    };
    match ferry_sys::host::read_kernel_proof(at.pid, at.fd) {
        Ok(nonce) => Some(ferry_transport::msg::kernel_proof_answer(&nonce)),
        Err(e) => {
            tracing::warn!(from = %source_host, error = %e, "same boot id but the source's kernel proof is not readable here: treated as another kernel (a machine cloned from one snapshot?)");
            None
        }
    }
}

/// How often the page store's size is checked against its bound.
const GC_EVERY: Duration = Duration::from_secs(10);

/// Compacts the page store to half its bound once it is past it, while no
/// migration is being received (the sessions' table stays locked meanwhile,
/// so none begins).
fn collect_store(agent: &Agent) {
    let Some(max) = agent.config.store_max else {
        return;
    };
    let before = agent.store.bytes();
    if before <= max {
        return;
    }
    let Ok(sessions) = agent.sessions.lock() else {
        return;
    };
    if !sessions.is_empty() {
        return;
    }
    match agent.store.compact(max / 2) {
        Ok(dropped) => tracing::info!(
            before = before,
            after = agent.store.bytes(),
            dropped_pages = dropped,
            "page store past its bound: kept its newest pages"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot compact the page store"),
    }
    drop(sessions);
}
