//! Standard checkpoints end to end (issue #13's acceptance tests): the test guest counts on
//! every vCPU, fills guest memory and writes two disks; a checkpoint taken through the API is
//! applied in place and restored in a new process (`strata restore`), and the guest must come
//! back exactly as it was at the checkpoint (counter, memory, disks, its vsock agent). Then
//! the store itself: ten rounds of checkpoint/apply/checkpoint leave it clean with the launch
//! disks frozen, a reboot writes only the active layers, and corrupt state and memory files
//! are refused with an error naming them.
//!
//! Guest code is slow on this machine's KVM (PVM): sizes are small and every timeout is a hang
//! guard, never a speed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use api::types::{
    ApplyCheckpoint, CheckpointInfo, CheckpointList, CheckpointType, CreateCheckpoint, TakenType,
    VmInfo, VmState,
};
use api::{Client, ClientError};
use resources::pattern::{fnv1a64_update, sector_fill, FNV_OFFSET, SECTOR_SIZE};
use snapshot::store::{Store, StoreRecord, LAYERS_DIR, STORE_FILE};
use strata_tests::checkpoint_setup::{
    api_error, count_get, resync, wait_agent, Console, Count, Restored, Setup,
};
use strata_tests::{api_client, strata_bin, Vm};

const MIB: u64 = 1 << 20;
/// The launch disks: small raw files (sparse, all zeros).
const DISK_SIZE: u64 = 8 * MIB;
/// Hang guard for a process to exit.
const EXIT_GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Consoles: `Console` (shared) for `strata run` and `strata restore`.

