//! Deleting checkpoints by merging (issue #15): a tree of six checkpoints of both kinds on two
//! branches of a running test guest with two disks; deletes in an order that covers one with two
//! children, a leaf, one in the middle, the root, the one the VM stands on, and the last. After
//! each delete every remaining checkpoint's disks hash (host side, `strata disk convert` of its
//! chain) as they did when it was taken, the running guest reads what it wrote, and the
//! checkpoint location takes less space; once every checkpoint is gone the VM's own launch disk
//! files hold the current content and the location holds no layer.
//!
//! Guest code is slow on this machine's KVM (PVM): disks are small and every timeout is a hang
//! guard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use api::types::{ApplyCheckpoint, CheckpointType, CreateCheckpoint, VmState};
use api::Client;
use resources::pattern::{fnv1a64_update, sector_fill, FNV_OFFSET, SECTOR_SIZE};
use strata_tests::checkpoint_setup::{flatten, ids, Setup};
use strata_tests::Vm;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 4 * MIB;
const DISKS: usize = 2;
/// How often a test polls for a background merge's end.
const MERGE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The host's model of what the guest wrote.
#[derive(Clone)]
struct Model(Vec<Vec<u8>>);

impl Model {
    fn new() -> Model {
        Model(vec![vec![0; DISK_SIZE as usize]; DISKS])
    }

    fn write(&mut self, n: usize, sector: u64, count: u64, seed: u64) {
        let mut buf = [0u8; SECTOR_SIZE];
        for s in sector..sector + count {
            sector_fill(seed, s, &mut buf);
            let at = s as usize * SECTOR_SIZE;
            self.0[n][at..at + SECTOR_SIZE].copy_from_slice(&buf);
        }
    }

    fn hash(&self, n: usize, sector: u64, count: u64) -> String {
        let (a, b) = (
            sector as usize * SECTOR_SIZE,
            (sector + count) as usize * SECTOR_SIZE,
        );
        format!("{:016x}", fnv1a64_update(FNV_OFFSET, &self.0[n][a..b]))
    }

    fn whole(&self, n: usize) -> u64 {
        fnv1a64_update(FNV_OFFSET, &self.0[n])
    }
}

struct Guest {
    vm: Vm,
    api: Client,
    model: Model,
    /// Every region written so far, per disk: read back after each delete.
    regions: Vec<(usize, u64, u64)>,
    next_seed: u64,
}

impl Guest {
    /// Writes `count` sectors at `sector` of disk `n` (a fresh seed) and flushes.
    fn write(&mut self, n: usize, sector: u64, count: u64) {
        let seed = self.next_seed;
        self.next_seed += 1;
        self.vm
            .line_ok(&format!("blk {n} write {sector} {count} {seed}"));
        self.vm.line_ok(&format!("blk {n} flush"));
        self.model.write(n, sector, count, seed);
        self.regions.push((n, sector, count));
    }

    /// The guest reads every region written so far as the model says.
    fn reads_back(&mut self, when: &str) {
        for &(n, sector, count) in &self.regions.clone() {
            let got = self.vm.line(&format!("blk {n} read {sector} {count}"));
            assert_eq!(
                got,
                self.model.hash(n, sector, count),
                "{when}: the guest reads disk {n} sectors {sector}+{count} wrong"
            );
        }
    }

    /// Applies production checkpoint `id` (it leaves the VM off), starts the VM, and takes
    /// back the model and regions `at` it.
    fn apply_production(&mut self, id: &str, at: (Model, Vec<(usize, u64, u64)>)) {
        let vm_after = self
            .api
            .apply_checkpoint(
                id,
                &ApplyCheckpoint {
                    save_current: false,
                },
            )
            .unwrap();
        assert_eq!(
            vm_after.state,
            VmState::Off,
            "a production apply leaves the VM off"
        );
        self.api.lifecycle(api::LifecycleAction::Start).unwrap();
        self.vm.wait_ready();
        (self.model, self.regions) = at;
    }

    fn take(&mut self, name: &str, kind: CheckpointType) -> String {
        let info = self
            .api
            .create_checkpoint(&CreateCheckpoint {
                name: Some(name.into()),
                kind: Some(kind),
            })
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        info.id
    }
}

