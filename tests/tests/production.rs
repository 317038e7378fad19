//! Production checkpoints end to end (issue #14's Must-show tests), with the test guest under
//! KVM and its agent on vsock port 52.
//!
//! The test guest's `log` workload appends sequence-numbered, checksummed records to a disk,
//! one write + flush per record. Its agent's `freeze` stops every log at a record boundary,
//! flushes, and answers with the records on each disk (`log_records`, `logs`); the VMM records
//! that answer as the checkpoint's `agent_freeze`. So a production checkpoint is
//! application-consistent exactly when, after applying it and booting again, `log verify N`
//! (the unbroken prefix of records on disk N) equals the count the agent reported when it
//! froze: not one record fewer (lost), not one more (taken after the freeze), none torn.
//!
//! 1. one disk: production checkpoint, the log goes on, apply → off, start, `log verify 0` = N;
//! 2. two disks, a log on each: per-disk counts;
//! 3. the agent off (`strata.agent=off`): `production` falls back to standard and says why,
//!    `production-only` fails with 503 and nothing changed, `disabled` refuses with 409, also
//!    when the request names a type;
//! 4. a VM that is off takes a disk-only checkpoint whatever its type; apply leaves it off;
//! 5. a new `strata run` with the same disks and state dir boots from the production
//!    checkpoint's disks.
//!
//! Guest code is slow on this machine's KVM (PVM): sizes are small and every timeout is a hang
//! guard, never a speed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::call::LifecycleAction;
use api::types::{
    ApplyCheckpoint, CheckpointInfo, CheckpointList, CheckpointType, Consistency, CreateCheckpoint,
    TakenType, VmInfo, VmState,
};
use api::{Client, ClientError};
use resources::pattern::{log_record_parse, SECTOR_SIZE};
use strata_tests::checkpoint_setup::{
    api_error, file_digest, start, wait_agent, wait_state, Setup,
};
use strata_tests::Vm;

const MIB: u64 = 1 << 20;
/// The launch disks: small raw files (sparse, all zeros). 8192 log records fit.
const DISK_SIZE: u64 = 4 * MIB;
/// Records a disk can hold.
const DISK_RECORDS: u64 = DISK_SIZE / SECTOR_SIZE as u64;
/// Records each log writes before the checkpoint, and again after it.
const MIN_RECORDS: u64 = 16;
/// `vmm::config::DEFAULT_CMDLINE`, which `--cmdline` replaces: kept, with the agent switched off.
const AGENT_OFF_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 strata.agent=off";
/// Hang guard for a log to grow.
const GROWTH_GUARD: Duration = Duration::from_secs(180);
/// Hang guard for the answer to a raw HTTP request on the API socket.
const HTTP_GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A VM's files and its `strata run`.

/// Boots `strata run` on `s`: 64 MiB, the disks, the vsock device, the API socket and the
/// checkpoint location; the default vCPUs and checkpoint type; `cmdline` if given. Waits for
/// the guest and the API.
fn boot(s: &Setup, cmdline: Option<&str>) -> (Vm, Client) {
    let vsock = s.vsock_arg();
    let mut extra = vec!["--vsock", vsock.as_str()];
    if let Some(c) = cmdline {
        extra.extend(["--cmdline", c]);
    }
    s.boot(None, &extra)
}

/// Runs a console command that must succeed; its output lines. A failure shows the console
/// and the VMM's stderr.
fn ok(vm: &mut Vm, cmd: &str) -> Vec<String> {
    let reply = vm.command(cmd);
    match reply.status {
        Ok(()) => reply.lines,
        Err(e) => panic!(
            "{cmd}: err {e} (output {:?})\nconsole:\n{}\nstrata stderr:\n{}",
            reply.lines,
            vm.transcript.join("\n"),
            vm.stderr()
        ),
    }
}

/// Runs a command that must succeed with one output line.
fn line(vm: &mut Vm, cmd: &str) -> String {
    let mut out = ok(vm, cmd);
    assert_eq!(out.len(), 1, "{cmd}: expected one line, got {out:?}");
    out.remove(0)
}

