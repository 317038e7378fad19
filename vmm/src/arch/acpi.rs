//! The ACPI tables Strata gives a guest: RSDP → XSDT → FADT (→ DSDT) and MADT.
//!
//! The platform is *hardware-reduced* ACPI (ACPI 6.5, 4.1): no PM1 blocks, no SCI, no FACS.
//! The guest powers off by writing `SLP_TYP(5) << 2 | SLP_EN` to the FADT's sleep control
//! register and resets through its reset register; the DSDT's `\_S5` tells it the sleep type.
//! The MADT lists one enabled local APIC per vCPU (APIC id = vCPU index) and the IOAPIC. The
//! DSDT describes COM1, the pvpanic port and, as they are added, the virtio-mmio devices.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START};
use crate::memory::GuestMemory;
use devices::legacy::{
    ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT, PVPANIC_PORT, RESET_CONTROL_PORT,
    RESET_CONTROL_VALUE, SLEEP_TYPE_S5,
};

/// OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"STRATA";
const OEM_REVISION: u32 = 1;

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit between [`ACPI_START`] and [`ACPI_END`].
    #[error("the ACPI tables need {0} bytes, more than the 128 KiB reserved for them")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe beyond the fixed platform devices.
pub struct AcpiConfig<'a> {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// More DSDT devices, each the AML of a complete `Device` object, placed in `\_SB`.
    pub devices: &'a [Vec<u8>],
}

/// The AML `Device` for a virtio-mmio transport: `_HID` LNRO0005 (what Linux's virtio_mmio
/// driver matches), its register window and its edge-triggered interrupt.
pub fn virtio_mmio_device(index: usize, base: u64, size: u64, irq: u32) -> Vec<u8> {
    let name = format!("VR{index:02X}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(index as u32));
    let mem = aml::Memory32Fixed::new(true, base as u32, size as u32);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    table_bytes(&dev)
}

fn table_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn gas_io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The DSDT's AML body.
fn dsdt_body(cfg: &AcpiConfig) -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &0u8, &0u8, &0u8]),
    );

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let pevt_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pevt_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pevt_crs = aml::ResourceTemplate::new(vec![&pevt_io]);
    let pevt_crs = aml::Name::new("_CRS".into(), &pevt_crs);
    let pevt = aml::Device::new("PEVT".into(), vec![&pevt_hid, &pevt_crs]);

    let mut sb_body = table_bytes(&com1);
    pevt.to_aml_bytes(&mut sb_body);
    for device in cfg.devices {
        sb_body.extend_from_slice(device);
    }

    let mut body = table_bytes(&s5);
    body.extend(aml::Scope::raw("_SB_".into(), sb_body));
    body
}

/// Writes every table into guest memory and returns the RSDP's address.
pub fn write_tables(memory: &GuestMemory, cfg: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let align = |n: u64| (n + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // Two XSDT entries: FADT and MADT.
    let fadt_addr = align(xsdt_addr + 36 + 16);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"STRADSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(cfg));
    let dsdt = dsdt.as_slice().to_vec();

    let mut fadt = FADTBuilder::new(OEM_ID, *b"STRAFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = gas_io_byte(RESET_CONTROL_PORT);
    fadt.reset_value = RESET_CONTROL_VALUE;
    fadt.sleep_control_reg = gas_io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = gas_io_byte(ACPI_SLEEP_CONTROL_PORT + 1);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"STRATA\0\0").into();
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align(fadt_addr + fadt_len);
    let fadt = table_bytes(&fadt.dsdt_64(dsdt_addr).finalize());

    let mut madt = MADT::new(
        OEM_ID,
        *b"STRAAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cfg.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt = table_bytes(&madt);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, *b"STRAXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = table_bytes(&xsdt);
    let rsdp = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (dsdt_addr, &dsdt),
        (madt_addr, &madt),
    ] {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// The walk from the RSDP and the MADT's structure, without external tools. The FADT, the
/// DSDT's devices and resources and every table's checksum are checked by ACPICA itself (`iasl`
/// and `acpiexec`) on the tables of a realistic VM in `vmm/tests/acpi_iasl.rs`.
#[cfg(test)]
mod tests {
    use super::*;

    fn read(memory: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        memory.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    /// Reads a whole table at `addr`, checking its checksum.
    fn table(memory: &GuestMemory, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(memory, addr, 8), 4) as usize;
        let t = read(memory, addr, len);
        assert!(checksum_ok(&t), "bad checksum in {:?}", &t[..4]);
        t
    }

    /// The tables the XSDT lists, each checksum checked.
    fn tables(vcpus: u8) -> Vec<Vec<u8>> {
        let memory = crate::memory::create(16 << 20).unwrap();
        let rsdp = write_tables(
            &memory,
            &AcpiConfig {
                vcpus,
                devices: &[],
            },
        )
        .unwrap();
        let r = read(&memory, rsdp.0, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]));
        assert!(checksum_ok(&r));
        let xsdt = table(&memory, u64_at(&r, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        (36..xsdt.len())
            .step_by(8)
            .map(|o| table(&memory, u64_at(&xsdt, o)))
            .collect()
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 4, 8] {
            let t = tables(vcpus);
            let madt = t.iter().find(|t| &t[..4] == b"APIC").unwrap();
            assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut o = 44;
            while o < madt.len() {
                let (kind, len) = (madt[o], madt[o + 1] as usize);
                match kind {
                    0 => lapics.push((madt[o + 2], madt[o + 3], u32_at(madt, o + 4))),
                    1 => ioapics.push(u32_at(madt, o + 4)),
                    _ => panic!("unexpected MADT entry {kind}"),
                }
                o += len;
            }
            let want: Vec<_> = (0..vcpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want);
            assert_eq!(ioapics, vec![IOAPIC_START as u32]);
        }
    }
}
