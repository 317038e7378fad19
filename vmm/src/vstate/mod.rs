//! vCPU and VM state as plain data: what a standard checkpoint saves of KVM, and how it is put
//! back onto a fresh KVM VM.
//!
//! - [`vcpu`]: [`vcpu::VcpuState`] — registers, system registers, FPU, XSAVE, XCRs, LAPIC,
//!   the MSRs this KVM reads and writes back, debug registers, vCPU events, MP state, CPUID
//!   and TSC frequency. Saved and restored on the vCPU's own thread (see [`crate::vcpu`]).
//! - [`vm`]: [`vm::VmState`] — PIC master and slave, IOAPIC, PIT2 and kvmclock.
//!
//! KVM's structures are stored as their bytes (`Vec<u8>` of exactly the structure's size):
//! they are plain C data, and what a VMM may change in them is KVM's to check. What KVM does
//! not check, and what Strata relies on, is checked on restore before any ioctl: every size,
//! every count (MSRs, CPUID entries, XCRs, vCPUs), the MSR indices (only those this KVM
//! accepts), the irqchip ids and the MP state. A bad field is a [`snapshot::StateError`]
//! naming it; a saved state never panics the VMM.
//!
//! What this KVM (PVM) does with each state ioctl is written down in `vmm/STATE.md`.

pub mod vcpu;
pub mod vm;

use snapshot::StateError;

/// KVM structures that are plain bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]` KVM structures with no pointers, no implicit padding (every
/// byte is a field, so all are initialised) and no invalid bit patterns.
pub(crate) unsafe trait Pod: Copy + Default {}

// SAFETY: each of these is a bindgen `#[repr(C)]` copy of a KVM UAPI structure made of
// integers and arrays of integers, with explicit padding fields (kvm-bindings derives
// zerocopy's `IntoBytes`/`FromBytes` for them, which proves the same; `kvm_fpu` lays out as
// 128 + 2 + 2 + 1 + 1 + 2 + 8 + 8 + 256 + 4 + 4 = 416 bytes with no gap).
mod pod_impls {
    use super::Pod;
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_pit_state2,
        kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    };
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_regs {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_sregs {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_fpu {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_xcrs {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_lapic_state {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_debugregs {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_vcpu_events {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_irqchip {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_pit_state2 {}
    // SAFETY: see the module comment.
    unsafe impl Pod for kvm_clock_data {}
}

/// The bytes of a KVM structure.
pub(crate) fn to_bytes<T: Pod>(value: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind the reference are
    // initialised, and they live as long as the borrow.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// A KVM structure from its saved bytes; `field` names it if the size is wrong.
pub(crate) fn from_bytes<T: Pod>(field: &str, bytes: &[u8]) -> Result<T, StateError> {
    let size = std::mem::size_of::<T>();
    snapshot::check(bytes.len() == size, field, || {
        format!("{} bytes, expected {size}", bytes.len())
    })?;
    let mut value = T::default();
    // SAFETY: `bytes` holds exactly `size_of::<T>()` bytes (checked above), `value` is a
    // distinct local of that size, and every bit pattern is a valid `T` (`T: Pod`).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), size);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn bytes_round_trip_and_wrong_sizes_name_the_field() {
        let regs = kvm_regs {
            rax: 7,
            rip: 0x1000,
            ..Default::default()
        };

        let bytes = to_bytes(&regs);
        let back: kvm_regs = from_bytes("regs", &bytes).unwrap();
        let short = from_bytes::<kvm_regs>("regs", &bytes[1..]).unwrap_err();

        assert_eq!((back.rax, back.rip), (7, 0x1000));
        assert_eq!(short.field, "regs");
    }
}
