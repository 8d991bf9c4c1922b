//! Each migration's outcome on the agent, decided once and journaled, so
//! that no failure leaves a copy here and the source's both running.
//!
//! States (one journal file per session under `<store>/journal/`, written
//! whole, synced, renamed): a session is *open* (in memory only) until its
//! restore begins; *restoring* (journaled with the target before CRIU or the
//! engine is called); *restored* (journaled with the copy's pid and start
//! time; a process tree is held stopped); then exactly one of *committed*
//! (journaled before the copy is resumed) or *aborted* (journaled once the
//! copy is removed). The source decides nothing alone after it asked for a
//! restore: it stays stopped until it has this agent's answer, on the
//! session's connection (`Committed`) or, if that is lost, by asking again
//! on a new one (`Outcome`, answered by `Decided`). Asking aborts a session
//! not yet committed (removing its copy first), so an answer is final.
//! A session's restore is refused once it was aborted, so a `Restore` still
//! in flight cannot follow a `Decided { committed: false }`.
//!
//! An agent that restarts finds every journal not ended: a *restored* or
//! *restoring* one has its copy removed and becomes *aborted*; a
//! *committed* one whose tree is still stopped is resumed.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use ferry_core::target::ContainerRef;
use ferry_image::process;

/// Journals older than this are removed when the agent starts.
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long asking for an outcome waits for a restore under way.
const RESTORE_WAIT: Duration = Duration::from_secs(300);

/// What a restored copy is, to remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Copy {
    /// A process tree: its root's pid and start time (never another
    /// process that reused the pid).
    Tree {
        pid: i32,
        start: u64,
    },
    Runc {
        root: PathBuf,
        id: String,
    },
    Docker {
        socket: PathBuf,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Restoring(Copy),
    Restored(Copy),
    /// Being removed after an abort (in memory only: the journal still
    /// says restoring or restored until the copy is gone, so an agent that
    /// dies meanwhile removes it when it starts again).
    Removing(Copy),
    /// The root's pid and, for a process tree, its start time (0 for a
    /// container): a restarted agent resumes only that very process.
    Committed {
        pid: i32,
        start: u64,
        /// The HA service an `ha move` brought here, if any.
        service: Option<String>,
    },
    Aborted,
}

/// The answer the source gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Committed(i32),
    Aborted,
}

/// Every session's state, with its journal.
pub(crate) struct Outcomes {
    dir: PathBuf,
    states: Mutex<HashMap<String, State>>,
}

impl Outcomes {
    /// Opens the journal under `store` and settles what a previous run of
    /// the agent left undecided.
    pub(crate) fn open(store: &Path) -> Outcomes {
        let dir = store.join("journal");
        let _ = fs::create_dir_all(&dir);
        let outcomes = Outcomes {
            dir,
            states: Mutex::new(HashMap::new()),
        };
        outcomes.recover();
        outcomes
    }

    fn recover(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if id.ends_with(".partial") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > KEEP);
            let state = fs::read_to_string(&path).ok().and_then(|t| parse(&t));
            match state {
                Some(State::Restoring(copy)) | Some(State::Restored(copy)) => {
                    tracing::warn!(session = %id, copy = ?copy, "a restore was never committed before the agent stopped: removing its copy");
                    remove(&copy);
                    let _ = self.write(&id, &State::Aborted);
                }
                Some(State::Committed { pid, start, .. }) => {
                    // Committed, maybe not yet resumed when the agent died
                    // (a container runs once restored: nothing to do).
                    let same = start > 0
                        && process::ProcessInfo::read(pid).is_ok_and(|p| p.start_time == start);
                    if same {
                        process::continue_tree(pid);
                    }
                    if old {
                        let _ = fs::remove_file(&path);
                    }
                }
                _ if old => {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Writes `state` as the session's journal, durably.
    fn write(&self, id: &str, state: &State) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{id}.partial"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(render(state).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(id))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// A restore of session `id` into `copy` (its pid not known yet for a
    /// tree) is about to begin; refused once the session was aborted.
    pub(crate) fn restoring(&self, id: &str, copy: Copy) -> Result<(), String> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = states.get(id) {
            return Err(format!("the session is already {}", label(s)));
        }
        let state = State::Restoring(copy);
        self.write(id, &state)
            .map_err(|e| format!("cannot journal the restore: {e}"))?;
        states.insert(id.to_string(), state);
        Ok(())
    }

    /// A restore under way named its copy (a tree's root, once CRIU has
    /// created it): journaled, so that a restart removes it.
    pub(crate) fn restoring_root(&self, id: &str, copy: Copy) -> Result<(), String> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(states.get(id), Some(State::Restoring(_))) {
            return Err(format!(
                "the session is {}",
                states.get(id).map_or("unknown", label)
            ));
        }
        let state = State::Restoring(copy);
        self.write(id, &state)
            .map_err(|e| format!("cannot journal the restored root: {e}"))?;
        states.insert(id.to_string(), state);
        Ok(())
    }

