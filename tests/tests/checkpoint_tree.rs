//! The checkpoint tree end to end (issue #15, what exists besides delete): the test guest under
//! KVM with its agent on vsock, checkpoints of both kinds on two branches.
//!
//! 1. **The tree, apply, `save_current`, revert**: standard and production checkpoints on two
//!    branches; applying an older one and working on makes the second branch; `GET
//!    /v1/checkpoints` and `strata ctl checkpoint list` show the tree with `Now` under the
//!    current checkpoint. Apply without `save_current` discards the current state (nothing is
//!    saved, the guest's disk, memory and counter are the checkpoint's); with it, a checkpoint
//!    of the VM's type is taken first (production, then standard after the type is changed) and
//!    holds the state that was current; revert (API and `strata ctl checkpoint revert`) applies
//!    the checkpoint the VM runs from. Every checkpoint's disks, flattened on the host with
//!    `strata disk convert`, hold what the guest wrote up to it.
//! 2. **Export and changed blocks**: exports of every checkpoint of a two-branch tree (API and
//!    `strata ctl checkpoint export`, raw and strata); `qemu-img compare` says the production
//!    export's raw disks equal `strata disk convert` of its chains; `strata run --disk
//!    path=DIR/disk0.raw` boots the production export and the guest reads its data; `strata
//!    restore --checkpoint DIR` starts the standard export in a new process and the guest's
//!    count and memory go on. The changed blocks between two checkpoints (API and `strata ctl
//!    checkpoint changes`, and the incremental export of just those blocks), copied onto the
//!    older export, give the newer export byte for byte: along a branch, across the branches
//!    and back up a branch ("any two positions of the tree"). The pairs that are not
//!    older-to-newer on one branch are checked last and reported together; on main today they
//!    fail: `Machine::checkpoint_changes` (vmm/src/checkpoint.rs) answers 409 "is not on its
//!    branch below it" for them.
//! 3. **Export progress and throughput**: a 1 GiB launch disk full of data; while the export
//!    runs `GET /v1/checkpoints` reports its progress, and `strata ctl checkpoint export` on a
//!    terminal draws a progress bar; the export's throughput is printed beside that of a `dd`
//!    of the same size to the same file system (figures only, nothing asserted on speed).
//!
//! Guest code is slow on this machine's KVM (PVM): guest-side sizes are small and every
//! timeout is a hang guard, never a speed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use api::types::{
    ApplyCheckpoint, ChangesInfo, CheckpointConfig, CheckpointInfo, CheckpointList, CheckpointType,
    Consistency, CreateCheckpoint, DiskFormat, ExportCheckpoint, ExportInfo, TakenType, VmInfo,
    VmState, PROGRESS_EXPORT,
};
use api::Client;
use resources::pattern::{fnv1a64_update, sector_fill, FNV_OFFSET, SECTOR_SIZE};
use strata_tests::checkpoint_setup::{
    count_get, resync, start, wait_agent, wait_state, Console, Count, Restored, Setup,
};
use strata_tests::{api_client, strata_bin, Vm};

const MIB: u64 = 1 << 20;
/// The launch disks of tests 1 and 2: small raw files (sparse, all zeros).
const DISK_SIZE: u64 = 8 * MIB;
/// Guest memory filled by `fill` (MiB).
const FILL_MIB: u32 = 8;
/// Hang guard for a host tool (`strata ctl`, `strata disk`, `qemu-img`, `dd`).
const TOOL_GUARD: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Consoles: `Console` (shared) for `strata run` and `strata restore`.

/// Powers the guest off from its console and waits until the API says the VM is off.
fn power_off(con: &mut impl Console, c: &Client) {
    con.ok("poweroff");
    let v = wait_state(c, VmState::Off);
    assert_eq!(v.last_exit.as_deref(), Some("poweroff"), "{v:?}");
}

// ---------------------------------------------------------------------------------------------
// A VM's files.

/// A VM's files ([`Setup`]) on raw launch disks of the given sizes, and `out/` in its folder,
/// where exports go (the VMM may write there: `--allow-path`).
fn setup(sizes: &[u64]) -> (Setup, PathBuf) {
    let s = Setup::new(sizes);
    let out = s.path("out");
    std::fs::create_dir(&out).unwrap();
    (s, out)
}

/// Boots `strata run`: 2 vCPUs, 64 MiB, the disks, vsock, the API socket, the checkpoint
/// location and the export folder `out`; the default checkpoint type (production). Waits for
/// the guest, the API and the agent.
fn boot(s: &Setup, out: &Path) -> (Vm, Client) {
    let (vm, c) = s.boot(
        Some(2),
        &[
            "--vsock",
            &s.vsock_arg(),
            "--allow-path",
            &out.display().to_string(),
        ],
    );
    wait_agent(&c, "after boot");
    (vm, c)
}

// ---------------------------------------------------------------------------------------------
// The host's model of the disks, with the guest's own sector pattern.

#[derive(Clone, PartialEq, Eq)]
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
    fn hash(&self, (sector, count): (u64, u64)) -> String {
        let from = sector as usize * SECTOR_SIZE;
        let to = (sector + count) as usize * SECTOR_SIZE;
        format!("{:016x}", fnv1a64_update(FNV_OFFSET, &self.0[from..to]))
    }
}

/// The disks of the VM as the host models them.
type Models = Vec<DiskModel>;

/// `blk N write` in the guest and in the model.
fn disk_write(con: &mut impl Console, models: &mut Models, n: usize, at: (u64, u64), seed: u64) {
    con.ok(&format!("blk {n} write {} {} {seed}", at.0, at.1));
    models[n].write(at.0, at.1, seed);
}

/// The ranges the tests read back: they cover every write of tests 1 and 2.
const READ_RANGES: [(u64, u64); 3] = [(0, 640), (1900, 200), (2900, 1200)];

/// The guest reads every disk as the models say, over [`READ_RANGES`].
fn assert_guest_disks(con: &mut impl Console, models: &Models, what: &str) {
    for (n, m) in models.iter().enumerate() {
        for range in READ_RANGES {
            let got = con.line(&format!("blk {n} read {} {}", range.0, range.1));
            assert_eq!(
                got,
                m.hash(range),
                "{what}: disk {n} sectors {range:?} as the guest reads them are not the \
                 expected content"
            );
        }
    }
}

