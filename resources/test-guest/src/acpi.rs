//! The few ACPI tables the guest reads: RSDP -> XSDT (or RSDT) -> MADT for
//! the CPUs' APIC ids and the IOAPIC address, FADT for the sleep control
//! register used by `poweroff`.

use crate::sync::Global;

/// Most CPUs the guest brings up.
pub const MAX_CPUS: usize = 32;
const DEFAULT_IOAPIC: u64 = 0xFEC0_0000;
const HEADER_LEN: usize = 36;

/// What the guest learned from ACPI.
#[derive(Clone, Copy)]
pub struct AcpiInfo {
    /// APIC ids of the enabled processors, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    /// Number of valid entries in `apic_ids`.
    pub cpu_count: usize,
    /// IOAPIC MMIO base.
    pub ioapic: u64,
    /// Physical address of the FADT, 0 when there is none.
    pub fadt: u64,
}

impl AcpiInfo {
    /// APIC ids of the enabled processors, in MADT order.
    pub fn cpus(&self) -> &[u32] {
        self.apic_ids.get(..self.cpu_count).unwrap_or_default()
    }
}

static INFO: Global<AcpiInfo> = Global::new(AcpiInfo {
    apic_ids: [0; MAX_CPUS],
    cpu_count: 0,
    ioapic: DEFAULT_IOAPIC,
    fadt: 0,
});

/// A Generic Address Structure (ACPI 6.x, 5.2.3.2).
pub struct GenericAddress {
    /// 0 = system memory, 1 = system I/O.
    pub space_id: u8,
    /// The address.
    pub address: u64,
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: ACPI tables live in identity-mapped RAM below 4 GiB; the
    // addresses come from the tables' own length fields.
    unsafe { (addr as *const u8).read_volatile() }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: as in `read_u8`.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in `read_u8`.
    unsafe { (addr as *const u64).read_unaligned() }
}

fn signature_is(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &b)| read_u8(addr + i as u64) == b)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(read_u8(addr + i));
    }
    sum == 0
}

/// Finds the RSDP: the boot_params pointer if it holds one, else a scan of
/// 0xE0000..0x100000 on 16-byte boundaries.
fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < (1 << 32) && signature_is(hint, b"RSD PTR ") {
        return Some(hint);
    }
    let mut addr = 0xE0000;
    while addr < 0x100000 {
        if signature_is(addr, b"RSD PTR ") && checksum_ok(addr, 20) {
            return Some(addr);
        }
        addr += 16;
    }
    None
}

/// Iterates the tables of the XSDT (or RSDT), calling `f(address)`.
fn for_each_table(rsdp: u64, mut f: impl FnMut(u64)) {
    let revision = read_u8(rsdp + 15);
    let xsdt = if revision >= 2 {
        read_u64(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(read_u32(rsdp + 16)), 4)
    };
    if root == 0 || root >= (1 << 32) {
        return;
    }
    let len = u64::from(read_u32(root + 4));
    if len < HEADER_LEN as u64 || len > 0x10000 {
        return;
    }
    let mut entry = root + HEADER_LEN as u64;
    while entry + entry_size <= root + len {
        let table = if entry_size == 8 {
            read_u64(entry)
        } else {
            u64::from(read_u32(entry))
        };
        if table != 0 && table < (1 << 32) {
            f(table);
        }
        entry += entry_size;
    }
}

/// Reads the MADT and FADT. BSP only, at start-up. Without ACPI the guest
/// runs on the BSP alone with the IOAPIC at its default address.
pub fn scan(rsdp_hint: u64) -> &'static AcpiInfo {
    // SAFETY: single-threaded start-up.
    let info = unsafe { &mut *INFO.get() };
    if let Some(rsdp) = find_rsdp(rsdp_hint) {
        for_each_table(rsdp, |table| {
            if signature_is(table, b"APIC") {
                parse_madt(table, info);
            } else if signature_is(table, b"FACP") {
                info.fadt = table;
            }
        });
    }
    info
}

fn parse_madt(madt: u64, info: &mut AcpiInfo) {
    let len = u64::from(read_u32(madt + 4));
    let end = madt + len.min(0x10000);
    let mut entry = madt + 44;
    while entry + 2 <= end {
        let kind = read_u8(entry);
        let entry_len = u64::from(read_u8(entry + 1));
        if entry_len < 2 || entry + entry_len > end {
            break;
        }
        match (kind, entry_len) {
            // Processor Local APIC: uid u8, APIC id u8, flags u32 (bit 0:
            // enabled).
            (0, 8..) if read_u32(entry + 4) & 1 != 0 => {
                add_cpu(info, u32::from(read_u8(entry + 3)));
            }
            // I/O APIC: id u8, reserved u8, address u32, GSI base u32; we
            // want the one that starts at GSI 0 (ISA IRQs).
            (1, 12..) if read_u32(entry + 8) == 0 => {
                info.ioapic = u64::from(read_u32(entry + 4));
            }
            // Processor Local x2APIC: reserved u16, x2APIC id u32, flags u32.
            (9, 16..) if read_u32(entry + 8) & 1 != 0 => {
                add_cpu(info, read_u32(entry + 4));
            }
            _ => {}
        }
        entry += entry_len;
    }
}

fn add_cpu(info: &mut AcpiInfo, apic_id: u32) {
    if info.cpus().contains(&apic_id) {
        return;
    }
    if let Some(slot) = info.apic_ids.get_mut(info.cpu_count) {
        *slot = apic_id;
        info.cpu_count += 1;
    }
}

/// The FADT's `X_SLEEP_CONTROL_REG` (offset 244), if the FADT exists.
/// `Ok(None)`: FADT present but without the register.
pub fn sleep_control() -> Result<Option<GenericAddress>, ()> {
    // SAFETY: written only during start-up.
    let fadt = unsafe { (*INFO.get()).fadt };
    if fadt == 0 {
        return Err(());
    }
    let len = read_u32(fadt + 4);
    if len < 244 + 12 {
        return Ok(None);
    }
    let gas = fadt + 244;
    let address = read_u64(gas + 4);
    if address == 0 {
        return Ok(None);
    }
    Ok(Some(GenericAddress {
        space_id: read_u8(gas),
        address,
    }))
}