trait LineOk {
    fn line_ok(&mut self, cmd: &str);
}

impl LineOk for Vm {
    fn line_ok(&mut self, cmd: &str) {
        let out = self.command(cmd).ok();
        assert!(out.is_empty(), "{cmd}: {out:?}");
    }
}

/// Content hash of every disk of checkpoint `id`, from `strata disk convert` of its chains.
fn checkpoint_hashes(api: &Client, id: &str, scratch: &Path) -> Vec<u64> {
    let info = api.checkpoint(id).unwrap();
    assert_eq!(info.disks.len(), DISKS, "{info:?}");
    info.disks
        .iter()
        .enumerate()
        .map(|(i, top)| {
            let out = scratch.join(format!("flat-{id}-{i}.raw"));
            let bytes = flatten(top, &out).unwrap_or_else(|e| panic!("{e}"));
            std::fs::remove_file(&out).unwrap();
            assert_eq!(bytes.len() as u64, DISK_SIZE);
            fnv1a64_update(FNV_OFFSET, &bytes)
        })
        .collect()
}

/// Bytes allocated under `dir`.
fn usage(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += md.blocks() * 512;
        if md.is_dir() {
            total += usage(&e.path());
        }
    }
    total
}

fn layer_files(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Boots the test guest with two zeroed raw launch disks, an API socket, a checkpoint
/// location and `extra` arguments (`v.sock` in them means a file in the test's folder); returns
/// the folder, the location, the launch disks and the guest.
fn boot(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>, Guest) {
    boot_with_env(extra, &[])
}

/// [`boot`] with `env` added to strata's environment (test hooks).
fn boot_with_env(
    extra: &[&str],
    env: &[(&str, &str)],
) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>, Guest) {
    let s = Setup::new(&[DISK_SIZE; DISKS]);
    let folder = s.dir.path().display().to_string();
    let extra: Vec<String> = extra
        .iter()
        .map(|a| a.replace("v.sock", &format!("{folder}/v.sock")))
        .collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (vm, api) = s.boot_with_env(Some(2), &extra, env);
    let g = Guest {
        vm,
        api,
        model: Model::new(),
        regions: Vec::new(),
        next_seed: 100,
    };
    let Setup {
        dir, state, disks, ..
    } = s;
    (dir, state, disks, g)
}

