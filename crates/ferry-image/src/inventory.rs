//! `inventory.img`: the first file CRIU reads; its image version says which
//! format the directory uses.

use std::path::Path;

use criu_proto as pb;

use super::framing::{self, Magic};
use super::{ImageError, Problem};

/// The only image format version CRIU has written since v1.4 (`CRTOOLS_IMAGES_V1_1`).
pub(crate) const IMAGES_V1_1: u32 = 2;

/// The inventory of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub img_version: u32,
    /// Kernel uptime at dump time, in microseconds (CRIU 3.x+).
    pub dump_uptime_us: Option<u64>,
    /// CRIU plugins that took part in the dump (e.g. "cuda_plugin").
    pub plugins: Vec<String>,
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<Inventory, ImageError> {
    let inv: pb::InventoryEntry =
        framing::decode_one(path, bytes, Magic::Inventory, "inventory_entry")?;
    if inv.img_version != IMAGES_V1_1 {
        return Err(ImageError::Inconsistent {
            path: path.to_path_buf(),
            problem: Problem::Version {
                found: inv.img_version,
                expected: IMAGES_V1_1,
            },
        });
    }
    Ok(Inventory {
        img_version: inv.img_version,
        dump_uptime_us: inv.dump_uptime,
        plugins: inv.plugins_entry.map(|p| p.plugins).unwrap_or_default(),
    })
}
