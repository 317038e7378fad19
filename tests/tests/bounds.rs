//! Resource bounds end to end (issue #16): the API serves a bounded number of connections, the
//! vsock device a bounded number of connections (below the open-file limit), and agent calls
//! run a bounded number at a time; beyond each bound the extra is refused cleanly and the VMM,
//! the guest and the connections within the bound go on working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use api::types::ExecRequest;
use strata_tests::{api_client, require_kvm, strata_bin, vsock_connect, Vm, BOOT_TIMEOUT};

/// The API's default bound (`api::server::DEFAULT_MAX_CONNECTIONS`).
const API_MAX_CONNECTIONS: usize = api::server::DEFAULT_MAX_CONNECTIONS;

/// Sends a `GET /v1/vm` on `s` and returns the answer, or the error that ended the exchange in
/// brackets (a refused connection may be closed before the request goes out).
fn get_vm(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let done = s
        .write_all(b"GET /v1/vm HTTP/1.1\r\nHost: strata\r\nConnection: close\r\n\r\n")
        .and_then(|()| s.read_to_string(&mut answer));
    match done {
        Ok(_) => answer,
        Err(e) => format!("{answer}[{e}]"),
    }
}

#[test]
fn api_connections_beyond_the_bound_are_refused_and_the_vmm_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vm = Vm::start(&["--memory", "64M", "--api-socket", sock.to_str().unwrap()]);
    vm.wait_ready();
    let client = api_client(&sock);

    // Idle clients take every slot (a client that connects and says nothing holds one until
    // the read timeout).
    let idle: Vec<UnixStream> = (0..API_MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // Connections beyond the bound: answered 503 too_many_connections (or closed), never
    // served, never crashing the VMM.
    let mut refused_with_503 = 0;
    for _ in 0..8 {
        let mut extra = UnixStream::connect(&sock).unwrap();
        let answer = get_vm(&mut extra);
        assert!(
            !answer.starts_with("HTTP/1.1 200"),
            "a connection beyond {API_MAX_CONNECTIONS} was served: {answer}"
        );
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("too_many_connections"), "{answer}");
            refused_with_503 += 1;
        } else {
            assert!(answer.starts_with('['), "{answer}");
        }
    }
    assert!(refused_with_503 > 0, "no refusal carried the 503 answer");
    // The clients within the bound are still served.
    let mut first = idle.into_iter().next().unwrap();
    let answer = get_vm(&mut first);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(first);

    // Once the idle ones go, the API serves again, and the guest never noticed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.vm().is_err() {
        assert!(Instant::now() < deadline, "the API never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vm.line("echo still here"), "still here");
}

/// A `strata` process, killed and reaped when dropped (also when the test fails).
struct Strata(Child);

impl Drop for Strata {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `strata run` whose open-file limit (soft and hard: strata raises the soft one to the
/// hard one) is `nofile`, with a vsock device on `uds`; returns once the guest is ready.
fn start_with_nofile(nofile: u64, uds: &Path) -> (Strata, BufReader<std::process::ChildStdout>) {
    require_kvm();
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut cmd = Command::new(strata_bin());
    cmd.args(["run", "--memory", "64M", "--vsock", &vsock])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
    // which is async-signal-safe, on a local value.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Strata(cmd.spawn().expect("start strata"));
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "strata ended before the guest was ready"
        );
        if line.contains("strata test guest ready") {
            return (child, out);
        }
        assert!(Instant::now() < deadline, "the guest never got ready");
    }
}

/// Sends `CONNECT port` on a new client of `uds`; returns the client if the device answered
/// `OK`, `None` if it closed the client instead.
fn try_vsock_connect(uds: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            Ok(_) => return None,
            Err(e) => panic!("the device neither answered nor closed the client: {e}"),
        }
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "{line:?}");
    Some(s)
}

fn echo(s: &mut UnixStream, text: &[u8]) {
    s.write_all(text).unwrap();
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, text);
}