#[test]
fn deleting_anywhere_in_a_tree_of_six_keeps_every_other_checkpoint_and_the_guest_and_ends_in_the_launch_disks(
) {
    let (dir, state, launch, mut g) = boot(&["--vsock", "cid=3,socket=v.sock"]);

    // The tree: c1 ─ c2 ┬ c3
    //                   └ c4 ─ c5 ─ c6 ─ Now
    let mut hashes: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut name = BTreeMap::new();
    g.write(0, 0, 64);
    g.write(1, 100, 32);
    let c1 = g.take("c1", CheckpointType::Standard);
    g.write(0, 32, 64);
    g.write(1, 2000, 64);
    let c2 = g.take("c2", CheckpointType::Production);
    let at_c2 = (g.model.clone(), g.regions.clone());
    g.write(0, 500, 128);
    g.write(1, 0, 16);
    let c3 = g.take("c3", CheckpointType::Standard);
    // The second branch: back to c2, diverge.
    g.apply_production(&c2, at_c2);
    g.reads_back("after applying c2 and starting");
    g.write(0, 1000, 256);
    g.write(1, 3000, 8);
    let c4 = g.take("c4", CheckpointType::Production);
    g.write(0, 40, 8);
    g.write(1, 4000, 256);
    let c5 = g.take("c5", CheckpointType::Standard);
    g.write(0, 6000, 64);
    g.write(1, 120, 64);
    let c6 = g.take("c6", CheckpointType::Standard);
    // The current state, after the last checkpoint.
    g.write(0, 7000, 100);
    g.write(1, 5000, 100);
    for (id, n) in [
        (&c1, "c1"),
        (&c2, "c2"),
        (&c3, "c3"),
        (&c4, "c4"),
        (&c5, "c5"),
        (&c6, "c6"),
    ] {
        hashes.insert(id.clone(), checkpoint_hashes(&g.api, id, dir.path()));
        name.insert(id.clone(), n);
    }
    let list = g.api.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 6);
    assert_eq!(list.current.as_deref(), Some(c6.as_str()));
    g.reads_back("before any delete");

    // Deletes: two children, leaf, middle, root, current, last.
    let order = [&c2, &c3, &c5, &c1, &c6, &c4];
    let mut remaining: Vec<String> = hashes.keys().cloned().collect();
    let mut before = usage(&state);
    for id in order {
        let what = format!("after deleting {} ({id})", name[id]);
        g.api
            .delete_checkpoint(id)
            .unwrap_or_else(|e| panic!("delete {}: {e}", name[id]));
        remaining.retain(|r| r != id);
        // The delete answers at once; its layers merge in the background.
        let list = g.api.wait_for_merge(id, MERGE_POLL).unwrap();
        let mut listed = ids(&list);
        listed.sort();
        let mut want = remaining.clone();
        want.sort();
        assert_eq!(listed, want, "{what}: the list");
        // c2's frozen layer is shared by c3's and c4's branches once c2 is gone, and says so
        // in the list, until c3 goes too.
        let shared: Vec<(u32, u32)> = list
            .shared_layers
            .iter()
            .map(|l| (l.disk, l.branches))
            .collect();
        let want_shared = if id == &c2 {
            vec![(0, 2), (1, 2)]
        } else {
            vec![]
        };
        assert_eq!(
            shared, want_shared,
            "{what}: shared layers {:?}",
            list.shared_layers
        );
        for r in &remaining {
            assert_eq!(
                checkpoint_hashes(&g.api, r, dir.path()),
                hashes[r],
                "{what}: checkpoint {} no longer holds its disks",
                name[r]
            );
        }
        g.reads_back(&what);
        let now = usage(&state);
        eprintln!(
            "{what}: {} checkpoints, location {} KiB (was {} KiB), layers {:?}",
            remaining.len(),
            now / 1024,
            before / 1024,
            layer_files(&state)
        );
        assert!(
            now < before,
            "{what}: the location did not shrink ({before} -> {now})"
        );
        // Folding keeps chains short: per disk, a layer for each remaining checkpoint but
        // the one on the launch disk, the active layer, and (after the first delete) the layer
        // c2 froze, kept while c3's and c4's branches share it.
        let per_disk = layer_files(&state).len() / DISKS;
        let shared = usize::from(id == &c2);
        assert!(
            per_disk <= remaining.len() + 1 + shared,
            "{what}: {per_disk} layers per disk for {} checkpoints: {:?}",
            remaining.len(),
            layer_files(&state)
        );
        before = now;
    }

    // Every checkpoint gone: the launch disks hold the current content, no layer is left.
    assert!(layer_files(&state).is_empty(), "{:?}", layer_files(&state));
    g.vm.line_ok("blk 0 flush");
    g.vm.line_ok("blk 1 flush");
    for (n, path) in launch.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            fnv1a64_update(FNV_OFFSET, &bytes),
            g.model.whole(n),
            "launch disk {n} does not hold the current content"
        );
    }
    // The guest keeps writing to its own disk files.
    g.write(0, 7500, 8);
    g.reads_back("after every delete");
    let bytes = std::fs::read(&launch[0]).unwrap();
    assert_eq!(fnv1a64_update(FNV_OFFSET, &bytes), g.model.whole(0));
    g.api.lifecycle(api::LifecycleAction::Stop).unwrap();
}

/// The records of the guest's `log` at the start of `bytes` (a disk image): how many parse,
/// in sequence, from sector 0.
fn log_records(bytes: &[u8]) -> u64 {
    let mut n = 0;
    for (k, sector) in bytes.chunks_exact(SECTOR_SIZE).enumerate() {
        let Ok(buf) = <&[u8; SECTOR_SIZE]>::try_from(sector) else {
            break;
        };
        match resources::pattern::log_record_parse(buf) {
            Some((seq, _)) if seq == k as u64 => n += 1,
            _ => break,
        }
    }
    n
}

