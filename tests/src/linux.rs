//! Shared helpers of the Linux end-to-end tests (`tests/tests/linux*.rs`).
//!
//! [`kit`] builds or finds a Linux kit, [`Shell`] drives the kit's busybox shell on the serial
//! console of a `strata run --guest linux`, and the rest makes and reads disk images on the
//! host. The hang guards of a [`Shell`] are the test file's own ([`Timeouts`]): a file whose VMs
//! may share the machine's 2 cores with other VMs allows more.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Vm;

/// One Linux VM at a time: each is CPU-bound on PVM, and two at once on 2 cores take more
/// than twice as long each, which only stretches every boot towards its hang guard. A `static`
/// is per process and each test file is its own test binary, so this lock serialises the tests
/// of one file (which cargo runs on parallel threads), not the files.
static ONE_LINUX_VM: Mutex<()> = Mutex::new(());

/// Holds `ONE_LINUX_VM`, the lock of this test binary, for the rest of a test (a failed test
/// does not block the others).
pub fn one_linux_vm() -> MutexGuard<'static, ()> {
    ONE_LINUX_VM.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds or finds the kit of `mode` (`test` or `stock`) with `resources/linux-kit/build.sh`;
/// returns its folder. Fails the test when it cannot.
pub fn kit(mode: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux-kit/build.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .arg(mode)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the kit script");
    assert!(
        out.status.success(),
        "the Linux kit script failed ({}): the Linux tests need the {mode} kit",
        out.status
    );
    let dir = String::from_utf8(out.stdout).unwrap();
    let dir = PathBuf::from(dir.lines().last().expect("the kit folder").trim());
    for f in ["vmlinux", "initramfs.cpio", "cmdline.txt"] {
        assert!(dir.join(f).exists(), "the kit {} has no {f}", dir.display());
    }
    eprintln!("linux kit: {} ({:?})", dir.display(), started.elapsed());
    dir
}

/// A raw disk `path` of `bytes` with an empty ext4 file system labelled `label`, made on the
/// host.
pub fn ext4_disk(path: &Path, bytes: u64, label: &str) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    drop(f);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label])
        .arg(path)
        .status()
        .expect(
            "cannot run mkfs.ext4: install Debian's e2fsprogs, and as root keep /usr/sbin on PATH",
        );
    assert!(status.success(), "mkfs.ext4 {} failed", path.display());
}

