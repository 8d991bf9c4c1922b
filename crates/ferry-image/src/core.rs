//! `core-<tid>.img`: per-task state. ferry reads the command name and the
//! architecture; registers and signals stay CRIU's business.

use std::path::Path;

use criu_proto as pb;

use super::framing::{self, CORE};
use super::ImageError;

/// What ferry reads from a task's core image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCore {
    /// The task's `comm` (at most 15 bytes, as the kernel keeps it).
    pub comm: String,
    /// CRIU's name for the architecture the task was dumped on.
    pub arch: &'static str,
    /// CRIU's task state (`TASK_ALIVE`, `TASK_DEAD` for zombies, ...).
    pub state: u32,
}

/// `task_state` of a live task (criu/include/image.h).
pub(crate) const TASK_ALIVE: u32 = 1;
/// `task_state` of a zombie: it has no memory images.
pub(crate) const TASK_DEAD: u32 = 2;
/// `task_state` of a stopped task.
pub(crate) const TASK_STOPPED: u32 = 3;

impl TaskCore {
    /// Alive or stopped tasks own memory (mm and pagemap images); zombies don't.
    pub fn has_memory(&self) -> bool {
        matches!(self.state, TASK_ALIVE | TASK_STOPPED)
    }
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<TaskCore, ImageError> {
    let core: pb::CoreEntry = framing::decode_one(path, bytes, CORE, "core_entry")?;
    let arch = pb::core_entry::March::try_from(core.mtype)
        .map(|m| m.as_str_name())
        .unwrap_or("UNKNOWN");
    let (comm, state) = core
        .tc
        .map(|tc| (tc.comm, tc.task_state))
        .unwrap_or_default();
    Ok(TaskCore { comm, arch, state })
}