#[test]
fn merges_finish_while_the_guest_keeps_writing_and_keep_every_write() {
    // Each 1 MiB step of a merge is followed by a 150 ms pause (a test hook), so the merges
    // below last long enough to watch the API answer while they run.
    let (dir, state, launch, mut g) = boot_with_env(
        &["--checkpoint-type", "standard"],
        &[(vmm::checkpoint::FOLD_STEP_DELAY_ENV, "150")],
    );
    // Disk 0 holds data written between checkpoints; disk 1 the guest's log, written all along.
    g.write(0, 0, 2048);
    g.vm.line_ok("log start 1");
    let c1 = g.take("c1", CheckpointType::Standard);
    // 3 MiB: c1's delete folds it in three 1 MiB steps.
    g.write(0, 1024, 6144);
    let c2 = g.take("c2", CheckpointType::Standard);
    g.write(0, 4000, 64);
    let h2 = checkpoint_hashes(&g.api, &c2, dir.path());
    // The log keeps writing (one record per guest loop) while both deletes merge online:
    // c1 (the launch disks take the layer above them in), then c2 (the launch disks take the
    // active layers in, which the log writes meanwhile).
    let during = g.vm.line("log verify 1");
    let started = std::time::Instant::now();
    let list = g.api.delete_checkpoint(&c1).unwrap();
    let answered = started.elapsed();
    assert_eq!(ids(&list), vec![c2.clone()]);
    // The delete answered before its merge ended, and the API answers while it runs: the
    // list reports the merge, with its bytes once a step is done, and the guest's console
    // and the VM's status answer too.
    let mut seen = Vec::new();
    let ended = loop {
        let list = g.api.checkpoints().unwrap();
        match list.progress {
            Some(p) if p.operation == "merge" && p.checkpoint == c1 => seen.push((p.done, p.total)),
            _ => break list,
        }
        assert_eq!(g.api.vm().unwrap().state, VmState::Running);
        std::thread::sleep(MERGE_POLL);
    };
    eprintln!(
        "delete c1: answered in {:.1} ms; the merge ran {:.1} ms, progress polled {:?}",
        answered.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
        seen
    );
    assert!(
        seen.iter().any(|&(done, total)| done > 0 && done < total),
        "no list answered mid-merge: {seen:?}"
    );
    assert!(ended.progress.is_none(), "{:?}", ended.progress);
    assert_eq!(checkpoint_hashes(&g.api, &c2, dir.path())[0], h2[0]);
    // `strata ctl checkpoint delete` waits for the merge: once it returns, none is reported.
    let out = std::process::Command::new(strata_tests::strata_bin())
        .args(["ctl", "--api-socket"])
        .arg(dir.path().join("api.sock"))
        .args(["checkpoint", "delete", &c2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl checkpoint delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("deleted {c2}\n")));
    let list = g.api.checkpoints().unwrap();
    assert!(
        list.checkpoints.is_empty() && list.progress.is_none(),
        "{list:?}"
    );
    g.reads_back("after both deletes");
    let after: u64 = g.vm.line("log verify 1").parse().unwrap();
    g.vm.line_ok("log stop");
    let total: u64 = g.vm.line("log verify 1").parse().unwrap();
    let during: u64 = during.parse().unwrap();
    eprintln!("log records: {during} before the deletes, {after} after, {total} at the stop");
    assert!(
        after > during && total >= after,
        "the log did not grow across the merges: {during} -> {after} -> {total}"
    );
    // Everything, the log included, is in the VM's own disk files now.
    assert!(std::fs::read_dir(state.join("layers"))
        .unwrap()
        .next()
        .is_none());
    g.vm.line_ok("blk 1 flush");
    let on_disk = log_records(&std::fs::read(&launch[1]).unwrap());
    assert_eq!(
        on_disk, total,
        "launch disk 1 holds {on_disk} log records, the guest wrote {total}"
    );
    let bytes = std::fs::read(&launch[0]).unwrap();
    assert_eq!(fnv1a64_update(FNV_OFFSET, &bytes), g.model.whole(0));
    g.api.lifecycle(api::LifecycleAction::Stop).unwrap();
}

