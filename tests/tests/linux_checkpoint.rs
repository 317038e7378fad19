//! Issue #13 on Linux: a standard checkpoint of the Linux test kernel while a process in it
//! counts and logs to an ext4 file system on a virtio-blk disk, then applied in place.
//!
//! `checkpoint_and_apply_a_counting_linux_guest` boots the kit's test kernel (`strata run
//! --guest linux --linux-kernel test`, as `linux.rs` does) with 2 vCPUs, an ext4 disk made on
//! the host, an API socket, `--state-dir` and `--checkpoint-type standard`. In the guest a
//! background shell loop counts: each round it writes `i` to `/tmp/count` (tmpfs, guest memory
//! only, replaced by a rename so it is never read empty), appends the line `i GEN` to
//! `/mnt/log` on the virtio disk, where GEN is the content of `/tmp/gen` (replaced by a rename
//! from the console), runs `sync` (every line reaches the virtio disk with a flush) and sleeps
//! 0.2 s. Timeline:
//!
//! 1. GEN is `A`. Let the loop run; read the count `c0` and the guest's clocks.
//! 2. Take a standard checkpoint through the API (`POST /v1/checkpoints`).
//! 3. Read the count `b0`, switch GEN to `B`, read the count `b1`: this is the timeline that
//!    the apply must discard. On the host, flatten the disk the checkpoint froze and read its
//!    `/log` with e2fsck (journal replay) and debugfs.
//! 4. Let the loop count on, 12 rounds past `b1` (and the checkpoint be at least 30 s old),
//!    and check, after a `sync`, that the guest's log holds `1 A`, `2 A`, ... then `B` lines
//!    from `[b0, b1+1]` on. Read the count `pre`.
//! 5. Apply the checkpoint (`POST /v1/checkpoints/{id}/apply`). At once read the count `k0`,
//!    switch GEN to `C`, read the count `k1`: the loop continues from its checkpointed value,
//!    so `c0 <= k0 < pre` (one console command after the apply against 12 rounds of the
//!    discarded timeline). Read the guest's clocks. Let the loop count on (it keeps growing),
//!    stop it, `sync`, drop the page cache and read the log.
//!
//! What the log proves after the apply: its lines are exactly `1, 2, ..., n` (no gap, no
//! repeat), with GEN `A` up to the switch to `C` (the first `C` line in `[k0, k1+1]`) and never
//! `B`. A repeat would mean the file held lines written after the checkpoint (the discarded
//! timeline), a gap that it lost lines the guest had written before it: so the file, as the
//! restored guest found it, ended exactly at the checkpoint's instant. The disk the checkpoint
//! froze (read on the host) holds `1 A ... d A` with `c0 - 1 <= d <= b0` (everything the loop
//! had synced by then; the rest was in the restored page cache), and that is a prefix of the
//! final log. After `umount` and `poweroff -f` (the VM is off; strata, which has an API
//! socket, stays up and is then ended) the host checks the active layer: `e2fsck -fn` finds
//! the file system clean and `/log` is what the guest read, and the launch disk (the
//! checkpoint's frozen disk) did not change.
//!
//! Last, the guest's time: its CLOCK_BOOTTIME (`/proc/uptime`, kept by its clocksource) and
//! its printk clock (`sched_clock`, kvmclock) are read back to back before the checkpoint and
//! after the apply; restored, both advance by the same amount (both continue from the
//! checkpoint's instant), within 5 s, while the checkpoint is at least 30 s old when applied,
//! and neither counts the time between the checkpoint and the apply. On PVM the guest's TSC is
//! the host's (KVM accepts `KVM_SET_MSRS` of IA32_TSC and ignores it), so a guest keeping time
//! with `rdtsc` would jump by the checkpoint's age after the apply, catch up the lost ticks
//! with RCU stall reports and hang for good once a stall report sends an NMI backtrace (the
//! sender stays on the `KVM_HC_SEND_IPI` vmcall): Strata hides the invariant-TSC bit there
//! (`vmm/src/arch/cpuid.rs`), so Linux keeps time with kvmclock, which is restored.
//!
//! Generous hang guards; no assertion on how long anything takes. Kernel messages are kept off
//! the console (`/proc/sys/kernel/printk`), which the test parses. When the kit cannot be
//! built, the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::types::{ApplyCheckpoint, CreateCheckpoint, TakenType, VmState};
use strata_tests::api_client;
use strata_tests::linux::{e2fs, ext4_disk, file_hash, kit, Shell, Timeouts};

