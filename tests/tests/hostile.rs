//! A guest that breaks the virtio rules on purpose must not hang or crash the VMM (issue 11,
//! "devices a guest cannot hang"; DESIGN invariant 6). The test guest's `hostile` commands
//! misbehave on one device's queue or on every MMIO register; afterwards the console, the other
//! disk and the agent must go on working, the broken device must work again once the guest resets
//! it (`blk N reset`, `vsock reset`), and strata must exit cleanly on `poweroff`. Also the device
//! status and reset commands on healthy devices. Every VM here has two raw disks and a vsock
//! device; no `hostile` request asks a device to write a disk, so each test ends by comparing the
//! disk files with what the guest wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use resources::pattern::{sector_fill, FNV_OFFSET, SECTOR_SIZE};
use strata_tests::Vm;
use vmm::agent::AgentClient;

/// Size of each disk.
const DISK_BYTES: usize = 4 << 20;
/// Hang guard: how long strata may take to exit after `poweroff`.
const EXIT_GUARD: Duration = Duration::from_secs(60);
/// MiB of guest memory `fill`ed before an attack and `check`ed after it: a device must not
/// write guest memory for a request it refuses (`huge` points its 1 GiB buffer there).
const FILL_MIB: u64 = 4;
const FILL_SEED: u64 = 7;

struct Guest {
    vm: Vm,
    uds: PathBuf,
    /// The API socket, for the VMs the `hostile` tests watch (the VMM then outlives its guest).
    api: Option<PathBuf>,
    disks: [PathBuf; 2],
    /// What each disk must hold: the host's model of the guest's `blk write`s.
    model: [Vec<u8>; 2],
    _dir: tempfile::TempDir,
}

/// Boots the test guest with two zeroed 4 MiB raw disks and vsock (CID 3).
fn boot() -> Guest {
    boot_with(false)
}

/// [`boot`], with an API socket when `api`.
fn boot_with(api: bool) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let disks = [dir.path().join("d0.raw"), dir.path().join("d1.raw")];
    for d in &disks {
        std::fs::write(d, vec![0u8; DISK_BYTES]).unwrap();
    }
    let uds = dir.path().join("v.sock");
    let disk_args: Vec<String> = disks
        .iter()
        .map(|d| format!("path={}", d.display()))
        .collect();
    let vsock = format!("cid=3,socket={}", uds.display());
    let api_path = dir.path().join("api.sock");
    let mut args = vec![
        "--memory",
        "64M",
        "--disk",
        &disk_args[0],
        "--disk",
        &disk_args[1],
        "--vsock",
        &vsock,
    ];
    if api {
        args.extend(["--api-socket", api_path.to_str().unwrap()]);
    }
    let mut vm = Vm::start(&args);
    let api = api.then_some(api_path);
    vm.wait_ready();
    Guest {
        vm,
        uds,
        api,
        disks,
        model: [vec![0u8; DISK_BYTES], vec![0u8; DISK_BYTES]],
        _dir: dir,
    }
}

impl Guest {
    fn agent(&self) -> AgentClient {
        AgentClient::connect(&self.uds, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("cannot reach the guest agent: {e}"))
    }

    /// Asserts that the agent answers a ping on a new connection.
    fn ping(&self) {
        self.agent()
            .ping()
            .unwrap_or_else(|e| panic!("the guest agent does not answer: {e}"));
    }

    /// What `blk N read SECTOR COUNT` must print, from the model.
    fn expected_hash(&self, disk: usize, sector: u64, count: u64) -> String {
        let from = sector as usize * SECTOR_SIZE;
        let to = (sector + count) as usize * SECTOR_SIZE;
        let bytes = &self.model[disk][from..to];
        format!(
            "{:016x}",
            resources::pattern::fnv1a64_update(FNV_OFFSET, bytes)
        )
    }

