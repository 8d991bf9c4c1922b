//! `ferry inspect`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{exit, write_json, CliError};
use ferry_archive::inspect::{inspect, render_human};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An images directory, a ferry archive, or a standard checkpoint
    /// archive (podman's export, CRI-O's) to inspect.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    // A standard checkpoint archive (podman's, CRI-O's) is read through a
    // staging directory; a ferry archive or an images directory directly.
    let report = if ferry_core::checkpoint::is_standard(&args.dir) {
        let need = std::fs::metadata(&args.dir).map_or(0, |m| m.len()) * 4;
        let stage = ferry_core::checkpoint::staging::create("ferry-inspect-", need, None)?;
        let dir = stage.path().join("images");
        ferry_core::checkpoint::unpack_standard(&args.dir, &dir)?;
        let mut report = inspect(&dir)?;
        // The staging directory goes with this command: name the tar.
        report.images_dir = format!("{} (a standard checkpoint archive)", args.dir.display());
        report
    } else {
        inspect(&args.dir)?
    };
    if args.json {
        write_json(out, &report)?;
    } else {
        write!(out, "{}", render_human(&report))?;
    }
    Ok(exit::OK)
}
