//! A migration's data connections: page batches, each checked against its
//! digests, into the agent's page store.

use std::sync::atomic::Ordering;

use super::free_bytes;
use crate::server::Agent;
use crate::AgentError;
use ferry_transport::pages;
use ferry_transport::{Conn, Incoming, Msg, TransportError};

/// A data connection: page batches, each checked, into the store.
pub fn serve_data(agent: &Agent, mut conn: Conn, session: &str) -> Result<(), AgentError> {
    let counter = agent
        .sessions
        .lock()
        .ok()
        .and_then(|s| s.get(session).cloned());
    let Some(counter) = counter else {
        conn.send_msg(&Msg::Error {
            message: format!("no open session '{session}'"),
        })?;
        return Ok(());
    };
    conn.send_msg(&Msg::Accepted {
        host: agent.host.clone(),
        boot_id: agent.boot_id.clone(),
        free_bytes: free_bytes(&agent.config.store),
        kernel_proof: None,
    })?;
    loop {
        match conn.recv() {
            Ok(Some(Incoming::Pages(batch))) => {
                let (digests, data) = match pages::decode_batch(agent.store.key(), &batch) {
                    Ok(x) => x,
                    Err(e) => {
                        let message = format!("bad page batch: {e}");
                        conn.send_msg(&Msg::Error {
                            message: message.clone(),
                        })?;
                        return Err(TransportError::BadFrame {
                            peer: conn.peer().to_string(),
                            what: message,
                        }
                        .into());
                    }
                };
                if let Err(e) = agent.store.put_batch(&digests, data) {
                    let message = format!(
                        "cannot store pages in {}: {e}",
                        agent.store.path().display()
                    );
                    conn.send_msg(&Msg::Error { message })?;
                    return Ok(());
                }
                counter.fetch_add(digests.len() as u64, Ordering::Relaxed);
                crate::metrics::get()
                    .received_bytes
                    .inc_by(data.len() as u64);
            }
            Ok(Some(Incoming::Msg(Msg::Flush))) => {
                conn.send_msg(&Msg::Flushed {
                    pages: counter.load(Ordering::Relaxed),
                })?;
            }
            Ok(Some(other)) => {
                let what = format!("unexpected {other:?} on a data stream");
                conn.send_msg(&Msg::Error {
                    message: what.clone(),
                })?;
                return Err(TransportError::BadFrame {
                    peer: conn.peer().to_string(),
                    what,
                }
                .into());
            }
            Ok(None) | Err(TransportError::Closed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
