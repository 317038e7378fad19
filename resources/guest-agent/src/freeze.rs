//! `freeze` and `thaw`, and the lease that thaws by itself.
//!
//! Freeze, in order (all under one lock, so requests from several connections and the lease
//! never interleave):
//! 1. refuse if already frozen (`already frozen`: a second freeze does not extend the lease;
//!    the host thaws and freezes again);
//! 2. run the hooks with `freeze` in name order; on a failure run the hooks that succeeded
//!    with `thaw` in reverse and fail, naming the hook;
//! 3. read the mount table, open every candidate mount point (one per filesystem: bind
//!    mounts of a frozen filesystem are skipped), `sync()`;
//! 4. `FIFREEZE` each in mount order (`EOPNOTSUPP`: skipped, logged); on any other failure
//!    `FITHAW` those already frozen in reverse, run the thaw hooks, and fail;
//! 5. start the lease: without `thaw` within `timeout_s`, the lease thread thaws (logged),
//!    and the next `thaw` reply says `lease_expired`.
//!
//! Thaw: `FITHAW` in reverse order, then the hooks with `thaw` in reverse. Every step is tried
//! even when one fails; afterwards nothing is frozen by the agent, and a failed step makes the
//! reply `ok:false` naming it. Thaw when nothing is frozen succeeds with `thawed: []`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use strata_guest_agent::protocol::ThawReply;

use crate::{hooks, mounts};

/// Longest lease accepted, seconds.
pub const MAX_LEASE_S: u64 = 24 * 3600;

/// Where `freeze` looks and what it may touch.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of freeze/thaw hooks.
    pub hooks_dir: PathBuf,
    /// Mount table to read.
    pub mounts_file: PathBuf,
    /// When not empty, freeze only these mount points.
    pub only: Vec<PathBuf>,
    /// How long one hook may run.
    pub hook_timeout: Duration,
}

/// One frozen filesystem.
struct FrozenFs {
    mount_point: String,
    /// Kept open for `FITHAW`, so thawing needs no path lookup.
    file: File,
}

/// What a successful freeze holds.
struct Frozen {
    filesystems: Vec<FrozenFs>,
    /// Hooks that ran `freeze` successfully, in run order.
    hooks: Vec<PathBuf>,
    lease_ends: Instant,
}

#[derive(Default)]
struct State {
    frozen: Option<Frozen>,
    /// The lease thawed the last freeze and no `thaw` has been answered since.
    lease_expired: bool,
}

/// The agent's freeze state, shared by every connection and the lease thread.
pub struct Freezer {
    config: Config,
    state: Mutex<State>,
    /// Signalled whenever a freeze starts or ends, for the lease thread.
    changed: Condvar,
}

impl Freezer {
    /// A freezer with nothing frozen. Start [`Freezer::run_lease`] on a thread of its own.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Freezes (see the module docs) with a lease of `lease_s` seconds; returns the frozen
    /// mount points.
    pub fn freeze(&self, lease_s: u64) -> Result<Vec<String>, String> {
        if !(1..=MAX_LEASE_S).contains(&lease_s) {
            return Err(format!("timeout_s must be 1..={MAX_LEASE_S}"));
        }
        let mut state = self.lock();
        if state.frozen.is_some() {
            return Err("already frozen".into());
        }
        let hooks = hooks::list(&self.config.hooks_dir)
            .map_err(|e| format!("cannot list {}: {e}", self.config.hooks_dir.display()))?;
        let mut ran = Vec::new();
        for hook in hooks {
            if let Err(e) = hooks::run(&hook, "freeze", self.config.hook_timeout) {
                log!("freeze failed: {e}");
                self.thaw_hooks(&ran);
                return Err(e);
            }
            ran.push(hook);
        }
        let filesystems = match self.freeze_filesystems() {
            Ok(fs) => fs,
            Err(e) => {
                log!("freeze failed: {e}");
                self.thaw_hooks(&ran);
                return Err(e);
            }
        };
        let frozen: Vec<String> = filesystems.iter().map(|f| f.mount_point.clone()).collect();
        log!("froze {frozen:?} for at most {lease_s} s");
        state.frozen = Some(Frozen {
            filesystems,
            hooks: ran,
            lease_ends: Instant::now() + Duration::from_secs(lease_s),
        });
        state.lease_expired = false;
        self.changed.notify_all();
        Ok(frozen)
    }

