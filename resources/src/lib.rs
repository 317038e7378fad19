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

/// The test guest's patterns (the guest's own source file, shared so host
/// tests compute the same values): the memory pattern of `fill`/`check`
/// ([`pattern::page_value`]), the disk pattern of `blk N write`
/// ([`pattern::sector_fill`]), the hash `blk N read` prints
/// ([`pattern::fnv1a64`]) and the records of the `log` workload
/// ([`pattern::log_record`], [`pattern::log_record_parse`]).
#[path = "../test-guest/src/pattern.rs"]
pub mod pattern;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::pattern::{
        fnv1a64, fnv1a64_update, log_record, log_record_parse, page_value, sector_fill,
        sector_word, splitmix64, FNV_OFFSET, SECTOR_SIZE,
    };

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

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a64_update(fnv1a64(b"foo"), b"bar"), fnv1a64(b"foobar"));
    }

    #[test]
    fn sector_fill_is_the_documented_generator() {
        let mut buf = [0u8; SECTOR_SIZE];
        sector_fill(42, 1234, &mut buf);
        for (i, word) in buf.chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(word.try_into().unwrap());
            assert_eq!(value, sector_word(42, 1234, i as u64));
        }
        let mut other = [0u8; SECTOR_SIZE];
        sector_fill(42, 1235, &mut other);
        assert_ne!(buf, other);
        sector_fill(43, 1234, &mut other);
        assert_ne!(buf, other);
    }

    #[test]
    fn sector_hash_matches_the_guest() {
        // `blk 0 write 0 8 42` then `blk 0 read 0 8` printed this under
        // Strata; a zeroed sector hashes to the second value.
        let mut hash = FNV_OFFSET;
        let mut buf = [0u8; SECTOR_SIZE];
        for sector in 0..8 {
            sector_fill(42, sector, &mut buf);
            hash = fnv1a64_update(hash, &buf);
        }
        assert_eq!(hash, 0x7ee0_c929_d571_e3c6);
        assert_eq!(fnv1a64(&[0u8; SECTOR_SIZE]), 0x7da1_44b9_7d05_4b25);
    }

    #[test]
    fn log_records_round_trip_and_detect_damage() {
        let mut rec = [0u8; SECTOR_SIZE];
        log_record(0xfeed, 17, &mut rec);
        assert_eq!(&rec[..8], b"STRALOG1");
        assert_eq!(log_record_parse(&rec), Some((17, 0xfeed)));
        let mut payload = [0u8; SECTOR_SIZE];
        sector_fill(0xfeed, 17, &mut payload);
        assert_eq!(rec[24..504], payload[24..504]);
        rec[100] ^= 1;
        assert_eq!(log_record_parse(&rec), None);
        assert_eq!(log_record_parse(&[0u8; SECTOR_SIZE]), None);
    }
}
