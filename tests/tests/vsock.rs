//! virtio-vsock end to end with the test guest: its agent on port 52 through the host client
//! the API uses, freeze/thaw of its `log` workload, and 16 concurrent connections to its echo
//! service on port 7.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    vm.line("log verify 0").parse().unwrap()
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
    std::thread::sleep(Duration::from_millis(700));
    let after_thaw = records(&mut g.vm);
    assert!(after_thaw > at_freeze, "the log did not resume after thaw");

    // A freeze the host never thaws ends by itself after its lease.
    a.freeze(1).unwrap();
    let leased = records(&mut g.vm);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        records(&mut g.vm) > leased,
        "the lease did not thaw the guest"
    );
    g.vm.command("log stop").ok();
    assert!(records(&mut g.vm) > 0);
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
