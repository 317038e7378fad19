//! The Strata VMM: builds and runs a KVM virtual machine.
//!
//! This crate owns the `strata` binary and everything about a VM that is not a device:
//! - [`config`]: a VM's configuration and its validation;
//! - [`memory`]: guest RAM around the 32-bit MMIO hole;
//! - [`arch`]: the x86_64 specifics — layout, CPUID, MSRs, the 64-bit entry state, the Linux
//!   zero page and the ACPI tables;
//! - [`linux_kit`]: `--guest linux`, the Linux guest kit;
//! - [`loader`]: ELF vmlinux and bzImage loading;
//! - [`vcpu`]: the vCPU threads, their state machine and the request/reply protocol;
//! - [`vstate`]: vCPU and VM state as plain data (save, check, restore); what this project's
//!   KVM does with each state ioctl is in `vmm/STATE.md` (probed 2026-11-30);
//! - [`vm`]: building a VM from a config, in steps a restore reuses
//!   ([`vm::Vm::save_state`], [`vm::Vm::restore_from`]); [`runner`]: running it through
//!   reboots to its end;
//! - [`device_manager`]: virtio-mmio device placement and wiring, and saving and restoring the
//!   virtio devices;
//! - [`api_handler`]: answering API calls in the control loop;
//! - [`console`]: the host side of the serial console;
//! - [`cli`]: the command line;
//! - [`sandbox`]: seccomp filters per thread, Landlock, the open-file limit.

pub mod agent;
pub mod api_handler;
pub mod arch;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod linux_kit;
pub mod loader;
pub mod memory;
pub mod runner;
pub mod sandbox;
pub mod vcpu;
pub mod vm;
pub mod vstate;

/// An error and its causes on one line (`a: b: c`).
pub fn error_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
