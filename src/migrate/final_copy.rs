//! The frozen phase: dump (left stopped), send what the destination lacks,
//! rebuild there, restore there, commit; or put the application back.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rayon::prelude::*;

use super::report::FinalReport;
use super::streams::PageSender;
use super::{Fate, FinalError, MigrateError, MigrateOptions, MigrateTarget};
use crate::checkpoint::{self, staging, CheckpointError};
use crate::criu::{Criu, DumpOutcome, DumpRequest, NoHooks, RestoreRequest};
use crate::image::dir::classify_name;
use crate::image::FileClass;
use crate::page::{self, Digest};
use crate::process;
use crate::target::runc::{self, RestoreFlags};
use crate::target::ContainerRef;
use crate::transport::msg::ImageEntry;
use crate::transport::pages::{self, ZERO_PAGE};
use crate::transport::{Conn, Msg, TransportError};
use crate::PAGE_SIZE;

/// Name prefix of the source's staging directories.
const STAGING_PREFIX: &str = "ferry-migrate-";
/// How much of a pages image is hashed before its new pages are handed
/// to the senders (the next block is hashed while they send).
const SEND_BLOCK: usize = 16 << 20;
/// How much of a block one task reads and hashes.
const HASH_CHUNK: usize = 1 << 20;
/// How long the source's killed pids may take to be reaped (same kernel).
const PID_FREE_WAIT: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The application being moved, as the final phase acts on it.
pub struct Source<'a> {
    pub target: &'a MigrateTarget,
    /// Root of its process tree (a container's init, as this host sees it).
    pub pid: i32,
}

impl Source<'_> {
    fn dump(&self, criu: &Criu, req: &DumpRequest) -> Result<DumpOutcome, CheckpointError> {
        match self.container() {
            None => checkpoint::dump(criu, req, &mut NoHooks),
            Some(c) => checkpoint::dump_container(criu, &c, req, &mut NoHooks).map(|o| o.dump),
        }
    }

    /// The container, unless the target is a plain process tree.
    fn container(&self) -> Option<ContainerRef> {
        match self.target {
            MigrateTarget::Process { .. } => None,
            MigrateTarget::Runc { id, root, .. } => Some(ContainerRef::Runc {
                id: id.clone(),
                root: root.clone(),
            }),
            MigrateTarget::Docker { name, socket, .. } => Some(ContainerRef::Docker {
                name: name.clone(),
                socket: socket.clone(),
            }),
        }
    }

    /// Ends the (stopped) source copy for good.
    fn kill(&self, pids: &[i32]) {
        match self.target {
            MigrateTarget::Process { .. } => process::kill_all(pids),
            MigrateTarget::Runc { id, root, .. } => {
                if let Err(e) = runc::delete(root, id) {
                    tracing::warn!(error = %e, "cannot delete the source container; killing its tasks");
                    process::kill_all(pids);
                }
            }
            MigrateTarget::Docker { name, socket, .. } => {
                if let Err(e) = crate::target::docker::remove(socket, name) {
                    tracing::warn!(error = %e, "cannot remove the source container; killing its tasks");
                    process::kill_all(pids);
                }
            }
        }
    }

    /// Same kernel, source gone, destination failed: restore here from the
    /// images that were sent. A stopped process holding one of the tree's
    /// pids can only be the destination's unfinished copy: it is killed.
    fn restore_here(
        &self,
        criu: &Criu,
        opts: &MigrateOptions,
        images: &Path,
        pids: &[i32],
    ) -> Fate {
        let restored = match self.container() {
            None => {
                for p in pids {
                    if matches!(process::ProcessInfo::read(*p), Ok(i) if i.is_stopped()) {
                        let _ = process::signal(*p, Signal::SIGKILL);
                    }
                    process::wait_pid_free(*p, PID_FREE_WAIT);
                }
                let req = RestoreRequest {
                    tcp_established: opts.restore.tcp_established,
                    shell_job: opts.restore.shell_job,
                    ext_unix_sk: opts.restore.ext_unix_sk,
                    file_locks: opts.restore.file_locks,
                    log_level: opts.restore.log_level,
                    log_file: "restore-fallback.log".into(),
                    ..RestoreRequest::new(images)
                };
                checkpoint::restore(criu, &req, &mut NoHooks).map(|o| o.pid)
            }
            Some(c) => checkpoint::restore_container(
                &c,
                checkpoint::Source::Dir(images),
                None,
                RestoreFlags {
                    tcp_established: opts.restore.tcp_established,
                    ext_unix_sk: opts.restore.ext_unix_sk,
                    file_locks: opts.restore.file_locks,
                    consume_images: false,
                },
            )
            .map(|o| o.pid),
        };
        match restored {
            Ok(pid) => Fate::RestoredHere { pid },
            Err(e) => Fate::Lost {
                images: images.to_path_buf(),
                why: crate::units::chain(&e),
            },
        }
    }
}

