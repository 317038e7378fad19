//! Smoke test of the fuzz targets on the stable toolchain, run by `cargo test --workspace`:
//!
//! - in-process, a few thousand inputs through `disk::fuzzing::header_table` (the body of the
//!   `header_table` fuzz target): valid headers and tables made by the disk crate's own
//!   encoders, then mutated (bit flips, with and without a fixed-up checksum, byte pokes,
//!   truncations, appended and overwritten random bytes, moved table entries) and pure random
//!   bytes. None may panic; valid inputs must be accepted and small corruptions rejected.
//! - the built fuzz binary itself (libFuzzer, without coverage instrumentation) on a handful of
//!   input files, each of which libFuzzer runs once; it must exit 0.
//!
//! Seeded: `STRATA_TEST_SEED` fixes the inputs, otherwise they are random; the test prints
//! `seed = N (replay with STRATA_TEST_SEED=N)` (shown when it fails), and a failing input is
//! also saved to a file that the fuzz binary can be run on (see `disk/tests/common/mod.rs`).

// Test code: helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Rng;
use disk::format::{
    l1_encode, Entry, Header, ParentRef, FLAG_FOLDING, HEADER_SIZE, MAX_CLUSTER_BITS,
    MAX_HOST_CLUSTER, MAX_PARENT_PATH, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use disk::fuzzing::{header_table, L2_FIRST_INDEX};

const CASES: usize = 5000;

/// A valid header made by `Header::new` + `encode`, with every field drawn from `rng` (the ids
/// too, so that a seed gives the same bytes).
fn valid_header(rng: &mut Rng) -> [u8; HEADER_SIZE] {
    let bits =
        MIN_CLUSTER_BITS + rng.below(u64::from(MAX_CLUSTER_BITS - MIN_CLUSTER_BITS + 1)) as u32;
    let size = match rng.below(3) {
        0 => 512 * (1 + rng.below(64)),
        1 => 512 * (1 + rng.below(1 << 24)),
        _ => MAX_VIRTUAL_SIZE - 512 * rng.below(4),
    };
    let path_len = 1 + rng.below(MAX_PARENT_PATH as u64) as usize;
    let path: String = (0..path_len)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect();
    let id = |rng: &mut Rng| -> [u8; 16] { rng.bytes(16).try_into().unwrap() };
    let folding = rng.one_in(4);
    let parent = match rng.below(3) {
        0 => ParentRef::None,
        1 => ParentRef::Layer {
            path,
            layer_id: id(rng),
            data_id: id(rng),
        },
        _ => ParentRef::Raw {
            path,
            size: rng.next(),
            mtime: (rng.next() as i64, rng.below(1_000_000_000) as u32),
            // A folding layer records its raw parent's inode (never 0); others record none.
            fold_ino: if folding {
                1 + rng.below(u64::MAX - 1)
            } else {
                0
            },
        },
    };
    let mut h = Header::new(bits, size, parent);
    h.layer_id = id(rng);
    h.data_id = id(rng);
    h.generation = rng.next();
    h.flags = if folding { FLAG_FOLDING } else { 0 };
    h.encode()
}

/// A valid table of `n` entries, each encoded at its index: an L1 table (8-byte entries,
/// from index 0) or an L2 table (16-byte extended entries, from [`L2_FIRST_INDEX`]).
fn valid_table(rng: &mut Rng, n: usize, l2: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n as u64 {
        if l2 {
            let alloc = if rng.one_in(3) { 0 } else { rng.next() as u16 };
            let zero = rng.next() as u16 & !alloc;
            let host = if alloc == 0 {
                0
            } else {
                1 + rng.below(MAX_HOST_CLUSTER)
            };
            let e = Entry { host, alloc, zero };
            out.extend_from_slice(&e.encode(L2_FIRST_INDEX + i));
        } else {
            let host = if rng.one_in(3) {
                0
            } else {
                rng.next() & MAX_HOST_CLUSTER
            };
            out.extend_from_slice(&l1_encode(i, host).to_le_bytes());
        }
    }
    out
}

/// Recomputes the header checksum (CRC-32C of bytes 0..508, stored at 508), so that a mutation
/// reaches the field checks behind it.
fn fix_checksum(b: &mut [u8]) {
    const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let crc = CRC32C.checksum(&b[..508]);
    b[508..512].copy_from_slice(&crc.to_le_bytes());
}

fn flip_bits(rng: &mut Rng, b: &mut [u8], range: std::ops::Range<usize>, count: usize) {
    let mut bits: Vec<usize> = Vec::new();
    while bits.len() < count {
        let bit = range.start * 8 + rng.below((range.len() * 8) as u64) as usize;
        if !bits.contains(&bit) {
            bits.push(bit);
            b[bit / 8] ^= 1 << (bit % 8);
        }
    }
}

/// What an input is expected to do, beyond not panicking.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Unmutated: the header is accepted and the table too, with this many entries (as an L2
    /// table when the flag is set, else as an L1 table).
    Valid(usize, bool),
    /// 1 to 3 bit flips in the header, checksum not fixed: CRC-32C catches every one.
    HeaderRejected,
    /// One bit flipped in a table entry that was not zero and is not zero now (L2 or L1).
    TableRejected(bool),
    /// Anything goes.
    Any,
}

