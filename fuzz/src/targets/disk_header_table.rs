//! The disk layer header and table parsers: `disk::fuzzing::header_table` (shared with
//! `disk/fuzz`), which checks that nothing panics and that what is accepted round-trips.

/// Feeds `data` to the header, L1 and L2 parsers.
pub fn run(data: &[u8]) {
    disk::fuzzing::header_table(data);
}
