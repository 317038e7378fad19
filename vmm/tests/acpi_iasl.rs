//! The ACPI tables Strata gives a guest, read back by a real ACPI parser: ACPICA's `iasl`
//! (Debian package `acpica-tools`), the same code base as Linux's ACPI interpreter.
//!
//! The VM is realistic and built the way `Vm::boot` builds it: 4 vCPUs, three virtio-blk disks
//! (one read-only) and a vsock device placed by the device manager, whose AML goes to
//! `acpi::write_tables`. The tables are found in guest memory the way a guest finds them (RSDP →
//! XSDT → FADT → DSDT, XSDT → MADT), each is written to a file, disassembled with `iasl -d`,
//! and the disassembly is compiled again with `iasl`: both must report no errors and no
//! warnings (checksums, table lengths, AML), and the recompiled tables must be byte for byte
//! Strata's. The checks then read the disassembled source, not bytes. `acpiexec` (same package)
//! then loads the FADT, DSDT and MADT into ACPICA's namespace, as Linux does, and evaluates
//! `\_S5`.
//!
//! This iasl (20200925) refuses a raw RSDP file ("does not contain a valid ACPI table"), so
//! the RSDP's fields and both its checksums are checked here by hand.
//!
//! Without `iasl` the test fails (it never skips) and says which package to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::{Bytes, GuestAddress};
use vmm::arch::acpi;
use vmm::config::{DiskConfig, VsockConfig};
use vmm::memory::GuestMemory;

const VCPUS: u8 = 4;
/// The documented layout (device_manager): transport i at 0xd000_0000 + i * 4 KiB, IRQ 5 + i.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_LEN: u64 = 0x1000;
const FIRST_IRQ: u32 = 5;
/// virtio device ids: block and vsock.
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_VSOCK: u32 = 19;

/// An ACPICA tool (`iasl`, `acpiexec`) on PATH, or a failure that names the package.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} (ACPICA) is not installed: install the Debian package acpica-tools \
             (apt-get install acpica-tools); this test needs it and does not skip"
        )
    })
}

