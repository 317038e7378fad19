//! Entry points shared by the fuzz targets in `disk/fuzz` and their stable-toolchain smoke test
//! (`disk/fuzz/tests/smoke.rs`), so both drive exactly the same code. Not part of the API:
//! Strata itself never calls these.
//!
//! Each entry point panics if and only if the code under test breaks its contract (that is how
//! a fuzzer learns of a bug); on every other input it returns a [`Verdict`] saying what was
//! accepted, which lets the smoke test check that its inputs reach past the first rejection.

use crate::format::{
    l1_decode, l1_encode, parse_l1, parse_l2, Entry, Header, HEADER_SIZE, L1_ENTRY_SIZE,
    L2_ENTRY_SIZE,
};

/// What [`header_table`] made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The first [`HEADER_SIZE`] bytes parsed as a header.
    pub header_ok: bool,
    /// The bytes after the header parsed as an L1 table of this many entries.
    pub table_entries: Option<usize>,
    /// The bytes after the header parsed as an L2 table of this many (extended) entries.
    pub l2_entries: Option<usize>,
}

/// The virtual cluster index of the first L2 entry [`header_table`] parses (an arbitrary
/// table, not the first, so that the index binding is exercised).
pub const L2_FIRST_INDEX: u64 = 4096 * 3;

/// Feeds `data` to the layer-header parser (its first [`HEADER_SIZE`] bytes, or all of it
/// when shorter) and the rest to the L1-table parser and to the L2-table parser (whose first
/// entry is virtual cluster [`L2_FIRST_INDEX`]). None may panic, and whatever they accept must
/// survive a round trip:
///
/// - an accepted header re-encodes to a sector that parses to the same header, and encoding
///   that one again gives the same bytes (the encoding is canonical);
/// - an accepted L1 table has one entry per 8 bytes and an accepted L2 table one per 16
///   bytes, and re-encoding every entry at its index gives back exactly the input bytes
///   (there is one encoding per entry).
pub fn header_table(data: &[u8]) -> Verdict {
    let mut verdict = Verdict::default();
    if let Ok(h) = Header::parse(data) {
        verdict.header_ok = true;
        let sector = h.encode();
        match Header::parse(&sector) {
            Ok(again) => {
                assert_eq!(again, h, "a re-encoded header parses differently");
                assert!(
                    again.encode() == sector,
                    "encoding a header is not canonical"
                );
            }
            Err(e) => panic!("a re-encoded header is rejected: {e} ({h:?})"),
        }
    }
    let table = data.get(HEADER_SIZE..).unwrap_or_default();
    if let Ok(entries) = parse_l1(table) {
        let whole = table.len() / L1_ENTRY_SIZE as usize;
        assert_eq!(
            entries.len(),
            whole,
            "L1 entries parsed from {} bytes",
            table.len()
        );
        for (i, (&host, raw)) in entries.iter().zip(table.chunks_exact(8)).enumerate() {
            let encoded = l1_encode(i as u64, host);
            assert_eq!(
                encoded.to_le_bytes(),
                raw,
                "L1 entry {i} ({host}) re-encodes to other bytes"
            );
            assert_eq!(
                l1_decode(i as u64, encoded),
                Ok(host),
                "L1 entry {i} does not round-trip"
            );
        }
        verdict.table_entries = Some(entries.len());
    }
    if let Ok(entries) = parse_l2(L2_FIRST_INDEX, table) {
        let whole = table.len() / L2_ENTRY_SIZE as usize;
        assert_eq!(
            entries.len(),
            whole,
            "L2 entries parsed from {} bytes",
            table.len()
        );
        for (i, (e, raw)) in entries.iter().zip(table.chunks_exact(16)).enumerate() {
            let index = L2_FIRST_INDEX + i as u64;
            let encoded = e.encode(index);
            assert_eq!(
                &encoded[..],
                raw,
                "L2 entry {i} ({e:?}) re-encodes to other bytes"
            );
            assert_eq!(
                Entry::decode(index, &encoded),
                Ok(*e),
                "L2 entry {i} does not round-trip"
            );
            assert!(e.alloc & e.zero == 0, "L2 entry {i} is both data and zero");
        }
        verdict.l2_entries = Some(entries.len());
    }
    verdict
}
