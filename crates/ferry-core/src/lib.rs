//! What ferry does to one application on one host: checkpoint and restore
//! it (a process tree, a runc or a Docker container), refuse what would
//! lose GPU state, read its memory live, and probe what the host can do.
//! Migration ([`ferry_migrate`](../ferry_migrate/index.html)) and the
//! agent with HA ([`ferry_agent`](../ferry_agent/index.html)) build on it.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod fault;
pub mod gpu;
pub mod live;
pub mod probe;
pub mod target;
