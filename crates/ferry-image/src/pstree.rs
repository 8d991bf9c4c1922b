//! `pstree.img`: the dumped processes, their parents, groups and threads.

use std::collections::HashSet;
use std::path::Path;

use criu_proto as pb;
use serde::Serialize;

use super::framing::{self, PSTREE};
use super::{ImageError, Problem};

/// One dumped process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PstreeEntry {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub threads: Vec<u32>,
}

/// Decodes and validates `pstree.img` (root first, as CRIU writes it).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<PstreeEntry>, ImageError> {
    let raw: Vec<pb::PstreeEntry> = framing::decode_all(path, bytes, PSTREE, "pstree_entry")?;
    let inconsistent = |problem| ImageError::Inconsistent {
        path: path.to_path_buf(),
        problem,
    };
    if raw.is_empty() {
        return Err(inconsistent(Problem::EmptyTree));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for e in raw {
        if !seen.insert(e.pid) {
            return Err(inconsistent(Problem::DuplicatePid { pid: e.pid }));
        }
        out.push(PstreeEntry {
            pid: e.pid,
            ppid: e.ppid,
            pgid: e.pgid,
            sid: e.sid,
            threads: e.threads,
        });
    }
    Ok(out)
}
