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

/// The memory pattern of the test guest's `fill`/`check` commands (the
/// guest's own source file, shared so host tests compute the same values).
#[path = "../test-guest/src/pattern.rs"]
pub mod pattern;

#[cfg(test)]
mod tests {
    use super::pattern::{page_value, splitmix64};

    #[test]
    fn splitmix64_matches_the_reference_generator() {
        // First outputs of splitmix64 seeded with 0 and 1234567 (Vigna's
        // reference implementation).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(1_234_567), 6_457_827_717_110_365_317);
    }

    #[test]
    fn page_value_depends_on_the_page_number_only() {
        assert_eq!(page_value(42, 0x20_0000), 0xCA69_5C33_29DF_9A80);
        assert_eq!(page_value(42, 0x20_0FF8), page_value(42, 0x20_0000));
        assert_eq!(page_value(7, 0x3FF_F000), 0x563A_E95B_90AE_D421);
        assert_ne!(page_value(42, 0x20_1000), page_value(42, 0x20_0000));
    }
}
