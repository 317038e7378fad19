//! What the guest keeps from the Linux zero page (`struct boot_params`) and
//! the command line, copied at boot before low memory is reused.

use crate::sync::Global;

const OFF_ACPI_RSDP_ADDR: usize = 0x070;
const OFF_EXT_CMD_LINE_PTR: usize = 0x0c0;
const OFF_E820_ENTRIES: usize = 0x1e8;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
/// `E820_MAX_ENTRIES_ZEROPAGE`.
const E820_MAX: usize = 128;
const CMDLINE_MAX: usize = 4096;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One E820 range.
#[derive(Clone, Copy)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = usable RAM.
    pub kind: u32,
}

/// The captured boot information.
pub struct BootInfo {
    /// `acpi_rsdp_addr` (0 if the VMM left it empty).
    pub rsdp: u64,
    e820: [E820Entry; E820_MAX],
    e820_len: usize,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

impl BootInfo {
    /// The memory map.
    pub fn e820(&self) -> &[E820Entry] {
        self.e820.get(..self.e820_len).unwrap_or_default()
    }

    /// The end of RAM: the highest end of a usable E820 range.
    pub fn ram_end(&self) -> u64 {
        self.e820()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0)
    }

    /// The command line, without its NUL.
    pub fn cmdline(&self) -> &[u8] {
        self.cmdline.get(..self.cmdline_len).unwrap_or_default()
    }
}

// Not zeroed at boot: `capture` sets the lengths and what they cover.
#[link_section = ".bss.noinit.bootinfo"]
static INFO: Global<BootInfo> = Global::new(BootInfo {
    rsdp: 0,
    e820: [E820Entry {
        addr: 0,
        size: 0,
        kind: 0,
    }; E820_MAX],
    e820_len: 0,
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
});

/// Copies the RSDP address, the E820 map and the command line out of the
/// zero page at `zero_page`. BSP only, at start-up.
pub fn capture(zero_page: usize) {
    // SAFETY: single-threaded start-up; nobody reads INFO yet.
    let info = unsafe { &mut *INFO.get() };
    info.rsdp = 0;
    info.e820_len = 0;
    info.cmdline_len = 0;
    if zero_page == 0 {
        return;
    }
    let zp = LowMemory(zero_page as u64);
    info.rsdp = zp.u64(OFF_ACPI_RSDP_ADDR);

    let entries = usize::from(zp.u8(OFF_E820_ENTRIES)).min(E820_MAX);
    for (i, entry) in info.e820.iter_mut().enumerate().take(entries) {
        let off = OFF_E820_TABLE + i * E820_ENTRY_SIZE;
        *entry = E820Entry {
            addr: zp.u64(off),
            size: zp.u64(off + 8),
            kind: zp.u32(off + 16),
        };
    }
    info.e820_len = entries;

    let ptr = u64::from(zp.u32(OFF_CMD_LINE_PTR)) | u64::from(zp.u32(OFF_EXT_CMD_LINE_PTR)) << 32;
    // cmdline_size may be left 0 by a VMM: then read up to the NUL.
    let size = match zp.u32(OFF_CMDLINE_SIZE) as usize {
        0 => CMDLINE_MAX,
        n => n.min(CMDLINE_MAX),
    };
    if ptr != 0 {
        let src = LowMemory(ptr);
        let mut len = 0;
        for (i, slot) in info.cmdline.iter_mut().enumerate().take(size) {
            let byte = src.u8(i);
            if byte == 0 {
                break;
            }
            *slot = byte;
            len += 1;
        }
        info.cmdline_len = len;
    }
}

/// Boot structures the VMM wrote into guest RAM: the zero page at the
/// address in RSI and the command line it points to. Both lie in RAM that
/// the VMM's (and our) identity map covers, and nothing writes them while
/// `capture` reads.
struct LowMemory(u64);

impl LowMemory {
    fn u8(&self, off: usize) -> u8 {
        // SAFETY: see the type's comment.
        unsafe { ((self.0 + off as u64) as *const u8).read_volatile() }
    }

    fn u32(&self, off: usize) -> u32 {
        // SAFETY: see the type's comment.
        unsafe { ((self.0 + off as u64) as *const u32).read_unaligned() }
    }

    fn u64(&self, off: usize) -> u64 {
        // SAFETY: see the type's comment.
        unsafe { ((self.0 + off as u64) as *const u64).read_unaligned() }
    }
}

/// The captured information (read-only after start-up).
pub fn get() -> &'static BootInfo {
    // SAFETY: written only by `capture` during start-up.
    unsafe { &*INFO.get() }
}