/// Boot to `strata-linux-ready`: ~25-60 s on an idle machine; a hang guard generous enough
/// for a machine whose 2 cores other VMs share (a boot took over 240 s with a load of 10).
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// One shell command on the console (a hang guard: other VMs may share the machine's 2 cores).
const SHELL_TIMEOUT: Duration = Duration::from_secs(120);
/// From `strata-linux-ready` to a shell that answers (seen over 60 s on a loaded machine).
const SHELL_START_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the counting loop may stay at one value (a hang guard: a round took 30 s on a
/// machine loaded by other VMs, ~1 s on an idle one).
const COUNT_STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Rounds the discarded timeline runs past the checkpoint before the apply: the count read
/// right after the apply must be below where that timeline got to. Reading the count takes
/// about one round (a console command forks `cat`; a round forks `mv`, `sync` and `sleep`).
const DISCARDED_ROUNDS: u64 = 12;
/// The least age of the checkpoint when it is applied: a guest clock that is not restored is
/// off by that much after the apply, well above [`CLOCK_TOLERANCE_S`].
const CHECKPOINT_AGE_AT_APPLY: Duration = Duration::from_secs(30);
/// How far the guest's two clocks may drift apart across checkpoint and apply (they are read
/// back to back by shell builtins; restored, they drift by far less).
const CLOCK_TOLERANCE_S: f64 = 5.0;
/// The first console command after the apply (a hang guard: a guest whose clocksource jumped
/// catches up its ticks at emulation speed before it answers).
const APPLY_ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// The console shell's hang guards.
const TIMEOUTS: Timeouts = Timeouts {
    boot: LINUX_BOOT_TIMEOUT,
    shell_start: SHELL_START_TIMEOUT,
    command: SHELL_TIMEOUT,
};

/// Reads the guest's CLOCK_BOOTTIME and marks the kernel log (two shell builtins, back to
/// back), then prints the first and the mark's printk time (see `clocks`).
const CLOCKS_SCRIPT: [&str; 4] = [
    "read u r < /proc/uptime",
    "echo smark > /dev/kmsg",
    "echo $u",
    "dmesg -r | grep smark | tail -n1",
];

/// The loop, one short line each (busybox's line editing redraws lines wider than the
/// terminal, so the script is written line by line).
const LOOP_SCRIPT: [&str; 11] = [
    "echo $$ > /tmp/pid",
    "i=0",
    "while true; do",
    "i=$((i+1))",
    "echo $i > /tmp/c2",
    "mv /tmp/c2 /tmp/count",
    "read g < /tmp/gen",
    "echo \"$i $g\" >> /mnt/log",
    "sync",
    "sleep 0.2",
    "done",
];

/// Flattens the disk chain whose top is `top` into the raw file `out` (the store's first layer
/// names the launch disk, which lives outside the store: trusted here).
fn flatten(top: &Path, out: &Path) {
    let anywhere = disk::ParentPolicy::anywhere();
    disk::ops::convert_with(
        top,
        out,
        disk::ops::ConvertFormat::Raw,
        &anywhere,
        &mut |_, _| {},
    )
    .unwrap_or_else(|e| panic!("flatten {}: {e}", top.display()));
}

/// The lines of `/log` in the ext4 image `image` (read with debugfs).
fn host_log(image: &Path) -> Vec<String> {
    let (status, out, err) = e2fs("debugfs", &["-R", "cat /log"], image);
    assert!(status.success(), "debugfs cat /log: {status}: {err}");
    out.lines().map(str::to_string).collect()
}

/// One line of the guest's log: `i GEN`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    i: u64,
    generation: String,
}

/// Parses log lines; panics (naming `what`) on a line that is not `i GEN`.
fn parse_log(lines: &[String], what: &str) -> Vec<Entry> {
    lines
        .iter()
        .map(|l| {
            let mut words = l.split_whitespace();
            let i = words.next().and_then(|w| w.parse().ok());
            let g = words.next();
            match (i, g, words.next()) {
                (Some(i), Some(g), None) => Entry {
                    i,
                    generation: g.to_string(),
                },
                _ => panic!("{what}: the line {l:?} is not `i GEN`; the log: {lines:?}"),
            }
        })
        .collect()
}

