//! What operators and scripts rely on: the version, shell completions,
//! manual pages, the agent as a service (environment, config file,
//! readiness) and its metrics.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_version_names_the_commit_the_formats_and_the_criu_needed() {
    let long = ferry(["--version"]).run().ok();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    assert!(head.status.success(), "the tests run in a git checkout");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(long.starts_with("ferry 0."), "{long}");
    assert!(long.contains(&format!("commit: {head}")), "{long}");
    for line in ["archive format: ", "wire protocol: ", "CRIU: >= 4.2"] {
        assert!(long.contains(line), "no '{line}' in:\n{long}");
    }
    let short = ferry(["-V"]).run().ok();
    assert!(short.contains(&head), "{short}");
}

/// The bash completion script loads in bash and completes commands and
/// flags.
#[test]
fn bash_completions_load_and_complete() {
    let script = ferry(["completions", "bash"]).run().ok();
    let dir = scratch("completions");
    let file = dir.path().join("ferry.bash");
    std::fs::write(&file, script).unwrap();
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "set -e; source {file}; complete -p ferry >/dev/null; \
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT={point}; \
             _ferry ferry '{last}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display(),
            words = words.join(" "),
            cword = words.len() - 1,
            point = line.len(),
            last = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "bash could not load the completions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let commands = complete("ferry mig");
    assert!(commands.lines().any(|l| l == "migrate"), "{commands}");
    let flags = complete("ferry migrate --max-d");
    assert!(flags.lines().any(|l| l == "--max-downtime"), "{flags}");
}

/// One manual page per command (roff, with its name and options).
#[test]
fn manual_pages_are_written_for_every_command() {
    let dir = scratch("man");
    let listed = ferry(["man"]).arg(dir.path()).run().ok();
    for page in [
        "ferry.1",
        "ferry-migrate.1",
        "ferry-ha-run.1",
        "ferry-agent.1",
    ] {
        let path = dir.path().join(page);
        assert!(listed.contains(&path.display().to_string()), "{listed}");
        let roff = std::fs::read_to_string(&path).unwrap();
        let name = page.trim_end_matches(".1");
        assert!(roff.contains(&format!(".TH {name} 1")), "{page}:\n{roff}");
    }
    let migrate = std::fs::read_to_string(dir.path().join("ferry-migrate.1")).unwrap();
    assert!(migrate.contains("max\\-downtime"), "{migrate}");
    // Internal commands get no page.
    assert!(!dir.path().join("ferry-guard.1").exists());
}
