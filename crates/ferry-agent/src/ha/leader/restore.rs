//! A new leader starting its copy from the newest checkpoint it holds.

use super::super::keys::ServiceSpec;
use super::super::member::Member;
use super::super::replica::{self};
use super::*;
use ferry_archive::NoProgress;

impl ServiceRun {
    /// After fencing: restores this host's own newest checkpoint (the
    /// leader keeps its archives). Returns whether the service runs again.
    pub(super) fn restore_own(&mut self, m: &Member, spec: &ServiceSpec) -> bool {
        let Some(l) = self.leading.as_mut() else {
            return false;
        };
        let (Some(cp), Some(path)) = (l.last.clone(), l.chain.last().map(|k| k.path.clone()))
        else {
            tracing::error!(service = %self.name, "fenced before any checkpoint: resigning");
            return false;
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        l.copy.delete();
        // Unpacked under the agent's staging prefix (swept if it is killed).
        let restored = ferry_archive::Chain::open(&path, None)
            .map_err(|e| ferry_image::units::chain(&e))
            .and_then(|chain| {
                let size = chain.head().index().files.iter().map(|f| f.size).sum();
                let stage =
                    ferry_core::checkpoint::staging::create(replica::STAGING_PREFIX, size, None)
                        .map_err(|e| e.to_string())?;
                ferry_archive::unpack(&chain, stage.path(), threads, &NoProgress)
                    .map_err(|e| ferry_image::units::chain(&e))?;
                l.copy
                    .restore(spec, stage.path(), &m.criu)
                    .map_err(|e| ferry_image::units::chain(&e))
            });
        match restored {
            Ok((pid, _)) => {
                tracing::warn!(service = %self.name, generation = cp.generation, pid, "fenced copy brought back from this host's newest checkpoint");
                l.address.restored_generation = cp.generation;
                l.address.restored_taken_unix_ms = cp.taken_unix_ms;
                m.lead_copy(&self.name, l.copy.clone(), l.token);
                true
            }
            Err(e) => {
                tracing::error!(service = %self.name, error = %e, "cannot restore this host's own checkpoint: resigning");
                false
            }
        }
    }
}