/// One input: a valid header and table, then (mostly) a mutation.
fn input(rng: &mut Rng) -> (Vec<u8>, &'static str, Expect) {
    let entries = rng.below(48) as usize;
    let l2 = rng.one_in(2);
    let w = if l2 { 16 } else { 8 };
    let mut b = valid_header(rng).to_vec();
    b.extend(valid_table(rng, entries, l2));
    let len = b.len();
    match rng.below(11) {
        0 => (b, "valid", Expect::Valid(entries, l2)),
        1 => {
            let n = 1 + rng.below(3) as usize;
            flip_bits(rng, &mut b, 0..HEADER_SIZE, n);
            (b, "header bit flips", Expect::HeaderRejected)
        }
        2 => {
            let n = 1 + rng.below(4) as usize;
            flip_bits(rng, &mut b, 0..508, n);
            fix_checksum(&mut b);
            (b, "header bit flips, checksum fixed", Expect::Any)
        }
        3 => {
            // Poke an interesting value into a header field, checksum fixed.
            let at = rng.below(508) as usize;
            let v = [0u8, 1, 0x7f, 0x80, 0xff][rng.below(5) as usize];
            let width = [1, 2, 4, 8][rng.below(4) as usize].min(508 - at);
            b[at..at + width].fill(v);
            fix_checksum(&mut b);
            (b, "header poke, checksum fixed", Expect::Any)
        }
        4 if entries > 0 => {
            let i = rng.below(entries as u64) as usize;
            let at = HEADER_SIZE + w * i;
            let was_zero = b[at..at + w].iter().all(|&x| x == 0);
            flip_bits(rng, &mut b, at..at + w, 1);
            let is_zero = b[at..at + w].iter().all(|&x| x == 0);
            let e = if was_zero || is_zero {
                Expect::Any
            } else {
                Expect::TableRejected(l2)
            };
            (b, "table bit flip", e)
        }
        5 if entries > 1 => {
            // Move an entry to another index: its check bits cover the index.
            let (i, j) = (
                rng.below(entries as u64) as usize,
                rng.below(entries as u64) as usize,
            );
            let e: Vec<u8> = b[HEADER_SIZE + w * i..][..w].to_vec();
            b[HEADER_SIZE + w * j..][..w].copy_from_slice(&e);
            (b, "table entry moved", Expect::Any)
        }
        6 => {
            b.truncate(rng.below(len as u64 + 1) as usize);
            (b, "truncated", Expect::Any)
        }
        7 => {
            let extra = rng.below(20) as usize;
            b.extend(rng.bytes(extra));
            (b, "random bytes appended", Expect::Any)
        }
        8 => {
            let at = rng.below(len as u64) as usize;
            let n = (1 + rng.below(64) as usize).min(len - at);
            b[at..at + n].copy_from_slice(&rng.bytes(n));
            (b, "random bytes overwritten", Expect::Any)
        }
        9 => {
            let n = rng.below(1200) as usize;
            (rng.bytes(n), "random bytes", Expect::Any)
        }
        _ => {
            // Several of the above at once, roughly.
            let n = 1 + rng.below(16) as usize;
            flip_bits(rng, &mut b, 0..len, n);
            if rng.one_in(2) {
                fix_checksum(&mut b);
            }
            b.truncate(len - rng.below(len as u64 / 2) as usize);
            (
                b,
                "flips anywhere, maybe checksum fixed, truncated",
                Expect::Any,
            )
        }
    }
}

