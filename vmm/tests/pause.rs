#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure
//! Pausing a VM whose guest is busy on a disk and on vsock stops everything that touches guest
//! memory, and resuming it lets the work go on (issue 11, "Must show").
//!
//! The test guest (two vCPUs, two disks, vsock) runs `count start` (every vCPU keeps writing a
//! counter) and `log start 0` (records appended and flushed to disk 0), while two host threads
//! keep the vsock device busy: one sends data to the guest's echo service (port 7) and reads it
//! back, the other opens agent connections and pings. While the VM is paused the host keeps
//! knocking — it sends data on an open echo connection and opens a new one, which a device that
//! kept running would put on the guest's rx ring — and all of guest RAM is hashed twice, some
//! seconds apart: it must not change, and as the rings are in guest RAM no used ring moves
//! either; the used index of every queue is also read from the ring itself and must equal what
//! the device saved and stay put; the log on the disk file does not grow. After resume the log
//! grows, the counter grows, what the host sent while paused is served (echoed, connected), and
//! both kinds of vsock traffic go on. All waits are hang guards; nothing is timed.
//!
//! Built through the library API (`Vm::boot`, `Vm::pause`, `Vm::save_state`, `Vm::resume`),
//! which gives the test guest memory. Needs /dev/kvm; fails loudly without it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{config_with_devices, log_records, memory_hash, platform};
use vm_memory::{Bytes, GuestAddress};
use vmm::agent::AgentClient;
use vmm::vm::{EventTx, Platform, Vm, VmEvent};

/// Hang guard for anything the guest must get done.
const GUARD: Duration = Duration::from_secs(180);

/// The guest's echo service.
const ECHO_PORT: u32 = 7;

/// Connects to guest port `port` through the vsock socket.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.set_write_timeout(Some(GUARD)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "handshake cut short");
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "handshake refused: {line:?}");
    s
}

/// A host thread counting round trips until told to stop.
struct Traffic {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Traffic {
    fn start(name: &str, uds: PathBuf, work: fn(&Path, &AtomicU64, &AtomicBool)) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (done.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || work(&uds, &d, &s))
            .unwrap();
        Self { done, stop, thread }
    }

