//! Checks the test guest image's ELF shape against the boot contract: what
//! linux-loader needs to load it by physical address and enter it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Elf, PT_LOAD};

const IMAGE_BASE: u64 = 0x10_0000;
const TRAMPOLINE: u64 = 0x8000;

#[test]
fn image_is_elf64_x86_64_executable_with_entry_in_a_load_segment() {
    let elf = Elf::parse(resources::TEST_GUEST);

    assert_eq!(elf.class, 2, "not ELFCLASS64");
    assert_eq!(elf.data, 1, "not little-endian");
    assert_eq!(elf.kind, 2, "not ET_EXEC");
    assert_eq!(elf.machine, 62, "not EM_X86_64");
    let segment = elf
        .segments
        .iter()
        .filter(|s| s.kind == PT_LOAD)
        .find(|s| s.vaddr <= elf.entry && elf.entry < s.vaddr + s.filesz)
        .expect("entry point outside every PT_LOAD segment");
    assert_eq!(
        segment.vaddr, segment.paddr,
        "entry segment is not identity-linked"
    );
}

#[test]
fn every_load_segment_is_loaded_at_or_above_1_mib() {
    let elf = Elf::parse(resources::TEST_GUEST);

    let loads: Vec<_> = elf.segments.iter().filter(|s| s.kind == PT_LOAD).collect();

    assert!(!loads.is_empty());
    for s in loads {
        assert!(
            s.paddr >= IMAGE_BASE,
            "segment loaded at {:#x}, below 1 MiB",
            s.paddr
        );
        assert!(
            s.paddr + s.memsz <= 1 << 30,
            "segment ends above the first GiB"
        );
    }
}

#[test]
fn trampoline_runs_at_0x8000_and_fits_in_one_page() {
    let elf = Elf::parse(resources::TEST_GUEST);

    let start = elf.symbol("__tramp_start").expect("__tramp_start");
    let end = elf.symbol("__tramp_end").expect("__tramp_end");
    let tramp16 = elf.section(".tramp16").expect(".tramp16");

    assert_eq!(start, TRAMPOLINE);
    assert_eq!(tramp16.addr, TRAMPOLINE);
    assert!(
        end > start && end - start <= 0x1000,
        "trampoline is {} bytes",
        end - start
    );
}

#[test]
fn interrupt_stubs_are_16_bytes_each() {
    let elf = Elf::parse(resources::TEST_GUEST);

    let stubs = elf.symbol("isr_stubs").expect("isr_stubs");
    let common = elf.symbol("isr_common").expect("isr_common");

    // A longer stub would push isr_common (16-byte aligned) further out.
    assert_eq!(common - stubs, 256 * 16);
}

#[test]
fn bss_is_inside_the_image_segment() {
    let elf = Elf::parse(resources::TEST_GUEST);

    let bss_end = elf.symbol("__image_end").expect("__image_end");
    let covered = elf
        .segments
        .iter()
        .filter(|s| s.kind == PT_LOAD)
        .any(|s| s.paddr <= bss_end && bss_end <= s.paddr + s.memsz);

    assert!(
        covered,
        "the image end {bss_end:#x} is not covered by p_memsz of a segment"
    );
}
