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
    disks: [PathBuf; 2],
    /// What each disk must hold: the host's model of the guest's `blk write`s.
    model: [Vec<u8>; 2],
    _dir: tempfile::TempDir,
}

/// Boots the test guest with two zeroed 4 MiB raw disks and vsock (CID 3).
fn boot() -> Guest {
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
    let mut vm = Vm::start(&[
        "--memory",
        "64M",
        "--disk",
        &disk_args[0],
        "--disk",
        &disk_args[1],
        "--vsock",
        &vsock,
    ]);
    vm.wait_ready();
    Guest {
        vm,
        uds,
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
        let status = self.vm.wait_exit(EXIT_GUARD);
        assert!(
            status.success(),
            "strata exited with {status} after poweroff; stderr:\n{}",
            tail(&self.vm.stderr())
        );
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
    let mut g = boot();
    g.write_and_check(0, 0, 16, 1);
    g.write_and_check(1, 0, 16, 2);
    g.vm.command(&format!("fill {FILL_MIB} {FILL_SEED}")).ok();

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
    // The device may or may not have set DEVICE_NEEDS_RESET; its status reads either way.
    let status = g.vm.line("blk 0 status");
    assert_status_line(&status);

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
    let mut g = boot();
    g.ping();
    g.vm.command("hostile vsock avail-idx").ok();
    assert_eq!(g.vm.command("vsock").status, err("driver needs reset"));
    // Everything else goes on.
    assert_eq!(g.vm.line("echo still here"), "still here");
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
    let mut g = boot();
    g.write_and_check(0, 0, 16, 1);
    g.write_and_check(1, 0, 16, 2);
    g.vm.command(&format!("fill {FILL_MIB} {FILL_SEED}")).ok();
    for seed in 1..=6u64 {
        g.vm.command(&format!("hostile mmio {seed}")).ok();
        assert_eq!(g.vm.line("echo still here"), "still here");
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
