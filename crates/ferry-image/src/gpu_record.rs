//! The GPU state a checkpoint carries: ferry's own record beside CRIU's
//! images ([`RECORD_FILE`]), written by the dump, stored in archives,
//! shown by inspect and checked by a restore against the host's GPUs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File beside the images recording the GPU state a checkpoint carries.
pub const RECORD_FILE: &str = "ferry-gpu.json";

/// What carried a checkpoint's GPU state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CarriedBy {
    /// NVIDIA's `cuda-checkpoint`, driven by ferry around the dump.
    CudaCheckpoint,
    /// CRIU's CUDA plugin.
    CriuCudaPlugin,
    /// Nothing: `--ignore-gpu` dropped it (the restored processes have a
    /// broken GPU context).
    Ignored,
}

impl CarriedBy {
    /// The name records and reports use.
    pub fn name(self) -> &'static str {
        match self {
            CarriedBy::CudaCheckpoint => "cuda-checkpoint",
            CarriedBy::CriuCudaPlugin => "criu-cuda-plugin",
            CarriedBy::Ignored => "ignored",
        }
    }

    /// The carrier a name stands for.
    pub fn from_name(name: &str) -> Option<CarriedBy> {
        [
            CarriedBy::CudaCheckpoint,
            CarriedBy::CriuCudaPlugin,
            CarriedBy::Ignored,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }
}

impl std::fmt::Display for CarriedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The GPU state a checkpoint carries, stored with it and shown by inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// The processes whose GPU state was carried (host pids at dump time).
    pub pids: Vec<i32>,
    pub model: String,
    pub count: u32,
    pub uuids: Vec<String>,
    /// GPU memory the checkpointed processes held, per device UUID.
    pub memory_in_use: Vec<(String, u64)>,
    pub driver_version: String,
    pub cuda_version: Option<String>,
    pub carried_by: CarriedBy,
}

/// A GPU record that cannot be read: never taken for "no GPU state",
/// which would skip the restore's compatibility check.
#[derive(Debug, thiserror::Error)]
pub enum GpuRecordError {
    #[error("cannot read the GPU record {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the GPU record {} is damaged", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown GPU state carrier '{0}'")]
    UnknownCarrier(String),
}

impl GpuRecord {
    pub fn total_memory(&self) -> u64 {
        self.memory_in_use.iter().map(|(_, m)| m).sum()
    }

    /// Reads the record stored with an images directory: `None` when the
    /// checkpoint carries no GPU state (no record), an error naming the
    /// file when the record is there but cannot be read.
    pub fn read(dir: &Path) -> Result<Option<GpuRecord>, GpuRecordError> {
        let path = dir.join(RECORD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(GpuRecordError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| GpuRecordError::Parse { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_none_and_damaged_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(GpuRecord::read(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(RECORD_FILE), b"{\"pids\": [1").unwrap();
        let e = GpuRecord::read(dir.path()).unwrap_err();
        assert!(e.to_string().contains(RECORD_FILE), "{e}");
        let record = GpuRecord {
            pids: vec![7],
            model: "H100".into(),
            count: 1,
            uuids: vec!["GPU-1".into()],
            memory_in_use: vec![("GPU-1".into(), 1 << 30)],
            driver_version: "550".into(),
            cuda_version: None,
            carried_by: CarriedBy::CudaCheckpoint,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            json.contains("\"carried_by\":\"cuda-checkpoint\""),
            "{json}"
        );
        std::fs::write(dir.path().join(RECORD_FILE), json).unwrap();
        assert_eq!(GpuRecord::read(dir.path()).unwrap(), Some(record));
        for c in ["cuda-checkpoint", "criu-cuda-plugin", "ignored"] {
            assert_eq!(CarriedBy::from_name(c).unwrap().name(), c);
        }
        assert!(CarriedBy::from_name("magic").is_none());
    }
}
