//! What ferry says about itself: `--version`, shell completions and
//! manual pages, all generated from the one command-line definition.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};

use super::{exit, Cli, CliError};

/// `ferry --version`: the commit, the formats and the CRIU ferry needs.
pub fn long_version() -> String {
    let criu = ferry_core::probe::MIN_TESTED_VERSION_CODE;
    format!(
        "{version}\ncommit: {commit} ({date})\narchive format: {amaj}.{amin}\nwire protocol: {wire}\nCRIU: >= {cmaj}.{cmin} (over its RPC socket)",
        version = env!("CARGO_PKG_VERSION"),
        commit = env!("FERRY_COMMIT"),
        date = env!("FERRY_COMMIT_DATE"),
        amaj = ferry_archive::format::VERSION_MAJOR,
        amin = ferry_archive::format::VERSION_MINOR,
        wire = ferry_transport::frame::VERSION,
        cmaj = criu / 10_000,
        cmin = criu / 100 % 100,
    )
}

/// `ferry -V`: the version and the commit.
pub fn short_version() -> String {
    format!("{} ({})", env!("CARGO_PKG_VERSION"), env!("FERRY_COMMIT"))
}

/// The command-line definition with its version texts.
pub fn command() -> clap::Command {
    Cli::command()
        .version(short_version())
        .long_version(long_version())
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `ferry completions SHELL`: the completion script on stdout
/// (bash: `source <(ferry completions bash)`, or install it into
/// /usr/share/bash-completion/completions/ferry).
pub fn completions(args: &CompletionsArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let mut cmd = command();
    clap_complete::generate(args.shell, &mut cmd, "ferry", out);
    Ok(exit::OK)
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write the pages into (ferry.1, ferry-dump.1, ...).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `ferry man DIR`: one manual page per command, subcommands included.
pub fn man(args: &ManArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    std::fs::create_dir_all(&args.dir)?;
    let mut cmd = command();
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, "ferry", &args.dir, &mut written)?;
    for path in &written {
        writeln!(out, "{}", path.display())?;
    }
    Ok(exit::OK)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).render(&mut roff)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, roff)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_names_commit_formats_and_criu() {
        let v = long_version();
        assert!(v.contains("commit: "), "{v}");
        assert!(v.contains("archive format: 2."), "{v}");
        assert!(v.contains("wire protocol: "), "{v}");
        assert!(v.contains("CRIU: >= 4.2"), "{v}");
    }
}