/// Checks that `log` is `1, 2, ..., n` with the generations `gens` in that order (each
/// present one forms one run; a generation may be absent only if it is not the first); returns
/// where each generation starts (its first `i`, or None).
fn check_log(log: &[Entry], gens: &[&str], what: &str) -> Vec<Option<u64>> {
    assert!(!log.is_empty(), "{what}: the log is empty");
    for (k, e) in log.iter().enumerate() {
        assert_eq!(
            e.i,
            k as u64 + 1,
            "{what}: line {} is {e:?}, not {}: the log is not 1, 2, 3, ... (a repeat is a line \
             from a discarded timeline, a gap a lost line); the log: {log:?}",
            k + 1,
            k + 1
        );
        assert!(
            gens.contains(&e.generation.as_str()),
            "{what}: line {e:?} has a generation outside {gens:?}; the log: {log:?}"
        );
    }
    let rank = |g: &str| gens.iter().position(|x| *x == g).unwrap();
    for w in log.windows(2) {
        assert!(
            rank(&w[0].generation) <= rank(&w[1].generation),
            "{what}: {:?} after {:?}: generations out of order {gens:?}; the log: {log:?}",
            w[1],
            w[0]
        );
    }
    assert_eq!(
        log[0].generation, gens[0],
        "{what}: the log does not start with {}",
        gens[0]
    );
    gens.iter()
        .map(|g| log.iter().find(|e| e.generation == *g).map(|e| e.i))
        .collect()
}

/// Runs `cmd` (in /tmp), whose output must be `want` numbers, within `timeout`.
fn numbers_within(sh: &mut Shell, cmd: &str, want: usize, timeout: Duration) -> Vec<u64> {
    let (out, status) = sh.run(cmd, timeout);
    let nums: Vec<u64> = out.iter().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(
        status == 0 && nums.len() == want && out.len() == want,
        "`{cmd}` gave {out:?} (status {status}), not {want} numbers; {}",
        sh.console()
    );
    nums
}

/// Runs `cmd` (in /tmp), whose output must be `want` numbers.
fn numbers(sh: &mut Shell, cmd: &str, want: usize) -> Vec<u64> {
    numbers_within(sh, cmd, want, SHELL_TIMEOUT)
}

/// The loop's count (the loop replaces the file by a rename: it is never seen empty).
fn count(sh: &mut Shell) -> u64 {
    numbers(sh, "cat count", 1)[0]
}