    /// Steps 3 and 4: all of the candidates frozen, or none.
    fn freeze_filesystems(&self) -> Result<Vec<FrozenFs>, String> {
        let path = &self.config.mounts_file;
        let table = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut opened: Vec<FrozenFs> = Vec::new();
        let mut devices = Vec::new();
        for m in mounts::candidates(&table, &self.config.only) {
            let name = m.mount_point.to_string_lossy().into_owned();
            let file =
                File::open(&m.mount_point).map_err(|e| format!("cannot open {name}: {e}"))?;
            let dev = file
                .metadata()
                .map_err(|e| format!("cannot stat {name}: {e}"))?
                .dev();
            if devices.contains(&dev) {
                // Another mount (a bind mount, or one hidden under a later mount on the same
                // path) of a filesystem already on the list.
                continue;
            }
            devices.push(dev);
            opened.push(FrozenFs {
                mount_point: name,
                file,
            });
        }
        mounts::sync_all();
        let mut frozen = Vec::with_capacity(opened.len());
        for fs in opened {
            match mounts::freeze(&fs.file) {
                Ok(()) => frozen.push(fs),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    log!(
                        "{} cannot be frozen (no kernel support), skipped",
                        fs.mount_point
                    );
                }
                Err(e) => {
                    let err = format!("FIFREEZE {}: {e}", fs.mount_point);
                    let mut errors = Vec::new();
                    thaw_filesystems(frozen, &mut Vec::new(), &mut errors);
                    for e in errors {
                        log!("while undoing a failed freeze: {e}");
                    }
                    return Err(err);
                }
            }
        }
        Ok(frozen)
    }

    /// Runs `thaw` on hooks that ran `freeze`, in reverse; failures are logged.
    fn thaw_hooks(&self, ran: &[PathBuf]) {
        for hook in ran.iter().rev() {
            if let Err(e) = hooks::run(hook, "thaw", self.config.hook_timeout) {
                log!("{e}");
            }
        }
    }

    /// Thaws what is frozen (see the module docs).
    pub fn thaw(&self) -> Result<ThawReply, String> {
        let mut state = self.lock();
        let lease_expired = std::mem::take(&mut state.lease_expired);
        let Some(frozen) = state.frozen.take() else {
            return Ok(ThawReply {
                thawed: Vec::new(),
                lease_expired,
            });
        };
        self.changed.notify_all();
        let (thawed, errors) = self.thaw_frozen(frozen);
        log!("thawed {thawed:?}");
        if errors.is_empty() {
            Ok(ThawReply {
                thawed,
                lease_expired,
            })
        } else {
            Err(format!("thawed {thawed:?}, but: {}", errors.join("; ")))
        }
    }

    fn thaw_frozen(&self, frozen: Frozen) -> (Vec<String>, Vec<String>) {
        let mut thawed = Vec::new();
        let mut errors = Vec::new();
        thaw_filesystems(frozen.filesystems, &mut thawed, &mut errors);
        for hook in frozen.hooks.iter().rev() {
            if let Err(e) = hooks::run(hook, "thaw", self.config.hook_timeout) {
                log!("{e}");
                errors.push(e);
            }
        }
        (thawed, errors)
    }

    /// The lease thread's body: thaws a freeze whose lease ran out. Never returns.
    pub fn run_lease(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            state = match state.frozen.as_ref().map(|f| f.lease_ends) {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(ends) if ends > now => {
                    self.changed
                        .wait_timeout(state, ends - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                Some(_) => {
                    if let Some(frozen) = state.frozen.take() {
                        let (thawed, errors) = self.thaw_frozen(frozen);
                        log!("lease ran out without thaw: thawed {thawed:?} by itself");
                        for e in errors {
                            log!("lease thaw: {e}");
                        }
                        state.lease_expired = true;
                    }
                    state
                }
            };
        }
    }

    /// Thaws whatever is frozen, for a clean exit.
    pub fn thaw_for_exit(&self) {
        let mut state = self.lock();
        if let Some(frozen) = state.frozen.take() {
            let (thawed, errors) = self.thaw_frozen(frozen);
            log!("exiting: thawed {thawed:?}");
            for e in errors {
                log!("exit thaw: {e}");
            }
        }
    }
}

