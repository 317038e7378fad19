//! Disassembles the test guest image and fails if it contains an
//! instruction the KVM our tests run on refuses (it emulates guest kernel
//! code and ends the VM with `KVM_EXIT_INTERNAL_ERROR` on these; see shared
//! PVM.md). The image is linked with `--gc-sections`, so everything in it is
//! reachable; a hit usually means `core::fmt` integer formatting, a float or
//! an auto-vectorised loop crept in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::{Elf, SHF_EXECINSTR};

/// Instructions refused outright.
const REFUSED: &[&str] = &[
    "ldmxcsr",
    "stmxcsr",
    "fwait",
    "wait",
    "xgetbv",
    "xsetbv",
    "popcnt",
    "cmpxchg16b",
    "rdtscp",
    "int3",
    "int",
    "int1",
    "icebp",
    "into",
    "clac",
    "stac",
    "emms",
    "andn",
    "bextr",
    "blsi",
    "blsmsk",
    "blsr",
    "bzhi",
    "mulx",
    "pdep",
    "pext",
    "rorx",
    "sarx",
    "shlx",
    "shrx",
    "adcx",
    "adox",
    "(bad)",
];

/// Refused families, matched as mnemonic prefixes.
const REFUSED_PREFIXES: &[&str] = &["xsave", "xrstor", "crc32"];

/// x87 instructions that do work (they only move state).
const X87_ALLOWED: &[&str] = &["fxsave", "fxsave64", "fxrstor", "fxrstor64"];

/// Prefixes objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repe", "repnz", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "ss", "fs", "gs", "notrack", "bnd", "xacquire", "xrelease",
];

/// Why the instruction text `insn` (mnemonic and operands, as objdump
/// prints them) is refused, or `None` when it is fine.
fn refusal(insn: &str) -> Option<&'static str> {
    let mut words = insn
        .split_whitespace()
        .skip_while(|w| PREFIXES.contains(w) || w.starts_with("rex"));
    let mnemonic = words.next()?;
    let operands = words.collect::<Vec<_>>().join(" ");

    if ["%xmm", "%ymm", "%zmm", "%mm", "%st"]
        .iter()
        .any(|r| operands.contains(r))
    {
        return Some("uses SSE/AVX/MMX/x87 registers");
    }
    if operands
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '%')
        .any(is_mask_register)
    {
        return Some("uses AVX-512 mask registers");
    }
    if REFUSED.contains(&mnemonic) {
        return Some("refused instruction");
    }
    if REFUSED_PREFIXES.iter().any(|p| mnemonic.starts_with(p)) {
        return Some("refused instruction family");
    }
    if mnemonic.starts_with('f') && !X87_ALLOWED.contains(&mnemonic) {
        return Some("x87 instruction");
    }
    if mnemonic.starts_with('v') {
        return Some("AVX instruction");
    }
    None
}

fn is_mask_register(word: &str) -> bool {
    word.len() == 3 && word.starts_with("%k") && word.as_bytes()[2].is_ascii_digit()
}

/// Disassembles one section; returns the offending lines.
fn offending_lines(path: &str, section: &str, mode: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new("objdump");
    cmd.args(["-d", "--demangle", "--no-show-raw-insn", "-j", section]);
    if let Some(mode) = mode {
        cmd.args(["-M", mode]);
    }
    let output = cmd
        .arg(path)
        .output()
        .expect("running objdump (binutils) failed");
    assert!(
        output.status.success(),
        "objdump failed on {section}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut current = String::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        if line.ends_with(">:") {
            current = line.to_string();
            continue;
        }
        // "  101000:\tcli" (address, then the instruction)
        let Some((address, insn)) = line.split_once(":\t") else {
            continue;
        };
        if !address.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        if let Some(why) = refusal(insn) {
            bad.push(format!(
                "{section} {current} {}: {} ({why})",
                address.trim(),
                insn.trim()
            ));
        }
    }
    bad
}

#[test]
fn image_holds_no_instruction_this_kvm_refuses() {
    let elf = Elf::parse(resources::TEST_GUEST);
    let code: Vec<_> = elf
        .sections
        .iter()
        .filter(|s| s.flags & SHF_EXECINSTR != 0)
        .collect();
    assert!(code.iter().any(|s| s.name == ".text"), "no .text section");

    let mut bad = Vec::new();
    for section in code {
        // The AP trampoline's parts run in real and protected mode.
        let mode = match section.name.as_str() {
            ".tramp16" => Some("i8086"),
            ".tramp32" => Some("i386"),
            _ => None,
        };
        bad.extend(offending_lines(
            resources::TEST_GUEST_PATH,
            &section.name,
            mode,
        ));
    }

    assert!(
        bad.is_empty(),
        "refused instructions in the test guest:\n{}",
        bad.join("\n")
    );
}

#[test]
fn image_links_no_core_fmt_integer_formatting() {
    // Pulled in by bounds-check and slice-index panics (their messages
    // format integers); it is SSE code. The test above would also fail, but
    // this names the cause.
    let elf = Elf::parse(resources::TEST_GUEST);

    let fmt: Vec<_> = elf
        .symbols()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            [
                "pad_integral",
                "4core3fmt3num",
                "panic_bounds_check",
                "slice_index_fail",
            ]
            .iter()
            .any(|needle| name.contains(needle))
        })
        .collect();

    assert!(
        fmt.is_empty(),
        "core::fmt integer formatting is linked in (index with get()/iterators \
         instead of [] in the guest):\n{}",
        fmt.join("\n")
    );
}

#[test]
fn refusal_flags_what_the_kvm_refuses() {
    for insn in [
        "pxor   %xmm0,%xmm0",
        "movaps %xmm1,(%rsp)",
        "vmovdqu %ymm0,(%rdi)",
        "ldmxcsr (%rsp)",
        "fldl   (%rax)",
        "fwait",
        "xsave64 (%rdi)",
        "xrstor (%rdi)",
        "popcnt %rax,%rax",
        "crc32b %al,%eax",
        "lock cmpxchg16b (%rdi)",
        "rdtscp",
        "int3",
        "int    $0x80",
        "clac",
        "shlx   %rax,%rbx,%rcx",
        "adox   %rax,%rbx",
        "kmovw  %k1,%eax",
    ] {
        assert!(refusal(insn).is_some(), "{insn} not flagged");
    }
}

#[test]
fn refusal_accepts_what_the_kvm_emulates() {
    for insn in [
        "mov    %rsp,%rbp",
        "lock xadd %eax,0xdc01(%rip)",
        "rep stos %rax,%es:(%rdi)",
        "repz scas %es:(%rdi),%rax",
        "fxsave (%rdi)",
        "cmpxchg8b (%rdi)",
        "rdtsc",
        "iretq",
        "ud2",
        "data16 cs nopw 0x0(%rax,%rax,1)",
        "wrmsr",
        "lzcnt  %rax,%rax",
    ] {
        assert_eq!(refusal(insn), None, "{insn} flagged");
    }
}