/// Runs `name` with `args` in `dir`; returns its stdout and stderr together.
fn run_tool(name: &str, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .current_dir(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

/// Fails if a line of an ACPICA tool's output reports a problem.
fn assert_no_complaints(what: &str, log: &str) {
    for line in log.lines() {
        let l = line.to_lowercase();
        for bad in [
            "error",
            "warning",
            "incorrect",
            "invalid",
            "ae_",
            "could not",
        ] {
            assert!(!l.contains(bad), "{what}: {line}\n{log}");
        }
    }
}

/// A table as a guest reads it, with where it was found.
struct Table {
    signature: String,
    bytes: Vec<u8>,
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The table at `addr`, as long as its header says.
fn sdt(mem: &GuestMemory, addr: u64) -> Table {
    let header = read(mem, addr, 36);
    let len = u32_at(&header, 4) as usize;
    assert!(
        (36..=64 << 10).contains(&len),
        "table at {addr:#x}: length {len}"
    );
    Table {
        signature: String::from_utf8_lossy(&header[..4]).into_owned(),
        bytes: read(mem, addr, len),
    }
}

/// Checks the RSDP as a guest's ACPICA does (signature, revision, length, the ACPI 1.0
/// checksum over 20 bytes and the extended one over all 36) and returns the XSDT's address.
fn check_rsdp(mem: &GuestMemory, rsdp_addr: GuestAddress) -> u64 {
    let rsdp = read(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ", "no RSDP at {rsdp_addr:?}");
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(&rsdp[9..15], b"STRATA", "RSDP OEM id");
    assert_eq!(rsdp[15], 2, "RSDP revision (2: ACPI 2.0+, with an XSDT)");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    let xsdt = u64_at(&rsdp, 24);
    assert_ne!(xsdt, 0, "RSDP has no XSDT address");
    xsdt
}

/// Every table reachable from the RSDP, as a guest walks them.
fn walk(mem: &GuestMemory, rsdp_addr: GuestAddress) -> Vec<Table> {
    let xsdt = sdt(mem, check_rsdp(mem, rsdp_addr));
    let mut tables = Vec::new();
    // A guest finds every other table through the XSDT's entries.
    let entries: Vec<u64> = (36..xsdt.bytes.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt.bytes, o))
        .collect();
    tables.push(xsdt);
    for addr in entries {
        let t = sdt(mem, addr);
        if t.signature == "FACP" {
            // X_DSDT (offset 140) wins over the 32-bit DSDT field when it is set.
            let x_dsdt = u64_at(&t.bytes, 140);
            let dsdt = if x_dsdt != 0 {
                x_dsdt
            } else {
                u64::from(u32_at(&t.bytes, 40))
            };
            let d = sdt(mem, dsdt);
            tables.push(t);
            tables.push(d);
        } else {
            tables.push(t);
        }
    }
    tables
}

/// iasl's compiler summary must say 0 errors, 0 warnings and 0 remarks.
fn assert_compiled_clean(what: &str, log: &str) {
    let summary = log
        .lines()
        .find(|l| l.contains("Errors,") && l.contains("Warnings"))
        .unwrap_or_else(|| panic!("{what}: no iasl summary line:\n{log}"));
    assert!(
        summary.contains("Compilation successful. 0 Errors, 0 Warnings, 0 Remarks"),
        "{what}: {summary}\n{log}"
    );
}

/// Writes `t` to DIR/NAME.dat, disassembles it, compiles the disassembly again and returns the
/// disassembled source.
fn disassemble(dir: &Path, t: &Table) -> String {
    let name = t.signature.to_lowercase();
    let dat = format!("{name}.dat");
    std::fs::write(dir.join(&dat), &t.bytes).unwrap();
    let log = run_tool("iasl", dir, &["-d", &dat]);
    // A bad checksum or length, or AML that does not parse, is a "Firmware Warning" or an
    // "ACPI Warning/Error" here.
    assert_no_complaints(&format!("iasl -d {dat}"), &log);
    let dsl_path = dir.join(format!("{name}.dsl"));
    let dsl = std::fs::read_to_string(&dsl_path)
        .unwrap_or_else(|e| panic!("iasl -d {dat} wrote no {}: {e}\n{log}", dsl_path.display()));
    // iasl -d annotates what it finds wrong in the source (e.g. a bad checksum).
    for line in dsl.lines() {
        let l = line.to_lowercase();
        assert!(
            !l.contains("incorrect") && !l.contains("error") && !l.contains("invalid"),
            "{}: iasl -d complains: {line}\n{dsl}",
            t.signature
        );
    }
    // Compile it again: the compiler checks the AML's namespace and resource descriptors and
    // the data tables' fields.
    let out = format!("{name}-again");
    let log = run_tool("iasl", dir, &["-p", &out, &format!("{name}.dsl")]);
    assert_compiled_clean(&format!("{} recompiled", t.signature), &log);
    // What iasl understood is all there is: the same bytes come back (the header aside, where
    // the compiler puts its own id and checksum).
    let again = std::fs::read(dir.join(format!("{out}.aml"))).unwrap();
    assert!(
        again[36..] == t.bytes[36..],
        "{}: the recompiled table differs from Strata's",
        t.signature
    );
    dsl
}

/// The body of the `Device (NAME)` block in the DSDT's source, braces balanced.
fn device_block<'a>(dsl: &'a str, name: &str) -> &'a str {
    let start = dsl
        .find(&format!("Device ({name})"))
        .unwrap_or_else(|| panic!("no Device ({name}) in the DSDT:\n{dsl}"));
    let open = start + dsl[start..].find('{').unwrap();
    let mut depth = 0;
    for (i, c) in dsl[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &dsl[start..open + i + 1];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced Device ({name})")
}

/// Every `Device (NAME)` in the DSDT's source, in order.
fn device_names(dsl: &str) -> Vec<String> {
    dsl.match_indices("Device (")
        .map(|(i, m)| {
            let rest = &dsl[i + m.len()..];
            rest[..rest.find(')').unwrap()].to_string()
        })
        .collect()
}

/// The `Name (_HID, ...)` value: a string or an EISAID.
fn hid(block: &str) -> String {
    let line = block
        .lines()
        .find(|l| l.contains("Name (_HID,"))
        .unwrap_or_else(|| panic!("no _HID in {block}"));
    let v = line.split("Name (_HID,").nth(1).unwrap();
    let v = v.split(')').next().unwrap().trim();
    let v = v.trim_start_matches("EisaId (").trim_matches('"');
    v.to_string()
}

/// A resource descriptor's arguments inside `_CRS`: the text between `KIND (` and the matching
/// `)`, with comments dropped; `None` when there is none.
fn descriptor(block: &str, kind: &str) -> Option<Vec<String>> {
    let start = block.find(&format!("{kind} ("))? + kind.len() + 2;
    let mut depth = 1;
    let mut end = start;
    for (i, c) in block[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    end = start + i;
                    break;
                }
            }
            _ => {}
        }
    }
    let args = block[start..end]
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<String>();
    Some(
        args.split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
    )
}