/// `log verify N`: the unbroken prefix of log records on disk `disk` (an `err`, e.g. a record
/// after a gap, fails the test).
fn records(vm: &mut Vm, disk: usize) -> u64 {
    let out = line(vm, &format!("log verify {disk}"));
    out.parse()
        .unwrap_or_else(|_| panic!("log verify {disk}: not a count: {out:?}"))
}

/// Waits until disk `disk`'s log holds more than `above` records; returns the count seen.
fn wait_growth(vm: &mut Vm, disk: usize, above: u64, when: &str) -> u64 {
    let guard = Instant::now() + GROWTH_GUARD;
    loop {
        let n = records(vm, disk);
        if n > above {
            return n;
        }
        assert!(
            Instant::now() < guard,
            "the log of disk {disk} did not grow past {above} {when}: still {n}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// API helpers.

fn create(
    c: &Client,
    name: &str,
    kind: Option<CheckpointType>,
) -> Result<CheckpointInfo, ClientError> {
    c.create_checkpoint(&CreateCheckpoint {
        name: Some(name.into()),
        kind,
    })
}

fn apply(c: &Client, id: &str) -> VmInfo {
    c.apply_checkpoint(
        id,
        &ApplyCheckpoint {
            save_current: false,
        },
    )
    .unwrap_or_else(|e| panic!("apply {id}: {e}"))
}

fn set_type(c: &Client, kind: CheckpointType) {
    let mut config = c.checkpoint_config().unwrap();
    config.kind = kind;
    let back = c.set_checkpoint_config(&config).unwrap();
    assert_eq!(back, config);
    assert_eq!(c.checkpoint_config().unwrap(), config);
}

/// `POST path` with a JSON `body` on the API socket, as curl sends it: the status and body as
/// they come.
fn http_post(sock: &Path, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(HTTP_GUARD)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, rest) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        // Chunk sizes in hex, each followed by its data.
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

/// What `GET /v1/checkpoints/{id}` and the list say of `info`: the same as the create's
/// answer.
fn assert_listed(c: &Client, info: &CheckpointInfo) {
    let got = c.checkpoint(&info.id).unwrap();
    assert_eq!(
        &got, info,
        "GET /v1/checkpoints/{} differs from the create's answer",
        info.id
    );
    let list = c.checkpoints().unwrap();
    let listed = list
        .checkpoints
        .iter()
        .find(|i| i.id == info.id)
        .unwrap_or_else(|| panic!("{} is not in the list {list:?}", info.id));
    assert_eq!(
        listed, info,
        "the list's entry differs from the create's answer"
    );
}

/// The per-disk record counts of a production checkpoint's `agent_freeze`, checked for its
/// shape: `frozen` lists the log, `log_records` is their sum.
fn frozen_logs(info: &CheckpointInfo) -> Vec<(u64, u64)> {
    let reply = info
        .agent_freeze
        .as_ref()
        .unwrap_or_else(|| panic!("no agent_freeze in {info:?}"));
    let logs: Vec<(u64, u64)> = reply["logs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logs in agent_freeze {reply:?}"))
        .iter()
        .map(|l| (l["disk"].as_u64().unwrap(), l["records"].as_u64().unwrap()))
        .collect();
    let total: u64 = logs.iter().map(|&(_, n)| n).sum();
    assert_eq!(
        reply["log_records"].as_u64(),
        Some(total),
        "agent_freeze.log_records is not the sum of its logs: {reply:?}"
    );
    assert_eq!(reply["frozen"], serde_json::json!(["log"]), "{reply:?}");
    logs
}

/// Takes a checkpoint of the configured type (production) of a running VM whose agent works
/// and checks that it is a production one: application-consistent, `frozen_us`, the agent's
/// freeze reply, no memory or state. Returns it with the per-disk counts the agent froze at.
fn take_production(c: &Client, name: &str) -> (CheckpointInfo, Vec<(u64, u64)>) {
    assert_eq!(
        c.checkpoint_config().unwrap().kind,
        CheckpointType::Production,
        "the default checkpoint type"
    );
    let info = create(c, name, None).unwrap_or_else(|e| panic!("create {name:?}: {e}"));
    assert_eq!(info.kind, TakenType::Production, "{info:?}");
    assert_eq!(
        info.consistency,
        Consistency::ApplicationConsistent,
        "{info:?}"
    );
    assert_eq!(info.fallback_reason, None, "{info:?}");
    assert!(info.frozen_us.is_some(), "no frozen_us: {info:?}");
    assert_eq!(
        info.paused_us, None,
        "a production checkpoint pauses no vCPU: {info:?}"
    );
    assert_eq!(
        (info.sizes.state, info.sizes.memory),
        (0, 0),
        "a production checkpoint saves no state or memory: {info:?}"
    );
    assert!(info.current, "{info:?}");
    assert_eq!(info.name, name);
    assert_listed(c, &info);
    let logs = frozen_logs(&info);
    eprintln!(
        "production checkpoint {}: frozen {} us, agent_freeze {:?}",
        info.id,
        info.frozen_us.unwrap(),
        info.agent_freeze
    );
    (info, logs)
}

/// Counts, on the host, the unbroken prefix of log records in a raw disk file, as `log verify`
/// does in the guest; fails if a record of the run follows a gap.
fn host_records(raw: &Path) -> u64 {
    let bytes = std::fs::read(raw).unwrap_or_else(|e| panic!("read {}: {e}", raw.display()));
    let mut good = 0u64;
    let mut nonce = None;
    let mut gap = false;
    for (lba, sector) in bytes.chunks_exact(SECTOR_SIZE).enumerate() {
        let parsed = log_record_parse(sector.try_into().unwrap());
        let fits = matches!(parsed, Some((seq, run)) if seq == lba as u64 && nonce.is_none_or(|n| n == run));
        if !gap && fits {
            good += 1;
            nonce = parsed.map(|(_, run)| run);
        } else if !gap {
            gap = true;
        } else {
            assert!(
                !fits,
                "{}: record {lba} follows a gap after {good} records",
                raw.display()
            );
        }
    }
    good
}

/// Whether the checkpoint froze `launch` itself (the first checkpoint freezes the launch disks).
fn froze_launch_disk(info: &CheckpointInfo, disk: usize, launch: &Path) -> bool {
    std::fs::canonicalize(&info.disks[disk]).unwrap() == std::fs::canonicalize(launch).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Files, to show that nothing changed.

/// Length and hash of each file, by path.
type Digests = BTreeMap<PathBuf, (u64, u64)>;

/// The length and hash of a file (a failure to read it fails the test).
fn digest(path: &Path) -> (u64, u64) {
    file_digest(path).unwrap_or_else(|e| panic!("read {e}"))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let ty = entry.file_type().unwrap();
        if ty.is_dir() {
            files_under(&entry.path(), out);
        } else {
            out.push(entry.path());
        }
    }
}

/// The launch disks and every file in the checkpoint location (its layers, checkpoint folders
/// and records), hashed.
fn all_files(s: &Setup) -> Digests {
    let mut paths = s.disks.clone();
    files_under(&s.state, &mut paths);
    assert!(
        paths.iter().any(|p| p.starts_with(s.state.join("layers"))),
        "no layer under {}: {paths:?}",
        s.state.display()
    );
    paths
        .into_iter()
        .map(|p| {
            let d = digest(&p);
            (p, d)
        })
        .collect()
}

fn assert_unchanged(s: &Setup, before: &Digests, list: &CheckpointList, c: &Client, what: &str) {
    let now = all_files(s);
    for (p, d) in before {
        match now.get(p) {
            Some(n) => assert_eq!(n, d, "{what}: {} changed (length, hash)", p.display()),
            None => panic!("{what}: {} is gone", p.display()),
        }
    }
    let new: Vec<&PathBuf> = now.keys().filter(|p| !before.contains_key(*p)).collect();
    assert!(new.is_empty(), "{what}: new files {new:?}");
    assert_eq!(
        &c.checkpoints().unwrap(),
        list,
        "{what}: the checkpoint list changed"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests 1, 2 and 5: the log workload across a production checkpoint.

/// Boots a VM on `ndisks` disks, starts a log on each, takes a production checkpoint while
/// they run, lets every log grow past the checkpoint, and applies it: the VM is off. Returns
/// the checkpoint and the per-disk counts the agent froze at.
fn log_checkpoint_apply(s: &Setup, vm: &mut Vm, c: &Client) -> (CheckpointInfo, Vec<u64>) {
    let ndisks = s.disks.len();
    wait_agent(c, "before the logs start");
    for d in 0..ndisks {
        ok(vm, &format!("log start {d}"));
    }
    // Enough records that the count means something (a hang guard, not a speed test).
    for d in 0..ndisks {
        wait_growth(vm, d, MIN_RECORDS - 1, "after log start");
    }
    let (info, logs) = take_production(c, "logs running");
    let want: Vec<(u64, u64)> = logs
        .iter()
        .enumerate()
        .map(|(d, &(_, n))| (d as u64, n))
        .collect();
    assert_eq!(logs, want, "agent_freeze.logs: one per disk, in disk order");
    let counts: Vec<u64> = logs.iter().map(|&(_, n)| n).collect();
    for (d, &n) in counts.iter().enumerate() {
        assert!(n > 0, "disk {d}: no record before the checkpoint");
        assert!(
            n + 100 < DISK_RECORDS,
            "disk {d}: the log nearly filled the disk ({n} records): make the disk larger"
        );
        // The first checkpoint freezes the launch disk itself: on the host it holds exactly the
        // records the agent reported, and it is never written again.
        assert!(froze_launch_disk(&info, d, &s.disks[d]), "{info:?}");
        assert_eq!(
            host_records(&s.disks[d]),
            n,
            "disk {d}: the frozen launch disk {} does not hold the {n} records the agent froze at",
            s.disks[d].display()
        );
    }
    // The logs go on after the thaw, on the new layers.
    for (d, &n) in counts.iter().enumerate() {
        let later = wait_growth(vm, d, n + MIN_RECORDS - 1, "after the checkpoint");
        eprintln!("disk {d}: {n} records at the checkpoint, {later} after it");
    }
    // Applied while the logs run: the VM goes off on the checkpoint's disks.
    let v = apply(c, &info.id);
    assert_eq!(
        v.state,
        VmState::Off,
        "after applying a production checkpoint: {v:?}"
    );
    assert_eq!(
        v.current_checkpoint.as_deref(),
        Some(info.id.as_str()),
        "{v:?}"
    );
    let v = c.vm().unwrap();
    assert_eq!(v.state, VmState::Off, "{v:?}");
    // The checkpoint itself did not change (apply starts new layers above it).
    let mut now = c.checkpoint(&info.id).unwrap();
    assert!(now.current, "{now:?}");
    now.current = info.current;
    assert_eq!(now, info, "applying changed the checkpoint");
    (info, counts)
}

/// Each disk's log holds exactly the records the agent froze at.
fn assert_records(vm: &mut Vm, counts: &[u64], when: &str) {
    for (d, &n) in counts.iter().enumerate() {
        assert_eq!(
            records(vm, d),
            n,
            "{when}: disk {d}'s log is not the {n} records the agent reported at the freeze"
        );
    }
}

/// Powers the guest off from its console and waits until the API says the VM is off.
fn power_off(vm: &mut Vm, c: &Client) {
    ok(vm, "poweroff");
    let v = wait_state(c, VmState::Off);
    assert_eq!(v.last_exit.as_deref(), Some("poweroff"), "{v:?}");
}

#[test]
fn production_checkpoint_of_one_log_applies_off_and_boots_to_exactly_the_frozen_records() {
    let s = Setup::new(&[DISK_SIZE]);
    let (mut vm, c) = boot(&s, None);
    let (info, counts) = log_checkpoint_apply(&s, &mut vm, &c);
    start(&mut vm, &c);
    assert_records(&mut vm, &counts, "after apply and start");
    let v = c.vm().unwrap();
    assert_eq!(v.current_checkpoint.as_deref(), Some(info.id.as_str()));
    power_off(&mut vm, &c);
}

#[test]
fn production_checkpoint_of_two_logs_boots_to_each_disks_frozen_records() {
    let s = Setup::new(&[DISK_SIZE; 2]);
    let (mut vm, c) = boot(&s, None);
    let (_info, counts) = log_checkpoint_apply(&s, &mut vm, &c);
    assert_eq!(counts.len(), 2);
    start(&mut vm, &c);
    assert_records(&mut vm, &counts, "after apply and start");
    power_off(&mut vm, &c);
}

/// The VM a new `strata run` with the same disks and state dir starts: running on the
/// production checkpoint's disks, that checkpoint current.
fn boot_again(s: &Setup, info: &CheckpointInfo) -> (Vm, Client) {
    let (vm, c) = boot(s, None);
    let v = c.vm().unwrap();
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(
        v.current_checkpoint.as_deref(),
        Some(info.id.as_str()),
        "{v:?}"
    );
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 1, "{list:?}");
    assert_eq!(list.current.as_deref(), Some(info.id.as_str()));
    assert_eq!(list.checkpoints[0].kind, TakenType::Production);
    (vm, c)
}

#[test]
fn a_new_strata_run_with_the_state_dir_boots_from_the_production_checkpoints_disks() {
    let s = Setup::new(&[DISK_SIZE]);
    let (mut vm, c) = boot(&s, None);
    let (info, counts) = log_checkpoint_apply(&s, &mut vm, &c);
    let launch = digest(&s.disks[0]);
    // The process ends while the applied VM is off, before it ever started again.
    drop(c);
    drop(vm);

    let (mut vm, c) = boot_again(&s, &info);
    assert_records(&mut vm, &counts, "in a new strata run after the apply");
    // Write beside the log, on the active layer; hard power-off; the process goes away.
    ok(&mut vm, "blk 0 write 7000 16 77");
    ok(&mut vm, "blk 0 flush");
    let beside = line(&mut vm, "blk 0 read 7000 16");
    let v = c.lifecycle(LifecycleAction::Stop).unwrap();
    assert_eq!(v.state, VmState::Off, "{v:?}");
    drop(c);
    drop(vm);

    let (mut vm, c) = boot_again(&s, &info);
    assert_records(&mut vm, &counts, "in a new strata run after stop and kill");
    assert_eq!(
        line(&mut vm, "blk 0 read 7000 16"),
        beside,
        "the new strata run does not continue on the active layer written before the stop"
    );
    assert_eq!(
        digest(&s.disks[0]),
        launch,
        "the launch disk was written after the checkpoint froze it"
    );
    power_off(&mut vm, &c);
}

// ---------------------------------------------------------------------------------------------
// Test 3: the agent off.

#[test]
fn with_the_agent_off_production_falls_back_production_only_fails_and_disabled_refuses() {
    let s = Setup::new(&[DISK_SIZE]);
    let (mut vm, c) = boot(&s, Some(AGENT_OFF_CMDLINE));
    let shown = line(&mut vm, "cmdline");
    assert!(shown.contains("strata.agent=off"), "{shown:?}");
    ok(&mut vm, "blk 0 write 10 8 3");
    ok(&mut vm, "blk 0 flush");

    // production (the default): a standard checkpoint, and why.
    assert_eq!(
        c.checkpoint_config().unwrap().kind,
        CheckpointType::Production
    );
    let info = create(&c, "fallback", None).unwrap_or_else(|e| panic!("create: {e}"));
    eprintln!("fallback_reason: {:?}", info.fallback_reason);
    assert_eq!(info.kind, TakenType::Standard, "{info:?}");
    assert_eq!(info.consistency, Consistency::Standard, "{info:?}");
    let reason = info
        .fallback_reason
        .as_deref()
        .unwrap_or_else(|| panic!("no fallback_reason: {info:?}"));
    assert!(
        reason.contains("agent"),
        "the fallback reason does not say the agent could not quiesce: {reason:?}"
    );
    assert!(info.sizes.memory > 0 && info.sizes.state > 0, "{info:?}");
    assert_eq!(
        (info.frozen_us, &info.agent_freeze),
        (None, &None),
        "{info:?}"
    );
    assert_listed(&c, &info);
    // The guest goes on and writes to its new layer.
    ok(&mut vm, "blk 0 write 20 8 4");
    ok(&mut vm, "blk 0 flush");

    let before = all_files(&s);
    let list = c.checkpoints().unwrap();
    assert_eq!(list.checkpoints.len(), 1, "{list:?}");

    // production-only through the VM's checkpoint type: 503, nothing changed.
    set_type(&c, CheckpointType::ProductionOnly);
    let (status, code, message) = api_error(
        create(&c, "production-only by config", None),
        "production-only (config) with the agent off",
    );
    eprintln!("production-only (config): HTTP {status} {code}: {message}");
    assert_eq!(
        (status, code.as_str()),
        (503, "agent_unreachable"),
        "{message}"
    );
    assert!(message.contains("agent"), "{message}");
    assert_unchanged(
        &s,
        &before,
        &list,
        &c,
        "a refused production-only checkpoint (config)",
    );

    // production-only as the request's type, the VM's type production: the same (raw, to see
    // the status and the error body as they come).
    set_type(&c, CheckpointType::Production);
    let (status, body) = http_post(
        &s.sock,
        "/v1/checkpoints",
        r#"{"name":"production-only by request","type":"production-only"}"#,
    );
    let body: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("HTTP {status}: the body is not JSON ({e}): {body:?}"));
    eprintln!("production-only (request): HTTP {status}: {body}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "agent_unreachable", "{body}");
    assert_unchanged(
        &s,
        &before,
        &list,
        &c,
        "a refused production-only checkpoint (request)",
    );

    // disabled: 409 with a clear error, nothing changed.
    set_type(&c, CheckpointType::Disabled);
    let (status, code, message) = api_error(
        create(&c, "while disabled", None),
        "a checkpoint while disabled",
    );
    eprintln!("disabled: HTTP {status} {code}: {message}");
    assert_eq!((status, code.as_str()), (409, "invalid_state"), "{message}");
    assert!(message.contains("disabled"), "{message}");
    assert_unchanged(
        &s,
        &before,
        &list,
        &c,
        "a refused checkpoint while disabled",
    );

    // The VM ran on through all of it.
    assert_eq!(c.vm().unwrap().state, VmState::Running);
    assert_eq!(line(&mut vm, "echo still here"), "still here");
    power_off(&mut vm, &c);
}

/// A VM whose checkpoint type is `disabled` takes no checkpoint, also when the request names a
/// type ("disabled: no checkpoints can be taken").
#[test]
fn disabled_refuses_a_checkpoint_whose_request_names_a_type() {
    let s = Setup::new(&[DISK_SIZE]);
    let (mut vm, c) = boot(&s, Some(AGENT_OFF_CMDLINE));
    ok(&mut vm, "blk 0 write 10 8 3");
    ok(&mut vm, "blk 0 flush");
    set_type(&c, CheckpointType::Disabled);
    let list = c.checkpoints().unwrap();
    assert!(list.checkpoints.is_empty(), "{list:?}");
    let launch = digest(&s.disks[0]);
    // Every type a request can name, each outcome kept so a failure shows them all.
    let outcomes: Vec<String> = [
        CheckpointType::Standard,
        CheckpointType::Production,
        CheckpointType::ProductionOnly,
    ]
    .into_iter()
    .map(|kind| {
        let outcome = match create(&c, &format!("{kind} while disabled"), Some(kind)) {
            Err(ClientError::Api {
                status: 409,
                code,
                message,
            }) if code == "invalid_state" && message.contains("disabled") => {
                return format!("type {kind}: refused (409 {code}: {message})");
            }
            Err(e) => format!("type {kind}: UNEXPECTED ERROR {e:?}"),
            Ok(i) => format!(
                "type {kind}: TAKEN as {} checkpoint {} (consistency {}, fallback_reason {:?})",
                i.kind, i.id, i.consistency, i.fallback_reason
            ),
        };
        format!("{outcome} [expected: 409 invalid_state, checkpoints disabled]")
    })
    .collect();
    for o in &outcomes {
        eprintln!("{o}");
    }
    let list_after = c.checkpoints().unwrap();
    assert!(
        outcomes.iter().all(|o| o.contains("refused")),
        "a VM whose checkpoint type is disabled took a checkpoint the request named a type for:\n{}\n\
         checkpoints now: {:?}",
        outcomes.join("\n"),
        list_after
            .checkpoints
            .iter()
            .map(|i| (&i.id, &i.name, i.kind))
            .collect::<Vec<_>>()
    );
    assert_eq!(list_after, list);
    assert_eq!(digest(&s.disks[0]), launch);
    power_off(&mut vm, &c);
}

// ---------------------------------------------------------------------------------------------
// Test 4: a VM that is off.

/// Checks a disk-only checkpoint of a VM that is off.
fn assert_disk_only(info: &CheckpointInfo, consistency: Consistency, what: &str) {
    assert_eq!(info.kind, TakenType::Production, "{what}: {info:?}");
    assert_eq!(info.consistency, consistency, "{what}: {info:?}");
    assert_eq!(
        (info.sizes.state, info.sizes.memory),
        (0, 0),
        "{what}: a disk-only checkpoint has no state or memory: {info:?}"
    );
    assert_eq!(info.paused_us, None, "{what}: {info:?}");
    assert_eq!(info.frozen_us, None, "{what}: {info:?}");
    assert_eq!(info.agent_freeze, None, "{what}: {info:?}");
    assert_eq!(info.fallback_reason, None, "{what}: {info:?}");
    assert!(info.current, "{what}: {info:?}");
}

#[test]
fn an_off_vm_takes_a_disk_only_checkpoint_whatever_its_type_and_apply_leaves_it_off() {
    let s = Setup::new(&[DISK_SIZE]);
    let (mut vm, c) = boot(&s, None);
    ok(&mut vm, "blk 0 write 100 16 5");
    ok(&mut vm, "blk 0 flush");
    let at_checkpoint = line(&mut vm, "blk 0 read 96 32");
    let v = c.lifecycle(LifecycleAction::Stop).unwrap();
    assert_eq!(v.state, VmState::Off, "{v:?}");

    // Every type, from the VM's config or the request: disks only, crash-consistent after a
    // stop; the VM stays off.
    let mut taken = Vec::new();
    let cases = [
        (CheckpointType::Production, None),
        (CheckpointType::Standard, None),
        (CheckpointType::ProductionOnly, None),
        (CheckpointType::Production, Some(CheckpointType::Standard)),
        (
            CheckpointType::Standard,
            Some(CheckpointType::ProductionOnly),
        ),
    ];
    for (config, request) in cases {
        set_type(&c, config);
        let what = format!("VM type {config}, request type {request:?}, VM off");
        let info = create(&c, &what, request).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_disk_only(&info, Consistency::CrashConsistent, &what);
        assert_eq!(
            info.parent,
            taken.last().map(|i: &CheckpointInfo| i.id.clone()),
            "{what}"
        );
        assert_listed(&c, &info);
        assert_eq!(c.vm().unwrap().state, VmState::Off, "{what}");
        taken.push(info);
    }
    // disabled still refuses.
    set_type(&c, CheckpointType::Disabled);
    let (status, _, message) = api_error(create(&c, "off, disabled", None), "off, disabled");
    assert_eq!(status, 409, "{message}");
    set_type(&c, CheckpointType::Production);

    // Start, overwrite, then apply the first one while running: off on its disks.
    start(&mut vm, &c);
    assert_eq!(line(&mut vm, "blk 0 read 96 32"), at_checkpoint);
    ok(&mut vm, "blk 0 write 90 20 6");
    ok(&mut vm, "blk 0 flush");
    assert_ne!(line(&mut vm, "blk 0 read 96 32"), at_checkpoint);
    let first = &taken[0];
    let v = apply(&c, &first.id);
    assert_eq!(
        v.state,
        VmState::Off,
        "applying a disk-only checkpoint: {v:?}"
    );
    assert_eq!(v.current_checkpoint.as_deref(), Some(first.id.as_str()));
    start(&mut vm, &c);
    assert_eq!(
        line(&mut vm, "blk 0 read 96 32"),
        at_checkpoint,
        "after applying {} and start",
        first.id
    );

    // Applied while off: it stays off, and starts.
    ok(&mut vm, "blk 0 write 90 20 7");
    ok(&mut vm, "blk 0 flush");
    let v = c.lifecycle(LifecycleAction::Stop).unwrap();
    assert_eq!(v.state, VmState::Off);
    let last = taken.last().unwrap();
    let v = apply(&c, &last.id);
    assert_eq!(v.state, VmState::Off, "applying while off: {v:?}");
    start(&mut vm, &c);
    assert_eq!(line(&mut vm, "blk 0 read 96 32"), at_checkpoint);

    // After a guest power-off the disks are clean: application-consistent.
    power_off(&mut vm, &c);
    let info = create(&c, "after poweroff", None).unwrap();
    assert_disk_only(&info, Consistency::ApplicationConsistent, "after poweroff");
    start(&mut vm, &c);
    assert_eq!(line(&mut vm, "blk 0 read 96 32"), at_checkpoint);
    power_off(&mut vm, &c);
}
