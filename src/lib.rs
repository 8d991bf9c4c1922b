//! ferry: checkpoint, migrate and keep alive running Linux applications by
//! talking to CRIU directly.
//!
//! One module per concern:
//! - [`criu`]: the CRIU RPC client (`criu swrk` or a `criu service` socket).
//! - [`image`]: reading and validating CRIU image files (the only place that
//!   sees raw image protobufs besides `criu`).
//! - [`inspect`]: the dump-size report built from an images directory.
//! - [`probe`]: what this host can do (CRIU, kernel features, engines, NVML).
//! - [`process`]: live process trees seen through `/proc`.
//! - [`workload`]: the bundled stateful test workload's memory layout and report.
//! - [`sys`]: every direct syscall and every `unsafe` block.
//! - [`archive`]: ferry's compressed, deduplicated checkpoint archives.
//! - [`bench`]: `ferry bench` measurements.
//! - [`page`]: page contents (zero detection, digests).
//! - [`live`]: reading a running process's memory for pre-copy.
//! - [`transport`]: authenticated, checksummed frames between source and agent.
//! - [`cli`]: the command-line contract (flags, output, exit codes).

pub mod agent;
pub mod archive;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod criu;
pub mod fault;
pub mod gpu;
pub mod ha;
pub mod image;
pub mod inspect;
pub mod lab;
pub mod live;
pub mod migrate;
pub mod page;
pub mod probe;
pub mod process;
pub mod sys;
pub mod target;
pub mod transport;
pub mod units;
pub mod workload;

/// Size of a memory page as CRIU writes it in page images (x86-64, arm64 4K).
pub const PAGE_SIZE: usize = 4096;