/// The numbers in the `{ ... }` list that follows a descriptor, e.g. an interrupt list.
fn following_list(block: &str, kind: &str) -> Vec<u64> {
    let start = block.find(&format!("{kind} (")).unwrap();
    let open = start + block[start..].find('{').unwrap();
    let close = open + block[open..].find('}').unwrap();
    block[open + 1..close]
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(parse_num)
        .collect()
}

/// An ASL integer: `Zero`, `One`, hex or decimal.
fn parse_num(v: &str) -> u64 {
    let v = v.trim();
    match v {
        "Zero" => return 0,
        "One" => return 1,
        _ => {}
    }
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|e| panic!("{v}: {e}")),
        None => v.parse().unwrap_or_else(|e| panic!("{v}: {e}")),
    }
}

/// The value of `Label : value` lines of a data table's disassembly, in order.
fn fields<'a>(dsl: &'a str, label: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            // "[024h 0036   4]   Label" → the label after the offset column.
            let k = k.rsplit(']').next()?.trim();
            (k == label).then(|| v.trim())
        })
        .collect()
}

fn field<'a>(dsl: &'a str, label: &str) -> &'a str {
    let all = fields(dsl, label);
    assert_eq!(all.len(), 1, "{label}: {all:?}\n{dsl}");
    all[0]
}

fn hex_field(dsl: &str, label: &str) -> u64 {
    let v = field(dsl, label);
    let v = v.split_whitespace().next().unwrap();
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{label}: {v}: {e}"))
}

/// The MADT's disassembly lists one enabled local APIC per vCPU (processor id = APIC id =
/// index), then one IOAPIC at 0xfec00000 with GSI base 0, and nothing else.
fn check_madt(madt: &str, vcpus: u8) {
    let n = usize::from(vcpus);
    assert_eq!(hex_field(madt, "Local Apic Address"), 0xfee0_0000, "{madt}");
    let types = fields(madt, "Subtable Type");
    let mut want = vec!["00 [Processor Local APIC]"; n];
    want.push("01 [I/O APIC]");
    assert_eq!(types, want, "{madt}");
    let proc_ids = fields(madt, "Processor ID");
    let apic_ids = fields(madt, "Local Apic ID");
    let enabled = fields(madt, "Processor Enabled");
    assert_eq!(
        (proc_ids.len(), apic_ids.len(), enabled.len()),
        (n, n, n),
        "{madt}"
    );
    for i in 0..n {
        let hex = |v: &str| u64::from_str_radix(v, 16).unwrap();
        assert_eq!(hex(proc_ids[i]), i as u64, "processor id {i}:\n{madt}");
        assert_eq!(hex(apic_ids[i]), i as u64, "APIC id {i}:\n{madt}");
        assert_eq!(enabled[i], "1", "vCPU {i} not enabled:\n{madt}");
    }
    assert_eq!(hex_field(madt, "Address"), 0xfec0_0000, "{madt}");
    assert_eq!(hex_field(madt, "Interrupt"), 0, "IOAPIC GSI base:\n{madt}");
}

/// Builds the VM's devices and tables exactly as `Vm::boot` does; returns the tables and the
/// device manager's output for cross-checks.
fn realistic_vm(dir: &Path) -> (Vec<Table>, vmm::device_manager::VirtioDevices) {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm: this test needs KVM");
    let vm = kvm.create_vm().unwrap();
    // Interrupt lines (irqfds) need the in-kernel irqchip, as in Vm::boot.
    vm.create_irq_chip().unwrap();
    let mem = vmm::memory::create(256 << 20).unwrap();

    let mut disks = Vec::new();
    for (i, readonly) in [(0, false), (1, true), (2, false)] {
        let path = dir.join(format!("disk{i}.raw"));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let mut spec = format!("path={}", path.display());
        if readonly {
            spec.push_str(",readonly=on");
        }
        disks.push(spec.parse::<DiskConfig>().unwrap());
    }
    let vsock: VsockConfig = format!("cid=3,socket={}", dir.join("v.sock").display())
        .parse()
        .unwrap();
    let virtio = vmm::device_manager::create(
        &vm,
        &mem,
        &disks,
        Some(&vsock),
        std::sync::Arc::new(|f| panic!("{f}")),
    )
    .unwrap();
    let rsdp = acpi::write_tables(
        &mem,
        &acpi::AcpiConfig {
            vcpus: VCPUS,
            devices: &virtio.acpi,
        },
    )
    .unwrap();
    (walk(&mem, rsdp), virtio)
}

