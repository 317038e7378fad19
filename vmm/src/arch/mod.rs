//! x86_64 specifics: the memory layout, CPUID, MSRs, the 64-bit entry state, the Linux zero
//! page and the ACPI tables.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod regs;