/// Powers the guest off from its console (`poweroff`), waits until the API says the VM is off
/// (with an API socket the VMM outlives its guest, waiting for the next call), then ends the
/// process: it has closed its disks and the store when the VM went off.
fn power_off(mut con: impl Console, c: Client) {
    con.ok("poweroff");
    let deadline = Instant::now() + EXIT_GUARD;
    loop {
        let v = c.vm().unwrap();
        if v.state == VmState::Off {
            assert_eq!(v.last_exit.as_deref(), Some("poweroff"), "{v:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM is not off {EXIT_GUARD:?} after poweroff: {v:?}\nconsole:\n{}",
            con.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Dropping the console kills the process and reaps it.
    drop(c);
    drop(con);
}

// ---------------------------------------------------------------------------------------------
// A VM's files: launch disks, sockets, checkpoint location.

/// Boots `strata run` on `s`'s disks: `vcpus`, 64 MiB, the vsock device, the API socket and
/// the checkpoint location; waits for the guest and the API.
fn boot(s: &Setup, vcpus: u32) -> (Vm, Client) {
    s.boot(Some(vcpus), &["--vsock", &s.vsock_arg()])
}

// ---------------------------------------------------------------------------------------------
// The host's model of the disks, with the guest's own sector pattern.

#[derive(Clone)]
struct DiskModel(Vec<u8>);

impl DiskModel {
    fn zero() -> DiskModel {
        DiskModel(vec![0; DISK_SIZE as usize])
    }

    fn write(&mut self, sector: u64, count: u64, seed: u64) {
        let mut buf = [0u8; SECTOR_SIZE];
        for s in sector..sector + count {
            sector_fill(seed, s, &mut buf);
            let at = s as usize * SECTOR_SIZE;
            self.0[at..at + SECTOR_SIZE].copy_from_slice(&buf);
        }
    }

    /// What `blk N read SECTOR COUNT` prints.
    fn hash(&self, sector: u64, count: u64) -> String {
        let from = sector as usize * SECTOR_SIZE;
        let to = (sector + count) as usize * SECTOR_SIZE;
        format!("{:016x}", fnv1a64_update(FNV_OFFSET, &self.0[from..to]))
    }
}

/// `blk N write` in the guest and in the model.
fn disk_write(
    con: &mut impl Console,
    models: &mut [DiskModel],
    n: usize,
    sector: u64,
    count: u64,
    seed: u64,
) {
    con.ok(&format!("blk {n} write {sector} {count} {seed}"));
    models[n].write(sector, count, seed);
}

fn disk_read(con: &mut impl Console, n: usize, (sector, count): (u64, u64)) -> String {
    con.line(&format!("blk {n} read {sector} {count}"))
}

// ---------------------------------------------------------------------------------------------
// API helpers.

fn take_checkpoint(c: &Client, name: &str) -> CheckpointInfo {
    let info = c
        .create_checkpoint(&CreateCheckpoint {
            name: Some(name.into()),
            kind: Some(CheckpointType::Standard),
        })
        .unwrap_or_else(|e| panic!("create checkpoint {name:?}: {e}"));
    assert_eq!(info.kind, TakenType::Standard, "{info:?}");
    assert_eq!(info.name, name);
    info
}

fn apply(c: &Client, id: &str) -> Result<VmInfo, ClientError> {
    c.apply_checkpoint(
        id,
        &ApplyCheckpoint {
            save_current: false,
        },
    )
}

/// The contents of `paths`, to compare byte for byte later.
fn read_files(paths: &[PathBuf]) -> Vec<(PathBuf, Vec<u8>)> {
    paths
        .iter()
        .map(|p| {
            (
                p.clone(),
                std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
            )
        })
        .collect()
}

fn assert_unchanged(before: &[(PathBuf, Vec<u8>)], what: &str) {
    for (p, bytes) in before {
        let now = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        assert!(
            now == *bytes,
            "{what}: {} changed ({} bytes before, {} now)",
            p.display(),
            bytes.len(),
            now.len()
        );
    }
}

/// `store.json` as it is now (readable while the VMM holds the store's lock).
fn store_record(state: &Path) -> StoreRecord {
    let path = state.join(STORE_FILE);
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files of the layers the VM writes now, in `--disk` order.
fn active_layers(state: &Path) -> Vec<PathBuf> {
    let record = store_record(state);
    let active: Vec<PathBuf> = record.active.iter().map(|d| d.top(state)).collect();
    for (d, p) in record.active.iter().zip(&active) {
        assert!(
            d.layer.is_some() && p.starts_with(state.join(LAYERS_DIR)),
            "disk {} is active on {} (not a store layer)",
            d.index,
            p.display()
        );
    }
    active
}

// ---------------------------------------------------------------------------------------------
// The count / memory / disks / agent scenario (tests 1 and 2).

/// Disk 0 and disk 1 ranges the scenario checks: they cover what was written before the
/// checkpoint and what is written after it (partly over it, partly on sectors that were zero).
const RANGES: [(u64, u64); 2] = [(96, 160), (296, 120)];

/// What the scenario recorded at its checkpoint.
struct AtCheckpoint {
    info: CheckpointInfo,
    /// `count get` just before the checkpoint.
    before: Count,
    /// `blk N read` of [`RANGES`] at the checkpoint.
    hashes: Vec<String>,
}

/// Counting on every vCPU, 32 MiB filled with seed 9, both disks written; then a standard
/// checkpoint.
fn run_up_to_checkpoint(con: &mut impl Console, c: &Client, vcpus: u32) -> AtCheckpoint {
    let mut models = vec![DiskModel::zero(), DiskModel::zero()];
    assert_eq!(con.line("cpus"), vcpus.to_string());
    // The agent works before the checkpoint, so that it answering after is meaningful.
    wait_agent(c, "after boot");
    con.ok("count start");
    con.ok("fill 32 9");
    disk_write(con, &mut models, 0, 100, 64, 11);
    disk_write(con, &mut models, 1, 300, 48, 21);
    let hashes: Vec<String> = (0..2).map(|n| disk_read(con, n, RANGES[n])).collect();
    for n in 0..2 {
        assert_eq!(
            hashes[n],
            models[n].hash(RANGES[n].0, RANGES[n].1),
            "disk {n} does not hold what the guest wrote"
        );
    }
    let before = count_get(con);
    assert_eq!(before.per_cpu.len(), vcpus as usize, "{before:?}");
    assert!(before.total > 0, "the guest does not count: {before:?}");
    let info = take_checkpoint(c, "scenario");
    assert_eq!(info.parent, None);
    assert!(info.current, "{info:?}");
    assert_eq!(info.disks.len(), 2, "{info:?}");
    AtCheckpoint {
        info,
        before,
        hashes,
    }
}

/// After the checkpoint: counting goes on, memory is refilled with seed 10, both disks get
/// more writes (over the checkpoint's data and beside it). Returns `count get` at the end:
/// the top of the window a restored count must fall in.
fn diverge(con: &mut impl Console, at: &AtCheckpoint) -> Count {
    let later = count_get(con);
    assert!(
        later.total > at.before.total,
        "the count did not grow after the checkpoint: {:?} then {later:?}",
        at.before
    );
    con.ok("fill 32 10");
    let mut scratch = vec![DiskModel::zero(), DiskModel::zero()];
    disk_write(con, &mut scratch, 0, 120, 64, 12);
    disk_write(con, &mut scratch, 1, 330, 80, 22);
    con.ok("blk 0 flush");
    con.ok("blk 1 flush");
    for (n, (&range, hash)) in RANGES.iter().zip(&at.hashes).enumerate() {
        assert_ne!(
            &disk_read(con, n, range),
            hash,
            "disk {n}: the writes after the checkpoint changed nothing"
        );
    }
    // Widen the window between the checkpoint and the last reading before apply or exit (a
    // margin, not a speed assertion).
    std::thread::sleep(Duration::from_secs(1));
    let top = count_get(con);
    assert!(top.total > later.total, "{later:?} then {top:?}");
    top
}

/// The guest is as it was at the checkpoint: the count resumes inside the window and grows on
/// every vCPU, memory holds seed 9, the disks the checkpoint's data, and the agent answers.
fn verify_back_at_checkpoint(
    con: &mut impl Console,
    c: &Client,
    at: &AtCheckpoint,
    top: &Count,
    vcpus: u32,
    how: &str,
) {
    let first = count_get(con);
    let before = &at.before;
    assert!(
        first.total != 0 && first.total >= before.total && first.total < top.total,
        "{how}: count {} is outside the checkpoint's window [{}, {}) (per-cpu {:?}, before \
         the checkpoint {:?}, before leaving {:?})",
        first.total,
        before.total,
        top.total,
        first.per_cpu,
        before.per_cpu,
        top.per_cpu
    );
    assert_eq!(first.per_cpu.len(), vcpus as usize, "{how}: {first:?}");
    for (i, (now, then)) in first.per_cpu.iter().zip(&before.per_cpu).enumerate() {
        assert!(
            now >= then,
            "{how}: vCPU {i} counter went back from {then} (before the checkpoint) to {now}"
        );
    }
    // Every vCPU goes on counting.
    std::thread::sleep(Duration::from_millis(500));
    let second = count_get(con);
    for (i, (a, b)) in first.per_cpu.iter().zip(&second.per_cpu).enumerate() {
        assert!(
            b > a,
            "{how}: vCPU {i} does not count: {a} then {b} (per-cpu {:?} then {:?})",
            first.per_cpu,
            second.per_cpu
        );
    }
    let check = con.command("check 32 9");
    assert!(
        check.status.is_ok(),
        "{how}: memory is not the checkpoint's (check 32 9: {check:?})"
    );
    for (n, (&range, hash)) in RANGES.iter().zip(&at.hashes).enumerate() {
        assert_eq!(
            &disk_read(con, n, range),
            hash,
            "{how}: disk {n} sectors {range:?} differ from the checkpoint's"
        );
    }
    wait_agent(c, how);
}

/// Test 1 on `vcpus` vCPUs: apply in place.
fn apply_in_place_resumes_the_checkpoint(vcpus: u32) {
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, vcpus);
    let at = run_up_to_checkpoint(&mut vm, &c, vcpus);
    let top = diverge(&mut vm, &at);
    let v = apply(&c, &at.info.id)
        .unwrap_or_else(|e| panic!("apply {}: {e}\nstderr:\n{}", at.info.id, vm.stderr()));
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.current_checkpoint.as_deref(), Some(at.info.id.as_str()));
    resync(&mut vm);
    verify_back_at_checkpoint(&mut vm, &c, &at, &top, vcpus, "after apply");
    // The VM goes on: writes land, and it powers off cleanly.
    vm.ok("blk 0 write 2000 8 77");
    vm.ok("blk 0 flush");
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 1, "{list:?}");
    assert_eq!(list.current.as_deref(), Some(at.info.id.as_str()));
    power_off(vm, c);
}

#[test]
fn apply_in_place_resumes_count_memory_disks_and_agent_on_2_vcpus() {
    apply_in_place_resumes_the_checkpoint(2);
}

#[test]
fn apply_in_place_resumes_count_memory_disks_and_agent_on_4_vcpus() {
    apply_in_place_resumes_the_checkpoint(4);
}

/// Test 2 on `vcpus` vCPUs: `strata restore` in a new process once the first one exited.
fn restore_in_a_new_process_resumes_the_checkpoint(vcpus: u32) {
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, vcpus);
    let at = run_up_to_checkpoint(&mut vm, &c, vcpus);
    let top = diverge(&mut vm, &at);
    power_off(vm, c);

    let sock2 = s.dir.path().join("api2.sock");
    let mut r = Restored::start(&[
        "--checkpoint",
        &at.info.path,
        "--api-socket",
        sock2.to_str().unwrap(),
    ]);
    let c = api_client(&sock2);
    let v = c.vm().unwrap();
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.config.vcpus, vcpus);
    assert_eq!(v.current_checkpoint.as_deref(), Some(at.info.id.as_str()));
    verify_back_at_checkpoint(&mut r, &c, &at, &top, vcpus, "after restore");
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 1, "{list:?}");
    assert_eq!(list.checkpoints[0].id, at.info.id);
    power_off(r, c);
}

