//! `ferry import`: a standard checkpoint archive (podman's `container
//! checkpoint --export`, CRI-O's, the kubelet's) into a ferry archive.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::pack::{describe_pack, PackFlags};
use super::progress::Bar;
use super::{exit, write_json, CliError};
use ferry_core::checkpoint;
use ferry_image::units::{bytes, millis};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The checkpoint archive (a tar, plain or zstd-compressed, holding
    /// `checkpoint/`, `config.dump`, `spec.dump`, `rootfs-diff.tar`, ...).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The ferry archive to write.
    #[arg(value_name = "ARCHIVE")]
    pub archive: PathBuf,
    #[command(flatten)]
    pub flags: PackFlags,
    /// Directory for the unpacked images meanwhile (default: tmpfs when
    /// it has room).
    #[arg(long, value_name = "DIR")]
    pub staging: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ImportArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let size = std::fs::metadata(&args.file).map_or(0, |m| m.len());
    let bar = Bar::new(size, "packing");
    let opts = args
        .flags
        .options(format!("import of {}", args.file.display()), &bar);
    let r = checkpoint::import_standard(&args.file, &args.archive, &opts, args.staging.as_deref())?;
    bar.finish();
    if args.json {
        write_json(out, &r)?;
        return Ok(exit::OK);
    }
    writeln!(
        out,
        "Imported {} ({}, {} compression): {} CRIU images{}{}; read in {}",
        args.file.display(),
        bytes(r.source_bytes),
        r.compression,
        r.images,
        if r.layer {
            format!(
                ", the container's writable layer ({} deletions)",
                r.deleted_files
            )
        } else {
            String::new()
        },
        if r.engine_files.is_empty() {
            String::new()
        } else {
            format!(", the engine's {}", r.engine_files.join(", "))
        },
        millis(r.read)
    )?;
    if !r.passed_over.is_empty() {
        writeln!(out, "  passed over: {}", r.passed_over.join(", "))?;
    }
    if let Some(p) = &r.pack {
        writeln!(
            out,
            "  {}",
            describe_pack(p, &args.archive.display().to_string()).replace('\n', "\n  ")
        )?;
    }
    Ok(exit::OK)
}