/// Saves a failing input where the fuzz binary can be run on it.
fn save(seed: u64, case: usize, data: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("strata-header_table-seed{seed}-case{case}.bin"));
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn header_table_target_survives_mutated_valid_inputs() {
    let seed = common::announce();
    let mut rng = Rng::new(seed);
    let (mut headers_ok, mut tables_ok, mut both_ok) = (0, 0, 0);
    for case in 0..CASES {
        let (data, how, expect) = input(&mut rng);
        let fail = |why: String| -> ! {
            let p = save(seed, case, &data);
            panic!(
                "case {case} ({how}, {} bytes, saved as {}): {why}\n{}",
                data.len(),
                p.display(),
                common::replay_hint(seed)
            )
        };
        let v = match std::panic::catch_unwind(|| header_table(&data)) {
            Ok(v) => v,
            Err(_) => fail("the fuzz target panicked (message above)".into()),
        };
        let ok = match expect {
            Expect::Valid(n, true) => v.header_ok && v.l2_entries == Some(n),
            Expect::Valid(n, false) => v.header_ok && v.table_entries == Some(n),
            Expect::HeaderRejected => !v.header_ok,
            Expect::TableRejected(true) => v.l2_entries.is_none(),
            Expect::TableRejected(false) => v.table_entries.is_none(),
            Expect::Any => true,
        };
        if !ok {
            fail(format!("expected {expect:?}, got {v:?}"));
        }
        headers_ok += usize::from(v.header_ok);
        let table = v.table_entries.is_some() || v.l2_entries.is_some();
        tables_ok += usize::from(table);
        both_ok += usize::from(v.header_ok && table);
    }
    println!(
        "of {CASES} inputs, accepted: {headers_ok} headers, {tables_ok} tables, {both_ok} both"
    );
    // Not vacuous: a good share of the inputs gets past each parser, and a good share does not.
    let share = |n: usize| n * 100 / CASES;
    for (what, n) in [
        ("headers", headers_ok),
        ("tables", tables_ok),
        ("headers and tables", both_ok),
    ] {
        assert!(
            (10..=90).contains(&share(n)),
            "{what} accepted in {}% of the cases\n{}",
            share(n),
            common::replay_hint(seed)
        );
    }
}

#[test]
fn header_table_fuzz_binary_runs_input_files() {
    let seed = common::announce();
    let mut rng = Rng::new(seed);
    let d = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut add = |name: &str, data: &[u8]| {
        let p = d.path().join(name);
        std::fs::write(&p, data).unwrap();
        files.push(p);
    };
    let mut valid = valid_header(&mut rng).to_vec();
    valid.extend(valid_table(&mut rng, 16, true));
    add("valid", &valid);
    add("empty", &[]);
    add("header-only", &valid[..HEADER_SIZE]);
    add("truncated", &valid[..300]);
    let mut poked = valid.clone();
    poked[20] = 0xff; // cluster_bits out of range
    fix_checksum(&mut poked);
    add("bad-field", &poked);
    for i in 0..4 {
        let (data, _, _) = input(&mut rng);
        add(&format!("mutated-{i}"), &data);
    }
    add("random", &rng.bytes(777));

    // Given files, libFuzzer runs each once and exits; a crash would leave its artifact in `d`.
    let out = Command::new(env!("CARGO_BIN_EXE_header_table"))
        .arg(format!("-artifact_prefix={}/", d.path().display()))
        .args(&files)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the fuzz binary failed ({}):\n{stderr}\n{}",
        out.status,
        common::replay_hint(seed)
    );
    // libFuzzer says `Executed <file>` after running each input once.
    for f in &files {
        assert!(
            stderr.contains(&format!("Executed {}", f.display())),
            "the fuzz binary did not run {}:\n{stderr}",
            name(f)
        );
    }
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}