#[test]
fn restore_in_a_new_process_resumes_count_memory_disks_and_agent_on_2_vcpus() {
    restore_in_a_new_process_resumes_the_checkpoint(2);
}

#[test]
fn restore_in_a_new_process_resumes_count_memory_disks_and_agent_on_4_vcpus() {
    restore_in_a_new_process_resumes_the_checkpoint(4);
}

// ---------------------------------------------------------------------------------------------
// Test 3: ten rounds of checkpoint, apply, checkpoint.

/// `strata disk check PATH`.
fn strata_disk_check(path: &Path) -> Result<(), String> {
    let out = Command::new(strata_bin())
        .args(["disk", "check"])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "strata disk check {}: {}\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn ten_rounds_of_checkpoint_apply_checkpoint_leave_a_clean_store_and_frozen_launch_disks() {
    const ROUNDS: u64 = 10;
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, 2);
    let mut models = vec![DiskModel::zero(), DiskModel::zero()];
    // The sectors each round writes, all inside this range of each disk.
    let range = (1000, 8 * (2 * ROUNDS + 2));
    disk_write(&mut vm, &mut models, 0, 1000, 8, 1);
    disk_write(&mut vm, &mut models, 1, 1000, 8, 2);

    let mut launch_frozen = None;
    // (id, expected parent) in the order taken.
    let mut expected: Vec<(String, Option<String>)> = Vec::new();
    let mut parent: Option<String> = None;
    for round in 0..ROUNDS {
        let a = take_checkpoint(&c, &format!("round {round} a"));
        assert_eq!(a.parent, parent, "round {round}: checkpoint a");
        expected.push((a.id.clone(), parent.clone()));
        if launch_frozen.is_none() {
            launch_frozen = Some(read_files(&s.disks));
        }
        let models_at_a = models.clone();
        let at_a: Vec<String> = (0..2).map(|n| models[n].hash(range.0, range.1)).collect();
        // Writes after a, discarded by the apply.
        let sector = 1008 + 16 * round;
        disk_write(&mut vm, &mut models, 0, sector, 8, 100 + round);
        disk_write(&mut vm, &mut models, 1, sector + 4, 8, 200 + round);
        let v = apply(&c, &a.id).unwrap_or_else(|e| panic!("round {round}: apply {}: {e}", a.id));
        assert_eq!(v.state, VmState::Running, "round {round}: {v:?}");
        resync(&mut vm);
        for (n, want) in at_a.iter().enumerate() {
            assert_eq!(
                &disk_read(&mut vm, n, range),
                want,
                "round {round}: disk {n} after applying {}",
                a.id
            );
        }
        models = models_at_a;
        // Writes kept, then b.
        disk_write(&mut vm, &mut models, 0, sector + 8, 8, 300 + round);
        disk_write(&mut vm, &mut models, 1, sector, 8, 400 + round);
        let b = take_checkpoint(&c, &format!("round {round} b"));
        assert_eq!(b.parent.as_deref(), Some(a.id.as_str()), "round {round}: b");
        expected.push((b.id.clone(), Some(a.id.clone())));
        parent = Some(b.id);
    }
    for (n, m) in models.iter().enumerate() {
        assert_eq!(
            disk_read(&mut vm, n, range),
            m.hash(range.0, range.1),
            "disk {n} at the end"
        );
    }
    let list = c.checkpoints().unwrap();
    let got: Vec<(String, Option<String>)> = list
        .checkpoints
        .iter()
        .map(|i| (i.id.clone(), i.parent.clone()))
        .collect();
    assert_eq!(got, expected, "the listing's ids and parents");
    assert_eq!(list.current, parent, "{list:?}");
    let marked: Vec<&str> = list
        .checkpoints
        .iter()
        .filter(|i| i.current)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(marked, vec![parent.as_deref().unwrap()]);
    power_off(vm, c);

    assert_unchanged(
        &launch_frozen.unwrap(),
        "launch disk after the first checkpoint",
    );
    check_store(&s.state, &list);
}

