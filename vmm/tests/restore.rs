#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure
//! A running test guest survives a pause, a save of all its vCPU and VM state, the teardown of
//! its KVM VM and vCPUs, and a restore into a fresh KVM VM on the same guest memory (issue 11,
//! "Must show"). Built through the library API only, as the runner does: a `Platform` whose
//! console goes to a channel, `Vm::boot`, `Vm::pause`, `Vm::save_state`,
//! `Vm::shutdown_keep_memory`, `Vm::restore_from`, `Vm::resume`.
//!
//! Needs /dev/kvm; fails loudly without it.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use devices::legacy::SerialInput;
use vmm::config::{ConsoleConfig, Kernel, VmConfig, DEFAULT_CMDLINE};
use vmm::console::ConsoleOutput;
use vmm::vm::{Platform, Vm, VmEvent, VmSnapshotState};

/// Hang guard for one console command (guest code runs at ~1 M instructions/s here).
const COMMAND_GUARD: Duration = Duration::from_secs(120);

/// Console output, split into lines and sent to the test.
struct Lines {
    tx: Sender<String>,
    partial: Vec<u8>,
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                let _ = self.tx.send(line);
            } else {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The test guest's console.
struct Console {
    lines: Receiver<String>,
    input: SerialInput,
}

impl Console {
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(COMMAND_GUARD)
            .expect("the guest stopped talking")
    }

    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.next_line();
            if pred(&line) {
                return line;
            }
        }
    }

    /// Runs a command; returns its output lines, or the `err` reason.
    fn command(&self, cmd: &str) -> Result<Vec<String>, String> {
        self.input.feed(format!("{cmd}\n").as_bytes());
        let echo = format!("> {cmd}");
        self.wait_for(|l| l.ends_with(&echo));
        let mut out = Vec::new();
        loop {
            let line = self.next_line();
            if line == "ok" {
                return Ok(out);
            }
            if let Some(reason) = line.strip_prefix("err") {
                return Err(reason.trim().to_string());
            }
            out.push(line);
        }
    }

    fn count(&self) -> u64 {
        let out = self.command("count get").unwrap();
        out[0].trim().parse().unwrap()
    }
}

fn config() -> VmConfig {
    VmConfig {
        kernel: Kernel::TestGuest,
        initrd: None,
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: 2,
        memory: 64 << 20,
        reboot: false,
        console: ConsoleConfig::None,
        disks: Vec::new(),
        vsock: None,
        api_socket: None,
        checkpoint: Default::default(),
    }
}

fn platform() -> (Platform, Console) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm"
    );
    vmm::vcpu::install_kick_handler().unwrap();
    let (tx, lines) = mpsc::channel();
    let output = ConsoleOutput::start(
        Box::new(Lines {
            tx,
            partial: Vec::new(),
        }),
        1 << 20,
    )
    .unwrap();
    let platform = Platform::new(output).unwrap();
    let input = SerialInput::new(platform.serial());
    (platform, Console { lines, input })
}

/// The counter keeps growing: polls until it exceeds `above` (hang guard only).
fn wait_count_above(console: &Console, above: u64) -> u64 {
    for _ in 0..1000 {
        let now = console.count();
        if now > above {
            return now;
        }
    }
    panic!("the counter stayed at or below {above}");
}

#[test]
fn running_guest_is_restored_into_a_fresh_vm_and_counts_on_from_where_it_was() {
    let (platform, console) = platform();
    let config = config();
    let (events, event_rx) = mpsc::channel::<VmEvent>();
    let vm = Vm::boot(&platform, &config, &events).unwrap();
    console.wait_for(|l| l.contains("strata test guest ready"));
    console.command("count start").unwrap();
    console.command("fill 4 7").unwrap();
    let before = wait_count_above(&console, 0);

    vm.pause().unwrap();
    let state = vm.save_state(&platform).unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let memory = vm.shutdown_keep_memory();
    let parsed: VmSnapshotState = serde_json::from_str(&json).unwrap();
    let restored = Vm::restore_from(&platform, &config, memory, &parsed, &events).unwrap();
    let again = restored.save_state(&platform).unwrap();
    restored.resume().unwrap();
    let after = console.count();
    let later = wait_count_above(&console, after);
    let check = console.command("check 4 7");
    let cpus = console.command("cpus").unwrap();
    restored.shutdown();

    assert_eq!(parsed, state);
    assert_eq!(again.vcpus.len(), 2);
    for (a, b) in again.vcpus.iter().zip(&state.vcpus) {
        assert_eq!((&a.regs, &a.sregs, &a.cpuid), (&b.regs, &b.sregs, &b.cpuid));
    }
    // `before` was read just before the pause: the restored guest counts on from there.
    assert!(after >= before, "count went back: {after} < {before}");
    assert!(later > after);
    assert_eq!(check, Ok(vec![]));
    assert_eq!(cpus, vec!["2".to_string()]);
    assert!(
        event_rx.try_recv().is_err(),
        "no vCPU or device stopped the VM"
    );
}
