//! Linux end to end, on the Linux test kernel of the guest kit (`resources/linux-kit/build.sh
//! test`): Linux's own virtio-mmio, virtio-blk and virtio-vsock drivers against Strata's
//! devices, and the real guest agent with a real `FIFREEZE`. Strata boots the kit itself, as a
//! user does, with `strata run --guest linux`.
//!
//! A Linux boot takes ~35 s on a PVM host, so the tests boot three times in all:
//! - `linux_test_kernel_end_to_end` (`--guest linux --linux-kernel test`): boot with 2 vCPUs,
//!   an ext4 disk and vsock; the kit strata booted is the cached one (not rebuilt) with its
//!   kernel and command line; count the CPUs; check ACPI and signals; mount the disk and write
//!   a file; ping the agent and run a command through it; freeze (a guest write blocks) and
//!   thaw (it completes); reboot and find the files again; `poweroff -f` ends Strata with
//!   status 0.
//! - `guest_linux_auto_boots_this_hosts_kit_from_the_cache` (`--guest linux` with
//!   `--linux-kernel auto` and `--no-reboot`): auto picks the kit for this host (the test kernel
//!   on PVM), again from the cache, and a guest reboot ends Strata with status 0.
//!
//! The kit cache is proven hit by timing-free evidence: the kit folder and its files keep their
//! inodes and modification times across strata's use of it, and the kit script, which logs
//! `linux-kit: ...` to strata's stderr whenever it builds or installs anything, logs nothing.
//!
//! When the kit cannot be built (no network for apt, no compiler, ...) the tests fail, they do
//! not skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use strata_tests::linux::{ext4_disk, kit, one_linux_vm, Shell, Timeouts};
use strata_tests::vsock_connect;

/// Boot to `strata-linux-ready`: ~25 s here, allow for a loaded CI machine.
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// One shell command on the console.
const SHELL_TIMEOUT: Duration = Duration::from_secs(60);
/// The console shell's hang guards (its VMs run one at a time, see `one_linux_vm`).
const TIMEOUTS: Timeouts = Timeouts {
    boot: LINUX_BOOT_TIMEOUT,
    shell_start: Duration::from_secs(60),
    command: SHELL_TIMEOUT,
};
const AGENT_PORT: u32 = 52;

/// The identity of a built kit: inode and modification time of its folder and of each file
/// the script writes. Rebuilding it (the script builds into a temporary folder and renames it)
/// changes every one of them.
#[derive(Debug, PartialEq, Eq)]
struct KitStamp(Vec<(String, u64, i64, i64)>);

impl KitStamp {
    fn of(kit: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        KitStamp(
            [".", ".complete", "vmlinux", "initramfs.cpio", "cmdline.txt"]
                .iter()
                .map(|f| {
                    let m = std::fs::metadata(kit.join(f))
                        .unwrap_or_else(|e| panic!("{}/{f}: {e}", kit.display()));
                    (f.to_string(), m.ino(), m.mtime(), m.mtime_nsec())
                })
                .collect(),
        )
    }
}

/// Checks that the running guest is the kit's: its kernel (the `Linux version` banner built
/// into the kit's vmlinux, with its build time) and the kit's command line (strata appends its
/// `virtio_mmio.device=` entries).
fn assert_runs_the_kit(sh: &mut Shell, kit: &Path) {
    let version = sh.ok("cat /proc/version");
    assert_eq!(version.len(), 1, "{version:?}");
    let vmlinux = std::fs::read(kit.join("vmlinux")).unwrap();
    let banners: Vec<String> = vmlinux
        .windows(14)
        .enumerate()
        .filter(|(_, w)| w == b"Linux version ")
        .map(|(i, _)| {
            let rest = &vmlinux[i..];
            let end = rest.iter().position(|&b| b == 0 || b == b'\n').unwrap();
            String::from_utf8_lossy(&rest[..end]).trim_end().to_string()
        })
        .collect();
    assert!(
        banners.iter().any(|b| b == version[0].trim_end()),
        "the guest runs {:?}, not the kit's kernel {}: {banners:?}",
        version[0],
        kit.display()
    );
    let want = std::fs::read_to_string(kit.join("cmdline.txt")).unwrap();
    let cmdline = sh.ok("cat /proc/cmdline").join(" ");
    assert!(
        cmdline.starts_with(want.trim()),
        "/proc/cmdline {cmdline:?} is not the kit's {want:?}"
    );
}