    /// `blk N write SECTOR COUNT SEED` and `blk N flush`, recorded in the model.
    fn write(&mut self, disk: usize, sector: u64, count: u64, seed: u64) {
        self.vm
            .command(&format!("blk {disk} write {sector} {count} {seed}"))
            .ok();
        self.vm.command(&format!("blk {disk} flush")).ok();
        let mut buf = [0u8; SECTOR_SIZE];
        for s in sector..sector + count {
            sector_fill(seed, s, &mut buf);
            let at = s as usize * SECTOR_SIZE;
            self.model[disk][at..at + SECTOR_SIZE].copy_from_slice(&buf);
        }
    }

    /// Asserts that `blk N read SECTOR COUNT` matches the model.
    fn check(&mut self, disk: usize, sector: u64, count: u64) {
        let got = self.vm.line(&format!("blk {disk} read {sector} {count}"));
        assert_eq!(
            got,
            self.expected_hash(disk, sector, count),
            "disk {disk} sectors {sector}..{}",
            sector + count
        );
    }

    /// Writes a pattern and reads it back.
    fn write_and_check(&mut self, disk: usize, sector: u64, count: u64, seed: u64) {
        self.write(disk, sector, count, seed);
        self.check(disk, sector, count);
    }

    /// Asserts `blk N status` is exactly `0xf` (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK).
    fn assert_healthy(&mut self, disk: usize) {
        assert_eq!(
            self.vm.line(&format!("blk {disk} status")),
            "0xf",
            "disk {disk}"
        );
    }

