//! Checkpoint benchmark (issue #13): standard checkpoints of the test guest with 2 vCPUs,
//! guests of 512 MiB, 2 GiB and 4 GiB, each with 256 MiB filled (`fill 256 7`) and `count`
//! running on its vCPUs. Per guest size it measures
//! - **create**: the time the guest was paused (`paused_us` of the API's answer, checked
//!   against `GET /v1/checkpoints/{id}` and the manifest), the wall time of the create call,
//!   and the memory file's size (`sizes.memory`, its allocated blocks, its apparent size);
//! - **apply in place**: the apply call's own latency, and the time from sending
//!   `POST /v1/checkpoints/{id}/apply` to the guest answering `echo` on its console;
//! - **restore** (`strata restore --checkpoint DIR/<id>` in a new process, after the first one
//!   exited): from spawning the process to its API answering (the VM runs by then), and to
//!   the guest answering `echo` on its console;
//! - the latency of `POST /v1/vm/pause` with `count` running: a create stops the vCPUs that way
//!   before the time its `paused_us` counts starts;
//! - the console's `echo` round trip on the running VM before any checkpoint, for reference:
//!   while `count` runs, the test guest looks at its UART only every few thousand increments
//!   of emulated code, so every answer carries that polling delay.
//!
//! After the applies and after the restores, `check 256 7` must pass (correctness, not speed).
//! It prints the median and minimum of each figure and a table beside the goals. It
//! asserts nothing about speed.
//!
//! `cargo build --release --bin strata && cargo bench -p strata-tests --bench checkpoint
//! [-- RUNS]` (default 5 runs of each measurement). `cargo test` runs one small guest with a
//! small fill, once (see `bench_is_full`). With `RUST_LOG=info` the VMMs' logs go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::types::{ApplyCheckpoint, CheckpointType, CreateCheckpoint, VmState};
use api::{Client, LifecycleAction};
use strata_tests::{bench_is_full, require_kvm, strata_bin, API_HANG_GUARD, BOOT_TIMEOUT};

/// The seed of the fill pattern.
const SEED: u32 = 7;
/// How long a console answer may take (fill and check of 256 MiB run ~25 s each here).
const SLOW_COMMAND: Duration = Duration::from_secs(300);
/// How long a quick console command may take.
const QUICK_COMMAND: Duration = Duration::from_secs(30);
const MIB: f64 = (1u64 << 20) as f64;

/// A `strata` process with the test guest on its piped console.
struct Guest {
    child: Child,
    stdin: ChildStdin,
    /// Console lines, stamped when they arrived.
    lines: Receiver<(Instant, String)>,
    stderr: Arc<Mutex<String>>,
    transcript: Vec<String>,
    what: String,
}