    /// The restore ended: `copy` exists (Some) or nothing does (None). A
    /// session aborted meanwhile (its outcome asked for after a restore
    /// that outlasted the wait) stays aborted, and the copy goes.
    pub(crate) fn restored(&self, id: &str, copy: Option<Copy>) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(
            states.get(id),
            Some(State::Aborted) | Some(State::Removing(_))
        ) {
            drop(states);
            if let Some(c) = copy {
                tracing::warn!(session = %id, copy = ?c, "a restore ended after its session was aborted: removing the copy");
                remove(&c);
            }
            return;
        }
        let state = match copy {
            Some(c) => State::Restored(c),
            None => State::Aborted,
        };
        if let Err(e) = self.write(id, &state) {
            tracing::error!(session = %id, error = %e, "cannot journal the restore's end");
        }
        states.insert(id.to_string(), state);
    }

    /// The source commits: journaled before the copy may run. Returns the
    /// decision (Aborted if the session was aborted meanwhile).
    pub(crate) fn commit(&self, id: &str, pid: i32, service: Option<&str>) -> Decision {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match states.get(id) {
            Some(State::Restored(copy)) => {
                let start = match copy {
                    Copy::Tree { start, .. } => *start,
                    _ => 0,
                };
                let state = State::Committed {
                    pid,
                    start,
                    service: service.map(str::to_string),
                };
                if let Err(e) = self.write(id, &state) {
                    tracing::error!(session = %id, error = %e, "cannot journal the commit: aborting");
                    drop(states);
                    return self.abort(id);
                }
                states.insert(id.to_string(), state);
                Decision::Committed(pid)
            }
            Some(State::Committed { pid, .. }) => Decision::Committed(*pid),
            _ => Decision::Aborted,
        }
    }

    /// Aborts the session unless it was committed: its copy (if any) is
    /// removed before this returns. A restore under way is waited for, and
    /// so is another abort removing the copy. The table is not held while
    /// a copy is removed (an engine may take seconds): other sessions go on.
    pub(crate) fn abort(&self, id: &str) -> Decision {
        let deadline = Instant::now() + RESTORE_WAIT;
        loop {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            match states.get(id).cloned() {
                Some(State::Committed { pid, .. }) => return Decision::Committed(pid),
                Some(State::Aborted) => return Decision::Aborted,
                Some(State::Removing(_)) => {
                    drop(states);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Some(State::Restoring(_)) if Instant::now() < deadline => {
                    drop(states);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Some(State::Restored(copy)) | Some(State::Restoring(copy)) => {
                    // From here a commit is refused and the copy is ours.
                    states.insert(id.to_string(), State::Removing(copy.clone()));
                    drop(states);
                    remove(&copy);
                    let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = self.write(id, &State::Aborted) {
                        tracing::error!(session = %id, error = %e, "cannot journal the abort");
                    }
                    states.insert(id.to_string(), State::Aborted);
                    return Decision::Aborted;
                }
                None => {
                    // Nothing restored here: none ever will be.
                    states.insert(id.to_string(), State::Aborted);
                    let _ = self.write(id, &State::Aborted);
                    return Decision::Aborted;
                }
            }
        }
    }

    /// The decision for `id` as the journal has it after a restart (or now).
    pub(crate) fn decide(&self, id: &str) -> Decision {
        let known = self
            .states
            .lock()
            .ok()
            .and_then(|s| s.get(id).cloned())
            .or_else(|| {
                fs::read_to_string(self.path(id))
                    .ok()
                    .and_then(|t| parse(&t))
            });
        match known {
            Some(State::Committed { pid, .. }) => Decision::Committed(pid),
            _ => self.abort(id),
        }
    }
}

impl Copy {
    /// A process tree by its root pid (its start time read now).
    pub(crate) fn tree(pid: i32) -> Copy {
        let start = process::ProcessInfo::read(pid)
            .map(|p| p.start_time)
            .unwrap_or(0);
        Copy::Tree { pid, start }
    }

    /// The copy a container restore makes.
    pub(crate) fn container(c: &ContainerRef) -> Copy {
        match c {
            ContainerRef::Runc { id, root } => Copy::Runc {
                root: root.clone(),
                id: id.clone(),
            },
            ContainerRef::Docker { name, socket } => Copy::Docker {
                socket: socket.clone(),
                name: name.clone(),
            },
            // Migrations do not reach podman (no wire target names it);
            // its containers run under runc at podman's root.
            ContainerRef::Podman { name } => Copy::Runc {
                root: ferry_core::target::podman::RUNC_ROOT.into(),
                id: name.clone(),
            },
        }
    }
}

/// The copy the newest migration committed here for HA service `service`
/// (by `ha move`) still is: the root of a tree, or a container's init, if
/// it still runs (a tree: with its journaled start time).
pub(crate) fn committed_for(store: &Path, service: &str) -> Option<i32> {
    let entries = fs::read_dir(store.join("journal")).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let modified = e.metadata().and_then(|m| m.modified()).ok()?;
            match fs::read_to_string(e.path()).ok().and_then(|t| parse(&t))? {
                State::Committed {
                    pid,
                    start,
                    service: Some(s),
                } if s == service => Some((modified, pid, start)),
                _ => None,
            }
        })
        .max_by_key(|(modified, _, _)| *modified)
        .and_then(|(_, pid, start)| {
            let info = process::ProcessInfo::read(pid).ok()?;
            (start == 0 || info.start_time == start).then_some(pid)
        })
}

