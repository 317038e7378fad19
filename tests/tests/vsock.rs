//! virtio-vsock end to end with the test guest: its agent on port 52 through the host client
//! the API uses, freeze/thaw of its `log` workload (on one disk and on two at once, with the
//! record counts `freeze` reports), a guest booted with `strata.agent=off` (no agent on port
//! 52), and 16 concurrent connections to its echo service on port 7.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
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

/// `log verify` record count of disk 0.
fn records(vm: &mut Vm) -> u64 {
    records_on(vm, 0)
}

/// `log verify N` record count.
fn records_on(vm: &mut Vm, disk: u64) -> u64 {
    let reply = vm.command(&format!("log verify {disk}"));
    match (&reply.status, reply.lines.as_slice()) {
        (Ok(()), [n]) => n.parse().unwrap(),
        _ => panic!(
            "log verify {disk}: {reply:?}\nconsole:\n{}\nstrata stderr:\n{}",
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
    wait_for_growth_on(vm, 0, before, extra, when);
}

/// Waits until disk `disk`'s log holds more than `before` records (hang guard: `extra` + 3
/// minutes).
fn wait_for_growth_on(vm: &mut Vm, disk: u64, before: u64, extra: Duration, when: &str) {
    let guard = Instant::now() + extra + Duration::from_secs(180);
    loop {
        let n = records_on(vm, disk);
        if n > before {
            return;
        }
        assert!(
            Instant::now() < guard,
            "the log of disk {disk} did not grow {when}: still {n} records"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A raw agent connection: request lines in, reply lines out, exactly as the guest wrote them.
struct RawAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl RawAgent {
    fn connect(uds: &Path) -> Self {
        let s = vsock_connect(uds, 52);
        Self {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Sends one request line and returns the reply line (without its line end).
    fn call(&mut self, request: &str) -> String {
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "{request} -> {line:?}");
        line.trim_end().to_string()
    }

    /// `freeze` with a lease of `lease_s` seconds: the reply, checked for its shape, and the
    /// (disk, records) of each log it reports.
    fn freeze(&mut self, lease_s: u64) -> (String, Vec<(u64, u64)>) {
        let line = self.call(&format!("{{\"op\":\"freeze\",\"timeout_s\":{lease_s}}}"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{line}");
        let logs: Vec<(u64, u64)> = v["logs"]
            .as_array()
            .unwrap_or_else(|| panic!("no logs in {line}"))
            .iter()
            .map(|l| (l["disk"].as_u64().unwrap(), l["records"].as_u64().unwrap()))
            .collect();
        let total: u64 = logs.iter().map(|&(_, n)| n).sum();
        assert_eq!(v["log_records"].as_u64(), Some(total), "{line}");
        let frozen: &[&str] = if logs.is_empty() { &[] } else { &["log"] };
        assert_eq!(v["frozen"], serde_json::json!(frozen), "{line}");
        (line, logs)
    }

    fn thaw(&mut self) {
        assert_eq!(self.call(r#"{"op":"thaw"}"#), r#"{"ok":true}"#);
    }
}

/// `blk N read 0 1`: the hash of sector 0 (record 0 of the disk's log, whose nonce is new with
/// each `log start`).
fn sector0(vm: &mut Vm, disk: u64) -> String {
    vm.line(&format!("blk {disk} read 0 1"))
}

#[test]
fn freeze_reports_every_running_log_and_thaw_resumes_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for name in ["a.raw", "b.raw"] {
        let disk = dir.path().join(name);
        std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
        args.push("--disk".to_string());
        args.push(format!("path={}", disk.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut g = boot(&args);
    let vm = &mut g.vm;
    vm.command("log start 0").ok();
    vm.command("log start 1").ok();
    wait_for_growth_on(vm, 0, 0, Duration::ZERO, "after log start 0");
    wait_for_growth_on(vm, 1, 0, Duration::ZERO, "after log start 1");

    // Both logs stop at the freeze, and each disk holds exactly the records the reply counts.
    let mut a = RawAgent::connect(&g.uds);
    let (line, logs) = a.freeze(600);
    let [(0, n0), (1, n1)] = logs[..] else {
        panic!("expected the logs of disks 0 and 1: {line}");
    };
    assert!(n0 > 0 && n1 > 0, "{line}");
    assert_eq!(
        line,
        format!(
            r#"{{"ok":true,"frozen":["log"],"log_records":{},"logs":[{{"disk":0,"records":{n0}}},{{"disk":1,"records":{n1}}}]}}"#,
            n0 + n1
        )
    );
    assert_eq!((records_on(vm, 0), records_on(vm, 1)), (n0, n1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (records_on(vm, 0), records_on(vm, 1)),
        (n0, n1),
        "a log grew while frozen"
    );

    // Thaw resumes both.
    a.thaw();
    wait_for_growth_on(vm, 0, n0, Duration::ZERO, "after thaw");
    wait_for_growth_on(vm, 1, n1, Duration::ZERO, "after thaw");

    // `log start 0` again restarts disk 0's log (a new run: record 0 changes) and leaves disk
    // 1's going; `log stop 1` stops only disk 1's.
    let (old0, old1) = (sector0(vm, 0), sector0(vm, 1));
    vm.command("log start 0").ok();
    let guard = Instant::now() + Duration::from_secs(180);
    while sector0(vm, 0) == old0 {
        assert!(Instant::now() < guard, "disk 0's log did not start again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before1 = records_on(vm, 1);
    wait_for_growth_on(vm, 1, before1, Duration::ZERO, "after disk 0's restart");
    vm.command("log stop 1").ok();
    let stopped1 = records_on(vm, 1);
    let (line, logs) = a.freeze(600);
    let [(0, m0)] = logs[..] else {
        panic!("expected only the log of disk 0: {line}");
    };
    assert_eq!(records_on(vm, 0), m0);
    assert_eq!(
        records_on(vm, 1),
        stopped1,
        "disk 1's log went on after log stop 1"
    );
    assert_eq!(sector0(vm, 1), old1, "disk 1's log was restarted");
    a.thaw();

    // The automatic thaw resumes every log.
    vm.command("log start 1").ok();
    wait_for_growth_on(vm, 1, 0, Duration::ZERO, "after log start 1");
    let lease = 2;
    let (line, logs) = a.freeze(lease);
    let [(0, k0), (1, k1)] = logs[..] else {
        panic!("expected the logs of disks 0 and 1: {line}");
    };
    let lease = Duration::from_secs(lease);
    wait_for_growth_on(vm, 0, k0, lease, "by itself after the lease");
    wait_for_growth_on(vm, 1, k1, lease, "by itself after the lease");

    // With no log running nothing is frozen.
    vm.command("log stop").ok();
    let (line, _) = a.freeze(600);
    assert_eq!(line, r#"{"ok":true,"frozen":[],"log_records":0,"logs":[]}"#);
    let (s0, s1) = (records_on(vm, 0), records_on(vm, 1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((records_on(vm, 0), records_on(vm, 1)), (s0, s1), "log stop");
}

/// What a host `CONNECT <port>` gets: `Ok(line)` for the device's answer line, `Err` when the
/// connection ends first.
fn handshake(uds: &Path, port: u32) -> Result<String, String> {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {line:?}")),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(format!("reset after {line:?}"))
            }
            Err(e) => panic!("CONNECT {port}: {e}"),
        }
    }
}

#[test]
fn with_strata_agent_off_nothing_listens_on_port_52() {
    let cmdline = "console=ttyS0 strata.agent=off";
    let mut g = boot(&["--cmdline", cmdline]);
    let shown = g.vm.line("cmdline");
    assert!(shown.contains(cmdline), "{shown:?}");

    // Port 52 is refused like an unbound port, and the host client says so.
    let agent = handshake(&g.uds, 52);
    let unbound = handshake(&g.uds, 53);
    assert!(agent.is_err(), "CONNECT 52 was accepted: {agent:?}");
    assert!(unbound.is_err(), "CONNECT 53 was accepted: {unbound:?}");
    match AgentClient::connect(&g.uds, Duration::from_secs(10)) {
        Err(vmm::agent::AgentError::HandshakeRefused { .. }) => {}
        Err(e) => panic!("expected a refused handshake, got {e}"),
        Ok(_) => panic!("the agent answered"),
    }

    // Everything else works: the echo service, the device, the console.
    let mut s = vsock_connect(&g.uds, 7);
    s.write_all(b"still here\n").unwrap();
    let mut back = [0u8; 11];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here\n");
    g.vm.command("vsock").ok();
    assert_eq!(g.vm.line("echo hi"), "hi");
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

#[test]
fn the_vsock_socket_is_owner_only_and_a_second_vm_cannot_take_a_live_one() {
    use std::os::unix::fs::PermissionsExt;
    let mut g = boot(&[]);
    let mode = std::fs::metadata(&g.uds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second VM given the same socket path is refused, naming it; the first keeps its agent.
    let vsock = format!("cid=4,socket={}", g.uds.display());
    let mut second = Vm::start(&["--memory", "64M", "--vsock", &vsock]);
    let status = second.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    let err = second.stderr();
    assert!(
        err.contains("another process is listening on socket") && err.contains("v.sock"),
        "{err}"
    );
    agent(&g.uds).ping().unwrap();
    assert_eq!(g.vm.line("echo still here"), "still here");
}