impl Guest {
    /// Spawns `strata ARGS`; returns it and the instant just before the spawn.
    fn spawn(args: &[OsString]) -> (Guest, Instant) {
        // With RUST_LOG set, the VMM's log goes to our stderr; otherwise it is kept for
        // failure messages.
        let logging = std::env::var_os("RUST_LOG").is_some();
        let mut cmd = Command::new(strata_bin());
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if logging {
                Stdio::inherit()
            } else {
                Stdio::piped()
            });
        let start = Instant::now();
        let mut child = cmd.spawn().expect("start strata");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let now = Instant::now();
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send((now, line)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                if let Ok(mut sink) = sink.lock() {
                    sink.push_str(&s);
                }
            });
        }
        let stdin = child.stdin.take().expect("stdin");
        let what = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let guest = Guest {
            child,
            stdin,
            lines,
            stderr,
            transcript: Vec::new(),
            what,
        };
        (guest, start)
    }

    fn fail(&self, why: &str) -> ! {
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        panic!(
            "strata {}: {why}\nstderr:\n{stderr}\nconsole (last lines):\n{}",
            self.what,
            self.transcript[self.transcript.len().saturating_sub(40)..].join("\n")
        );
    }

    /// The next console line and when it arrived.
    fn next(&mut self, timeout: Duration) -> (Instant, String) {
        match self.lines.recv_timeout(timeout) {
            Ok((at, line)) => {
                self.transcript.push(line.clone());
                (at, line)
            }
            Err(RecvTimeoutError::Timeout) => self.fail(&format!("no console line in {timeout:?}")),
            Err(RecvTimeoutError::Disconnected) => self.fail("the console closed"),
        }
    }

    /// Reads lines until one satisfies `pred`; returns when it arrived and the line.
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(&format!("no awaited console line in {timeout:?}"));
            }
            let (at, line) = self.next(left);
            if pred(&line) {
                return (at, line);
            }
        }
    }

    /// Drops console lines already received.
    fn drain(&mut self) {
        while let Ok((_, line)) = self.lines.try_recv() {
            self.transcript.push(line);
        }
    }

    fn send(&mut self, text: &str) {
        self.stdin
            .write_all(text.as_bytes())
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| self.fail(&format!("writing the console: {e}")));
    }

    /// Sends `echo TOKEN`; returns when the answer `TOKEN` arrived (then waits for `ok`).
    fn echo(&mut self, token: &str) -> Instant {
        self.drain();
        self.send(&format!("echo {token}\n"));
        let (at, _) = self.wait_for(QUICK_COMMAND, |l| l == token);
        self.wait_for(QUICK_COMMAND, |l| l == "ok");
        at
    }

    /// Runs a console command that must answer `ok`; returns its output lines.
    fn command(&mut self, cmd: &str, timeout: Duration) -> Vec<String> {
        self.drain();
        self.send(&format!("{cmd}\n"));
        // The guest echoes the command line (after its prompt, when that was printed by this
        // process).
        self.wait_for(QUICK_COMMAND, |l| l.ends_with(cmd));
        let mut out = Vec::new();
        loop {
            let (_, line) = self.next(timeout);
            if line == "ok" {
                return out;
            }
            if line.starts_with("err") {
                self.fail(&format!("{cmd}: {line}"));
            }
            out.push(line);
        }
    }

    /// Powers the guest off, waits until the VMM reports the VM off (with an API socket it
    /// stays up, off), then ends the process and waits for it to exit.
    fn poweroff(mut self, api: &Client) {
        self.drain();
        self.send("poweroff\n");
        let deadline = Instant::now() + QUICK_COMMAND;
        loop {
            match api.vm() {
                Ok(vm) if vm.state == VmState::Off => break,
                Ok(_) => {}
                Err(e) => self.fail(&format!("GET /v1/vm after poweroff: {e}")),
            }
            if Instant::now() > deadline {
                self.fail("the VM is not off after poweroff");
            }
            self.drain();
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Only this process, which we started (a no-op once it exited).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of `sock` as soon as the VMM answers a request on it: the VMM serves its API
/// only once the VM is built (booted, or restored and resumed).
fn connect(sock: &Path) -> Client {
    let deadline = Instant::now() + API_HANG_GUARD;
    loop {
        if let Ok(c) = Client::new(sock) {
            if let Ok(vm) = c.vm() {
                assert_eq!(vm.state, VmState::Running, "the VM after start: {vm:?}");
                return c.with_timeout(API_HANG_GUARD);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the API socket {} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Median and minimum of a sample.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
}

fn stat(samples: &[f64]) -> Stat {
    assert!(!samples.is_empty());
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat { median, min: v[0] }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_stat(name: &str, unit: &str, samples: &[f64]) -> Stat {
    let s = stat(samples);
    println!(
        "  {name:<58} median {:9.1} {unit}   min {:9.1} {unit}   ({} runs)",
        s.median,
        s.min,
        samples.len()
    );
    s
}

/// One guest size's results.
struct Row {
    memory_mib: u64,
    pause: Stat,
    create: Stat,
    allocated_mib: f64,
    apparent_mib: f64,
    apply_call: Stat,
    apply_answer: Stat,
    restore_running: Stat,
    restore_answer: Stat,
    echo: Stat,
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn bench_size(memory_mib: u64, fill_mib: u64, runs: usize) -> Row {
    println!(
        "\n{memory_mib} MiB guest, 2 vCPUs, {fill_mib} MiB filled (fill {fill_mib} {SEED}), \
         count running:"
    );
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let sock = tmp.path().join("api.sock");
    let (mut vm, _) = Guest::spawn(&[
        os("run"),
        os("--memory"),
        os(format!("{memory_mib}M")),
        os("--vcpus"),
        os("2"),
        os("--checkpoint-type"),
        os("standard"),
        os("--state-dir"),
        state_dir.clone().into_os_string(),
        os("--api-socket"),
        sock.clone().into_os_string(),
    ]);
    let (_, ready) = vm.wait_for(BOOT_TIMEOUT, |l| l.contains("strata test guest ready"));
    assert!(ready.ends_with("cpus=2"), "ready line {ready:?}");
    let api = connect(&sock);
    let t = Instant::now();
    vm.command(&format!("fill {fill_mib} {SEED}"), SLOW_COMMAND);
    println!(
        "  (fill {fill_mib} {SEED} took {:.1} s in the guest)",
        t.elapsed().as_secs_f64()
    );
    vm.command("count start", QUICK_COMMAND);

    // The console's answer time on the running VM, as a baseline for the answers below.
    let echo: Vec<f64> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            let at = vm.echo(&format!("base{i}"));
            ms(at - t)
        })
        .collect();

    // What stopping the vCPUs costs with count running: a create pauses the VM this way
    // before its `paused_us` starts.
    let mut pause_call = Vec::new();
    for _ in 0..runs {
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        api.lifecycle(LifecycleAction::Pause).unwrap();
        pause_call.push(ms(t.elapsed()));
        api.lifecycle(LifecycleAction::Resume).unwrap();
    }

    // Create.
    let (mut pause, mut create) = (Vec::new(), Vec::new());
    let (mut allocated, mut apparent) = (Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for i in 0..runs {
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let info = api
            .create_checkpoint(&CreateCheckpoint {
                name: Some(format!("bench {i}")),
                kind: Some(CheckpointType::Standard),
            })
            .unwrap();
        create.push(ms(t.elapsed()));
        let paused_us = info
            .paused_us
            .expect("paused_us of a running VM's checkpoint");
        assert_eq!(api.checkpoint(&info.id).unwrap().paused_us, Some(paused_us));
        let dir = state_dir.join(&info.id);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["paused_us"], paused_us, "manifest {manifest}");
        pause.push(paused_us as f64 / 1e3);
        let meta = std::fs::metadata(dir.join("memory")).unwrap();
        let blocks = meta.blocks() * 512;
        assert!(
            blocks >= fill_mib << 20,
            "the memory file holds {blocks} bytes, less than the {fill_mib} MiB filled"
        );
        assert!(
            meta.len() >= memory_mib << 20,
            "memory file of {} bytes",
            meta.len()
        );
        println!(
            "    checkpoint {}: paused {:.1} ms, create {:.1} ms, sizes.memory {:.1} MiB, \
             memory file {:.1} MiB on disk, {:.1} MiB apparent",
            info.id,
            paused_us as f64 / 1e3,
            create[i],
            info.sizes.memory as f64 / MIB,
            blocks as f64 / MIB,
            meta.len() as f64 / MIB
        );
        allocated.push(blocks as f64 / MIB);
        apparent.push(meta.len() as f64 / MIB);
        ids.push(info.id);
    }
    let id = ids[0].clone();
    // The guest still answers after the checkpoints.
    vm.echo("after-create");

    // Apply in place.
    let (mut apply_call, mut apply_answer) = (Vec::new(), Vec::new());
    for i in 0..runs {
        std::thread::sleep(Duration::from_millis(200));
        vm.drain();
        let t = Instant::now();
        let after = api
            .apply_checkpoint(&id, &ApplyCheckpoint::default())
            .unwrap();
        apply_call.push(ms(t.elapsed()));
        assert_eq!(after.state, VmState::Running, "after apply: {after:?}");
        assert_eq!(after.current_checkpoint.as_deref(), Some(id.as_str()));
        let at = vm.echo(&format!("apply{i}"));
        apply_answer.push(ms(at - t));
    }
    let t = Instant::now();
    vm.command(&format!("check {fill_mib} {SEED}"), SLOW_COMMAND);
    println!(
        "  (check {fill_mib} {SEED} after apply: ok, {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let cpus = vm.command("cpus", QUICK_COMMAND);
    assert_eq!(cpus, ["2"], "cpus after apply");
    vm.poweroff(&api);

    // Restore in a new process, each after the previous one exited.
    let checkpoint = state_dir.join(&id);
    let (mut restore_running, mut restore_answer) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let sock = tmp.path().join(format!("restore{i}.sock"));
        let (mut vm, t) = Guest::spawn(&[
            os("restore"),
            os("--checkpoint"),
            checkpoint.clone().into_os_string(),
            os("--api-socket"),
            sock.clone().into_os_string(),
        ]);
        // Input typed before the VM is restored would be lost with the UART's state: wait
        // until the VMM serves its API, which it does once the VM runs.
        let api = connect(&sock);
        restore_running.push(ms(t.elapsed()));
        let at = vm.echo(&format!("restore{i}"));
        restore_answer.push(ms(at - t));
        if i + 1 == runs {
            let t = Instant::now();
            vm.command(&format!("check {fill_mib} {SEED}"), SLOW_COMMAND);
            println!(
                "  (check {fill_mib} {SEED} after restore: ok, {:.1} s)",
                t.elapsed().as_secs_f64()
            );
            let cpus = vm.command("cpus", QUICK_COMMAND);
            assert_eq!(cpus, ["2"], "cpus after restore");
        }
        assert_eq!(
            api.vm().unwrap().current_checkpoint.as_deref(),
            Some(id.as_str())
        );
        vm.poweroff(&api);
    }

    let echo = print_stat(
        "console echo round trip, running VM (baseline)",
        "ms",
        &echo,
    );
    print_stat(
        "pause API call, count running (before paused_us starts)",
        "ms",
        &pause_call,
    );
    let pause = print_stat("create: guest paused (paused_us)", "ms", &pause);
    let create = print_stat("create: wall time of the create call", "ms", &create);
    let allocated = print_stat(
        "create: memory file on disk (st_blocks*512)",
        "MiB",
        &allocated,
    );
    let apparent = print_stat("create: memory file apparent size", "MiB", &apparent);
    let apply_call = print_stat("apply in place: apply call", "ms", &apply_call);
    let apply_answer = print_stat(
        "apply in place: apply sent -> echo answered",
        "ms",
        &apply_answer,
    );
    let restore_running = print_stat(
        "restore: spawn -> API answers (VM running)",
        "ms",
        &restore_running,
    );
    let restore_answer = print_stat("restore: spawn -> echo answered", "ms", &restore_answer);
    Row {
        memory_mib,
        pause,
        create,
        allocated_mib: allocated.median,
        apparent_mib: apparent.median,
        apply_call,
        apply_answer,
        restore_running,
        restore_answer,
        echo,
    }
}

fn main() {
    require_kvm();
    let full = bench_is_full();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if full { 5 } else { 1 });
    let (sizes, fill): (&[u64], u64) = if full {
        (&[512, 2048, 4096], 256)
    } else {
        (&[128], 8)
    };
    println!(
        "strata checkpoint benchmark (issue #13): test guest, 2 vCPUs, {runs} run(s) of each \
         measurement, {}",
        strata_bin().display()
    );
    let rows: Vec<Row> = sizes
        .iter()
        .map(|&size| bench_size(size, fill, runs))
        .collect();

    let mm = |s: Stat| format!("{:.1} / {:.1}", s.median, s.min);
    println!(
        "\nSummary, {fill} MiB filled, count running, 2 vCPUs; times in ms as median / min of \
         {runs} run(s):"
    );
    println!(
        "{:<27} {:>15} {:>17} {:>11} {:>15} {:>17} {:>17} {:>17} {:>17}",
        "guest",
        "pause ms",
        "create ms",
        "memory MiB",
        "apply call ms",
        "apply->answer ms",
        "restore->run ms",
        "restore->answer",
        "echo (base) ms"
    );
    for r in &rows {
        println!(
            "{:<27} {:>15} {:>17} {:>11} {:>15} {:>17} {:>17} {:>17} {:>17}",
            format!("Strata {} MiB", r.memory_mib),
            mm(r.pause),
            mm(r.create),
            format!("{:.1}", r.allocated_mib),
            mm(r.apply_call),
            mm(r.apply_answer),
            mm(r.restore_running),
            mm(r.restore_answer),
            mm(r.echo)
        );
    }
    for (who, pause, restore) in [
        ("Firecracker 512 MiB (*)", "750", "13"),
        ("Cloud Hypervisor 512 MiB (*)", "323", "11"),
        ("goal of issue #13 (*)", "<= 81", "<= 11"),
    ] {
        println!(
            "{who:<27} {pause:>15} {:>17} {:>11} {:>15} {:>17} {restore:>17} {:>17} {:>17}",
            "", "", "", "", "", ""
        );
    }
    println!(
        "memory MiB: the memory file's allocated size on disk (median); its apparent size is \
         the guest's RAM ({}).",
        rows.iter()
            .map(|r| format!("{:.0} MiB", r.apparent_mib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "(*) The issue's figures, not measured by this bench (Firecracker and Cloud Hypervisor \
         could not be run here): Firecracker pauses 750 ms for a full snapshot of the \
         512 MiB/256 MiB case and Cloud Hypervisor 323 ms; they restore in 13 ms and 11 ms \
         (new process -> guest running). We aim to pause at most a quarter of the best of them \
         (<= 81 ms) and to restore at least as fast (<= 11 ms)."
    );
    println!(
        "restore->run: spawn -> the VMM's API answers with the VM running (what the issue's \
         restore figures time); restore->answer and apply->answer add the guest's console round \
         trip, which with count running costs about the echo baseline (the test guest looks at \
         its UART between batches of emulated counting)."
    );
}