#[test]
fn vsock_connections_beyond_the_bound_are_refused_below_the_open_file_limit() {
    // The bound is what the limit leaves after 256 descriptors for the VMM and 64 for pending
    // clients (`devices::virtio::vsock::connection_bound`): 336 leaves 16 connections (the
    // test guest's echo service takes 32).
    let bound = 16;
    let nofile = 256 + 64 + bound as u64;
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let (mut child, _out) = start_with_nofile(nofile, &uds);

    let mut conns: Vec<UnixStream> = (0..bound)
        .map(|i| {
            try_vsock_connect(&uds, 7)
                .unwrap_or_else(|| panic!("connection {i} of {bound} was refused"))
        })
        .collect();
    // Beyond the bound: closed without OK, again and again, and nothing breaks.
    for _ in 0..4 {
        assert!(
            try_vsock_connect(&uds, 7).is_none(),
            "a connection beyond the bound of {bound} got in"
        );
    }
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, format!("connection {i}\n").as_bytes());
    }
    // One goes: a new one gets in (once the guest's side of the old one is gone).
    drop(conns.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut again = loop {
        if let Some(c) = try_vsock_connect(&uds, 7) {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "a freed connection slot never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    echo(&mut again, b"a new one\n");
    assert!(child.0.try_wait().unwrap().is_none(), "strata exited");
}

#[test]
fn agent_calls_beyond_the_bound_are_refused_as_busy_and_the_rest_complete() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let uds = dir.path().join("v.sock");
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut vm = Vm::start(&[
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--vsock",
        &vsock,
    ]);
    vm.wait_ready();
    let _ = api_client(&sock);
    drop(vsock_connect(&uds, 52)); // the agent listens

    // Many more calls than the bound at once: the control loop hands out slots in
    // microseconds, an agent call takes a vsock round trip through the guest.
    let calls = 4 * vmm::api_handler::MAX_AGENT_CALLS;
    let barrier = Arc::new(Barrier::new(calls));
    let threads: Vec<_> = (0..calls)
        .map(|i| {
            let (sock, barrier) = (sock.clone(), barrier.clone());
            std::thread::spawn(move || {
                let c = api::Client::new(&sock)
                    .unwrap()
                    .with_timeout(Duration::from_secs(60));
                barrier.wait();
                c.exec(&ExecRequest {
                    argv: vec!["echo".into(), format!("call-{i}")],
                    timeout_s: Some(30),
                })
                .map(|r| (i, r.stdout))
            })
        })
        .collect();
    let (mut done, mut busy) = (0, 0);
    for t in threads {
        match t.join().unwrap() {
            Ok((i, stdout)) => {
                assert_eq!(stdout.trim_end(), format!("call-{i}"));
                done += 1;
            }
            Err(e) => {
                assert_eq!(e.api_code(), Some("agent_unreachable"), "{e}");
                assert!(e.to_string().contains("busy"), "{e}");
                busy += 1;
            }
        }
    }
    assert!(
        busy > 0,
        "{calls} calls at once and none was refused as busy"
    );
    assert!(
        done >= vmm::api_handler::MAX_AGENT_CALLS,
        "only {done} of {calls} calls completed"
    );
    // The slots come back: the next call is served.
    let c = api_client(&sock);
    let r = c
        .exec(&ExecRequest {
            argv: vec!["echo".into(), "after".into()],
            timeout_s: Some(30),
        })
        .unwrap();
    assert_eq!(r.stdout.trim_end(), "after");
}

/// Log lines a call site writes per window (`devices::ratelimit`).
const LOG_LINES_PER_WINDOW: usize = 10;
/// The window.
const LOG_WINDOW: Duration = Duration::from_secs(5);

#[test]
fn a_guest_breaking_a_queue_over_and_over_does_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let mut vm = Vm::start(&["--memory", "64M", "--disk", &disk_arg]);
    vm.wait_ready();
    // Each round breaks the queue (a warning from the device) and resets the device.
    let rounds = 40;
    let started = Instant::now();
    for _ in 0..rounds {
        vm.command("hostile blk 0 avail-idx").ok();
        vm.command("blk 0 reset").ok();
    }
    let took = started.elapsed();
    assert_eq!(vm.line("echo still here"), "still here");
    // strata's stderr is complete once it exited.
    vm.send("poweroff\n");
    assert!(vm.wait_exit(Duration::from_secs(60)).success());
    let stderr = vm.stderr();
    let warnings = stderr.matches("queue broken").count();
    println!("{warnings} warnings for {rounds} broken queues in {took:?}");
    let windows = (took.as_secs_f64() / LOG_WINDOW.as_secs_f64()).ceil() as usize + 1;
    assert!(warnings > 0, "no warning at all:\n{stderr}");
    assert!(
        warnings <= LOG_LINES_PER_WINDOW * windows,
        "{warnings} warnings for {rounds} broken queues in {took:?}:\n{stderr}"
    );
    if took < LOG_WINDOW {
        assert!(
            warnings < rounds,
            "{warnings} warnings for {rounds} broken queues"
        );
    }
    // What was held back is counted the next time the site writes.
    if warnings < rounds && took >= LOG_WINDOW {
        assert!(stderr.contains("similar messages suppressed"), "{stderr}");
    }
}