#[test]
fn iasl_reads_every_table_of_a_realistic_vm_without_errors_and_finds_its_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let (tables, virtio) = realistic_vm(tmp.path());
    let sigs: Vec<&str> = tables.iter().map(|t| t.signature.as_str()).collect();
    assert_eq!(sigs, ["XSDT", "FACP", "DSDT", "APIC"]);

    let asl = tmp.path().join("asl");
    std::fs::create_dir(&asl).unwrap();
    let dsl: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.signature.clone(), disassemble(&asl, t)))
        .collect();
    let source = |sig: &str| {
        dsl.iter()
            .find(|(s, _)| s == sig)
            .map(|(_, d)| d.as_str())
            .unwrap()
    };

    // XSDT: two entries (the walk found the FADT and the MADT there).
    let xsdt = source("XSDT");
    let entries = xsdt
        .lines()
        .filter(|l| l.contains("ACPI Table Address"))
        .count();
    assert_eq!(entries, 2, "{xsdt}");

    // FADT: hardware-reduced, with the reset and sleep registers in I/O space.
    let fadt = source("FACP");
    // No fixed-feature buttons: in hardware-reduced ACPI the buttons, if any, are devices.
    for flag in [
        "Hardware Reduced (V5)",
        "Reset Register Supported (V2)",
        "Control Method Power Button (V1)",
        "Control Method Sleep Button (V1)",
    ] {
        // iasl prints each flag's bit after its name, e.g. "Hardware Reduced (V5) : 1".
        assert!(
            fadt.lines()
                .any(|l| l.contains(flag) && l.trim_end().ends_with(": 1")),
            "FADT flag {flag} not set:\n{fadt}"
        );
    }
    assert_eq!(hex_field(fadt, "Value to cause reset"), 0x06, "{fadt}");
    // A Generic Address Structure's field: the first one after the register's heading.
    let gas = |register: &str, field: &str| -> u64 {
        let heading = format!(" {register} : [Generic Address Structure]");
        let at = fadt
            .find(&heading)
            .unwrap_or_else(|| panic!("no {register}:\n{fadt}"));
        let v = fields(&fadt[at..], field)[0];
        u64::from_str_radix(v.split_whitespace().next().unwrap(), 16).unwrap()
    };
    let gas_address = |register: &str| gas(register, "Address");
    let space_id = |register: &str| gas(register, "Space ID");
    assert_eq!(gas_address("Reset Register"), 0xcf9, "{fadt}");
    assert_eq!(gas_address("Sleep Control Register"), 0x600, "{fadt}");
    assert_eq!(gas_address("Sleep Status Register"), 0x601, "{fadt}");
    for reg in [
        "Reset Register",
        "Sleep Control Register",
        "Sleep Status Register",
    ] {
        assert_eq!(space_id(reg), 1, "{reg} is not in I/O space:\n{fadt}");
    }

    // MADT: one enabled local APIC per vCPU (processor id = APIC id = index), then the IOAPIC.
    check_madt(source("APIC"), VCPUS);

    // DSDT: \_S5, COM1, pvpanic and the four virtio-mmio transports, nothing else.
    let dsdt = source("DSDT");
    assert!(dsdt.contains("Name (_S5, Package"), "no \\_S5:\n{dsdt}");
    assert!(dsdt.contains("Scope (_SB)"), "no \\_SB:\n{dsdt}");
    let names = device_names(dsdt);
    assert_eq!(
        names,
        ["COM1", "PEVT", "VR00", "VR01", "VR02", "VR03"],
        "{dsdt}"
    );

    let com1 = device_block(dsdt, "COM1");
    assert_eq!(hid(com1), "PNP0501", "{com1}");
    let io = descriptor(com1, "IO").unwrap_or_else(|| panic!("COM1 has no IO:\n{com1}"));
    // IO (Decode16, min, max, alignment, length)
    assert_eq!(io[0], "Decode16", "{com1}");
    assert_eq!(
        (parse_num(&io[1]), parse_num(&io[2]), parse_num(&io[4])),
        (0x3f8, 0x3f8, 8),
        "{com1}"
    );
    assert_eq!(following_list(com1, "Interrupt"), [4], "COM1 IRQ:\n{com1}");

    let pevt = device_block(dsdt, "PEVT");
    assert_eq!(hid(pevt), "QEMU0001", "{pevt}");
    let io = descriptor(pevt, "IO").unwrap_or_else(|| panic!("pvpanic has no IO:\n{pevt}"));
    assert_eq!(
        (parse_num(&io[1]), parse_num(&io[2]), parse_num(&io[4])),
        (0x505, 0x505, 1),
        "{pevt}"
    );

    // ACPICA's interpreter, which Linux runs, loads the namespace from the FADT's DSDT and
    // evaluates \_S5 (the sleep type Linux writes to power off).
    let log = run_tool(
        "acpiexec",
        &asl,
        &["-b", "Evaluate \\_S5", "facp.dat", "dsdt.dat", "apic.dat"],
    );
    assert_no_complaints("acpiexec", &log);
    assert!(
        log.contains("1 ACPI AML tables successfully acquired and loaded"),
        "{log}"
    );
    assert!(log.contains(" 6 Devices,"), "{log}");
    let s5: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
        .collect();
    assert_eq!(
        s5,
        [
            "0000000000000005",
            "0000000000000000",
            "0000000000000000",
            "0000000000000000"
        ],
        "\\_S5:\n{log}"
    );

    // The transports: disks in --disk order, then vsock; each where the device manager put it
    // and where the MMIO bus really has it (the magic value and device id are read through the
    // bus), with the command line's virtio_mmio.device= copy agreeing.
    let kinds = [
        VIRTIO_ID_BLOCK,
        VIRTIO_ID_BLOCK,
        VIRTIO_ID_BLOCK,
        VIRTIO_ID_VSOCK,
    ];
    assert_eq!(virtio.cmdline.len(), kinds.len(), "{:?}", virtio.cmdline);
    for (i, kind) in kinds.iter().enumerate() {
        let name = format!("VR{i:02X}");
        let dev = device_block(dsdt, &name);
        assert_eq!(hid(dev), "LNRO0005", "{dev}");
        let uid = dev
            .lines()
            .find(|l| l.contains("Name (_UID,"))
            .unwrap_or_else(|| panic!("{name} has no _UID:\n{dev}"));
        let uid = uid.split("Name (_UID,").nth(1).unwrap();
        let uid = uid.split(')').next().unwrap();
        assert_eq!(parse_num(uid), i as u64, "{dev}");
        let mem = descriptor(dev, "Memory32Fixed")
            .unwrap_or_else(|| panic!("{name} has no Memory32Fixed:\n{dev}"));
        let base = MMIO_BASE + i as u64 * MMIO_LEN;
        assert_eq!(mem[0], "ReadWrite", "{dev}");
        assert_eq!(
            (parse_num(&mem[1]), parse_num(&mem[2])),
            (base, MMIO_LEN),
            "{dev}"
        );
        let irq = FIRST_IRQ + i as u32;
        let int = descriptor(dev, "Interrupt")
            .unwrap_or_else(|| panic!("{name} has no Interrupt:\n{dev}"));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ...)
        assert_eq!(
            int[..4],
            ["ResourceConsumer", "Edge", "ActiveHigh", "Exclusive"],
            "{dev}"
        );
        assert_eq!(
            following_list(dev, "Interrupt"),
            [u64::from(irq)],
            "{name} IRQ:\n{dev}"
        );
        assert_eq!(
            virtio.cmdline[i],
            format!("virtio_mmio.device=4K@{base:#x}:{irq}")
        );

        let mut reg = [0u8; 4];
        assert!(
            virtio.mmio.read(base, &mut reg),
            "nothing on the MMIO bus at {base:#x} ({name})"
        );
        assert_eq!(&reg, b"virt", "{name}: magic at {base:#x}");
        assert!(virtio.mmio.read(base + 8, &mut reg));
        assert_eq!(
            u32::from_le_bytes(reg),
            *kind,
            "{name}: device id at {base:#x}"
        );
    }
    // Past the last transport the bus is empty: no device is missing from the DSDT.
    let mut reg = [0u8; 4];
    assert!(!virtio
        .mmio
        .read(MMIO_BASE + kinds.len() as u64 * MMIO_LEN, &mut reg));
}

#[test]
fn iasl_finds_one_enabled_local_apic_per_vcpu_for_1_and_32_vcpus() {
    for vcpus in [1u8, vmm::config::MAX_VCPUS] {
        let tmp = tempfile::tempdir().unwrap();
        let mem = vmm::memory::create(64 << 20).unwrap();
        let rsdp = acpi::write_tables(
            &mem,
            &acpi::AcpiConfig {
                vcpus,
                devices: &[],
            },
        )
        .unwrap();
        let tables = walk(&mem, rsdp);
        let madt = tables.iter().find(|t| t.signature == "APIC").unwrap();
        check_madt(&disassemble(tmp.path(), madt), vcpus);
    }
}
