//! The commit protocol with answers lost and ends crashing: an ordinary
//! program (a Python counter writing to a file, no setsid of its own) runs
//! in exactly one place after each. The agent runs in a pid namespace of
//! its own, so it is "another host" (the source stays stopped, not killed,
//! until the outcome is known).

mod common;

use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::program::FileCounter;
use common::*;

/// An agent in a pid namespace of its own, with `env` for it.
fn other_host_agent(dir: &std::path::Path, env: &[&str]) -> AgentProc {
    other_host_agent_at(dir, env, "127.0.0.1:0")
}

fn other_host_agent_at(dir: &std::path::Path, env: &[&str], listen: &str) -> AgentProc {
    let mut wrapper = vec!["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    if !env.is_empty() {
        wrapper.push("env");
        wrapper.extend_from_slice(env);
    }
    AgentProc::start_wrapped_at(dir, &wrapper, listen)
}

fn migrate(pid: i32, agent: &AgentProc) -> Cmd {
    ferry(["migrate", "--shell-job", "--json", "--timeout", "20s"])
        .args_from(["--pid", &pid.to_string(), "--to", &agent.addr])
        .arg("--key")
        .arg(&agent.key)
}

/// The destination commits, but its `Committed` never reaches the source:
/// the source asks again, learns it committed, and ends its own copy; it
/// never resumes it.
#[test]
fn a_lost_committed_is_asked_for_and_the_source_is_not_resumed() {
    require_criu();
    let dir = scratch("commit-lost");
    let agent = other_host_agent(dir.path(), &["FERRY_FAULT=agent-drop-committed"]);
    let mut p = FileCounter::start(dir.path(), 0);
    let run = migrate(p.pid, &agent).run();
    p.reap_shell();
    let report = run.json();
    assert_eq!(report["same_kernel"].as_bool(), Some(false), "{report}");
    assert!(
        run.stderr().contains("its answer had been lost"),
        "{}",
        run.stderr()
    );
    assert!(
        agent.wait_for("asked for a migration's outcome", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    assert_eq!(p.state(), None, "the source still exists");
    assert!(p.counts_on(), "the copy does not count on\n{}", agent.log());
}

/// The source dies right after sending `Commit`: the destination commits
/// and runs the program; the source's copy stays stopped (CRIU left it so)
/// until `ferry resolve` asks the destination and kills it.
#[test]
fn a_source_that_dies_after_commit_leaves_its_copy_stopped_until_resolved() {
    require_criu();
    let dir = scratch("commit-source-dies");
    let agent = other_host_agent(dir.path(), &[]);
    let p = FileCounter::start(dir.path(), 0);
    let pid = p.pid;
    let cmd = migrate(pid, &agent)
        .env(ferry_core::fault::ENV, "migrate-after-commit-sent")
        .env(ferry_core::fault::HOLD_ENV, "20000");
    let h = std::thread::spawn(move || cmd.run());
    assert!(
        agent.wait_for("migration committed", Duration::from_secs(60)),
        "{}",
        agent.log()
    );
    let key = agent.key.display().to_string();
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("ferry migrate .*--key {key}")])
        .status()
        .unwrap();
    assert!(killed.success(), "no ferry migrate to kill");
    let _ = h.join();
    // Exactly one copy counts: the destination's; the source is stopped.
    assert_eq!(p.state().as_deref(), Some("T"), "{}", agent.log());
    assert!(p.counts_on(), "the copy does not count on\n{}", agent.log());
    let session = agent
        .log()
        .lines()
        .find(|l| l.contains("migration begins"))
        .and_then(|l| l.split("session=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .expect("the session id in the agent's log")
        .to_string();
    let out = ferry(["resolve", "--to", &agent.addr, "--session", &session])
        .args_from(["--pid", &pid.to_string()])
        .arg("--key")
        .arg(&agent.key)
        .ok();
    assert!(out.contains("committed"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.state().is_some_and(|s| s != "Z") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p.state().is_none_or(|s| s == "Z"),
        "the stopped source was not ended: {:?}",
        p.state()
    );
    assert!(p.counts_on(), "the copy stopped counting");
}

/// The destination dies between its restore and the commit and stays away
/// longer than `--outcome-wait`: `ferry migrate` exits 7 (undecided), its
/// JSON error names the `ferry resolve` to run, and the source stays
/// stopped. Once the agent is back (its journal aborted the restore, which
/// died with its pid namespace), that resolve resumes the source.
#[test]
fn an_unanswered_commit_exits_7_and_the_resolve_it_names_resumes_the_source() {
    require_criu();
    let dir = scratch("commit-undecided");
    let mut agent = other_host_agent(
        dir.path(),
        &[
            "FERRY_FAULT=agent-before-commit",
            "FERRY_FAULT_HOLD_MS=30000",
        ],
    );
    let p = FileCounter::start(dir.path(), 0);
    let pid = p.pid;
    let cmd = migrate(pid, &agent).args_from(["--outcome-wait", "2s"]);
    let h = std::thread::spawn(move || cmd.run());
    assert!(
        agent.wait_for(
            "fault point agent-before-commit reached",
            Duration::from_secs(60)
        ),
        "{}",
        agent.log()
    );
    let addr = agent.addr.clone();
    agent.kill();
    let run = h.join().unwrap();
    run.fails_with(7);
    let err: serde_json::Value = serde_json::from_str(&run.stdout())
        .unwrap_or_else(|e| panic!("no JSON error ({e}): {}", run.stdout()));
    assert_eq!(err["error"]["kind"], "undecided", "{err}");
    assert_eq!(err["error"]["exit_code"], 7, "{err}");
    let hint = err["error"]["hint"].as_str().unwrap_or_default();
    let prefix = format!("once {addr} answers: ferry resolve --to {addr} --session ");
    let session = hint
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&format!(" --pid {pid}")))
        .unwrap_or_else(|| panic!("hint {hint:?} does not name the resolve"));
    assert_eq!(p.state().as_deref(), Some("T"), "the source is not stopped");

    let again = other_host_agent_at(dir.path(), &[], &addr);
    let out = ferry(["resolve", "--to", &addr, "--session", session])
        .args_from(["--pid", &pid.to_string()])
        .arg("--key")
        .arg(&again.key)
        .ok();
    assert!(out.contains("aborted"), "{out}");
    assert!(p.counts_on(), "the source did not resume: {:?}", p.state());
}
