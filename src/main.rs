//! The `ferry` binary: parse the command line, set up logging, run, map the
//! outcome to an exit status. The commands live in [`cli`]; what they do,
//! in the library crates under `crates/`.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use cli::{exit, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Everything ferry writes (images, archives, page stores, staging,
    // logs) holds application memory or keys: root-only, whatever umask
    // ferry was started with. Its children (CRIU, runc) inherit it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let parsed = cli::docs::command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // --help and --version are not errors.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(exit::OK);
            }
            if std::env::args().any(|a| a == "--json") {
                let message = e.render().to_string();
                let _ = cli::failure::write_usage_json(&mut std::io::stdout(), &message);
            } else {
                let _ = e.print();
            }
            return ExitCode::from(exit::USAGE);
        }
    };
    let default = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    // Not locked for the whole run: `pack -` streams the archive to stdout
    // from a writer thread.
    let mut out = std::io::stdout();
    let result = cli::run(&cli, &matches, &mut out);
    let _ = out.flush();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let kind = cli::failure::kind(&cli.command, &e);
            if cli.command.json() {
                let _ = cli::failure::write_json(&mut out, &cli.command, &e);
                let _ = out.flush();
            }
            // Always on stderr too, for the terminal and the logs.
            let criu_lines = e
                .criu_failure()
                .map(|c| c.log_errors().to_vec())
                .unwrap_or_default();
            let hint = cli::failure::hint(&e);
            eprintln!("error: {:#}", anyhow::Error::new(e));
            for line in criu_lines {
                eprintln!("  criu: {line}");
            }
            if let Some(hint) = hint {
                eprintln!("  hint: {hint}");
            }
            ExitCode::from(kind.exit_code())
        }
    }
}