/// `FITHAW` on each of `filesystems` in reverse; every one is tried.
fn thaw_filesystems(
    filesystems: Vec<FrozenFs>,
    thawed: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    for fs in filesystems.into_iter().rev() {
        match mounts::thaw(&fs.file) {
            Ok(()) => {}
            // EINVAL: not frozen any more (someone ran `fsfreeze -u`); it is thawed all the same.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log!("{} was already thawed", fs.mount_point)
            }
            Err(e) => {
                errors.push(format!("FITHAW {}: {e}", fs.mount_point));
                continue;
            }
        }
        thawed.push(fs.mount_point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A freezer whose mount table has no candidates, with `hooks` as its hooks
    /// (name, shell body); the hooks log their calls to `calls`.
    fn freezer(dir: &std::path::Path, hooks: &[(&str, &str)]) -> Arc<Freezer> {
        let hooks_dir = dir.join("hooks");
        std::fs::create_dir(&hooks_dir).unwrap();
        for (name, body) in hooks {
            let path = hooks_dir.join(name);
            let log = dir.join("calls");
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{name} $1\" >> {}\n{body}\n",
                    log.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mounts_file = dir.join("mounts");
        std::fs::write(&mounts_file, "proc /proc proc rw 0 0\n").unwrap();
        Freezer::new(Config {
            hooks_dir,
            mounts_file,
            only: Vec::new(),
            hook_timeout: Duration::from_secs(10),
        })
    }

    fn calls(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    #[test]
    fn freeze_then_thaw_runs_hooks_forward_then_backward() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path(), &[("10-a", "true"), ("20-b", "true")]);
        assert_eq!(f.freeze(30).unwrap(), Vec::<String>::new());
        assert_eq!(f.thaw().unwrap(), ThawReply::default());
        assert_eq!(
            calls(dir.path()),
            "10-a freeze\n20-b freeze\n20-b thaw\n10-a thaw\n"
        );
    }

    #[test]
    fn a_failing_hook_fails_the_freeze_and_thaws_the_earlier_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(
            dir.path(),
            &[
                ("10-a", "true"),
                ("20-bad", "[ \"$1\" = thaw ] || exit 1"),
                ("30-c", "true"),
            ],
        );
        let err = f.freeze(30).unwrap_err();
        assert!(
            err.contains("20-bad") && err.contains("exit status 1"),
            "{err}"
        );
        assert_eq!(calls(dir.path()), "10-a freeze\n20-bad freeze\n10-a thaw\n");
        // Nothing is frozen: thaw has nothing to do and runs no hook.
        assert_eq!(f.thaw().unwrap(), ThawReply::default());
        assert_eq!(calls(dir.path()), "10-a freeze\n20-bad freeze\n10-a thaw\n");
    }

    #[test]
    fn a_second_freeze_is_refused_and_thaw_when_thawed_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path(), &[]);
        f.freeze(30).unwrap();
        assert_eq!(f.freeze(30).unwrap_err(), "already frozen");
        f.thaw().unwrap();
        assert_eq!(f.thaw().unwrap(), ThawReply::default());
    }

    #[test]
    fn leases_outside_the_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path(), &[]);
        assert!(f.freeze(0).unwrap_err().contains("timeout_s"));
        assert!(f.freeze(MAX_LEASE_S + 1).unwrap_err().contains("timeout_s"));
    }

    #[test]
    fn the_lease_thaws_by_itself_and_the_next_thaw_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path(), &[("10-a", "true")]);
        let lease = Arc::clone(&f);
        std::thread::spawn(move || lease.run_lease());
        // Taken before the freeze, so the lease (1 s from inside `freeze`) ends after start + 1 s.
        let start = Instant::now();
        f.freeze(1).unwrap();
        // A hang guard: the lease thaws by itself or never.
        let guard = start + Duration::from_secs(60);
        while !calls(dir.path()).contains("thaw") {
            assert!(Instant::now() < guard, "the lease never thawed");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Behaviour, not speed: the lease did not thaw before it ran out.
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "thawed {:?} into a 1 s lease",
            start.elapsed()
        );
        let reply = f.thaw().unwrap();
        assert!(reply.lease_expired && reply.thawed.is_empty());
        assert!(!f.thaw().unwrap().lease_expired);
    }
}