    /// `poweroff`; strata must exit 0 (a VMM with a device thread stuck in a loop does not),
    /// and the disk files must hold exactly what the guest wrote.
    fn poweroff(mut self) {
        self.vm.send("poweroff\n");
        if self.api.is_some() {
            // With an API socket the VMM outlives its guest: the VM must be off, by poweroff.
            let deadline = std::time::Instant::now() + EXIT_GUARD;
            loop {
                let reply = self.get_vm();
                if reply.contains("\"off\"") {
                    assert!(
                        reply.contains("\"poweroff\""),
                        "not a clean poweroff: {reply}"
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the VM is not off {EXIT_GUARD:?} after poweroff: {reply}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            let status = self.vm.wait_exit(EXIT_GUARD);
            assert!(
                status.success(),
                "strata exited with {status} after poweroff; stderr:\n{}",
                tail(&self.vm.stderr())
            );
        }
        for (path, model) in self.disks.iter().zip(&self.model) {
            let data = std::fs::read(path).unwrap();
            let differs = data
                .chunks(SECTOR_SIZE)
                .zip(model.chunks(SECTOR_SIZE))
                .position(|(a, b)| a != b);
            assert!(
                data.len() == model.len() && differs.is_none(),
                "{} does not hold what the guest wrote (first differing sector {differs:?})",
                path.display()
            );
        }
    }
}

/// Hang guard for an API answer (the VMM answers at once; this only keeps a hung VMM from
/// hanging the test).
const API_GUARD: Duration = Duration::from_secs(10);
/// How long the VMM's CPU time is watched while the guest idles.
const IDLE_WINDOW: Duration = Duration::from_secs(3);
/// RSS growth allowed across an attack: a device must not allocate for a request it refuses.
const RSS_SLACK_KIB: u64 = 8 * 1024;

impl Guest {
    /// `GET /v1/vm` over the API socket: the whole HTTP reply.
    fn get_vm(&self) -> String {
        use std::io::{Read, Write};
        let api = self.api.as_ref().expect("booted with an API socket");
        let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
        s.set_read_timeout(Some(API_GUARD)).unwrap();
        s.write_all(b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .unwrap_or_else(|e| panic!("the API did not answer: {e}"));
        assert!(reply.starts_with("HTTP/1.1 200"), "API: {reply}");
        reply
    }

    /// The API answers, and says the VM runs.
    fn assert_api_answers(&self) {
        let reply = self.get_vm();
        assert!(reply.contains("\"running\""), "API: {reply}");
    }

    /// The VMM's user + system CPU time in clock ticks (/proc/PID/stat fields 14 and 15).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.vm.pid())).unwrap();
        // The command name may hold spaces: fields count from after its closing parenthesis.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Asserts that the VMM uses (almost) no CPU while the guest idles at its prompt: a device
    /// thread spinning on a broken queue would use a whole core.
    fn assert_idle(&self) {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let before = self.cpu_ticks();
        std::thread::sleep(IDLE_WINDOW);
        let used = self.cpu_ticks() - before;
        let window = IDLE_WINDOW.as_secs() * hz;
        assert!(
            used * 5 < window,
            "the VMM used {used} of {window} clock ticks while the guest idled"
        );
    }

    /// The VMM's resident set in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.vm.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// The last lines of a (possibly huge) stderr.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Asserts that `line` is what `blk N status` prints: `0x<hex>`, then ` needs-reset` exactly when
/// bit 0x40 is set.
fn assert_status_line(line: &str) {
    let (hex, suffix) = match line.split_once(' ') {
        Some((hex, suffix)) => (hex, Some(suffix)),
        None => (line, None),
    };
    let value = hex
        .strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("not a status line: {line:?}"));
    let needs_reset = value & 0x40 != 0;
    assert_eq!(suffix, needs_reset.then_some("needs-reset"), "{line:?}");
}

fn err(reason: &str) -> Result<(), String> {
    Err(reason.to_string())
}

#[test]
fn healthy_disks_report_status_0xf_without_needs_reset() {
    let mut g = boot();
    g.assert_healthy(0);
    g.assert_healthy(1);
    assert_eq!(g.vm.command("blk 2 status").status, err("no such disk"));
    g.poweroff();
}

#[test]
fn blk_reset_brings_a_healthy_disk_back_with_its_data() {
    let mut g = boot();
    g.write_and_check(0, 0, 16, 42);
    g.write_and_check(1, 0, 16, 43);
    g.vm.command("blk 0 reset").ok();
    g.assert_healthy(0);
    // The data survives the reset, and the fresh queue serves new requests.
    g.check(0, 0, 16);
    g.write_and_check(0, 16, 16, 44);
    // Resets in a row, and of a disk that was just reset.
    g.vm.command("blk 0 reset").ok();
    g.vm.command("blk 0 reset").ok();
    g.check(0, 0, 32);
    // The other disk was not disturbed.
    g.assert_healthy(1);
    g.write_and_check(1, 16, 16, 45);
    g.check(1, 0, 32);
    assert_eq!(g.vm.command("blk 2 reset").status, err("no such disk"));
    g.poweroff();
}

#[test]
fn vsock_reset_drops_connections_and_the_agent_listens_again() {
    let mut g = boot();
    let mut old = g.agent();
    old.ping().unwrap();
    // Not through the agent: that would pull the device away from under its own request.
    let r = old.exec(&["vsock".into(), "reset".into()], 10).unwrap();
    assert_eq!((r.exit_code, r.stderr.as_str()), (1, "not over vsock"));
    g.vm.command("vsock reset").ok();
    let status = g.vm.line("vsock");
    assert!(
        status.contains(" conns=0 "),
        "connections left after the reset: {status}"
    );
    assert!(
        old.ping().is_err(),
        "a connection from before the reset still answers"
    );
    // The agent listens again; twice, with a reset in between.
    let mut new = g.agent();
    new.ping().unwrap();
    let r = new.exec(&["echo".into(), "hi".into()], 10).unwrap();
    assert_eq!((r.exit_code, r.stdout.trim_end()), (0, "hi"));
    g.vm.command("vsock reset").ok();
    g.ping();
    // The disks were not disturbed.
    g.write_and_check(0, 0, 8, 1);
    g.poweroff();
}

/// `hostile blk 0 <attack>` on a VM with two disks: the guest's driver gives disk 0 up, the
/// console, disk 1 and the agent keep working, `blk 0 reset` brings disk 0 back with its data,
/// guest memory the requests pointed at is unchanged, and strata exits cleanly.
fn hostile_blk(attack: &str) {
    let mut g = boot_with(true);
    g.write_and_check(0, 0, 16, 1);
    g.write_and_check(1, 0, 16, 2);
    g.vm.command(&format!("fill {FILL_MIB} {FILL_SEED}")).ok();
    let rss_before = g.rss_kib();

    g.vm.command(&format!("hostile blk 0 {attack}")).ok();

    // The guest's own driver refuses disk 0 until it is reset.
    assert_eq!(
        g.vm.command("blk 0 read 0 16").status,
        err("driver needs reset")
    );
    // Everything else goes on.
    assert_eq!(g.vm.line("echo still here"), "still here");
    g.write_and_check(1, 16, 16, 3);
    g.ping();
    // The device set DEVICE_NEEDS_RESET (virtio 1.2, 2.1.2) and stopped.
    let status = g.vm.line("blk 0 status");
    assert_status_line(&status);
    assert!(status.ends_with(" needs-reset"), "blk 0 status: {status}");
    // The VMM answers, spins on nothing, and allocated nothing for the refused request.
    g.assert_api_answers();
    g.assert_idle();
    let rss_after = g.rss_kib();
    assert!(
        rss_after < rss_before + RSS_SLACK_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    g.vm.command("blk 0 reset").ok();
    g.assert_healthy(0);
    g.check(0, 0, 16);
    g.write_and_check(0, 16, 16, 4);
    g.vm.command(&format!("check {FILL_MIB} {FILL_SEED}")).ok();
    g.poweroff();
}

#[test]
fn hostile_blk_avail_idx_far_ahead_leaves_the_vmm_and_the_other_disk_working() {
    hostile_blk("avail-idx");
}

#[test]
fn hostile_blk_descriptor_loop_leaves_the_vmm_and_the_other_disk_working() {
    hostile_blk("desc-loop");
}

#[test]
fn hostile_blk_one_gib_descriptor_leaves_the_vmm_and_the_other_disk_working() {
    hostile_blk("huge");
}

#[test]
fn hostile_blk_descriptors_past_ram_leave_the_vmm_and_the_other_disk_working() {
    hostile_blk("oob");
}

#[test]
fn hostile_vsock_avail_idx_leaves_the_vmm_working_and_vsock_reset_recovers() {
    let mut g = boot_with(true);
    g.ping();
    g.vm.command("hostile vsock avail-idx").ok();
    assert_eq!(g.vm.command("vsock").status, err("driver needs reset"));
    // Everything else goes on.
    assert_eq!(g.vm.line("echo still here"), "still here");
    g.assert_api_answers();
    g.assert_idle();
    g.write_and_check(0, 0, 16, 1);
    g.write_and_check(1, 0, 16, 2);
    // The guest resets the device and the host reaches the agent again.
    g.vm.command("vsock reset").ok();
    g.ping();
    assert!(g.vm.line("vsock").starts_with("cid=3 "));
    g.poweroff();
}

#[test]
fn hostile_mmio_leaves_the_vmm_working_and_resets_bring_every_device_back() {
    let mut g = boot_with(true);
    g.write_and_check(0, 0, 16, 1);
    g.write_and_check(1, 0, 16, 2);
    g.vm.command(&format!("fill {FILL_MIB} {FILL_SEED}")).ok();
    for seed in 1..=6u64 {
        g.vm.command(&format!("hostile mmio {seed}")).ok();
        assert_eq!(g.vm.line("echo still here"), "still here");
        g.assert_api_answers();
        if seed == 1 {
            g.assert_idle();
        }
        // Every driver gave its device up; the registers still read.
        for disk in 0..2 {
            assert_eq!(
                g.vm.command(&format!("blk {disk} read 0 16")).status,
                err("driver needs reset"),
                "disk {disk}, seed {seed}"
            );
            let status = g.vm.line(&format!("blk {disk} status"));
            assert_status_line(&status);
        }
        assert_eq!(g.vm.command("vsock").status, err("driver needs reset"));
        // Resets bring everything back, data included.
        for disk in 0..2 {
            g.vm.command(&format!("blk {disk} reset")).ok();
            g.assert_healthy(disk);
            g.check(disk, 0, 16);
        }
        g.vm.command("vsock reset").ok();
        g.ping();
    }
    g.write_and_check(0, 16, 16, 3);
    g.write_and_check(1, 16, 16, 4);
    g.vm.command(&format!("check {FILL_MIB} {FILL_SEED}")).ok();
    g.poweroff();
}
