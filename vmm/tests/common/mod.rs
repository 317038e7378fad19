//! What the library-API tests of a running test guest share: a [`Platform`] whose console goes
//! to a channel of lines, the console protocol, a VM configuration with two raw disks and a
//! vsock device in a temporary folder, host-side models of the guest's disk patterns, and
//! hashing guest memory.
//!
//! Needs /dev/kvm; fails loudly without it.

#![allow(dead_code)] // not every test uses every helper

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use devices::legacy::SerialInput;
use resources::pattern::{fnv1a64_update, log_record_parse, sector_fill, FNV_OFFSET, SECTOR_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{ConsoleConfig, DiskConfig, Kernel, VmConfig, VsockConfig, DEFAULT_CMDLINE};
use vmm::console::ConsoleOutput;
use vmm::memory::GuestMemory;
use vmm::vm::Platform;

/// Hang guard for one console command (guest code runs at ~1 M instructions/s here).
pub const COMMAND_GUARD: Duration = Duration::from_secs(120);

/// Size of each test disk.
pub const DISK_BYTES: u64 = 1 << 20;

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
pub struct Console {
    lines: Receiver<String>,
    input: SerialInput,
}

impl Console {
    pub fn next_line(&self) -> String {
        self.lines
            .recv_timeout(COMMAND_GUARD)
            .expect("the guest stopped talking")
    }

    pub fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.next_line();
            if pred(&line) {
                return line;
            }
        }
    }

    /// Runs a command; returns its output lines, or the `err` reason.
    pub fn command(&self, cmd: &str) -> Result<Vec<String>, String> {
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

    /// A command that must succeed with one line of output.
    pub fn line(&self, cmd: &str) -> String {
        let out = self
            .command(cmd)
            .unwrap_or_else(|e| panic!("`{cmd}` failed: {e}"));
        assert_eq!(out.len(), 1, "`{cmd}` printed {out:?}");
        out[0].clone()
    }

    pub fn count(&self) -> u64 {
        // The total, then a line per vCPU.
        let out = self.command("count get").unwrap();
        out[0].trim().parse().unwrap()
    }

    /// Polls `count get` until it exceeds `above` (a hang guard, not a timing assertion).
    pub fn wait_count_above(&self, above: u64) -> u64 {
        for _ in 0..1000 {
            let now = self.count();
            if now > above {
                return now;
            }
        }
        panic!("the counter stayed at or below {above}");
    }
}

/// A platform whose console is `Console`.
pub fn platform() -> (Platform, Console) {
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

/// A 2-vCPU, 64 MiB test guest without devices.
pub fn config() -> VmConfig {
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

/// The files of a VM with devices.
pub struct Files {
    pub dir: tempfile::TempDir,
    pub disks: Vec<PathBuf>,
    pub uds: PathBuf,
}

/// [`config`] with two empty raw disks of [`DISK_BYTES`] and vsock (CID 3) in a new folder.
pub fn config_with_devices() -> (VmConfig, Files) {
    let dir = tempfile::tempdir().unwrap();
    let disks: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("disk{i}.raw")))
        .collect();
    for d in &disks {
        std::fs::File::create(d)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
    }
    let uds = dir.path().join("vsock.sock");
    let mut c = config();
    c.disks = disks
        .iter()
        .map(|p| DiskConfig {
            path: p.clone(),
            read_only: false,
            l2_cache_size: None,
        })
        .collect();
    c.vsock = Some(VsockConfig {
        cid: 3,
        socket: uds.clone(),
    });
    (c, Files { dir, disks, uds })
}

/// What `blk N read SECTOR COUNT` prints after `blk N write SECTOR COUNT SEED`.
pub fn pattern_hash(sector: u64, count: u64, seed: u64) -> String {
    let mut hash = FNV_OFFSET;
    let mut buf = [0u8; SECTOR_SIZE];
    for s in sector..sector + count {
        sector_fill(seed, s, &mut buf);
        hash = fnv1a64_update(hash, &buf);
    }
    format!("{hash:016x}")
}

/// The hash `blk N read SECTOR COUNT` would print, of the disk file itself.
pub fn file_hash(path: &Path, sector: u64, count: u64) -> String {
    let bytes = std::fs::read(path).unwrap();
    let from = sector as usize * SECTOR_SIZE;
    let to = (sector + count) as usize * SECTOR_SIZE;
    format!("{:016x}", fnv1a64_update(FNV_OFFSET, &bytes[from..to]))
}

/// How many `log` records of one run the disk file holds from sector 0 on (an unbroken
/// prefix: record `i` at sector `i`, all with the first record's nonce).
pub fn log_records(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let mut nonce = None;
    let mut n = 0u64;
    for sector in bytes.chunks_exact(SECTOR_SIZE) {
        let sector: &[u8; SECTOR_SIZE] = sector.try_into().unwrap();
        match log_record_parse(sector) {
            Some((seq, run)) if seq == n && nonce.is_none_or(|r| r == run) => {
                nonce = Some(run);
                n += 1;
            }
            _ => break,
        }
    }
    n
}

/// A hash of all of guest RAM.
pub fn memory_hash(memory: &GuestMemory) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut buf = vec![0u8; 1 << 20];
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            memory
                .read_slice(&mut buf[..n], GuestAddress(start + at))
                .unwrap();
            hash = fnv1a64_update(hash, &buf[..n]);
            at += n as u64;
        }
    }
    hash
}
