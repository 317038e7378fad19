//! Entry points shared by the fuzz targets in `disk/fuzz` and their stable-toolchain smoke test
//! (`disk/fuzz/tests/smoke.rs`), so both drive exactly the same code. Not part of the API:
//! Strata itself never calls these.
//!
//! Each entry point panics if and only if the code under test breaks its contract (that is how
//! a fuzzer learns of a bug); on every other input it returns a [`Verdict`] saying what was
//! accepted, which lets the smoke test check that its inputs reach past the first rejection.

use crate::format::{parse_table, Entry, Header, ENTRY_SIZE, HEADER_SIZE};

/// What [`header_table`] made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The first [`HEADER_SIZE`] bytes parsed as a header.
    pub header_ok: bool,
    /// The bytes after the header parsed as an allocation table of this many entries.
    pub table_entries: Option<usize>,
}

/// Feeds `data` to the layer-header parser (its first [`HEADER_SIZE`] bytes, or all of it
/// when shorter) and the rest to the allocation-table parser. Neither may panic, and whatever
/// they accept must survive a round trip:
///
/// - an accepted header re-encodes to a sector that parses to the same header, and encoding
///   that one again gives the same bytes (the encoding is canonical);
/// - an accepted table has one entry per 8 bytes, and re-encoding every entry at its index
///   gives back exactly the input bytes (there is one encoding per entry).
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
    if let Ok(entries) = parse_table(table) {
        let whole = table.len() / ENTRY_SIZE as usize;
        assert_eq!(
            entries.len(),
            whole,
            "entries parsed from {} bytes",
            table.len()
        );
        for (i, (e, raw)) in entries.iter().zip(table.chunks_exact(8)).enumerate() {
            let encoded = e.encode(i as u64);
            assert_eq!(
                encoded.to_le_bytes(),
                raw,
                "entry {i} ({e:?}) re-encodes to other bytes"
            );
            assert_eq!(
                Entry::decode(i as u64, encoded),
                Ok(*e),
                "entry {i} does not round-trip"
            );
        }
        verdict.table_entries = Some(entries.len());
    }
    verdict
}