/// Where two images first differ, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths {} and {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at byte {i} (sector {}); differing sectors: {}",
            i / SECTOR_SIZE,
            a.chunks(SECTOR_SIZE)
                .zip(b.chunks(SECTOR_SIZE))
                .filter(|(x, y)| x != y)
                .count()
        ),
        None => "identical".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Host tools.

/// What a host tool printed.
struct ToolOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl ToolOutput {
    fn describe(&self) -> String {
        format!(
            "{}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `program args`, killing it after [`TOOL_GUARD`] (a hang guard).
fn run_tool(program: &Path, args: &[&str]) -> ToolOutput {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + TOOL_GUARD;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} did not finish within {TOOL_GUARD:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ToolOutput {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `strata ARGS...` that must succeed; its stdout.
fn strata_ok(args: &[&str]) -> String {
    let out = run_tool(&strata_bin(), args);
    assert!(out.status.success(), "strata {args:?}: {}", out.describe());
    out.stdout
}

/// `strata ctl --api-socket SOCK ARGS...` that must succeed; its stdout.
fn ctl(sock: &Path, args: &[&str]) -> String {
    let mut all = vec!["ctl", "--api-socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    strata_ok(&all)
}

/// The contents of the chain whose top is `top`, flattened by `strata disk convert` (trusting
/// the chain: the store's first layers name the launch disks, outside the store's folder).
fn flatten(top: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join(format!(
        "flat-{}.raw",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    strata_ok(&[
        "disk",
        "convert",
        top,
        out.to_str().unwrap(),
        "--format",
        "raw",
        "--allow-parent-outside",
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Every disk of checkpoint `info`, flattened on the host, holds what the models say.
fn assert_checkpoint_holds(info: &CheckpointInfo, models: &Models, scratch: &Path) {
    assert_eq!(info.disks.len(), models.len(), "{info:?}");
    for (n, (top, m)) in info.disks.iter().zip(models).enumerate() {
        let got = flatten(top, scratch);
        assert!(
            got == m.0,
            "checkpoint {} ({:?}) disk {n}, flattened from {top}: not what the guest wrote up \
             to it: {}",
            info.id,
            info.name,
            first_difference(&got, &m.0)
        );
    }
}

/// `qemu-img compare -f raw -F raw A B`: whether it says the images are identical.
fn qemu_img_identical(a: &Path, b: &Path) -> Result<(), String> {
    let out = run_tool(
        Path::new("qemu-img"),
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    if out.status.success() && out.stdout.contains("Images are identical") {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {} {}: {}",
            a.display(),
            b.display(),
            out.describe()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The counter and memory.

/// A standard checkpoint and the guest just before it: its count, memory seed and disks.
struct Standard {
    info: CheckpointInfo,
    count: Count,
    seed: u32,
    models: Models,
}

/// The guest is at standard checkpoint `at`: its counter resumes from at least the value
/// before the checkpoint (below `top`, the count of the same timeline before leaving it, when
/// known) and every vCPU counts on; memory holds the checkpoint's fill (and not
/// `discarded_seed`, the fill of the state left); the disks are the checkpoint's.
fn assert_at_standard(
    con: &mut impl Console,
    at: &Standard,
    top: Option<&Count>,
    discarded_seed: u32,
    what: &str,
) {
    let first = count_get(con);
    assert!(
        first.total >= at.count.total && top.is_none_or(|t| first.total < t.total),
        "{what}: count {first:?} is outside the checkpoint's window: {:?} before it, {top:?} \
         before leaving",
        at.count
    );
    assert_eq!(first.per_cpu.len(), at.count.per_cpu.len(), "{what}");
    for (i, (now, then)) in first.per_cpu.iter().zip(&at.count.per_cpu).enumerate() {
        assert!(
            now >= then,
            "{what}: vCPU {i} went back from {then} (before the checkpoint) to {now}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let second = count_get(con);
    for (i, (a, b)) in first.per_cpu.iter().zip(&second.per_cpu).enumerate() {
        assert!(b > a, "{what}: vCPU {i} does not count: {a} then {b}");
    }
    let check = con.command(&format!("check {FILL_MIB} {}", at.seed));
    assert!(
        check.status.is_ok(),
        "{what}: memory is not the checkpoint's (check {FILL_MIB} {}: {check:?})",
        at.seed
    );
    let other = con.command(&format!("check {FILL_MIB} {discarded_seed}"));
    assert!(
        other.status.is_err(),
        "{what}: memory still holds the discarded state's fill (seed {discarded_seed})"
    );
    assert_guest_disks(con, &at.models, what);
}

// ---------------------------------------------------------------------------------------------
// API helpers.

fn create(c: &Client, name: &str, kind: Option<CheckpointType>) -> CheckpointInfo {
    let info = c
        .create_checkpoint(&CreateCheckpoint {
            name: Some(name.into()),
            kind,
        })
        .unwrap_or_else(|e| panic!("create checkpoint {name:?}: {e}"));
    assert_eq!(info.name, name);
    assert!(info.current, "{info:?}");
    info
}

/// A standard checkpoint of the running guest, with the count just before it.
fn take_standard(
    con: &mut impl Console,
    c: &Client,
    name: &str,
    seed: u32,
    models: &Models,
) -> Standard {
    let count = count_get(con);
    let info = create(c, name, Some(CheckpointType::Standard));
    assert_eq!(info.kind, TakenType::Standard, "{info:?}");
    Standard {
        info,
        count,
        seed,
        models: models.clone(),
    }
}

/// A production checkpoint (the VM's default type) of the running guest, its agent answering.
fn take_production(c: &Client, name: &str) -> CheckpointInfo {
    wait_agent(c, name);
    let info = create(c, name, None);
    assert_eq!(info.kind, TakenType::Production, "{info:?}");
    assert_eq!(
        info.consistency,
        Consistency::ApplicationConsistent,
        "{info:?}"
    );
    info
}

fn apply(c: &Client, id: &str, save_current: bool) -> VmInfo {
    c.apply_checkpoint(id, &ApplyCheckpoint { save_current })
        .unwrap_or_else(|e| panic!("apply {id} (save_current {save_current}): {e}"))
}

fn set_type(c: &Client, kind: CheckpointType) {
    let config = CheckpointConfig {
        kind,
        ..c.checkpoint_config().unwrap()
    };
    assert_eq!(c.set_checkpoint_config(&config).unwrap(), config);
}

/// Ids and parents of the list, in its order.
fn parents(list: &CheckpointList) -> Vec<(String, Option<String>)> {
    list.checkpoints
        .iter()
        .map(|i| (i.id.clone(), i.parent.clone()))
        .collect()
}

/// The list's checkpoints: ids and parents as expected (in commit order), `current` the only
/// one marked, each one's `children` those whose parent it is; and `strata ctl --json
/// checkpoint list` says the same.
fn assert_list(
    c: &Client,
    sock: &Path,
    expected: &[(&CheckpointInfo, Option<&CheckpointInfo>)],
    current: &CheckpointInfo,
    what: &str,
) -> CheckpointList {
    let list = c.checkpoints().unwrap();
    let want: Vec<(String, Option<String>)> = expected
        .iter()
        .map(|(i, p)| (i.id.clone(), p.map(|p| p.id.clone())))
        .collect();
    assert_eq!(parents(&list), want, "{what}: the list's ids and parents");
    assert_eq!(list.current.as_deref(), Some(current.id.as_str()), "{what}");
    let marked: Vec<&str> = list
        .checkpoints
        .iter()
        .filter(|i| i.current)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(marked, [current.id.as_str()], "{what}: marked current");
    for i in &list.checkpoints {
        let kids: Vec<&str> = list
            .checkpoints
            .iter()
            .filter(|k| k.parent.as_deref() == Some(&i.id))
            .map(|k| k.id.as_str())
            .collect();
        assert_eq!(i.children, kids, "{what}: children of {}", i.id);
    }
    let json = ctl(sock, &["--json", "checkpoint", "list"]);
    let from_ctl: CheckpointList = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("ctl --json checkpoint list: {e}: {json}"));
    assert_eq!(from_ctl, list, "{what}: ctl --json checkpoint list");
    list
}

/// One row of `strata ctl checkpoint list` below its header: whether it is marked `*`, the
/// tree guides before the id, and the id (or `Now`).
type TreeRow = (bool, String, String);

/// The rows of `strata ctl checkpoint list`.
fn ctl_tree(sock: &Path) -> Vec<TreeRow> {
    let text = ctl(sock, &["checkpoint", "list"]);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.trim_start().starts_with("ID"),
        "no header in checkpoint list:\n{text}"
    );
    // Table rows start with the current marker `* ` or two blanks; lines after the table (a
    // running operation, shared layers) do not.
    lines
        .filter(|l| (l.starts_with("* ") || l.starts_with("  ")) && !l.trim().is_empty())
        .map(|l| {
            let marked = l.starts_with("* ");
            let rest = l.get(2..).unwrap_or_else(|| panic!("short row {l:?}"));
            let at = rest
                .find(|ch: char| ch.is_ascii_alphanumeric())
                .unwrap_or_else(|| panic!("no id in row {l:?}:\n{text}"));
            let id = rest[at..].split_whitespace().next().unwrap().to_string();
            (marked, rest[..at].to_string(), id)
        })
        .collect()
}

/// An expected row of the tree.
fn row(marked: bool, guides: &str, id: &str) -> TreeRow {
    (marked, guides.to_string(), id.to_string())
}

/// `strata ctl checkpoint list` is the expected tree.
fn assert_ctl_tree(sock: &Path, want: &[TreeRow], names: &[(&str, &CheckpointInfo)], what: &str) {
    let got = ctl_tree(sock);
    let name = |id: &str| {
        names
            .iter()
            .find(|(_, i)| i.id == id)
            .map_or(id.to_string(), |(n, _)| n.to_string())
    };
    let show = |rows: &[TreeRow]| {
        rows.iter()
            .map(|(m, g, id)| format!("{}{g}{}", if *m { "* " } else { "  " }, name(id)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        got == want,
        "{what}: strata ctl checkpoint list shows\n{}\ninstead of\n{}",
        show(&got),
        show(want)
    );
}

// ---------------------------------------------------------------------------------------------
// Test 1: the tree, apply with and without save_current, revert.

#[test]
fn a_tree_of_both_kinds_on_two_branches_with_apply_save_current_and_revert() {
    let (s, outdir) = setup(&[DISK_SIZE]);
    let scratch = s.path("");
    let (mut vm, c) = boot(&s, &outdir);
    let mut models = vec![DiskModel::zero()];
    // Nothing to revert to yet: 404, and nothing happens.
    let e = c.revert().expect_err("revert with no checkpoint");
    assert_eq!(e.api_code(), Some("not_found"), "{e}");
    vm.ok("count start");
    vm.ok(&format!("fill {FILL_MIB} 1"));
    disk_write(&mut vm, &mut models, 0, (100, 64), 1);

    // Branch 1: A (standard, root) → P1 (production) → S2 (standard).
    let a = take_standard(&mut vm, &c, "A", 1, &models);
    assert_eq!(a.info.parent, None);
    disk_write(&mut vm, &mut models, 0, (200, 32), 2);
    let p1 = take_production(&c, "P1");
    let p1_models = models.clone();
    assert_eq!(p1.parent.as_deref(), Some(a.info.id.as_str()));
    disk_write(&mut vm, &mut models, 0, (300, 32), 3);
    vm.ok(&format!("fill {FILL_MIB} 2"));
    let s2 = take_standard(&mut vm, &c, "S2", 2, &models);
    assert_eq!(s2.info.parent.as_deref(), Some(p1.id.as_str()));
    // Work on, then apply A without saving: the writes and the fill since S2 go.
    disk_write(&mut vm, &mut models, 0, (400, 16), 4);
    disk_write(&mut vm, &mut models, 0, (100, 8), 40);
    vm.ok(&format!("fill {FILL_MIB} 3"));
    let top = count_get(&mut vm);
    let v = apply(&c, &a.info.id, false);
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.current_checkpoint.as_deref(), Some(a.info.id.as_str()));
    resync(&mut vm);
    assert_at_standard(&mut vm, &a, Some(&top), 3, "after applying A");
    let list = c.checkpoints().unwrap();
    assert_eq!(
        list.checkpoints.len(),
        3,
        "apply without save_current took a checkpoint: {:?}",
        parents(&list)
    );
    models = a.models.clone();

    // Branch 2 from A: B1 (standard) → B2 (production).
    disk_write(&mut vm, &mut models, 0, (500, 32), 5);
    vm.ok(&format!("fill {FILL_MIB} 4"));
    let b1 = take_standard(&mut vm, &c, "B1", 4, &models);
    assert_eq!(b1.info.parent.as_deref(), Some(a.info.id.as_str()));
    disk_write(&mut vm, &mut models, 0, (600, 16), 6);
    let b2 = take_production(&c, "B2");
    // save_current for a checkpoint that does not exist: 404, and nothing is taken.
    let e = c
        .apply_checkpoint("0123456789abcdef", &ApplyCheckpoint { save_current: true })
        .expect_err("apply of an unknown checkpoint");
    assert_eq!(e.api_code(), Some("not_found"), "{e}");
    assert_eq!(c.checkpoints().unwrap().checkpoints.len(), 5);
    assert_eq!(c.vm().unwrap().state, VmState::Running);
    let b2_models = models.clone();
    assert_eq!(b2.parent.as_deref(), Some(b1.info.id.as_str()));

    // Every checkpoint's disks hold what the guest wrote up to it.
    assert_checkpoint_holds(&a.info, &a.models, &scratch);
    assert_checkpoint_holds(&p1, &p1_models, &scratch);
    assert_checkpoint_holds(&s2.info, &s2.models, &scratch);
    assert_checkpoint_holds(&b1.info, &b1.models, &scratch);
    assert_checkpoint_holds(&b2, &b2_models, &scratch);

    let names = [
        ("A", &a.info),
        ("P1", &p1),
        ("S2", &s2.info),
        ("B1", &b1.info),
        ("B2", &b2),
    ];
    assert_list(
        &c,
        &s.sock,
        &[
            (&a.info, None),
            (&p1, Some(&a.info)),
            (&s2.info, Some(&p1)),
            (&b1.info, Some(&a.info)),
            (&b2, Some(&b1.info)),
        ],
        &b2,
        "two branches",
    );
    let tree_at_b2 = [
        row(false, "", &a.info.id),
        row(false, "├─ ", &p1.id),
        row(false, "│  └─ ", &s2.info.id),
        row(false, "└─ ", &b1.info.id),
        row(true, "   └─ ", &b2.id),
        row(false, "      └─ ", "Now"),
    ];
    assert_ctl_tree(&s.sock, &tree_at_b2, &names, "two branches, the VM on B2");

    // Revert (strata ctl) to B2, a production checkpoint: the writes since go, the VM is off.
    disk_write(&mut vm, &mut models, 0, (700, 16), 7);
    disk_write(&mut vm, &mut models, 0, (600, 4), 70);
    let out = ctl(&s.sock, &["checkpoint", "revert"]);
    let v = c.vm().unwrap();
    assert_eq!(v.state, VmState::Off, "after reverting to B2: {v:?}\n{out}");
    assert_eq!(v.current_checkpoint.as_deref(), Some(b2.id.as_str()));
    assert!(
        out.lines()
            .any(|l| l.starts_with("state:") && l.trim_end().ends_with("off"))
            && out.contains(&b2.id),
        "ctl checkpoint revert's output: {out}"
    );
    // Off on B2's disks: Now is still under B2, and nothing was taken.
    assert_ctl_tree(&s.sock, &tree_at_b2, &names, "reverted to B2, the VM off");
    start(&mut vm, &c);
    models = b2_models.clone();
    assert_guest_disks(&mut vm, &models, "after reverting to B2 and start");
    assert_eq!(c.checkpoints().unwrap().checkpoints.len(), 5);

    // Apply S2 saving the current state: a checkpoint of the VM's type (production) first.
    wait_agent(&c, "after the cold boot");
    vm.ok("count start");
    vm.ok(&format!("fill {FILL_MIB} 5"));
    disk_write(&mut vm, &mut models, 0, (800, 16), 8);
    disk_write(&mut vm, &mut models, 0, (500, 8), 80);
    let saved_models = models.clone();
    let v = apply(&c, &s2.info.id, true);
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.current_checkpoint.as_deref(), Some(s2.info.id.as_str()));
    resync(&mut vm);
    assert_at_standard(&mut vm, &s2, None, 5, "after applying S2 with save_current");
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 6, "{:?}", parents(&list));
    let sv = list.checkpoints.last().unwrap().clone();
    assert_eq!(
        (sv.kind, sv.parent.as_deref()),
        (TakenType::Production, Some(b2.id.as_str())),
        "the checkpoint save_current took: {sv:?}"
    );
    assert_checkpoint_holds(&sv, &saved_models, &scratch);
    assert_list(
        &c,
        &s.sock,
        &[
            (&a.info, None),
            (&p1, Some(&a.info)),
            (&s2.info, Some(&p1)),
            (&b1.info, Some(&a.info)),
            (&b2, Some(&b1.info)),
            (&sv, Some(&b2)),
        ],
        &s2.info,
        "after apply S2 with save_current",
    );
    let names_sv = [
        ("A", &a.info),
        ("P1", &p1),
        ("S2", &s2.info),
        ("B1", &b1.info),
        ("B2", &b2),
        ("saved", &sv),
    ];
    let tree_at_s2 = [
        row(false, "", &a.info.id),
        row(false, "├─ ", &p1.id),
        row(true, "│  └─ ", &s2.info.id),
        row(false, "│     └─ ", "Now"),
        row(false, "└─ ", &b1.info.id),
        row(false, "   └─ ", &b2.id),
        row(false, "      └─ ", &sv.id),
    ];
    assert_ctl_tree(&s.sock, &tree_at_s2, &names_sv, "the VM on S2");

    // Revert (API) to S2, a standard checkpoint: back to its instant again.
    models = s2.models.clone();
    disk_write(&mut vm, &mut models, 0, (300, 8), 9);
    vm.ok(&format!("fill {FILL_MIB} 6"));
    let top = count_get(&mut vm);
    let v = c.revert().unwrap_or_else(|e| panic!("revert: {e}"));
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.current_checkpoint.as_deref(), Some(s2.info.id.as_str()));
    resync(&mut vm);
    assert_at_standard(&mut vm, &s2, Some(&top), 6, "after reverting to S2");
    assert_eq!(c.checkpoints().unwrap().checkpoints.len(), 6);
    assert_ctl_tree(&s.sock, &tree_at_s2, &names_sv, "reverted to S2");

    // The state save_current kept: applied (without saving), it boots with those writes.
    let v = apply(&c, &sv.id, false);
    assert_eq!(v.state, VmState::Off, "{v:?}");
    start(&mut vm, &c);
    assert_guest_disks(&mut vm, &saved_models, "the state save_current saved");
    assert_eq!(c.checkpoints().unwrap().checkpoints.len(), 6);

    // With the VM's type standard, save_current takes a standard checkpoint, which resumes.
    wait_agent(&c, "after the second cold boot");
    set_type(&c, CheckpointType::Standard);
    models = saved_models.clone();
    vm.ok("count start");
    vm.ok(&format!("fill {FILL_MIB} 7"));
    disk_write(&mut vm, &mut models, 0, (900, 16), 10);
    let count = count_get(&mut vm);
    let v = apply(&c, &a.info.id, true);
    assert_eq!(v.state, VmState::Running, "{v:?}");
    resync(&mut vm);
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 7, "{:?}", parents(&list));
    let sd = list.checkpoints.last().unwrap().clone();
    assert_eq!(
        (sd.kind, sd.parent.as_deref()),
        (TakenType::Standard, Some(sv.id.as_str())),
        "the checkpoint save_current took with the VM's type standard: {sd:?}"
    );
    assert_eq!(list.current.as_deref(), Some(a.info.id.as_str()));
    let saved = Standard {
        info: sd.clone(),
        count,
        seed: 7,
        models: models.clone(),
    };
    assert_checkpoint_holds(&sd, &models, &scratch);
    // The guest is at A now; top of A's window unknown in this timeline.
    assert_at_standard(&mut vm, &a, None, 7, "after applying A with save_current");
    let v = apply(&c, &sd.id, false);
    assert_eq!(v.state, VmState::Running, "{v:?}");
    resync(&mut vm);
    assert_at_standard(
        &mut vm,
        &saved,
        None,
        1,
        "the standard state save_current saved",
    );
    assert_ctl_tree(
        &s.sock,
        &[
            row(false, "", &a.info.id),
            row(false, "├─ ", &p1.id),
            row(false, "│  └─ ", &s2.info.id),
            row(false, "└─ ", &b1.info.id),
            row(false, "   └─ ", &b2.id),
            row(false, "      └─ ", &sv.id),
            row(true, "         └─ ", &sd.id),
            row(false, "            └─ ", "Now"),
        ],
        &[
            ("A", &a.info),
            ("P1", &p1),
            ("S2", &s2.info),
            ("B1", &b1.info),
            ("B2", &b2),
            ("saved", &sv),
            ("saved standard", &sd),
        ],
        "the VM on the saved standard checkpoint",
    );
    power_off(&mut vm, &c);
}

// ---------------------------------------------------------------------------------------------
// Test 2: exports and changed blocks.

/// A checkpoint of test 2 with the content its disks must have.
struct Taken {
    name: &'static str,
    info: CheckpointInfo,
    models: Models,
}

/// Exports `id` through the API into `dest`.
fn export(c: &Client, id: &str, dest: &Path, format: DiskFormat) -> ExportInfo {
    c.export_checkpoint(
        id,
        &ExportCheckpoint {
            destination: dest.display().to_string(),
            disk_format: format,
        },
    )
    .unwrap_or_else(|e| panic!("export {id} to {}: {e}", dest.display()))
}

/// Copies every changed extent of `changes` from the images `newer` onto copies of `older`.
fn apply_changes(changes: &ChangesInfo, older: &[Vec<u8>], newer: &[Vec<u8>]) -> Vec<Vec<u8>> {
    assert_eq!(changes.disks.len(), older.len(), "{changes:?}");
    changes
        .disks
        .iter()
        .zip(older.iter().zip(newer))
        .map(|(d, (old, new))| {
            assert_eq!(d.virtual_size, new.len() as u64, "{d:?}");
            let mut out = old.clone();
            let mut end = 0;
            for e in &d.extents {
                assert!(
                    e.offset >= end && e.length > 0,
                    "extents overlap or are out of order: {d:?}"
                );
                assert!(
                    e.offset.is_multiple_of(d.granularity)
                        && ((e.offset + e.length).is_multiple_of(d.granularity)
                            || e.offset + e.length == d.virtual_size),
                    "extent {e:?} is not on the granularity {}",
                    d.granularity
                );
                end = e.offset + e.length;
                let r = e.offset as usize..end as usize;
                out[r.clone()].copy_from_slice(&new[r]);
            }
            out
        })
        .collect()
}

/// The raw disk files of an export, read.
fn read_export(info: &ExportInfo) -> Vec<Vec<u8>> {
    info.disks
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The changes from `older` (None: the launch disks) to `newer`, through the API and `strata
/// ctl checkpoint changes` (they must agree), copied onto `older`'s export: the result must be
/// `newer`'s export byte for byte. Returns what went wrong instead of panicking, so that one
/// run reports every pair.
fn check_changes(
    c: &Client,
    sock: &Path,
    older: Option<(&Taken, &[Vec<u8>])>,
    newer: (&Taken, &[Vec<u8>]),
    launch: &[Vec<u8>],
    incremental: &Path,
) -> Result<u64, String> {
    let since = older.map(|(t, _)| t.info.id.as_str());
    let what = format!(
        "changes from {} to {}",
        older.map_or("the launch disks", |(t, _)| t.name),
        newer.0.name
    );
    let changes = c.checkpoint_changes(&newer.0.info.id, since).map_err(|e| {
        format!(
            "{what}: GET /v1/checkpoints/{}/changes: {e}",
            newer.0.info.id
        )
    })?;
    let mut args = vec!["--json", "checkpoint", "changes", newer.0.info.id.as_str()];
    if let Some(s) = since {
        args.extend(["--since", s]);
    }
    let json = ctl(sock, &args);
    let from_ctl: ChangesInfo =
        serde_json::from_str(&json).map_err(|e| format!("{what}: ctl --json: {e}: {json}"))?;
    if from_ctl != changes {
        return Err(format!(
            "{what}: ctl says {from_ctl:?}, the API {changes:?}"
        ));
    }
    let text = ctl(sock, &args[1..]);
    if !text.contains("total:") {
        return Err(format!("{what}: ctl checkpoint changes prints {text}"));
    }
    let base = older.map_or(launch, |(_, img)| img);
    let rebuilt = apply_changes(&changes, base, newer.1);
    for (n, (got, want)) in rebuilt.iter().zip(newer.1).enumerate() {
        if got != want {
            return Err(format!(
                "{what}: disk {n}: the older export with the changed extents copied in is not \
                 the newer export: {} (extents {:?})",
                first_difference(got, want),
                changes.disks[n].extents
            ));
        }
    }
    // The incremental export of just those blocks (ctl --export): its map is the API's, and
    // its extents copied onto the older export give the newer one too.
    let inc = incremental.join(format!(
        "{}-since-{}",
        newer.0.name,
        older.map_or("launch", |(t, _)| t.name)
    ));
    let mut args = vec!["checkpoint", "changes", newer.0.info.id.as_str()];
    if let Some(s) = since {
        args.extend(["--since", s]);
    }
    args.extend(["--export", inc.to_str().unwrap()]);
    let text = ctl(sock, &args);
    let map: ChangesInfo = serde_json::from_slice(
        &std::fs::read(inc.join("changes.json"))
            .map_err(|e| format!("{what}: ctl --export wrote no changes.json: {e}\n{text}"))?,
    )
    .map_err(|e| format!("{what}: changes.json: {e}"))?;
    if map != changes {
        return Err(format!(
            "{what}: ctl --export's changes.json {map:?} is not the API's {changes:?}"
        ));
    }
    let files: Vec<Vec<u8>> = (0..changes.disks.len())
        .map(|n| std::fs::read(inc.join(format!("disk{n}.raw"))))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: ctl --export's disk files: {e}\n{text}"))?;
    let rebuilt = apply_changes(&changes, base, &files);
    for (n, (got, want)) in rebuilt.iter().zip(newer.1).enumerate() {
        if got != want {
            return Err(format!(
                "{what}: disk {n}: the older export with ctl --export's blocks copied in is not \
                 the newer export: {}",
                first_difference(got, want),
            ));
        }
        use std::os::unix::fs::MetadataExt;
        let d = &changes.disks[n];
        let allocated = std::fs::metadata(inc.join(format!("disk{n}.raw")))
            .unwrap()
            .blocks()
            * 512;
        if allocated > d.changed_bytes() + 4096 * d.extents.len() as u64 {
            return Err(format!(
                "{what}: disk {n}: ctl --export's file holds {allocated} bytes for {} changed",
                d.changed_bytes()
            ));
        }
    }
    let left: Vec<_> = std::fs::read_dir(&inc)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "changes.json" && !n.starts_with("disk"))
        .collect();
    if !left.is_empty() {
        return Err(format!("{what}: ctl --export left {left:?} behind"));
    }
    Ok(changes.changed_bytes())
}

#[test]
fn exports_boot_and_restore_and_changed_blocks_rebuild_newer_exports_across_branches() {
    let (s, outdir) = setup(&[DISK_SIZE, DISK_SIZE]);
    let scratch = s.path("");
    let (mut vm, c) = boot(&s, &outdir);
    let mut models = vec![DiskModel::zero(), DiskModel::zero()];
    vm.ok("count start");
    vm.ok(&format!("fill {FILL_MIB} 5"));

    // P0 (production, root) → S1 (standard) → P2 (production); S1 → P3 (production).
    disk_write(&mut vm, &mut models, 0, (100, 64), 11);
    disk_write(&mut vm, &mut models, 1, (50, 32), 12);
    let p0 = take_production(&c, "P0");
    let p0 = Taken {
        name: "P0",
        info: p0,
        models: models.clone(),
    };
    disk_write(&mut vm, &mut models, 0, (120, 64), 13);
    disk_write(&mut vm, &mut models, 1, (4000, 32), 14);
    vm.ok(&format!("fill {FILL_MIB} 6"));
    let s1 = take_standard(&mut vm, &c, "S1", 6, &models);
    assert_eq!(s1.info.parent.as_deref(), Some(p0.info.id.as_str()));
    disk_write(&mut vm, &mut models, 0, (2000, 64), 15);
    disk_write(&mut vm, &mut models, 1, (100, 16), 16);
    let p2 = take_production(&c, "P2");
    assert_eq!(p2.parent.as_deref(), Some(s1.info.id.as_str()));
    let p2 = Taken {
        name: "P2",
        info: p2,
        models: models.clone(),
    };
    vm.ok(&format!("fill {FILL_MIB} 7"));
    let top = count_get(&mut vm);
    let v = apply(&c, &s1.info.id, false);
    assert_eq!(v.state, VmState::Running, "{v:?}");
    resync(&mut vm);
    assert_at_standard(&mut vm, &s1, Some(&top), 7, "after applying S1");
    models = s1.models.clone();
    disk_write(&mut vm, &mut models, 0, (3000, 16), 17);
    disk_write(&mut vm, &mut models, 0, (120, 10), 18);
    disk_write(&mut vm, &mut models, 1, (50, 10), 19);
    let p3 = take_production(&c, "P3");
    assert_eq!(p3.parent.as_deref(), Some(s1.info.id.as_str()));
    let p3 = Taken {
        name: "P3",
        info: p3,
        models: models.clone(),
    };
    let s1t = Taken {
        name: "S1",
        info: s1.info.clone(),
        models: s1.models.clone(),
    };
    for t in [&p0, &s1t, &p2, &p3] {
        assert_checkpoint_holds(&t.info, &t.models, &scratch);
    }

    // Exports: every checkpoint raw through the API; S1 also through ctl, P3 also as strata.
    let exports = outdir.join("exports");
    std::fs::create_dir(&exports).unwrap();
    let mut images: Vec<Vec<Vec<u8>>> = Vec::new();
    for t in [&p0, &s1t, &p2, &p3] {
        let dest = exports.join(t.name);
        let e = export(&c, &t.info.id, &dest, DiskFormat::Raw);
        assert_eq!(e.id, t.info.id);
        let names: Vec<PathBuf> = e.disks.iter().map(PathBuf::from).collect();
        assert_eq!(
            names,
            [dest.join("disk0.raw"), dest.join("disk1.raw")],
            "{e:?}"
        );
        assert!(dest.join("manifest.json").is_file(), "{e:?}");
        // The manifest's checksums (taken as the export wrote the disks) are those of the
        // files as they are, read back.
        let manifest = snapshot::manifest::Manifest::load(&dest.join("manifest.json")).unwrap();
        let recorded = manifest
            .export
            .as_ref()
            .unwrap_or_else(|| panic!("{manifest:?}"));
        assert_eq!(recorded.disks.len(), 2, "{recorded:?}");
        for f in &recorded.disks {
            let read = snapshot::memory::sparse_digest(&dest.join(&f.file)).unwrap();
            assert_eq!(
                (f.size, f.crc64),
                (read.size, read.crc64),
                "export of {}: {} as recorded and as read back",
                t.name,
                f.file
            );
        }
        let standard = t.info.kind == TakenType::Standard;
        assert_eq!(
            (e.state.is_some(), e.memory.is_some()),
            (standard, standard),
            "an export has state and memory exactly when it is a standard checkpoint's: {e:?}"
        );
        let img = read_export(&e);
        for (n, (got, m)) in img.iter().zip(&t.models).enumerate() {
            assert!(
                *got == m.0,
                "export of {} disk {n}: {}",
                t.name,
                first_difference(got, &m.0)
            );
        }
        images.push(img);
    }
    // qemu-img compare of the production export against strata disk convert of its chains.
    for (n, top) in p2.info.disks.iter().enumerate() {
        let flat = scratch.join(format!("p2-flat{n}.raw"));
        strata_ok(&[
            "disk",
            "convert",
            top,
            flat.to_str().unwrap(),
            "--allow-parent-outside",
        ]);
        let exported = exports.join("P2").join(format!("disk{n}.raw"));
        qemu_img_identical(&exported, &flat).unwrap_or_else(|e| panic!("{e}"));
    }
    // A destination that holds files is refused (400) and left as it was; an unknown
    // checkpoint is 404.
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (before, parent_before) = (listing(&exports), listing(&outdir));
    let e = c
        .export_checkpoint(
            &p2.info.id,
            &ExportCheckpoint {
                destination: exports.display().to_string(),
                disk_format: DiskFormat::Raw,
            },
        )
        .expect_err("export into a folder that holds files");
    assert!(
        matches!(e, api::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    assert_eq!(
        listing(&exports),
        before,
        "a refused export wrote into the folder"
    );
    assert_eq!(
        listing(&outdir),
        parent_before,
        "a refused export left files beside it"
    );
    let e = c
        .checkpoint_changes("0123456789abcdef", Some(&p0.info.id))
        .expect_err("changes of an unknown checkpoint");
    assert_eq!(e.api_code(), Some("not_found"), "{e}");
    let ctl_dir = exports.join("S1-ctl");
    let out = ctl(
        &s.sock,
        &[
            "checkpoint",
            "export",
            &s1.info.id,
            ctl_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains(&s1.info.id) && out.contains(ctl_dir.join("disk1.raw").to_str().unwrap()),
        "ctl checkpoint export's output: {out}"
    );
    for n in 0..2 {
        qemu_img_identical(
            &ctl_dir.join(format!("disk{n}.raw")),
            &exports.join("S1").join(format!("disk{n}.raw")),
        )
        .unwrap_or_else(|e| panic!("ctl export of S1 against the API's: {e}"));
    }
    let strata_dir = exports.join("P3-strata");
    ctl(
        &s.sock,
        &[
            "checkpoint",
            "export",
            &p3.info.id,
            strata_dir.to_str().unwrap(),
            "--format",
            "strata",
        ],
    );
    for (n, m) in p3.models.iter().enumerate() {
        let got = flatten(
            strata_dir.join(format!("disk{n}.strata")).to_str().unwrap(),
            &scratch,
        );
        assert!(
            got == m.0,
            "strata export of P3 disk {n}: {}",
            first_difference(&got, &m.0)
        );
    }

    // Changed blocks along each branch, then across the branches (collected, asserted last).
    // Without `since` the changes are those after the launch disks, which the first
    // checkpoint froze as they were then (what the guest had written before it).
    let launch: Vec<Vec<u8>> = s.disks.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let along = [
        (None, (&p0, &images[0])),
        (Some((&p0, &images[0])), (&s1t, &images[1])),
        (Some((&s1t, &images[1])), (&p2, &images[2])),
        (Some((&p0, &images[0])), (&p2, &images[2])),
        (Some((&s1t, &images[1])), (&p3, &images[3])),
        (Some((&p0, &images[0])), (&p3, &images[3])),
        (Some((&s1t, &images[1])), (&s1t, &images[1])),
    ];
    for (older, newer) in along {
        let older = older.map(|(t, i): (&Taken, &Vec<Vec<u8>>)| (t, i.as_slice()));
        let changed = check_changes(
            &c,
            &s.sock,
            older,
            (newer.0, newer.1),
            &launch,
            &outdir.join("incremental"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(changed < 2 * DISK_SIZE, "{changed}");
        if older.is_some_and(|(o, _)| o.info.id == newer.0.info.id) {
            assert_eq!(changed, 0, "changes of {} since itself", newer.0.name);
        }
    }
    // Any two positions of the tree: across the branches, and back up a branch (the changes
    // from a newer checkpoint to an older one turn the newer export into the older).
    let across: Vec<String> = [
        ((&p2, &images[2]), (&p3, &images[3])),
        ((&p3, &images[3]), (&p2, &images[2])),
        ((&p2, &images[2]), (&s1t, &images[1])),
        ((&p3, &images[3]), (&p0, &images[0])),
    ]
    .into_iter()
    .filter_map(|(o, n)| {
        check_changes(
            &c,
            &s.sock,
            Some((o.0, o.1)),
            (n.0, n.1),
            &launch,
            &outdir.join("incremental"),
        )
        .err()
        .map(|e| {
            eprintln!("NOT ON ONE BRANCH, OLDER TO NEWER: {e}");
            e
        })
    })
    .collect();
    power_off(&mut vm, &c);
    drop(c);
    drop(vm);

    // strata run boots the production export's disks.
    let sock3 = s.path("run-export.sock");
    let p2_dir = exports.join("P2");
    let args = [
        "--memory".to_string(),
        "64M".into(),
        "--api-socket".into(),
        sock3.display().to_string(),
        "--disk".into(),
        format!("path={}", p2_dir.join("disk0.raw").display()),
        "--disk".into(),
        format!("path={}", p2_dir.join("disk1.raw").display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut booted = Vm::start(&args);
    booted.wait_ready();
    let c3 = api_client(&sock3);
    assert_guest_disks(&mut booted, &p2.models, "strata run on P2's export");
    power_off(&mut booted, &c3);
    drop(c3);
    drop(booted);

    // strata restore starts the standard export in a new process: count and memory go on.
    let sock4 = s.path("restore-export.sock");
    let mut r = Restored::start(&[
        "--checkpoint",
        exports.join("S1").to_str().unwrap(),
        "--api-socket",
        sock4.to_str().unwrap(),
    ]);
    let c4 = api_client(&sock4);
    let v = c4.vm().unwrap();
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_at_standard(&mut r, &s1, None, 7, "strata restore of S1's export");
    // The restored VM runs on new layers above the export: writes land, the export stays.
    let before = std::fs::read(exports.join("S1").join("disk0.raw")).unwrap();
    let mut after_models = s1.models.clone();
    disk_write(&mut r, &mut after_models, 0, (3100, 16), 20);
    r.ok("blk 0 flush");
    assert_guest_disks(&mut r, &after_models, "writes on the restored export");
    assert!(
        std::fs::read(exports.join("S1").join("disk0.raw")).unwrap() == before,
        "the restored VM wrote into the export's disk file"
    );
    power_off(&mut r, &c4);

    assert!(
        across.is_empty(),
        "changed blocks between checkpoints that are not older-to-newer on one branch ({} of 4 \
         pairs failed):\n{}",
        across.len(),
        across.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Test 3: export progress (API and ctl) and throughput.

/// The data disk of test 3: 1 GiB, every byte written (no holes, nothing zero).
const BIG_DISK: u64 = 1024 * MIB;

/// Writes `size` bytes of data to `path`: each MiB a different pattern (never zero).
fn write_data_disk(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for mib in 0..size / MIB {
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            let v = (mib << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// `dd if=/dev/zero of=PATH bs=1M count=N conv=fsync`: seconds.
fn dd_seconds(path: &Path, mib: u64) -> f64 {
    let t = Instant::now();
    let out = run_tool(
        Path::new("dd"),
        &[
            "if=/dev/zero",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mib}"),
            "conv=fsync",
        ],
    );
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "dd: {}", out.describe());
    std::fs::remove_file(path).unwrap();
    secs
}

#[test]
fn export_reports_progress_in_the_api_and_ctl_and_its_throughput_is_measured() {
    let (s, outdir) = setup(&[]);
    let launch = s.path("data.raw");
    write_data_disk(&launch, BIG_DISK);
    let s = Setup {
        disks: vec![launch.clone()],
        ..s
    };
    let (mut vm, c) = boot(&s, &outdir);
    vm.ok("blk 0 write 10 8 3");
    vm.ok("blk 0 flush");
    let info = take_production(&c, "big");

    // The API: poll the list while the export runs on another thread.
    let dest = outdir.join("export-api");
    let poll = api_client(&s.sock);
    let started = Instant::now();
    let (id, d2, sock) = (info.id.clone(), dest.clone(), s.sock.clone());
    let worker = std::thread::spawn(move || {
        let c = api_client(&sock);
        let r = export(&c, &id, &d2, DiskFormat::Raw);
        (r, started.elapsed())
    });
    let mut samples = Vec::new();
    while !worker.is_finished() {
        let list = poll.checkpoints().unwrap();
        if let Some(p) = list.progress {
            samples.push(p);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (exported, took) = worker.join().unwrap();
    assert_eq!(
        poll.checkpoints().unwrap().progress,
        None,
        "after the export"
    );
    eprintln!(
        "API export: {} progress samples, first {:?}, last {:?}",
        samples.len(),
        samples.first(),
        samples.last()
    );
    assert!(
        samples.iter().any(|p| p.total > 0),
        "GET /v1/checkpoints never showed the export's progress while it ran ({took:?}): \
         {samples:?}"
    );
    let mut done = 0;
    for p in &samples {
        assert_eq!(
            (p.operation.as_str(), p.checkpoint.as_str()),
            (PROGRESS_EXPORT, info.id.as_str()),
            "{p:?}"
        );
        assert!(p.done <= p.total || p.total == 0, "{p:?}");
        assert!(p.done >= done, "progress went back: {samples:?}");
        done = p.done;
    }
    qemu_img_identical(&launch, Path::new(&exported.disks[0])).unwrap_or_else(|e| panic!("{e}"));

    // strata ctl on a terminal (script gives it one): a progress bar.
    let ctl_dest = outdir.join("export-ctl");
    let command = format!(
        "{} ctl --api-socket {} checkpoint export {} {}",
        strata_bin().display(),
        s.sock.display(),
        info.id,
        ctl_dest.display()
    );
    let out = run_tool(Path::new("script"), &["-qefc", &command, "/dev/null"]);
    assert!(out.status.success(), "{command}: {}", out.describe());
    let tty = out.stdout.replace('\r', "\n");
    assert!(
        tty.contains(&format!("exporting {}", info.id)) && tty.contains('%'),
        "strata ctl checkpoint export on a terminal drew no progress bar:\n{tty}"
    );
    assert!(tty.contains("exported"), "{tty}");
    qemu_img_identical(&launch, &ctl_dest.join("disk0.raw")).unwrap_or_else(|e| panic!("{e}"));
    power_off(&mut vm, &c);

    // Throughput beside a dd of the same size to the same file system.
    let mib = BIG_DISK / MIB;
    let dd = dd_seconds(&s.path("dd.raw"), mib);
    let rate = |secs: f64| mib as f64 / secs;
    eprintln!(
        "export of a {mib} MiB disk full of data: {:.2} s, {:.0} MiB/s (ExportInfo.bytes {}); \
         dd of {mib} MiB with conv=fsync to the same file system: {dd:.2} s, {:.0} MiB/s",
        took.as_secs_f64(),
        rate(took.as_secs_f64()),
        exported.bytes,
        rate(dd)
    );
}
