//! `stats-dump` and `stats-restore`: CRIU's own timings and page counters.

use std::path::Path;
use std::time::Duration;

use criu_proto as pb;
use serde::Serialize;

use super::framing::{self, STATS};
use super::ImageError;

/// CRIU's statistics of one dump. Times as CRIU measured them (µs resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DumpStats {
    /// Time to freeze the tree.
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub freezing: Duration,
    /// How long the tree stayed frozen.
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub frozen: Duration,
    /// Time to collect memory (parasite drain) while frozen.
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub memdump: Duration,
    /// Time to write memory to images.
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub memwrite: Duration,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
}

/// CRIU's statistics of one restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RestoreStats {
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub forking: Duration,
    #[serde(serialize_with = "crate::units::serde_micros")]
    pub restore: Duration,
    pub pages_compared: u64,
    pub pages_skipped_cow: u64,
    pub pages_restored: Option<u64>,
}

fn micros(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

fn read_entry(path: &Path) -> Result<pb::StatsEntry, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError::io(path, e))?;
    parse_entry(path, &bytes)
}

fn parse_entry(path: &Path, bytes: &[u8]) -> Result<pb::StatsEntry, ImageError> {
    framing::decode_one(path, bytes, STATS, "stats_entry")
}

impl DumpStats {
    /// Reads a `stats-dump` file; `Ok(None)` if it holds no dump section.
    pub fn read(path: &Path) -> Result<Option<DumpStats>, ImageError> {
        Ok(read_entry(path)?.dump.map(DumpStats::from))
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Option<DumpStats>, ImageError> {
        Ok(parse_entry(path, bytes)?.dump.map(DumpStats::from))
    }
}

impl From<pb::DumpStatsEntry> for DumpStats {
    fn from(d: pb::DumpStatsEntry) -> Self {
        DumpStats {
            freezing: micros(d.freezing_time),
            frozen: micros(d.frozen_time),
            memdump: micros(d.memdump_time),
            memwrite: micros(d.memwrite_time),
            pages_scanned: d.pages_scanned,
            pages_skipped_parent: d.pages_skipped_parent,
            pages_written: d.pages_written,
            pages_lazy: d.pages_lazy,
        }
    }
}

impl RestoreStats {
    /// Reads a `stats-restore` file; `Ok(None)` if it holds no restore section.
    pub fn read(path: &Path) -> Result<Option<RestoreStats>, ImageError> {
        Ok(read_entry(path)?.restore.map(RestoreStats::from))
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Option<RestoreStats>, ImageError> {
        Ok(parse_entry(path, bytes)?.restore.map(RestoreStats::from))
    }
}

impl From<pb::RestoreStatsEntry> for RestoreStats {
    fn from(r: pb::RestoreStatsEntry) -> Self {
        RestoreStats {
            forking: micros(r.forking_time),
            restore: micros(r.restore_time),
            pages_compared: r.pages_compared,
            pages_skipped_cow: r.pages_skipped_cow,
            pages_restored: r.pages_restored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::path::PathBuf;

    #[test]
    fn decodes_dump_stats() {
        let entry = pb::StatsEntry {
            dump: Some(pb::DumpStatsEntry {
                freezing_time: 10,
                frozen_time: 6000,
                memdump_time: 4000,
                memwrite_time: 3000,
                pages_scanned: 100,
                pages_skipped_parent: 0,
                pages_written: 90,
                irmap_resolve: None,
                pages_lazy: 0,
            }),
            restore: None,
        };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&framing::IMG_SERVICE_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&framing::STATS_MAGIC.to_le_bytes());
        let payload = entry.encode_to_vec();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let s = DumpStats::parse(&PathBuf::from("stats-dump"), &bytes)
            .unwrap()
            .unwrap();
        assert_eq!(s.frozen, Duration::from_millis(6));
        assert_eq!(s.pages_written, 90);
    }
}