/// Waits until the count reaches `target`; returns it. Fails if it stops growing.
fn wait_count(sh: &mut Shell, target: u64) -> u64 {
    let mut last = (count(sh), Instant::now());
    loop {
        let c = count(sh);
        if c >= target {
            return c;
        }
        if c != last.0 {
            last = (c, Instant::now());
        }
        assert!(
            last.1.elapsed() < COUNT_STALL_TIMEOUT,
            "the count stays at {c}, below {target}, for {COUNT_STALL_TIMEOUT:?}; {}",
            sh.console()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Switches the loop's generation to `g`: the count before, then after (the file is
/// replaced by a rename, so the loop reads the old or the new one whole). Short commands:
/// a line wider than the terminal comes back garbled by busybox's line editing. The
/// switch itself must answer within `timeout`.
fn switch_generation(sh: &mut Shell, g: &str, timeout: Duration) -> (u64, u64) {
    let n = numbers_within(
        sh,
        &format!("echo {g} > g2; cat count; mv g2 gen; cat count"),
        2,
        timeout,
    );
    (n[0], n[1])
}

/// The guest's CLOCK_BOOTTIME (`/proc/uptime`, kept by its clocksource) and its printk
/// clock (`sched_clock`), in seconds, read back to back.
fn clocks(sh: &mut Shell) -> (f64, f64) {
    let out = sh.ok("sh /tmp/ck.sh");
    let uptime = out.iter().find_map(|l| l.trim().parse().ok());
    // `<12>[  123.456789] smark`
    let printk = out
        .iter()
        .find(|l| l.contains("smark"))
        .and_then(|l| l.split_once('[')?.1.split_once(']'))
        .and_then(|(t, _)| t.trim().parse().ok());
    match (uptime, printk) {
        (Some(u), Some(p)) => (u, p),
        _ => panic!("cannot read the guest's clocks from {out:?}"),
    }
}

/// How many RCU stall reports the guest's kernel log holds.
fn rcu_stalls(sh: &mut Shell) -> u64 {
    let (out, _) = sh.run("dmesg | grep -c 'rcu: INFO'", SHELL_TIMEOUT);
    out.iter()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("grep -c gave {out:?}"))
}

/// The guest's log, parsed.
fn guest_log(sh: &mut Shell, what: &str) -> Vec<Entry> {
    let lines = sh.ok("cat /mnt/log");
    parse_log(&lines, what)
}

#[test]
fn checkpoint_and_apply_a_counting_linux_guest() {
    let kit = kit("test");
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("data.raw");
    ext4_disk(&disk, 64 << 20, "stratadata");
    let sock = tmp.path().join("api.sock");
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();

    let started = Instant::now();
    let mut sh = Shell::start(
        &[
            "--guest",
            "linux",
            "--linux-kernel",
            "test",
            "--vcpus",
            "2",
            "--memory",
            "256M",
            "--disk",
            &format!("path={}", disk.display()),
            "--api-socket",
            sock.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--checkpoint-type",
            "standard",
        ],
        TIMEOUTS,
    )
    .reporting_threads();
    let boot = sh.wait_ready(started);
    eprintln!(
        "linux checkpoint: kit {}: strata-linux-ready {boot:?} after start",
        kit.display()
    );
    let api = api_client(&sock);
    assert_eq!(api.vm().unwrap().state, VmState::Running);

    // Kernel messages off the console (the test parses what the shell prints there).
    sh.ok("echo 1 > /proc/sys/kernel/printk");
    // The counting loop, on ext4 on the virtio disk.
    sh.ok("mount -t ext4 /dev/vda /mnt");
    sh.ok("echo A > /tmp/gen");
    for line in LOOP_SCRIPT {
        assert!(!line.contains('\''), "{line}");
        sh.ok(&format!("echo '{line}' >> /tmp/l.sh"));
    }
    assert_eq!(sh.ok("cat /tmp/l.sh"), LOOP_SCRIPT, "the loop script");
    for line in CLOCKS_SCRIPT {
        sh.ok(&format!("echo '{line}' >> /tmp/ck.sh"));
    }
    // In a subshell: the loop belongs to init, not to the console's job control.
    sh.ok("(sh /tmp/l.sh </dev/null >/dev/null 2>&1 &)");
    sh.ok("cd /tmp");
    sh.ok("until [ -e count ]; do sleep 0.2; done");

    // 1. Let it run.
    let c0 = wait_count(&mut sh, 5);
    let clocksource = sh.ok("cat /sys/devices/system/clocksource/*/current_*");
    let stalls_before = rcu_stalls(&mut sh);
    let clocks_before = clocks(&mut sh);
    let clocks_before_at = Instant::now();
    eprintln!(
        "linux checkpoint: count {c0} before the checkpoint; clocksource {clocksource:?}, \
         CLOCK_BOOTTIME and printk clock {clocks_before:?}"
    );

    // 2. A standard checkpoint of the running guest.
    let taken = api
        .create_checkpoint(&CreateCheckpoint {
            name: Some("counting".into()),
            kind: None,
        })
        .unwrap_or_else(|e| panic!("create the checkpoint: {e}; {}", sh.console()));
    let taken_at = Instant::now();
    assert_eq!(taken.kind, TakenType::Standard, "{taken:?}");
    assert_eq!(taken.disks.len(), 1, "{taken:?}");
    eprintln!(
        "linux checkpoint: checkpoint {} taken, guest paused {:?} us, sizes {:?}",
        taken.id, taken.paused_us, taken.sizes
    );

    // 3. The timeline to be discarded: generation B.
    let (b0, b1) = switch_generation(&mut sh, "B", SHELL_TIMEOUT);
    eprintln!("linux checkpoint: count {b0}..{b1} after the checkpoint (generation B)");
    assert!(c0 <= b0 && b0 <= b1, "c0 {c0}, b0 {b0}, b1 {b1}");

    // The disk the checkpoint froze, read on the host: after a journal replay, `1 A .. d A`
    // with everything the loop had synced before the checkpoint.
    let frozen = PathBuf::from(&taken.disks[0]);
    let frozen_hash = file_hash(&frozen);
    let frozen_raw = tmp.path().join("checkpoint.raw");
    flatten(&frozen, &frozen_raw);
    let (fsck, out, err) = e2fs("e2fsck", &["-fy"], &frozen_raw);
    assert!(
        matches!(fsck.code(), Some(0 | 1)),
        "e2fsck of the checkpoint's disk {}: {fsck}\n{out}{err}",
        frozen.display()
    );
    let at_checkpoint = parse_log(&host_log(&frozen_raw), "the checkpoint's disk");
    check_log(&at_checkpoint, &["A"], "the checkpoint's disk");
    let d = at_checkpoint.len() as u64;
    eprintln!("linux checkpoint: the checkpoint's disk (e2fsck -fy: {fsck}) holds 1 A .. {d} A");
    assert!(
        c0 - 1 <= d && d <= b0,
        "the checkpoint's disk ends at {d}: the loop had synced {} before the checkpoint and \
         counted at most to {b0} at it",
        c0 - 1
    );

    // 4. The discarded timeline runs on and reaches the disk.
    wait_count(&mut sh, b1 + DISCARDED_ROUNDS);
    sh.ok("sync");
    let before_apply = guest_log(&mut sh, "the log before the apply");
    let starts = check_log(&before_apply, &["A", "B"], "the log before the apply");
    let first_b = starts[1].expect("B lines in the log before the apply");
    assert!(
        b0 <= first_b && first_b <= b1 + 1,
        "the first B line is {first_b}, not in [{b0}, {}]",
        b1 + 1
    );
    let pre = count(&mut sh);
    eprintln!(
        "linux checkpoint: before the apply: count {pre}, log 1 A .. {} A, {first_b} B .. {} B",
        first_b - 1,
        before_apply.len()
    );
    if let Some(left) = CHECKPOINT_AGE_AT_APPLY.checked_sub(taken_at.elapsed()) {
        std::thread::sleep(left);
    }

    // 5. Apply: the guest goes back to the checkpoint, processes and disk.
    let age = taken_at.elapsed();
    let vm = api
        .apply_checkpoint(
            &taken.id,
            &ApplyCheckpoint {
                save_current: false,
            },
        )
        .unwrap_or_else(|e| panic!("apply the checkpoint: {e}; {}", sh.console()));
    let applied_at = Instant::now();
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    assert_eq!(vm.current_checkpoint.as_deref(), Some(taken.id.as_str()));
    eprintln!(
        "linux checkpoint: checkpoint applied {:.1} s after it was taken",
        age.as_secs_f64()
    );
    sh.hint = format!(
        "after applying a checkpoint taken {:.1} s earlier: a guest whose clocksource (TSC) \
         was not restored with its kvmclock jumps by that much, reports RCU stalls, catches \
         up its ticks, and on PVM hangs for good once a stall report sends an NMI (the \
         sender stays on the KVM_HC_SEND_IPI vmcall): is invariant TSC hidden from it? ",
        age.as_secs_f64()
    );
    let (k0, k1) = switch_generation(&mut sh, "C", APPLY_ANSWER_TIMEOUT);
    sh.hint.clear();
    let answered = applied_at.elapsed();
    let clocks_after = clocks(&mut sh);
    let between_clock_reads = clocks_before_at.elapsed().as_secs_f64();
    let stalls_after = rcu_stalls(&mut sh);
    eprintln!(
        "linux checkpoint: count {k0}..{k1} right after the apply (generation C); the shell \
         answered {:.1} s after the apply; CLOCK_BOOTTIME and printk clock {clocks_after:?}; \
         {} RCU stall reports since the checkpoint",
        answered.as_secs_f64(),
        stalls_after.saturating_sub(stalls_before)
    );
    assert!(
        c0 <= k0 && k0 < pre,
        "after the apply the count is {k0}: it should continue from the checkpoint's value \
         (at least {c0}, read before it) and be below {pre}, where the discarded timeline got"
    );
    let later = wait_count(&mut sh, k1 + 5);
    eprintln!("linux checkpoint: the count grows on after the apply: {later}");

    // Stop the loop; read the log from the disk, not from the page cache.
    sh.ok("kill $(cat /tmp/pid)");
    sh.ok("sync");
    sh.ok("echo 3 > /proc/sys/vm/drop_caches");
    let after_apply = guest_log(&mut sh, "the log after the apply");
    let starts = check_log(&after_apply, &["A", "C"], "the log after the apply");
    let first_c = starts[1].expect("C lines in the log after the apply");
    assert!(
        k0 <= first_c && first_c <= k1 + 1,
        "the first C line is {first_c}, not in [{k0}, {}]",
        k1 + 1
    );
    assert_eq!(
        after_apply[..at_checkpoint.len()],
        at_checkpoint[..],
        "the checkpoint's disk is not a prefix of the log after the apply"
    );
    eprintln!(
        "linux checkpoint: after the apply: log 1 A .. {} A, {first_c} C .. {} C",
        first_c - 1,
        after_apply.len()
    );

    // The checkpoint is the current one.
    let list = api.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 1, "{list:?}");
    assert!(list.checkpoints[0].current, "{list:?}");

    // Power off. With an API socket strata outlives its guest: the VM is off, then strata is
    // ended (killed: what the guest flushed is on disk) and the host reads the active layer.
    sh.ok("umount /mnt");
    sh.send("poweroff -f\n");
    let deadline = Instant::now() + Duration::from_secs(120);
    let off = loop {
        let vm = api.vm().unwrap();
        if vm.state == VmState::Off {
            break vm;
        }
        assert!(
            Instant::now() < deadline,
            "the VM is still {:?} 120 s after poweroff; {}",
            vm.state,
            sh.console()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(off.last_exit.as_deref(), Some("poweroff"), "{off:?}");
    drop(api);
    drop(sh);

    let store = snapshot::store::Store::open(&state).unwrap();
    let active = store.active()[0].top(store.location());
    assert_ne!(active, frozen, "the VM wrote the checkpoint's disk");
    let active_raw = tmp.path().join("active.raw");
    flatten(&active, &active_raw);
    let (fsck, out, err) = e2fs("e2fsck", &["-fn"], &active_raw);
    assert!(
        fsck.success(),
        "e2fsck -fn of the disk after the apply ({}): {fsck}\n{out}{err}",
        active.display()
    );
    let on_disk = parse_log(&host_log(&active_raw), "the disk after poweroff");
    assert_eq!(
        on_disk, after_apply,
        "the disk after poweroff does not hold the log the guest read"
    );
    assert_eq!(
        file_hash(&frozen),
        frozen_hash,
        "the checkpoint's disk {} changed",
        frozen.display()
    );

    // The guest's time continues from the checkpoint: both clocks advanced alike.
    let boottime = clocks_after.0 - clocks_before.0;
    let printk = clocks_after.1 - clocks_before.1;
    assert!(
        (boottime - printk).abs() < CLOCK_TOLERANCE_S,
        "across the checkpoint and the apply the guest's CLOCK_BOOTTIME (clocksource \
         {clocksource:?}) advanced {boottime:.1} s and its printk clock (kvmclock) {printk:.1} \
         s: the clocksource is off by {:.1} s after applying a checkpoint {:.1} s old (the \
         shell answered only {:.1} s after the apply, with {} RCU stall reports): was the \
         guest's TSC restored with kvmclock? (On PVM the guest's TSC is the host's: KVM \
         accepts KVM_SET_MSRS of IA32_TSC and ignores it.)",
        boottime - printk,
        age.as_secs_f64(),
        answered.as_secs_f64(),
        stalls_after.saturating_sub(stalls_before)
    );
    // The guest did not see the time between the checkpoint and the apply.
    let unseen = age.as_secs_f64();
    assert!(
        boottime < between_clock_reads - unseen + CLOCK_TOLERANCE_S,
        "the guest's CLOCK_BOOTTIME advanced {boottime:.1} s between two reads {:.1} s apart \
         on the host, across a checkpoint applied {unseen:.1} s after it was taken: the \
         guest should not count those {unseen:.1} s",
        between_clock_reads
    );
    eprintln!(
        "linux checkpoint: the guest's clocks advanced {boottime:.1} s (boot time) and \
         {printk:.1} s (printk) between reads {between_clock_reads:.1} s apart, across a \
         checkpoint {unseen:.1} s old"
    );
}
