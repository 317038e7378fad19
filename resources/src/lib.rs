//! What runs inside a guest: the embedded test guest, later the Linux guest
//! agent and kit.
//!
//! The test guest (`test-guest/`, see its README for the boot contract and
//! the console commands) is a freestanding x86_64 ELF built by this crate's
//! build script and embedded in the `strata` binary, which boots it when no
//! kernel is given.

/// The test guest ELF image (linked at 1 MiB, entered in 64-bit mode through
/// the Linux boot protocol, like an ELF `vmlinux`).
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// Where the build left the test guest image, for tools (objdump, gdb) and
/// for `strata run --kernel`.
pub const TEST_GUEST_PATH: &str = concat!(env!("OUT_DIR"), "/test-guest.elf");