/// Runs an e2fsprogs tool on `image`; returns its status and output.
pub fn e2fs(tool: &str, args: &[&str], image: &Path) -> (ExitStatus, String, String) {
    let out = Command::new(tool)
        .args(args)
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (Debian's e2fsprogs): {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A hash of a file's content.
pub fn file_hash(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// strata's threads, for failure messages: name, state, CPU time (twice, 2 s apart: a vCPU
/// that runs guest code gains), kernel wait channel.
pub fn thread_activity(pid: u32) -> String {
    let sample = || -> Vec<(String, String, String, u64, String)> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let mut v: Vec<_> = dir
            .flatten()
            .map(|t| {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                let stat = read("stat");
                let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = after.split_whitespace().collect();
                let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                    + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                (
                    t.file_name().to_string_lossy().into_owned(),
                    read("comm").trim().to_string(),
                    f.first().unwrap_or(&"?").to_string(),
                    ticks,
                    read("wchan"),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = sample();
    std::thread::sleep(Duration::from_secs(2));
    let after = sample();
    after
        .iter()
        .map(|(tid, comm, state, ticks, wchan)| {
            let was = before.iter().find(|b| &b.0 == tid).map_or(0, |b| b.3);
            format!(
                "  {tid} {comm:16} {state} cpu {ticks} ticks (+{} in 2 s) wchan {wchan}",
                ticks - was.min(*ticks)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The hang guards of a [`Shell`] (not speed limits).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the start (or a reboot) to the kit's `strata-linux-ready` line.
    pub boot: Duration,
    /// From `strata-linux-ready` to a shell that answers.
    pub shell_start: Duration,
    /// One shell command run by [`Shell::ok`].
    pub command: Duration,
}

/// `strata run` with the Linux shell on its serial console, driven line by line through the
/// harness's [`Vm`] (whose `command` speaks the test guest's protocol, not a shell's).
pub struct Shell {
    /// The `strata` process and its console transcript.
    pub vm: Vm,
    /// Numbers the end markers of commands and readiness probes.
    seq: u32,
    timeouts: Timeouts,
    /// Said first in failure messages, once set.
    pub hint: String,
    /// Whether failure messages list strata's threads ([`thread_activity`]).
    report_threads: bool,
    /// The terminal width [`Shell::wait_ready`] sets, if any.
    columns: Option<u16>,
}

impl Shell {
    /// Starts `strata run` with `args` (which choose the Linux guest) and these hang guards.
    pub fn start(args: &[&str], timeouts: Timeouts) -> Self {
        Shell {
            vm: Vm::start(args),
            seq: 0,
            timeouts,
            hint: String::new(),
            report_threads: false,
            columns: None,
        }
    }

    /// Failure messages also list strata's threads and what they do ([`thread_activity`]: it
    /// takes 2 s), to tell a hung guest from a busy one.
    pub fn reporting_threads(mut self) -> Self {
        self.report_threads = true;
        self
    }

    /// [`Shell::wait_ready`] then sets the terminal to `cols` columns (`stty cols`): wide
    /// enough, busybox's line editing never redraws (and garbles) the input.
    pub fn with_columns(mut self, cols: u16) -> Self {
        self.columns = Some(cols);
        self
    }

    /// Writes raw text to the console.
    pub fn send(&mut self, text: &str) {
        self.vm.send(text);
    }

    /// The console so far and strata's stderr (and threads, see [`Shell::reporting_threads`]),
    /// after the [`Shell::hint`]: for failure messages.
    pub fn console(&self) -> String {
        let mut s = format!(
            "{}console:\n{}\nstrata stderr:\n{}",
            self.hint,
            self.vm.transcript.join("\n"),
            self.vm.stderr()
        );
        if self.report_threads {
            s.push_str("\nstrata threads:\n");
            s.push_str(&thread_activity(self.vm.pid()));
        }
        s
    }

    /// The next console line within `timeout`, or None.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        self.vm.try_line(timeout)
    }

    /// Reads lines until one, trimmed, satisfies `pred`; returns it trimmed. Panics after
    /// `timeout`, naming `what` it waited for.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_line(left) {
                Some(l) if pred(l.trim_end()) => return l.trim_end().to_string(),
                Some(_) => {}
                None => panic!("no {what} within {timeout:?}; {}", self.console()),
            }
        }
    }

    /// Runs `cmd` in the console shell and returns its output lines and exit status.
    /// Keep `cmd` short: busybox's line editing redraws lines wider than the terminal. The end
    /// marker is split by quotes so that the echo of the input never matches it.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (Vec<String>, i32) {
        self.seq += 1;
        let tag = format!("@E{}", self.seq);
        let (head, tail) = tag.split_at(2);
        let echoed = format!("{head}\"\"{tail}");
        self.send(&format!("{cmd}; echo {echoed} $?\n"));
        let mut lines = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.try_line(left) else {
                panic!(
                    "`{cmd}` did not finish within {timeout:?}; {}",
                    self.console()
                )
            };
            let clean = line.trim_end();
            if let Some(rest) = clean.strip_prefix(&format!("{tag} ")) {
                let status = rest.trim().parse().unwrap_or(-1);
                // Drop the echo of our input, stray readiness probes and kernel messages.
                lines.retain(|l: &String| {
                    !l.contains(&echoed) && !l.starts_with("@R") && !l.starts_with('[')
                });
                return (lines, status);
            }
            lines.push(clean.to_string());
        }
    }

    /// Runs `cmd`, which must succeed within [`Timeouts::command`]; returns its output lines.
    pub fn ok(&mut self, cmd: &str) -> Vec<String> {
        let (out, status) = self.run(cmd, self.timeouts.command);
        assert_eq!(
            status,
            0,
            "`{cmd}` failed with {status}: {out:?}; {}",
            self.console()
        );
        out
    }

    /// Runs `cmd`, which must succeed with one line of output; returns it trimmed.
    pub fn one(&mut self, cmd: &str) -> String {
        let out = self.ok(cmd);
        assert_eq!(out.len(), 1, "`{cmd}` gave {out:?}; {}", self.console());
        out[0].trim().to_string()
    }

    /// Waits until the shell answers (input sent while it starts may be lost), within
    /// [`Timeouts::shell_start`].
    pub fn wait_shell(&mut self) {
        let deadline = Instant::now() + self.timeouts.shell_start;
        loop {
            self.seq += 1;
            let tag = format!("@R{}", self.seq);
            let (head, tail) = tag.split_at(2);
            self.send(&format!("echo {head}\"\"{tail}\n"));
            let until = Instant::now() + Duration::from_secs(3);
            while let Some(l) = self.try_line(until.saturating_duration_since(Instant::now())) {
                if l.trim_end() == tag {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the console shell does not answer; {}",
                self.console()
            );
        }
    }

    /// Waits for the kit's ready line (within [`Timeouts::boot`]) and a shell; returns how long
    /// the boot took from `since`. Then sets the terminal width, if [`Shell::with_columns`]
    /// asked for one.
    pub fn wait_ready(&mut self, since: Instant) -> Duration {
        self.wait_for(self.timeouts.boot, "strata-linux-ready", |l| {
            l == "strata-linux-ready"
        });
        let took = since.elapsed();
        self.wait_shell();
        if let Some(cols) = self.columns {
            self.ok(&format!("stty cols {cols}"));
        }
        took
    }

    /// Waits for strata to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.vm.wait_exit(timeout)
    }
}
