//! Bad files: truncated layers, flipped bytes in the header and the table, wrong magic or
//! version, missing or swapped parents. Each gives an error naming the file, never a panic,
//! and `check` reports it as corruption.

// Test code: helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use disk::{
    check, create_empty, create_layer, error_chain, format, Chain, CreateOptions, OpenOptions,
};

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        format: None,
    }
}

/// base.strata (data in clusters 0..4) <- top.strata (data in cluster 1).
fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.strata");
    create_empty(&base, 1 << 20, CreateOptions::default()).unwrap();
    let mut c = Chain::open(&base, OpenOptions::default()).unwrap();
    c.write_at(0, &vec![3u8; 4 * 65_536]).unwrap();
    drop(c);
    let top = d.join("top.strata");
    create_layer(&base, &top).unwrap();
    let mut c = Chain::open(&top, OpenOptions::default()).unwrap();
    c.write_at(65_536, &[4u8; 100]).unwrap();
    drop(c);
    (base, top)
}

/// The error of opening the chain, or (L2 tables are read on demand) of reading all of it.
fn open_err(top: &Path) -> String {
    match Chain::open(top, ro()) {
        Ok(c) => {
            let mut b = vec![0u8; c.virtual_size() as usize];
            match c.read_at(0, &mut b) {
                Ok(()) => panic!("{} opened and read", top.display()),
                Err(e) => error_chain(&e),
            }
        }
        Err(e) => error_chain(&e),
    }
}

/// File offset of the L2 entry of virtual cluster `c` (in the first L2 table).
fn l2_entry_offset(path: &Path, c: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, format::L1_OFFSET).unwrap();
    let host = u64::from_le_bytes(b) & ((1 << 48) - 1);
    assert_ne!(host, 0, "{} has no L2 table", path.display());
    host * 65_536 + c * format::L2_ENTRY_SIZE
}

fn assert_names(msg: &str, file: &Path) {
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "error does not name {name}: {msg}");
}

fn corrupt(path: &Path, offset: u64, f: impl Fn(u8) -> u8) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, offset).unwrap();
    file.write_all_at(&[f(b[0])], offset).unwrap();
}

#[test]
fn every_flipped_header_byte_is_an_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = setup(d.path());
    for (file, step) in [(&top, 1), (&base, 7)] {
        for off in (0..format::HEADER_SIZE as u64).step_by(step) {
            corrupt(file, off, |b| b ^ 0x40);
            let msg = open_err(&top);
            assert_names(&msg, file);
            assert!(!check(&top, false).unwrap().is_clean());
            corrupt(file, off, |b| b ^ 0x40);
        }
    }
    Chain::open(&top, ro()).unwrap();
}

#[test]
fn flipped_table_bytes_are_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = setup(d.path());
    // Entries 0..4 of the base and entry 1 of the top hold data; so do the L1 entries.
    for file in [&base, &top] {
        for byte in 0..8 {
            let off = format::L1_OFFSET + byte;
            corrupt(file, off, |b| b ^ 0x01);
            let msg = open_err(&top);
            assert_names(&msg, file);
            assert!(!check(&top, false).unwrap().is_clean());
            corrupt(file, off, |b| b ^ 0x01);
        }
    }
    for (file, entries) in [(&base, 0..4u64), (&top, 1..2)] {
        let at = l2_entry_offset(file, 0);
        for e in entries {
            for byte in 0..16 {
                let off = at + e * 16 + byte;
                corrupt(file, off, |b| b ^ 0x01);
                let msg = open_err(&top);
                assert_names(&msg, file);
                assert!(msg.contains("corrupt"), "{msg}");
                assert!(!check(&top, false).unwrap().is_clean());
                corrupt(file, off, |b| b ^ 0x01);
            }
        }
    }
    // An unused entry turned into garbage is caught too.
    corrupt(&top, l2_entry_offset(&top, 9) + 2, |_| 0x77);
    assert_names(&open_err(&top), &top);
}

#[test]
fn wrong_magic_and_version_are_named() {
    let d = tempfile::tempdir().unwrap();
    let (_, top) = setup(d.path());
    corrupt(&top, 0, |_| b'X');
    let msg = open_err(&top);
    assert!(msg.contains("magic") && msg.contains("top.strata"), "{msg}");
    corrupt(&top, 0, |_| b'S');
    corrupt(&top, 8, |_| 9);
    let msg = open_err(&top);
    assert!(
        msg.contains("version 9") && msg.contains("top.strata"),
        "{msg}"
    );
    // A version 1 layer is refused by name.
    corrupt(&top, 8, |_| 1);
    let msg = open_err(&top);
    assert!(
        msg.contains("version 1") && msg.contains("top.strata"),
        "{msg}"
    );
}

#[test]
fn truncated_layers_are_named() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = setup(d.path());
    let len = std::fs::metadata(&base).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    // Into the data area: a referenced cluster is gone.
    f.set_len(len - 1000).unwrap();
    let msg = open_err(&top);
    assert!(
        msg.contains("base.strata") && msg.contains("truncated"),
        "{msg}"
    );
    assert!(!check(&top, false).unwrap().is_clean());
    // Into the table, and into the header.
    for l in [5000, 300, 0] {
        f.set_len(l).unwrap();
        let msg = open_err(&top);
        assert_names(&msg, &base);
    }
}

#[test]
fn missing_or_swapped_parent_is_named() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = setup(d.path());
    let saved = d.path().join("saved.strata");
    std::fs::rename(&base, &saved).unwrap();
    let msg = open_err(&top);
    assert!(
        msg.contains("top.strata") && msg.contains("base.strata") && msg.contains("missing"),
        "{msg}"
    );
    assert!(!check(&top, false).unwrap().is_clean());
    // A different layer of the same size in its place.
    create_empty(&base, 1 << 20, CreateOptions::default()).unwrap();
    let msg = open_err(&top);
    assert!(msg.contains("different layer"), "{msg}");
    std::fs::remove_file(&base).unwrap();
    // The right layer, but written to since the child was made.
    std::fs::rename(&saved, &base).unwrap();
    Chain::open(&base, OpenOptions::default())
        .unwrap()
        .write_at(0, &[1])
        .unwrap();
    let msg = open_err(&top);
    assert!(msg.contains("modified"), "{msg}");
}

#[test]
fn changed_raw_parent_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.img");
    std::fs::write(&base, vec![1u8; 65_536]).unwrap();
    let top = d.path().join("top.strata");
    create_layer(&base, &top).unwrap();
    std::fs::write(&base, vec![1u8; 131_072]).unwrap();
    let msg = open_err(&top);
    assert!(msg.contains("base.img") && msg.contains("size"), "{msg}");
}

#[test]
fn random_garbage_files_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.strata");
    let mut x = 0x1234_5678_9abc_def1u64;
    for len in [0usize, 7, 511, 512, 4096, 70_000] {
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if len >= 8 {
            bytes[..8].copy_from_slice(&format::MAGIC);
        }
        std::fs::write(&p, &bytes).unwrap();
        assert_names(&open_err(&p), &p);
        assert!(!check(&p, false).unwrap().is_clean());
    }
}