/// A background merge outlives the VM it began in: the VM is stopped mid-merge (the online fold
/// is undone and runs again on a chain of its own while the VM is off) and started again (the
/// fold that holds the VM's disks finishes before they open); every write stays, the remaining
/// checkpoint holds its disks, and the merge ends.
#[test]
fn a_vm_stopped_and_started_during_a_background_merge_keeps_every_write() {
    let (dir, _state, _launch, mut g) = boot_with_env(
        &["--checkpoint-type", "standard"],
        &[(vmm::checkpoint::FOLD_STEP_DELAY_ENV, "150")],
    );
    g.write(0, 0, 2048);
    let c1 = g.take("c1", CheckpointType::Standard);
    g.write(0, 1024, 6144);
    g.write(1, 0, 4096);
    let c2 = g.take("c2", CheckpointType::Standard);
    g.write(0, 4000, 64);
    let h2 = checkpoint_hashes(&g.api, &c2, dir.path());
    g.api.delete_checkpoint(&c1).unwrap();
    // Mid-merge (three 150 ms steps per disk): off, then on again.
    g.api.lifecycle(api::LifecycleAction::Stop).unwrap();
    assert_eq!(g.api.vm().unwrap().state, VmState::Off);
    g.api.lifecycle(api::LifecycleAction::Start).unwrap();
    assert_eq!(g.vm.wait_ready(), 2);
    let list = g.api.wait_for_merge(&c1, MERGE_POLL).unwrap();
    assert_eq!(ids(&list), vec![c2.clone()]);
    assert!(list.shared_layers.is_empty(), "{:?}", list.shared_layers);
    assert_eq!(checkpoint_hashes(&g.api, &c2, dir.path()), h2);
    g.reads_back("after the merge across a stop and a start");
    g.write(1, 100, 8);
    g.reads_back("after a write on the merged chain");
    g.api.lifecycle(api::LifecycleAction::Stop).unwrap();
}

/// The layer a fold takes out may have children on two branches: deleting c1 makes the launch
/// disks take c2's layer in, and that layer is the parent both of c3's layer (the first branch)
/// and of the VM's active layer (the second, after c2 was applied). Both children must be
/// pointed past it before it goes: c2, c3 and the guest read the same after the merge.
#[test]
fn deleting_the_root_under_a_checkpoint_with_two_branches_keeps_both_branches() {
    let (dir, _state, _launch, mut g) = boot(&["--vsock", "cid=3,socket=v.sock"]);
    g.write(0, 0, 64);
    g.write(1, 0, 64);
    let c1 = g.take("c1", CheckpointType::Standard);
    g.write(0, 64, 2048);
    g.write(1, 64, 512);
    let c2 = g.take("c2", CheckpointType::Production);
    let at_c2 = (g.model.clone(), g.regions.clone());
    g.write(0, 3000, 64);
    g.write(1, 3000, 64);
    let c3 = g.take("c3", CheckpointType::Standard);
    let (h2, h3) = (
        checkpoint_hashes(&g.api, &c2, dir.path()),
        checkpoint_hashes(&g.api, &c3, dir.path()),
    );
    g.apply_production(&c2, at_c2);
    g.write(0, 5000, 64);
    g.write(1, 5000, 64);
    g.api.delete_checkpoint(&c1).unwrap();
    let list = g.api.wait_for_merge(&c1, MERGE_POLL).unwrap();
    let mut left = ids(&list);
    left.sort();
    let mut want = vec![c2.clone(), c3.clone()];
    want.sort();
    assert_eq!(left, want);
    assert_eq!(
        checkpoint_hashes(&g.api, &c2, dir.path()),
        h2,
        "c2 after the merge"
    );
    assert_eq!(
        checkpoint_hashes(&g.api, &c3, dir.path()),
        h3,
        "c3 after the merge"
    );
    g.reads_back("after deleting c1");
    g.api.lifecycle(api::LifecycleAction::Stop).unwrap();
}