/// Fails if the kit script built or installed anything during this strata run (it logs
/// `linux-kit: ...` to strata's stderr only then).
fn assert_kit_script_was_quiet(stderr: &str) {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("linux-kit:"))
        .collect();
    assert!(
        lines.is_empty(),
        "strata's use of the kit was not a cache hit: {lines:?}"
    );
}

/// One JSON-lines connection to the guest agent.
struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    /// Connects to the agent, retrying while it starts (it is started by /init).
    fn connect(uds: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = std::panic::catch_unwind(|| {
                let s = vsock_connect(uds, AGENT_PORT);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut a = Agent {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    writer: s,
                };
                let pong = a.request(r#"{"op":"ping"}"#);
                assert_eq!(pong["ok"], true, "{pong}");
                a.writer
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                a
            });
            match attempt {
                Ok(a) => return a,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    fn request(&mut self, json: &str) -> serde_json::Value {
        self.writer
            .write_all(format!("{json}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read the agent's reply");
        assert!(n > 0, "the agent closed the connection after {json}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }
}

#[test]
fn linux_test_kernel_end_to_end() {
    let _one = one_linux_vm();
    // First use: builds the kit, or finds it. strata's own use below must hit the cache.
    let kit = kit("test");
    let stamp = KitStamp::of(&kit);
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("data.raw");
    ext4_disk(&disk, 64 << 20, "stratadata");
    let uds = tmp.path().join("vsock.sock");

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
            "--vsock",
            &format!("cid=3,socket={}", uds.display()),
        ],
        TIMEOUTS,
    );
    let boot = sh.wait_ready(started);
    eprintln!("linux: strata-linux-ready {boot:?} after start");
    assert_eq!(KitStamp::of(&kit), stamp, "strata's use rebuilt the kit");
    assert_runs_the_kit(&mut sh, &kit);

    // The sandbox with a Linux guest (vmm/src/sandbox/mod.rs): every thread has
    // no_new_privs and a seccomp filter, except, on kvm_pvm, the vCPU threads, the thread that
    // starts them and the KVM worker a vCPU starts (a filter there hangs the guest's user
    // space, which has just run the kit's checks above).
    let pvm = vmm::linux_kit::is_pvm();
    let threads = strata_tests::thread_status(sh.vm.pid());
    let vcpu = |n: &str| {
        n.strip_prefix("vcpu")
            .is_some_and(|i| i.parse::<u32>().is_ok())
    };
    assert_eq!(
        threads.values().filter(|t| vcpu(&t.0)).count(),
        2,
        "{threads:?}"
    );
    for (tid, (name, seccomp, nnp)) in &threads {
        let unfiltered = vcpu(name) || name == "vcpu-spawner" || name.starts_with("kvm-nx");
        let want = if pvm && unfiltered { "0" } else { "2" };
        assert_eq!(
            seccomp, want,
            "thread {tid} ({name}): Seccomp {seccomp}, expected {want} (pvm: {pvm}): {threads:?}"
        );
        assert_eq!(nnp, "1", "thread {tid} ({name}): {threads:?}");
    }

    // Both vCPUs, from the MADT.
    let cpus = sh.ok("grep -c ^processor /proc/cpuinfo");
    assert_eq!(cpus, ["2"], "CPUs in /proc/cpuinfo");

    // ACPI loaded Strata's tables without AML errors.
    let (errors, _) = sh.run("dmesg | grep -c AE_", SHELL_TIMEOUT);
    assert_eq!(errors, ["0"], "ACPI errors in dmesg");
    // Both virtio-mmio devices are in the DSDT (LNRO0005); the command line's copies of them
    // are refused as duplicates (EBUSY) once ACPI has them.
    let acpi = sh.ok("ls /sys/bus/acpi/devices").join(" ");
    for dev in ["LNRO0005:00", "LNRO0005:01", "PNP0501:00"] {
        assert!(acpi.contains(dev), "no ACPI device {dev}: {acpi}");
    }
    let (blocks, _) = sh.run("ls /sys/block", SHELL_TIMEOUT);
    assert!(
        blocks.iter().any(|l| l.contains("vda")),
        "no vda: {blocks:?}"
    );

    // Signals and their return path (the SYSCALL-as-page-fault patch on PVM: sigreturn,
    // restarted system calls, a child killed by a signal).
    assert_eq!(
        sh.ok("trap 'echo got-usr1' USR1; kill -USR1 $$"),
        ["got-usr1"]
    );
    let (killed, status) = sh.run("timeout 1 sleep 9", SHELL_TIMEOUT);
    assert_eq!(status, 143, "timeout 1 sleep 9: {killed:?}");

    // ext4 on virtio-blk.
    sh.ok("mount -t ext4 /dev/vda /mnt");
    sh.ok("echo hello-strata > /mnt/hello");
    sh.ok("sync");

    // The agent over vsock.
    let mut agent = Agent::connect(&uds);
    let info = agent.request(r#"{"op":"info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["hostname"], "strata-linux", "{info}");
    let exec = agent.request(r#"{"op":"exec","argv":["cat","/mnt/hello"],"timeout_s":30}"#);
    assert_eq!(exec["ok"], true, "{exec}");
    assert_eq!(exec["exit_code"], 0, "{exec}");
    assert_eq!(exec["stdout"], "hello-strata\n", "{exec}");

    // freeze really freezes the guest's ext4: a write from the console blocks until thaw.
    let frozen = agent.request(r#"{"op":"freeze","timeout_s":120}"#);
    assert_eq!(frozen["ok"], true, "{frozen}");
    let list: Vec<String> = frozen["frozen"]
        .as_array()
        .unwrap_or_else(|| panic!("no frozen list: {frozen}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        list.iter().any(|m| m == "/mnt"),
        "/mnt not frozen: {frozen}"
    );
    sh.send("echo x > /mnt/f; sync; echo W\"\"DONE\n");
    let blocked_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < blocked_until {
        if let Some(l) = sh.try_line(blocked_until.saturating_duration_since(Instant::now())) {
            assert_ne!(
                l.trim_end(),
                "WDONE",
                "the write finished on a frozen file system"
            );
        }
    }
    let thawed = agent.request(r#"{"op":"thaw"}"#);
    assert_eq!(thawed["ok"], true, "{thawed}");
    sh.wait_for(SHELL_TIMEOUT, "the write after thaw", |l| l == "WDONE");
    drop(agent);

    // Reboot (Strata resets the guest in the same process) and find both files again.
    sh.ok("umount /mnt");
    let rebooted = Instant::now();
    sh.send("reboot -f\n");
    let boot2 = sh.wait_ready(rebooted);
    eprintln!("linux: strata-linux-ready {boot2:?} after reboot");
    sh.ok("mount -t ext4 /dev/vda /mnt");
    assert_eq!(sh.ok("cat /mnt/hello"), ["hello-strata"]);
    assert_eq!(sh.ok("cat /mnt/f"), ["x"]);
    sh.ok("umount /mnt");

    // poweroff ends Strata with status 0.
    sh.send("poweroff -f\n");
    let status = sh.wait_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "strata exited with {status}; {}",
        sh.console()
    );
    assert_kit_script_was_quiet(&sh.vm.stderr());
}

#[test]
fn guest_linux_auto_boots_this_hosts_kit_from_the_cache() {
    let _one = one_linux_vm();
    // auto: the test kernel on a PVM host (this project's machines), the stock one elsewhere.
    let mode = if vmm::linux_kit::is_pvm() {
        "test"
    } else {
        "stock"
    };
    let kit = kit(mode);
    let stamp = KitStamp::of(&kit);

    let started = Instant::now();
    let mut sh = Shell::start(
        &[
            "--guest",
            "linux",
            "--linux-kernel",
            "auto",
            "--no-reboot",
            "--memory",
            "256M",
        ],
        TIMEOUTS,
    );
    let boot = sh.wait_ready(started);
    eprintln!("linux ({mode} kit through auto): strata-linux-ready {boot:?} after start");
    assert_eq!(KitStamp::of(&kit), stamp, "strata's use rebuilt the kit");
    assert_runs_the_kit(&mut sh, &kit);

    // With --no-reboot a guest reboot (Linux resets through the FADT's reset register) ends
    // strata with status 0 instead of booting again.
    sh.send("reboot -f\n");
    let status = sh.wait_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "strata exited with {status}; {}",
        sh.console()
    );
    let boots = sh
        .vm
        .transcript
        .iter()
        .filter(|l| l.trim_end() == "strata-linux-ready")
        .count();
    assert_eq!(
        boots,
        1,
        "the guest booted again despite --no-reboot; {}",
        sh.console()
    );
    assert_kit_script_was_quiet(&sh.vm.stderr());
}
