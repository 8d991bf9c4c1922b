//! Learning a migration's outcome when the destination's answer to
//! `Restore` or `Commit` was lost: the source stays stopped and asks the
//! agent again, on new connections, until it answers (the agent decides a
//! session once and journals it: see the agent's `session::outcome`).

use std::time::{Duration, Instant};

use ferry_transport::{Conn, Msg, Secret, TransportError};

/// How long a source waits for the destination's answer before it leaves
/// the application stopped and says how to settle it.
pub const OUTCOME_WAIT: Duration = Duration::from_secs(60);
/// Between two tries.
const RETRY: Duration = Duration::from_millis(200);
/// One try's connection and answer.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the destination decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The application runs there as `pid`.
    Committed { pid: i32 },
    /// Nothing of it runs there (any copy was removed before the answer).
    Aborted,
}

/// Asks the agent at `to` for session `session`'s outcome, trying again
/// until `wait` has passed; the last error if it never answered.
pub fn ask(
    to: &str,
    secret: &Secret,
    session: &str,
    wait: Duration,
) -> Result<Outcome, TransportError> {
    let deadline = Instant::now() + wait;
    loop {
        match ask_once(to, secret, session) {
            Ok(o) => return Ok(o),
            Err(e) if Instant::now() + RETRY >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "the destination did not answer the outcome yet");
                std::thread::sleep(RETRY);
            }
        }
    }
}

fn ask_once(to: &str, secret: &Secret, session: &str) -> Result<Outcome, TransportError> {
    let mut conn = Conn::connect(to, secret, TRY_TIMEOUT)?;
    conn.set_read_timeout(Some(TRY_TIMEOUT))?;
    conn.send_msg(&Msg::Outcome {
        session: session.to_string(),
    })?;
    match conn.recv_msg()? {
        Msg::Decided {
            committed: true,
            pid,
        } => Ok(Outcome::Committed { pid }),
        Msg::Decided {
            committed: false, ..
        } => Ok(Outcome::Aborted),
        other => Err(TransportError::Unexpected {
            peer: to.to_string(),
            got: format!("{other:?}"),
            expected: "Decided",
        }),
    }
}
