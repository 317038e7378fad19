//! The Linux zero page (`struct boot_params`) with the E820 map, the command line pointer and
//! the RSDP address, for the 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;
use crate::memory::{ram_ranges, GuestMemory};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` magic.
const BOOT_FLAG: u16 = 0xaa55;
/// `header` magic: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` Linux expects (CONFIG_PHYSICAL_ALIGN's default).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Errors while writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The E820 map does not fit the zero page.
    #[error("the E820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    /// Writing guest memory failed.
    #[error("cannot write the zero page")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The E820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the BIOS/ACPI area
/// reserved, RAM from 1 MiB up to the MMIO hole, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.raw_value();
        let from = start.max(HIMEM_START);
        let end = start + len;
        if end > from {
            map.push((from, end - from, E820_RAM));
        }
    }
    map
}

/// What the zero page describes.
pub struct BootInfo {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    /// Where the ACPI RSDP is.
    pub rsdp: GuestAddress,
    /// The initrd's address and size, if there is one.
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Builds the zero page, starting from a bzImage's setup header when there is one.
pub fn build(info: &BootInfo, setup: Option<setup_header>) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.acpi_rsdp_addr = info.rsdp.raw_value();
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr.raw_value() >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }

    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write(memory: &GuestMemory, params: &boot_params) -> Result<(), BootParamsError> {
    memory
        .write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_usable_ram_is_configured_size_minus_legacy_hole() {
        let size = 512u64 << 20;
        let map = e820_map(size);
        let usable: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(usable, size - (HIMEM_START - EBDA_START));
        assert!(map.contains(&(ACPI_START, ACPI_END - ACPI_START, E820_RESERVED)));
    }

    #[test]
    fn e820_splits_around_mmio_hole() {
        let map = e820_map(4 << 30);
        assert!(map.contains(&(HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM)));
        assert!(map.contains(&(MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START, E820_RAM)));
    }

    #[test]
    fn zero_page_has_magic_cmdline_and_rsdp() {
        let info = BootInfo {
            mem_size: 256 << 20,
            cmdline_size: 12,
            rsdp: GuestAddress(ACPI_START),
            initrd: Some((GuestAddress(0x0f00_0000), 0x1234)),
        };
        let p = build(&info, None).unwrap();
        assert_eq!({ p.hdr.header }, HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x0f00_0000, 0x1234)
        );
    }
}
