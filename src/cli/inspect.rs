//! `ferry inspect`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{exit, write_json, CliError};
use ferry_archive::inspect::{inspect, render_human};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An images directory or a ferry archive to inspect.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let report = inspect(&args.dir)?;
    if args.json {
        write_json(out, &report)?;
    } else {
        write!(out, "{}", render_human(&report))?;
    }
    Ok(exit::OK)
}
