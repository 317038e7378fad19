//! Fuzzes the layer header and allocation-table parsers with arbitrary bytes: they must never
//! panic, and whatever they accept must re-encode to the same meaning.
#![no_main]

use disk::format::{parse_table, Entry, Header, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        // Accepted headers round-trip.
        let again = Header::parse(&h.encode()).expect("re-encoded header must parse");
        assert_eq!(again.parent, h.parent);
        assert_eq!(again.virtual_size, h.virtual_size);
    }
    let table = data.get(HEADER_SIZE.min(data.len())..).unwrap_or_default();
    if let Ok(entries) = parse_table(table) {
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(Entry::decode(i as u64, e.encode(i as u64)).ok(), Some(*e));
        }
    }
});
