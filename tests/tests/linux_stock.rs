//! Debian's stock cloud kernel gets through early boot on Strata (it cannot get further on
//! PVM, where it stops on an instruction the emulator refuses; on hardware KVM it boots).
//! Its serial log must show the banner, the exact command line Strata passed, an E820 map that
//! matches `--memory`, Strata's ACPI tables and the CPU count from the MADT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::linux::kit;
use strata_tests::{require_kvm, strata_bin};

struct Boot {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Boot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(kernel: &Path, memory: &str, vcpus: &str, cmdline: &str, extra: &[&str]) -> Boot {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let child = Command::new(strata_bin())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(extra)
        .args(["--memory", memory, "--vcpus", vcpus, "--cmdline", cmdline])
        .arg(format!("--console=file={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Boot {
        child,
        log,
        _dir: dir,
    }
}

/// Waits until every needle is in the log (or fails listing the missing ones).
fn wait_for_all(boot: &Boot, needles: &[String], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = std::fs::read_to_string(&boot.log)
            .unwrap_or_default()
            .replace("\r\n", "\n");
        let missing: Vec<&String> = needles
            .iter()
            .filter(|n| !log.contains(n.as_str()))
            .collect();
        if missing.is_empty() {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "after {limit:?} the serial log lacks {missing:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn stock_vmlinux_reports_our_cmdline_e820_acpi_and_cpus() {
    let kit = kit("stock");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 strata.test=early-boot-7731";
    // A 300000-byte initrd goes to the top of the 256 MiB, page-aligned: 0x0ffb6000.
    let initrd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(initrd.path(), vec![0u8; 300_000]).unwrap();
    let b = boot(
        &kit.join("vmlinux"),
        "256M",
        "2",
        cmdline,
        &["--initrd", initrd.path().to_str().unwrap()],
    );
    let needles = vec![
        "Linux version 6.1".to_string(),
        format!("Command line: {cmdline}\n"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved".to_string(),
        // 256 MiB: RAM from 1 MiB to 0x0fffffff.
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable".to_string(),
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 STRATA)".to_string(),
        "ACPI: XSDT".to_string(),
        "ACPI: FACP".to_string(),
        "ACPI: DSDT".to_string(),
        "ACPI: APIC".to_string(),
        "smpboot: Allowing 2 CPUs".to_string(),
        "RAMDISK: [mem 0x0ffb6000-0x0fffffff]".to_string(),
    ];
    let log = wait_for_all(&b, &needles, Duration::from_secs(150));
    // Nothing beyond our map: exactly three E820 lines.
    assert_eq!(log.matches("BIOS-e820:").count(), 3, "{log}");
}

#[test]
fn stock_bzimage_loads_and_starts() {
    let kit = kit("stock");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 strata.test=bzimage-4410";
    let b = boot(&kit.join("vmlinuz"), "256M", "1", cmdline, &[]);
    // The decompressor runs in the guest first: ~100 s on PVM, well under a second on hardware.
    let needles = vec![
        "Linux version 6.1".to_string(),
        format!("Command line: {cmdline}\n"),
        "ACPI: RSDP 0x00000000000E0000".to_string(),
    ];
    wait_for_all(&b, &needles, Duration::from_secs(400));
}