/// Removes a copy: kills a tree (if it is still the same process), deletes
/// a container.
pub(crate) fn remove(copy: &Copy) {
    match copy {
        Copy::Tree { pid, start } => {
            let same =
                *pid > 0 && process::ProcessInfo::read(*pid).is_ok_and(|p| p.start_time == *start);
            if same {
                process::kill_all(&process::tree(*pid).unwrap_or_else(|_| vec![*pid]));
            }
        }
        Copy::Runc { root, id } => {
            if ferry_core::target::runc::status(root, id).is_some() {
                if let Err(e) = ferry_core::target::runc::delete(root, id) {
                    tracing::error!(container = %id, error = %ferry_image::units::chain(&e), "cannot delete an uncommitted container");
                }
            }
        }
        Copy::Docker { socket, name } => {
            if let Ok(Some(_)) = ferry_core::target::docker::status(socket, name) {
                if let Err(e) = ferry_core::target::docker::remove(socket, name) {
                    tracing::error!(container = %name, error = %ferry_image::units::chain(&e), "cannot remove an uncommitted container");
                }
            }
        }
    }
}

fn label(s: &State) -> &'static str {
    match s {
        State::Restoring(_) => "restoring",
        State::Restored(_) => "restored",
        State::Removing(_) => "being removed",
        State::Committed { .. } => "committed",
        State::Aborted => "aborted",
    }
}

fn render_copy(c: &Copy) -> String {
    match c {
        Copy::Tree { pid, start } => format!("tree {pid} {start}"),
        Copy::Runc { root, id } => format!("runc {id} {}", root.display()),
        Copy::Docker { socket, name } => format!("docker {name} {}", socket.display()),
    }
}

fn render(s: &State) -> String {
    match s {
        State::Restoring(c) => format!("restoring {}\n", render_copy(c)),
        State::Restored(c) | State::Removing(c) => format!("restored {}\n", render_copy(c)),
        State::Committed {
            pid,
            start,
            service: None,
        } => format!("committed {pid} {start}\n"),
        State::Committed {
            pid,
            start,
            service: Some(svc),
        } => format!("committed {pid} {start} {svc}\n"),
        State::Aborted => "aborted\n".into(),
    }
}

