//! The listener: accept, authenticate, dispatch; clean shutdown on SIGTERM.

use ferry_sys::host::{boot_id, hostname};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::session;
use super::store::PageStore;
use super::{AgentConfig, AgentError};
use ferry_transport::{Conn, Msg, Secret};

/// Time a peer has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(50);

/// State shared by every connection of an agent.
pub struct Agent {
    pub config: AgentConfig,
    pub store: PageStore,
    pub host: String,
    pub boot_id: String,
    /// Sessions open now: id -> pages received on its data streams.
    pub sessions: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Post-copy page-source connections, by session, until its restore
    /// takes them.
    pub page_sources: Mutex<HashMap<String, Conn>>,
    /// Membership of an HA cluster, when the agent joined one.
    pub ha: Option<Arc<crate::ha::Member>>,
    conns: Mutex<HashMap<u64, TcpStream>>,
}

/// Runs an agent until SIGTERM/SIGINT. `ready` receives the bound address
/// (useful with port 0).
pub fn run(
    config: AgentConfig,
    ready: &mut dyn FnMut(std::net::SocketAddr),
) -> Result<(), AgentError> {
    let secret = Secret::from_file(&config.key)?;
    let store = PageStore::open(&config.store).map_err(|source| AgentError::Store {
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
    let agent = Arc::new(Agent {
        ha,
        host: hostname(),
        boot_id: boot_id(),
        store,
        config,
        sessions: Mutex::new(HashMap::new()),
        page_sources: Mutex::new(HashMap::new()),
        conns: Mutex::new(HashMap::new()),
    });
    tracing::info!(%local, store = %agent.config.store.display(), pages = agent.store.len(), "agent listening");
    ready(local);
    let mut threads = Vec::new();
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                next_id += 1;
                let id = next_id;
                if let (Ok(clone), Ok(mut conns)) = (stream.try_clone(), agent.conns.lock()) {
                    conns.insert(id, clone);
                }
                let agent = Arc::clone(&agent);
                let secret = secret.clone();
                threads.push(std::thread::spawn(move || {
                    if let Err(e) = serve(&agent, stream, &secret) {
                        tracing::warn!(%peer, error = %ferry_image::units::chain(&e), "connection ended with an error");
                    }
                    if let Ok(mut conns) = agent.conns.lock() {
                        conns.remove(&id);
                    }
                }));
                threads.retain(|t| !t.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => tracing::warn!(error = %e, "accept failed"),
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

fn serve(agent: &Agent, stream: TcpStream, secret: &Secret) -> Result<(), AgentError> {
    let mut conn = Conn::accept(stream, secret, HANDSHAKE_TIMEOUT)?;
    conn.set_read_timeout(Some(session::IDLE_TIMEOUT))?;
    match conn.recv_msg()? {
        Msg::Begin {
            session,
            target,
            expected_bytes,
            boot_id,
            host,
            gpu,
        } => session::serve_control(
            agent,
            conn,
            session::Begin {
                id: session,
                target,
                expected_bytes,
                source_host: host,
                same_kernel: !boot_id.is_empty() && boot_id == self::boot_id(),
                gpu,
            },
        ),
        Msg::Join { session } => session::serve_data(agent, conn, &session),
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
                    "expected Begin, Join, PageSource or Offer, got {}",
                    other.kind()
                ),
            })?;
            Ok(())
        }
    }
}
