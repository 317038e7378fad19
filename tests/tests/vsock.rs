//! virtio-vsock end to end with the test guest: its agent on port 52 through the host client
//! the API uses, freeze/thaw of its `log` workload, and 16 concurrent connections to its echo
//! service on port 7.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_tests::{vsock_connect, Vm};
use vmm::agent::AgentClient;

struct Guest {
    vm: Vm,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

fn boot(extra: &[&str]) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut args = vec!["--memory", "64M", "--vsock", &vsock];
    args.extend_from_slice(extra);
    let mut vm = Vm::start(&args);
    vm.wait_ready();
    Guest { vm, uds, _dir: dir }
}

fn agent(uds: &Path) -> AgentClient {
    AgentClient::connect(uds, Duration::from_secs(10)).unwrap()
}

#[test]
fn agent_answers_ping_info_exec_and_survives_malformed_requests() {
    let g = boot(&[]);
    let mut a = agent(&g.uds);
    a.ping().unwrap();
    let info = a.info().unwrap();
    assert_eq!(info["agent"], "strata-test-guest", "{info}");
    let r = a.exec(&["echo".into(), "hi".into()], 10).unwrap();
    assert_eq!((r.exit_code, r.stdout.trim_end()), (0, "hi"));
    let r = a.exec(&["no-such-command".into()], 10).unwrap();
    assert_ne!(r.exit_code, 0);

    // Raw malformed lines on another connection get ok:false, and the agent keeps serving.
    let s = vsock_connect(&g.uds, 52);
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    for bad in [
        "this is not json",
        "{\"op\":\"fly\"}",
        "{\"no_op\":1}",
        "[1,2,3]",
    ] {
        w.write_all(format!("{bad}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad} -> {line}");
    }
    w.write_all(b"{\"op\":\"ping\"}\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    a.ping().unwrap();
}

/// `log verify` record count.
fn records(vm: &mut Vm) -> u64 {
    let reply = vm.command("log verify 0");
    match (&reply.status, reply.lines.as_slice()) {
        (Ok(()), [n]) => n.parse().unwrap(),
        _ => panic!(
            "log verify 0: {reply:?}\nconsole:\n{}\nstrata stderr:\n{}",
            vm.transcript.join("\n"),
            vm.stderr()
        ),
    }
}

#[test]
fn freeze_stops_the_log_workload_until_thaw_and_the_lease_thaws_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("log.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mut g = boot(&["--disk", &format!("path={}", disk.display())]);
    g.vm.command("log start 0").ok();
    std::thread::sleep(Duration::from_millis(500));

    let mut a = agent(&g.uds);
    let frozen = a.freeze(60).unwrap();
    assert_eq!(frozen, vec!["log".to_string()]);
    let at_freeze = records(&mut g.vm);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(records(&mut g.vm), at_freeze, "the log grew while frozen");
    a.thaw().unwrap();
    wait_for_growth(&mut g.vm, at_freeze, Duration::ZERO, "after thaw");

    // A freeze the host never thaws ends by itself after its lease, and until then it really
    // holds the workload.
    leased_freeze_holds_then_thaws_by_itself(&mut g.vm, &mut a);
    g.vm.command("log stop").ok();
    assert!(records(&mut g.vm) > 0);
}

/// Freezes with a lease and never thaws: first proves the `log` workload stopped (the record
/// count on disk does not move while the lease surely runs), then that it resumes by itself.
///
/// No speed is asserted. The guest sets its deadline after the host sent `freeze`, so every
/// count read back before `sent + lease / 2` on the host's clock (half, in case the guest's
/// clock runs fast) was taken while frozen and must equal the count at the freeze. If this
/// machine is too slow to read the count at least twice with a pause in between inside that
/// window, the attempt proves nothing: the host thaws and tries again with a longer lease.
fn leased_freeze_holds_then_thaws_by_itself(vm: &mut Vm, a: &mut AgentClient) {
    const PAUSE: Duration = Duration::from_millis(300);
    for lease_s in [6u64, 24, 96] {
        let sent = Instant::now();
        let frozen = a.freeze(lease_s).unwrap();
        assert_eq!(frozen, vec!["log".to_string()], "the log was not running");
        let surely_frozen_until = sent + Duration::from_secs(lease_s) / 2;
        let at_freeze = records(vm);
        let mut samples = 0;
        loop {
            std::thread::sleep(PAUSE);
            let n = records(vm);
            if Instant::now() >= surely_frozen_until {
                break;
            }
            assert_eq!(
                n, at_freeze,
                "the log grew from {at_freeze} to {n} records while frozen ({lease_s} s lease)"
            );
            samples += 1;
        }
        if samples < 2 {
            eprintln!("the {lease_s} s lease ran out before the freeze was seen twice: longer");
            a.thaw().unwrap();
            continue;
        }
        // Now the lease ends by itself: the log grows again without a thaw from the host.
        let lease = Duration::from_secs(lease_s);
        wait_for_growth(
            vm,
            at_freeze,
            lease,
            &format!("by itself ({lease_s} s lease)"),
        );
        return;
    }
    panic!("no lease was long enough to see the freeze hold on this machine");
}

/// Waits until the log holds more than `before` records (hang guard: `extra` + 3 minutes).
fn wait_for_growth(vm: &mut Vm, before: u64, extra: Duration, when: &str) {
    let guard = Instant::now() + extra + Duration::from_secs(180);
    loop {
        let n = records(vm);
        if n > before {
            return;
        }
        assert!(
            Instant::now() < guard,
            "the log did not resume {when}: still {n} records"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sixteen_connections_each_echo_a_mebibyte() {
    let g = boot(&[]);
    let threads: Vec<_> = (0..16u8)
        .map(|t| {
            let uds = g.uds.clone();
            std::thread::spawn(move || {
                let s = vsock_connect(&uds, 7);
                let data: Vec<u8> = (0..1usize << 20)
                    .map(|i| (i as u8).wrapping_mul(31) ^ t)
                    .collect();
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
                let mut got = vec![0u8; data.len()];
                let mut r = s;
                r.read_exact(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == data, "connection {t} got different bytes back");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