/// The store after the VMM exited: it opens without repairs, `check` is clean, every layer
/// file checks clean (library and `strata disk check`), and the layer folder holds exactly the
/// layers the checkpoints and the active set refer to. Every failure is collected, so that one
/// run shows them all.
fn check_store(state: &Path, list: &CheckpointList) {
    let mut failures: Vec<String> = Vec::new();
    let store = Store::open(state).unwrap();
    if !store.opened().is_clean() {
        failures.push(format!(
            "opening the store repaired something: {:?}",
            store.opened()
        ));
    }
    let report = store.check();
    for p in &report.problems {
        failures.push(format!("Store::check: {}", p.message));
    }
    if report.checkpoints != list.checkpoints.len() {
        failures.push(format!(
            "Store::check saw {} checkpoints, the API listed {}",
            report.checkpoints,
            list.checkpoints.len()
        ));
    }
    if store.current() != list.current.as_deref() {
        failures.push(format!(
            "store current {:?}, the API's {:?}",
            store.current(),
            list.current
        ));
    }

    let mut referenced = BTreeSet::new();
    for m in store.list().unwrap() {
        for d in &m.disks {
            referenced.extend(d.store_layers().map(|l| l.resolve(state)));
        }
    }
    for d in store.active() {
        referenced.extend(d.store_layers().map(|l| l.resolve(state)));
    }
    drop(store);

    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(state.join(LAYERS_DIR)).unwrap() {
        files.insert(entry.unwrap().path());
    }
    assert!(!files.is_empty());
    for f in &files {
        match disk::ops::check(f, false) {
            Ok(r) if r.is_clean() => {}
            Ok(r) => failures.push(format!("disk::ops::check {}: {r:?}", f.display())),
            Err(e) => failures.push(format!("disk::ops::check {}: {e}", f.display())),
        }
        if let Err(e) = strata_disk_check(f) {
            failures.push(e);
        }
    }
    if files != referenced {
        failures.push(format!(
            "layer files not referenced by any checkpoint's disks or the active set: {:?}; \
             referenced but missing: {:?}",
            files.difference(&referenced).collect::<Vec<_>>(),
            referenced.difference(&files).collect::<Vec<_>>()
        ));
    }
    let names: Vec<String> = list
        .checkpoints
        .iter()
        .map(|i| format!("{} {:?}", i.id, i.name))
        .collect();
    assert!(
        failures.is_empty(),
        "the store after {} checkpoints is not clean ({} problems):\n{}\n(the checkpoints: {})",
        list.checkpoints.len(),
        failures.len(),
        failures.join("\n"),
        names.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// Test 4: a reboot after a checkpoint writes only the active layers.

#[test]
fn reboot_after_a_checkpoint_writes_only_the_active_layers() {
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, 2);
    let mut models = vec![DiskModel::zero(), DiskModel::zero()];
    disk_write(&mut vm, &mut models, 0, 10, 16, 1);
    disk_write(&mut vm, &mut models, 1, 20, 16, 2);
    // The first checkpoint freezes the launch disks, the second the layers made by the first.
    let first = take_checkpoint(&c, "first");
    disk_write(&mut vm, &mut models, 0, 40, 16, 3);
    disk_write(&mut vm, &mut models, 1, 50, 16, 4);
    let second = take_checkpoint(&c, "second");
    let frozen: Vec<PathBuf> = first
        .disks
        .iter()
        .chain(&second.disks)
        .map(PathBuf::from)
        .collect();
    for (p, launch) in first.disks.iter().zip(&s.disks) {
        assert_eq!(
            std::fs::canonicalize(p).unwrap(),
            std::fs::canonicalize(launch).unwrap(),
            "the first checkpoint freezes the launch disk"
        );
    }
    for p in &second.disks {
        assert!(
            Path::new(p).starts_with(&s.state),
            "the second checkpoint freezes a store layer, not {p}"
        );
    }
    let frozen = read_files(&frozen);
    let active = active_layers(&s.state);
    disk_write(&mut vm, &mut models, 0, 60, 16, 5);
    disk_write(&mut vm, &mut models, 1, 70, 16, 6);
    vm.ok("blk 0 flush");
    vm.ok("blk 1 flush");
    let active_before = read_files(&active);

    vm.ok("reboot");
    assert_eq!(
        vm.wait_ready(),
        2,
        "the guest did not come back after reboot"
    );
    // It continues on the same active layers, with everything written before the reboot.
    assert_eq!(active_layers(&s.state), active, "the active layers changed");
    for (n, m) in models.iter().enumerate() {
        assert_eq!(
            disk_read(&mut vm, n, (0, 128)),
            m.hash(0, 128),
            "disk {n} after reboot"
        );
    }
    disk_write(&mut vm, &mut models, 0, 200, 16, 7);
    disk_write(&mut vm, &mut models, 1, 210, 16, 8);
    disk_write(&mut vm, &mut models, 0, 10, 4, 9);
    vm.ok("blk 0 flush");
    vm.ok("blk 1 flush");
    for (n, m) in models.iter().enumerate() {
        assert_eq!(
            disk_read(&mut vm, n, (0, 256)),
            m.hash(0, 256),
            "disk {n} after the writes that followed the reboot"
        );
    }
    assert_unchanged(&frozen, "checkpoint layer or launch disk after a reboot");
    for (p, bytes) in &active_before {
        assert!(
            std::fs::read(p).unwrap() != *bytes,
            "the active layer {} did not change with the writes after the reboot",
            p.display()
        );
    }
    let v = c.vm().unwrap();
    assert_eq!(v.current_checkpoint.as_deref(), Some(second.id.as_str()));
    power_off(vm, c);
    assert_unchanged(&frozen, "checkpoint layer or launch disk after power-off");
    let store = Store::open(&s.state).unwrap();
    let report = store.check();
    assert!(report.is_clean(), "store check: {:?}", report.problems);
}

// ---------------------------------------------------------------------------------------------
// Test 5: corrupt state and memory files are refused, naming the file.

/// Runs `strata restore` expecting it to refuse: its exit status and stderr.
fn refused_restore(checkpoint: &Path, sock: &Path) -> (ExitStatus, String) {
    let mut r = Restored::start(&[
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
        "--console",
        "none",
    ]);
    let status = r.wait_exit(EXIT_GUARD);
    (status, r.stderr())
}

/// The VM still runs after a refused apply: API state, console, counting.
fn still_running(vm: &mut Vm, c: &Client, current: &str, what: &str) {
    let v = c.vm().unwrap();
    assert_eq!(
        v.state,
        VmState::Running,
        "{what}: the VM is not running after a refused apply: {v:?}"
    );
    assert_eq!(v.current_checkpoint.as_deref(), Some(current), "{what}");
    let a = count_get(vm);
    let b = count_get(vm);
    assert!(b.total > a.total, "{what}: the guest stopped counting");
}

#[test]
fn corrupt_state_and_memory_files_are_refused_naming_the_file() {
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, 2);
    vm.ok("count start");
    vm.ok("fill 8 3");
    let c1 = take_checkpoint(&c, "state to corrupt");
    let c2 = take_checkpoint(&c, "memory to corrupt");
    let list0 = c.checkpoints().unwrap();
    let state1 = Path::new(&c1.path).join("state");
    let memory2 = Path::new(&c2.path).join("memory");

    // One byte flipped in the middle of the state file.
    let mut bytes = std::fs::read(&state1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&state1, &bytes).unwrap();
    let (status, _, message) = api_error(apply(&c, &c1.id), "apply with a corrupt state file");
    eprintln!("apply, corrupt state file: HTTP {status}: {message}");
    assert!(status == 409 || status == 500, "HTTP {status}: {message}");
    assert!(
        message.contains(state1.to_str().unwrap()),
        "the error does not name {}: {message}",
        state1.display()
    );
    assert_eq!(
        c.checkpoints().unwrap(),
        list0,
        "a refused apply changed the list"
    );
    still_running(&mut vm, &c, &c2.id, "corrupt state");

    // The memory file one page longer, then one page shorter than its layout.
    let len = std::fs::metadata(&memory2).unwrap().len();
    for (new_len, how) in [(len + 4096, "longer"), (len - 4096, "shorter")] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&memory2)
            .unwrap()
            .set_len(new_len)
            .unwrap();
        let (status, _, message) = api_error(
            apply(&c, &c2.id),
            &format!("apply with a memory file {how} than its layout"),
        );
        eprintln!("apply, memory file {how}: HTTP {status}: {message}");
        assert!(status == 409 || status == 500, "HTTP {status}: {message}");
        assert!(
            message.contains(memory2.to_str().unwrap()),
            "memory file {how}: the error does not name {}: {message}",
            memory2.display()
        );
        assert_eq!(
            c.checkpoints().unwrap(),
            list0,
            "a refused apply changed the list"
        );
        still_running(&mut vm, &c, &c2.id, &format!("memory file {how}"));
    }
    power_off(vm, c);

    // strata restore refuses both, naming the file.
    let sock = s.dir.path().join("restore.sock");
    let (status, stderr) = refused_restore(Path::new(&c1.path), &sock);
    eprintln!("restore, corrupt state file: {status}: {stderr}");
    assert!(
        !status.success(),
        "restore of a corrupt state file: {status}"
    );
    assert!(
        stderr.contains(state1.to_str().unwrap()),
        "restore's error does not name {}: {stderr}",
        state1.display()
    );
    for (new_len, how) in [(len + 4096, "longer"), (len - 4096, "shorter")] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&memory2)
            .unwrap()
            .set_len(new_len)
            .unwrap();
        let (status, stderr) = refused_restore(Path::new(&c2.path), &sock);
        eprintln!("restore, memory file {how}: {status}: {stderr}");
        assert!(
            !status.success(),
            "restore with a memory file {how} than its layout: {status}"
        );
        assert!(
            stderr.contains(memory2.to_str().unwrap()),
            "memory file {how}: restore's error does not name {}: {stderr}",
            memory2.display()
        );
    }

    // The store's checker names both files too, and nothing else changed.
    let store = Store::open(&s.state).unwrap();
    let problems: BTreeSet<PathBuf> = store.check().problems.into_iter().map(|p| p.path).collect();
    assert_eq!(problems, BTreeSet::from([state1, memory2]));
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(store.current(), Some(c2.id.as_str()));
}