    fn count(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits (hang guard only) until more than `above` round trips were done.
    fn wait_above(&self, above: u64, what: &str) {
        let deadline = Instant::now() + GUARD;
        while self.count() <= above {
            assert!(!self.thread.is_finished(), "the {what} thread ended");
            assert!(Instant::now() < deadline, "no {what} traffic after {above}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("a traffic thread failed");
    }
}

/// Sends 1 KiB at a time to the echo service and checks what comes back.
fn echo(uds: &Path, done: &AtomicU64, stop: &AtomicBool) {
    let mut s = vsock_connect(uds, ECHO_PORT);
    let mut round = 0u8;
    while !stop.load(Ordering::SeqCst) {
        let out: Vec<u8> = (0..1024u32).map(|i| (i as u8) ^ round).collect();
        s.write_all(&out).unwrap();
        let mut back = vec![0u8; out.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, out, "the echo differs");
        round = round.wrapping_add(1);
        done.fetch_add(1, Ordering::SeqCst);
    }
}

/// Pings the agent, on a new connection every 10 pings.
fn ping(uds: &Path, done: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let mut agent = AgentClient::connect(uds, GUARD).unwrap();
        for _ in 0..10 {
            agent.ping().unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Every ready queue's (device, queue, used index in the ring, the device's next used index),
/// from a saved state of the paused VM.
fn used_indices(vm: &Vm, platform: &Platform) -> Vec<(usize, usize, u16, u16)> {
    let state = vm.save_state(platform).unwrap();
    let mut out = Vec::new();
    for (d, dev) in state.devices.iter().enumerate() {
        assert!(dev.transport.active, "device {d} is not running");
        for (q, queue) in dev.transport.queues.iter().enumerate() {
            if queue.ready {
                let idx: u16 = vm
                    .memory()
                    .read_obj(GuestAddress(queue.used_ring + 2))
                    .unwrap();
                out.push((d, q, idx, queue.next_used));
            }
        }
    }
    out
}

#[test]
fn a_paused_busy_vm_leaves_guest_memory_and_rings_alone_and_resume_goes_on() {
    let (platform, console) = platform();
    let (config, files) = config_with_devices();
    let (events, event_rx) = mpsc::channel::<VmEvent>();
    let vm = Vm::boot(&platform, &config, &EventTx::new(&events, 0)).unwrap();
    console.wait_for(|l| l.contains("strata test guest ready"));
    console.command("count start").unwrap();
    console.command("log start 0").unwrap();
    let echo = Traffic::start("echo", files.uds.clone(), echo);
    let pings = Traffic::start("ping", files.uds.clone(), ping);
    echo.wait_above(0, "echo");
    pings.wait_above(0, "ping");
    let deadline = Instant::now() + GUARD;
    while log_records(&files.disks[0]) == 0 {
        assert!(Instant::now() < deadline, "the log workload wrote nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The test can see a change: a running guest's memory changes.
    let running = [memory_hash(vm.memory()), memory_hash(vm.memory())];
    let mut knock = vsock_connect(&files.uds, ECHO_PORT);

    vm.pause().unwrap();
    let first = memory_hash(vm.memory());
    let used_first = used_indices(&vm, &platform);
    let records_first = log_records(&files.disks[0]);
    // Host traffic while paused: waits for the resume.
    knock.write_all(b"sent while paused").unwrap();
    let mut late = UnixStream::connect(&files.uds).unwrap();
    late.set_read_timeout(Some(GUARD)).unwrap();
    late.write_all(format!("CONNECT {ECHO_PORT}\n").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let used_second = used_indices(&vm, &platform);
    let records_second = log_records(&files.disks[0]);
    let second = memory_hash(vm.memory());
    let (echo_paused, pings_paused) = (echo.count(), pings.count());

    vm.resume().unwrap();
    let deadline = Instant::now() + GUARD;
    let mut records_after = log_records(&files.disks[0]);
    while records_after <= records_second {
        assert!(
            Instant::now() < deadline,
            "the log stopped at {records_after}"
        );
        std::thread::sleep(Duration::from_millis(20));
        records_after = log_records(&files.disks[0]);
    }
    echo.wait_above(echo_paused, "echo");
    pings.wait_above(pings_paused, "ping");
    let mut knocked = [0u8; 17];
    knock.read_exact(&mut knocked).unwrap();
    let mut answer = [0u8; 3];
    late.read_exact(&mut answer).unwrap();
    let count = console.count();
    let count_later = console.wait_count_above(count);
    echo.finish();
    pings.finish();
    console.command("log stop").unwrap();
    let verified: u64 = console.line("log verify 0").trim().parse().unwrap();
    vm.shutdown();

    assert_ne!(
        running[0], running[1],
        "the hash does not see a running guest"
    );
    assert_eq!(&knocked, b"sent while paused");
    assert_eq!(&answer, b"OK ");
    assert_eq!(
        first, second,
        "guest memory changed while the VM was paused"
    );
    assert_eq!(used_first, used_second, "a used ring moved while paused");
    // Two disks (one queue each) and vsock (rx, tx, event).
    assert_eq!(used_first.len(), 5, "{used_first:?}");
    for (d, q, in_ring, device) in &used_first {
        assert_eq!(
            in_ring, device,
            "device {d} queue {q}: ring and device disagree"
        );
    }
    assert_eq!(records_first, records_second, "the log grew while paused");
    assert!(records_after > records_second);
    assert!(count_later > count);
    assert!(verified >= records_after, "{verified} < {records_after}");
    assert!(
        event_rx.try_recv().is_err(),
        "no vCPU or device stopped the VM"
    );
}