pub fn run(
    criu: &Criu,
    source: &Source<'_>,
    opts: &MigrateOptions,
    control: &mut Conn,
    sender: &mut PageSender,
    known: &mut HashSet<Digest>,
    same_kernel: bool,
) -> Result<(FinalReport, i32), MigrateError> {
    let pid = source.pid;
    let rss = process::tree_rss_bytes(pid).unwrap_or(0);
    staging::sweep_stale(STAGING_PREFIX, opts.staging.as_deref());
    let stage =
        staging::create(STAGING_PREFIX, rss, opts.staging.as_deref()).map_err(|source| {
            MigrateError::Staging {
                path: staging::base_for(rss, opts.staging.as_deref()),
                source,
            }
        })?;
    let images = stage.path().join("images");
    let req = DumpRequest {
        leave_stopped: true,
        tcp_established: opts.restore.tcp_established,
        shell_job: opts.restore.shell_job,
        ext_unix_sk: opts.restore.ext_unix_sk,
        file_locks: opts.restore.file_locks,
        log_level: opts.restore.log_level,
        ignore_gpu: opts.ignore_gpu,
        // Connections not yet accepted are left out; their clients retry.
        tcp_skip_in_flight: true,
        ..DumpRequest::new(pid, &images)
    };
    let mut report = FinalReport::default();
    let frozen_at = Instant::now();
    let pids = process::tree(pid).unwrap_or_else(|_| vec![pid]);
    let dumped = source
        .dump(criu, &req)
        .map_err(|e| MigrateError::Dump(Box::new(e)))?;
    report.dump_ms = ms(dumped.wall);
    report.criu_dump = dumped
        .stats
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok());

    // From here the source is stopped: every failure path decides its fate.
    let mut source_killed = false;
    let result = transfer_and_restore(
        opts,
        control,
        sender,
        known,
        &images,
        &mut report,
        same_kernel,
        source,
        &pids,
        &mut source_killed,
    );
    match result {
        Ok(restored) => {
            report.frozen_ms = ms(frozen_at.elapsed());
            if !source_killed {
                source.kill(&pids);
            }
            if let Some(keep) = &opts.keep_images {
                // The migration is done: a failed copy only costs the copy.
                if let Err(e) = copy_dir(&images, keep) {
                    tracing::error!(dir = %keep.display(), error = %e, "migrated, but cannot keep the images");
                }
            }
            Ok((report, restored))
        }
        Err(cause) => {
            let after = if !source_killed {
                process::continue_tree(pid);
                Fate::ResumedHere
            } else {
                source.restore_here(criu, opts, &images, &pids)
            };
            if let Fate::Lost { .. } = after {
                // Keep the images: they are all that is left.
                let _ = stage.keep();
            }
            Err(MigrateError::Final {
                after,
                source: cause,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn transfer_and_restore(
    opts: &MigrateOptions,
    control: &mut Conn,
    sender: &mut PageSender,
    known: &mut HashSet<Digest>,
    images: &Path,
    report: &mut FinalReport,
    same_kernel: bool,
    source: &Source<'_>,
    pids: &[i32],
    source_killed: &mut bool,
) -> Result<i32, FinalError> {
    let t = Instant::now();
    let wire_before = sender.wire_bytes() + control.sent_bytes();
    let files = image_files(images)?;
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for name in files {
        let path = images.join(&name);
        let io = |source| FinalError::Images {
            path: path.clone(),
            source,
        };
        let recipe = classify_name(&name) == FileClass::Pages;
        let (checksum, blob) = if recipe {
            let file = fs::File::open(&path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len() as usize;
            // One pass over the dump: each page's digest is also its
            // checksum leaf. Block by block, so that the pages of one block
            // are on the wire while the next is read and hashed; read with
            // pread, each MiB hashed while it is in cache (mapping the
            // whole image cost more than hashing it: ~0.1 s per GiB here).
            let mut leaves: Vec<u128> = Vec::with_capacity(len / PAGE_SIZE + 1);
            let mut digests: Vec<Digest> = Vec::with_capacity(len / PAGE_SIZE);
            let mut buf = vec![0u8; SEND_BLOCK.min(len)];
            let mut offset = 0;
            while offset < len {
                let block = &mut buf[..SEND_BLOCK.min(len - offset)];
                let hashed: Vec<Vec<(Digest, u128)>> = block
                    .par_chunks_mut(HASH_CHUNK)
                    .enumerate()
                    .map(|(i, chunk)| {
                        file.read_exact_at(chunk, (offset + i * HASH_CHUNK) as u64)?;
                        Ok(chunk
                            .chunks(pages::CHECKSUM_LEAF_BYTES)
                            .map(|p| match page::fingerprint(p) {
                                _ if p.len() < PAGE_SIZE => (ZERO_PAGE, pages::leaf_hash(p)),
                                Some(d) => (d, d),
                                None => (ZERO_PAGE, page::zero_page_digest()),
                            })
                            .collect())
                    })
                    .collect::<std::io::Result<_>>()
                    .map_err(io)?;
                for ((d, leaf), p) in hashed.into_iter().flatten().zip(block.chunks(PAGE_SIZE)) {
                    leaves.push(leaf);
                    if p.len() < PAGE_SIZE {
                        continue; // a tail: not a page
                    }
                    digests.push(d);
                    report.pages_in_images += 1;
                    if d == ZERO_PAGE {
                        report.zero_pages += 1;
                    } else if known.insert(d) {
                        sender.push(d, p)?;
                        report.pages_sent += 1;
                    }
                }
                offset += block.len();
            }
            (
                pages::combine_leaves(&leaves),
                pages::encode_digests(&digests),
            )
        } else {
            let bytes = fs::read(&path).map_err(io)?;
            (pages::file_checksum(&bytes), bytes)
        };
        let checksum = format!("{checksum:032x}");
        entries.push(ImageEntry {
            name,
            size: fs::metadata(&path).map_err(io)?.len(),
            checksum,
            recipe,
        });
        blobs.push(blob);
    }
    let queued = t.elapsed();
    sender.flush()?;
    tracing::debug!(
        queued_ms = ms(queued),
        flushed_ms = ms(t.elapsed()),
        "final copy: pages hashed and queued, then all sent"
    );
    control.send_msg(&Msg::Images { files: entries })?;
    for b in &blobs {
        control.send_blob(b)?;
    }
    report.wire_bytes = sender.wire_bytes() + control.sent_bytes() - wire_before;
    report.transfer_ms = ms(t.elapsed());

    control.send_msg(&Msg::Rebuild)?;
    match control.recv_msg()? {
        Msg::Rebuilt {
            ms, pages_in_place, ..
        } => {
            report.rebuild_ms = ms;
            report.pages_in_place = pages_in_place;
        }
        other => return Err(unexpected(control, other, "Rebuilt")),
    }
    if same_kernel {
        // One pid space (a process tree needs its pids) and one cgroup
        // tree (a container needs its cgroups): the source goes first.
        // A tree whose root is the init of a pid namespace of its own (a
        // container, or a process tree started so) comes back in a new
        // namespace: its pids here need not be free, and waiting for them
        // would wait for whoever reaps the killed init (a slow PID 1 here
        // took about 1.3 s).
        let t = Instant::now();
        let own_pid_ns = pids
            .first()
            .is_some_and(|&p| process::is_pid_namespace_init(p));
        source.kill(pids);
        *source_killed = true;
        if !own_pid_ns {
            for p in pids {
                process::wait_pid_free(*p, PID_FREE_WAIT);
            }
        }
        report.pid_wait_ms = ms(t.elapsed());
    }
    control.send_msg(&Msg::Restore {
        opts: opts.restore.clone(),
    })?;
    let restored = match control.recv_msg()? {
        Msg::Restored { pid, ms, stats } => {
            report.restore_ms = ms;
            report.criu_restore = stats;
            pid
        }
        other => return Err(unexpected(control, other, "Restored")),
    };
    let t = Instant::now();
    control.send_msg(&Msg::Commit)?;
    match control.recv_msg()? {
        Msg::Committed => {}
        other => return Err(unexpected(control, other, "Committed")),
    }
    report.commit_ms = ms(t.elapsed());
    Ok(restored)
}

fn unexpected(control: &Conn, got: Msg, expected: &'static str) -> FinalError {
    FinalError::Transport(TransportError::Unexpected {
        peer: control.peer().to_string(),
        got: format!("{got:?}"),
        expected,
    })
}

/// The image files to send (CRIU's logs stay here).
fn image_files(dir: &Path) -> Result<Vec<String>, FinalError> {
    let io = |source| FinalError::Images {
        path: dir.to_path_buf(),
        source,
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| classify_name(n) != FileClass::Log)
        .collect();
    names.sort();
    Ok(names)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}