fn parse(text: &str) -> Option<State> {
    let line = text.lines().next()?;
    let mut w = line.splitn(4, ' ');
    let state = w.next()?;
    let copy = |w: &mut std::str::SplitN<'_, char>| -> Option<Copy> {
        match w.next()? {
            "tree" => {
                let pid = w.next()?.parse().ok()?;
                let start = w.next()?.parse().ok()?;
                Some(Copy::Tree { pid, start })
            }
            "runc" => {
                let id = w.next()?.to_string();
                let root = PathBuf::from(w.next()?);
                Some(Copy::Runc { root, id })
            }
            "docker" => {
                let name = w.next()?.to_string();
                let socket = PathBuf::from(w.next()?);
                Some(Copy::Docker { socket, name })
            }
            _ => None,
        }
    };
    match state {
        "restoring" => Some(State::Restoring(copy(&mut w)?)),
        "restored" => Some(State::Restored(copy(&mut w)?)),
        "committed" => Some(State::Committed {
            pid: w.next()?.parse().ok()?,
            // Journals written before the start time was kept: never
            // resumed by a restart, since the pid may be another process.
            start: w.next().and_then(|t| t.parse().ok()).unwrap_or(0),
            service: w.next().map(str::to_string),
        }),
        "aborted" => Some(State::Aborted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_round_trip() {
        for s in [
            State::Restoring(Copy::Tree { pid: 0, start: 0 }),
            State::Restored(Copy::Tree { pid: 42, start: 7 }),
            State::Restored(Copy::Runc {
                root: "/run/r oot".into(),
                id: "c1".into(),
            }),
            State::Restoring(Copy::Docker {
                socket: "/run/docker.sock".into(),
                name: "web".into(),
            }),
            State::Committed {
                pid: 9,
                start: 123,
                service: None,
            },
            State::Committed {
                pid: 9,
                start: 123,
                service: Some("web".into()),
            },
            State::Aborted,
        ] {
            assert_eq!(parse(&render(&s)), Some(s));
        }
        assert_eq!(parse("garbage"), None);
        // Without a start time: never taken for a process to resume.
        assert_eq!(
            parse("committed 9\n"),
            Some(State::Committed {
                pid: 9,
                start: 0,
                service: None
            })
        );
    }

    /// A restart resumes a committed tree still stopped, and only if the
    /// pid is still that tree's (a reused pid is left alone).
    #[test]
    fn a_restart_resumes_only_the_committed_process() {
        let state = |pid: i32| {
            process::ProcessInfo::read(pid)
                .map(|p| p.state)
                .unwrap_or('?')
        };
        let stopped_child = || {
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            let pid = child.id() as i32;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
            let until = Instant::now() + Duration::from_secs(5);
            while state(pid) != 'T' && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            (child, pid)
        };
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        fs::create_dir_all(&journal).unwrap();
        let (mut same, same_pid) = stopped_child();
        let (mut other, other_pid) = stopped_child();
        let start = process::ProcessInfo::read(same_pid).unwrap().start_time;
        let other_start = process::ProcessInfo::read(other_pid).unwrap().start_time;
        fs::write(
            journal.join("s1"),
            format!("committed {same_pid} {start}\n"),
        )
        .unwrap();
        fs::write(
            journal.join("s2"),
            format!("committed {other_pid} {}\n", other_start + 1),
        )
        .unwrap();
        let _o = Outcomes::open(dir.path());
        let until = Instant::now() + Duration::from_secs(5);
        while state(same_pid) == 'T' && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (resumed, left) = (state(same_pid), state(other_pid));
        for c in [&mut same, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_ne!(resumed, 'T', "the committed process was not resumed");
        assert_eq!(left, 'T', "a process whose start time differs was resumed");
    }

    #[test]
    fn a_decision_is_final_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outcomes::open(dir.path());
        o.restoring("a", Copy::Tree { pid: 0, start: 0 }).unwrap();
        o.restored("a", Some(Copy::Tree { pid: 0, start: 0 }));
        assert_eq!(o.commit("a", 5, None), Decision::Committed(5));
        assert_eq!(o.abort("a"), Decision::Committed(5));
        // Asked about before any restore: aborted, and no restore follows.
        assert_eq!(o.decide("b"), Decision::Aborted);
        assert!(o.restoring("b", Copy::Tree { pid: 0, start: 0 }).is_err());
        o.restoring("c", Copy::Tree { pid: 0, start: 0 }).unwrap();
        o.restored("c", Some(Copy::Tree { pid: 0, start: 0 }));
        drop(o);
        // A restart aborts what was restored but never committed.
        let o = Outcomes::open(dir.path());
        assert_eq!(o.decide("a"), Decision::Committed(5));
        assert_eq!(o.decide("c"), Decision::Aborted);
        assert_eq!(o.commit("c", 6, None), Decision::Aborted);
    }
}
