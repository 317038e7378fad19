//! Hostile images (issue #16): layers crafted to make Strata read or write a file the user
//! never chose, to hang it, or to exhaust its memory; a failing disk under a flush; a crashed
//! create. Each crafted file is refused with an error naming it, and nothing outside the chain's
//! directory is ever written. `tests/tests/hostile_images.rs` runs the same corpus through
//! `strata disk` and measures the tool's peak RSS.

// Test code: helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use disk::crafted::{layer_over_raw, mtime, write_layer};
use disk::file::Faults;
use disk::format::{self, Entry, Header, ParentRef};
use disk::{
    check, create_empty, create_layer, create_layer_with, error_chain, merge, Chain, CreateOptions,
    MergeDirection, OpenOptions, ParentPolicy,
};

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        format: None,
    }
}

/// The full error of opening `top` read-only.
fn open_err(top: &Path, policy: &ParentPolicy) -> String {
    match Chain::open_with(top, ro(), policy) {
        Ok(_) => panic!("{} opened", top.display()),
        Err(e) => error_chain(&e),
    }
}

/// A "secret" file of 64 KiB outside the chain's directory: `(outer dir, chain dir, secret)`.
fn victim_setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let outer = tempfile::tempdir().unwrap();
    let chain_dir = outer.path().join("vm");
    std::fs::create_dir(&chain_dir).unwrap();
    let secret = outer.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5au8; 65_536]).unwrap();
    (outer, chain_dir, secret)
}

#[test]
fn an_absolute_parent_outside_the_layers_directory_is_refused_unless_allowed() {
    let (_outer, dir, secret) = victim_setup();
    let top = dir.join("evil.strata");
    layer_over_raw(&top, secret.to_str().unwrap(), &secret).unwrap();
    let e = open_err(&top, &ParentPolicy::default());
    assert!(
        e.contains("evil.strata") && e.contains("secret.raw") && e.contains("outside"),
        "{e}"
    );
    assert!(e.contains("--allow-parent-outside"), "{e}");
    // The caller's opt-in (never the file's) lets it open: the path rules were what refused.
    let c = Chain::open_with(&top, ro(), &ParentPolicy::anywhere()).unwrap();
    assert_eq!(c.depth(), 2);
    drop(c);
    let c = Chain::open_with(
        &top,
        ro(),
        &ParentPolicy::with_dirs([secret.parent().unwrap()]),
    )
    .unwrap();
    assert_eq!(c.depth(), 2);
}

#[test]
fn a_parent_that_climbs_with_dotdot_or_a_symlink_is_refused() {
    let (_outer, dir, secret) = victim_setup();
    let top = dir.join("climb.strata");
    layer_over_raw(&top, "../secret.raw", &secret).unwrap();
    let e = open_err(&top, &ParentPolicy::default());
    assert!(
        e.contains("climb.strata") && e.contains("outside") && e.contains("climbs with .."),
        "{e}"
    );
    // A symbolic link in the layer's own directory that leads outside is no way round.
    std::os::unix::fs::symlink(&secret, dir.join("innocent.raw")).unwrap();
    let link = dir.join("link.strata");
    layer_over_raw(&link, "innocent.raw", &secret).unwrap();
    let e = open_err(&link, &ParentPolicy::default());
    assert!(
        e.contains("link.strata") && e.contains("outside") && e.contains("symbolic link"),
        "{e}"
    );
    // `..` that stays inside is fine.
    std::fs::create_dir(dir.join("sub")).unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![1u8; 65_536]).unwrap();
    let inside = dir.join("sub/inside.strata");
    layer_over_raw(&inside, "../sub/../base.raw", &base).unwrap();
    let e = open_err(&inside, &ParentPolicy::default());
    assert!(e.contains("outside"), "{e}");
    let below = dir.join("below.strata");
    create_layer(&base, &below).unwrap();
    let deeper = dir.join("sub/deeper.raw");
    std::fs::write(&deeper, vec![2u8; 65_536]).unwrap();
    let over_sub = dir.join("oversub.strata");
    create_layer(&deeper, &over_sub).unwrap();
    let c = Chain::open(&over_sub, ro()).unwrap();
    assert_eq!(c.layer_path(0), Some(dir.join("sub/deeper.raw").as_path()));
}

#[test]
fn a_fifo_parent_is_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let top = d.path().join("fifo.strata");
    let h = Header::new(
        16,
        1 << 20,
        ParentRef::Raw {
            path: "pipe".into(),
            size: 1 << 20,
            mtime: (0, 0),
            fold_ino: 0,
        },
    );
    write_layer(&top, &h).unwrap();
    // On another thread, so that a blocking open fails the test instead of hanging it.
    let (tx, rx) = mpsc::channel();
    let t = top.clone();
    std::thread::spawn(move || {
        let _ = tx.send(open_err(&t, &ParentPolicy::anywhere()));
    });
    let e = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("opening a layer over a FIFO blocked");
    assert!(
        e.contains("fifo.strata") && e.contains("pipe") && e.contains("FIFO"),
        "{e}"
    );
    // The same for a FIFO given as the disk itself.
    let (tx, rx) = mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            Chain::open(&f, ro())
                .map(|_| ())
                .map_err(|e| error_chain(&e)),
        );
    });
    let e = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("opening a FIFO blocked")
        .unwrap_err();
    assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
}

#[test]
fn a_parent_swapped_for_another_file_of_the_same_size_is_refused() {
    let d = tempfile::tempdir().unwrap();
    // Raw parent: same size, other content and mtime.
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let top = d.path().join("top.strata");
    create_layer(&base, &top).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let other = d.path().join("other.raw");
    std::fs::write(&other, vec![2u8; 1 << 20]).unwrap();
    std::fs::rename(&other, &base).unwrap();
    let e = open_err(&top, &ParentPolicy::default());
    assert!(
        e.contains("top.strata") && e.contains("base.raw") && e.contains("modified"),
        "{e}"
    );
    // Layer parent: another layer of the same size.
    let lbase = d.path().join("lbase.strata");
    create_empty(&lbase, 1 << 20, CreateOptions::default()).unwrap();
    let ltop = d.path().join("ltop.strata");
    create_layer(&lbase, &ltop).unwrap();
    let imposter = d.path().join("imposter.strata");
    create_empty(&imposter, 1 << 20, CreateOptions::default()).unwrap();
    std::fs::rename(&imposter, &lbase).unwrap();
    let e = open_err(&ltop, &ParentPolicy::default());
    assert!(
        e.contains("ltop.strata") && e.contains("different layer"),
        "{e}"
    );
}

#[test]
fn a_64_tib_header_on_a_small_file_is_refused_or_opens_cheaply() {
    let d = tempfile::tempdir().unwrap();
    // The smallest clusters the format has (8 KiB): an L1 table of 128 MiB.
    let h = Header::new(
        format::MIN_CLUSTER_BITS,
        format::MAX_VIRTUAL_SIZE,
        ParentRef::None,
    );
    assert!(h.data_offset > 128 << 20);
    let tiny = d.path().join("tiny.strata");
    std::fs::write(&tiny, h.encode()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tiny)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let e = open_err(&tiny, &ParentPolicy::default());
    assert!(e.contains("tiny.strata") && e.contains("truncated"), "{e}");
    // Sparse up to its data area: opens, reading no table (the holes are skipped).
    let sparse = d.path().join("sparse.strata");
    write_layer(&sparse, &h).unwrap();
    let c = Chain::open(&sparse, ro()).unwrap();
    assert_eq!(c.virtual_size(), format::MAX_VIRTUAL_SIZE);
    let mut b = [1u8; 4096];
    c.read_at(format::MAX_VIRTUAL_SIZE - 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // A cluster size below the format's smallest is refused outright.
    let mut raw = h.encode();
    raw[20..24].copy_from_slice(&12u32.to_le_bytes());
    fix_crc(&mut raw);
    let small = d.path().join("small-clusters.strata");
    std::fs::write(&small, raw).unwrap();
    let e = open_err(&small, &ParentPolicy::default());
    assert!(
        e.contains("small-clusters.strata") && e.contains("cluster_bits"),
        "{e}"
    );
}

/// Recomputes the header checksum after a deliberate edit.
fn fix_crc(b: &mut [u8; format::HEADER_SIZE]) {
    let crc = crc32c(&b[..508]);
    b[508..512].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A base layer with data in its first cluster; returns the file offset of L1 entry 0 and of
/// the L2 entry of virtual cluster 0.
fn written_layer(path: &Path) -> (u64, u64) {
    create_empty(path, 1 << 30, CreateOptions::default()).unwrap();
    let mut c = Chain::open(path, OpenOptions::default()).unwrap();
    c.write_at(0, &[7u8; 65_536]).unwrap();
    drop(c);
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, format::L1_OFFSET).unwrap();
    let l2 = format::l1_decode(0, u64::from_le_bytes(b)).unwrap();
    (format::L1_OFFSET, l2 * 65_536)
}

#[test]
fn overflowing_cluster_numbers_are_refused() {
    let d = tempfile::tempdir().unwrap();
    // An allocation mark whose clusters have no file offset (2^46 clusters of 2 MiB = 2^67
    // bytes): `host * cluster_size` would wrap into the header.
    let mut h = Header::new(21, 1 << 30, ParentRef::None);
    h.alloc_end = format::MAX_HOST_CLUSTER + 1;
    let p = d.path().join("mark.strata");
    write_layer(&p, &h).unwrap();
    let e = open_err(&p, &ParentPolicy::default());
    assert!(e.contains("mark.strata") && e.contains("alloc_end"), "{e}");

    // The largest mark the format allows at 64 KiB clusters: writing finds the file full
    // instead of wrapping; the header is untouched.
    let mut h = Header::new(16, 1 << 30, ParentRef::None);
    h.alloc_end = format::MAX_HOST_CLUSTER + 1;
    let full = d.path().join("full.strata");
    write_layer(&full, &h).unwrap();
    let before = std::fs::read(&full).unwrap();
    let mut c = Chain::open(&full, OpenOptions::default()).unwrap();
    c.prepare_write().unwrap();
    let header = std::fs::read(&full).unwrap();
    let e = error_chain(&c.write_at(0, &[1u8; 4096]).unwrap_err());
    assert!(e.contains("full.strata") && e.contains("full"), "{e}");
    drop(c);
    let after = std::fs::read(&full).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(
        after, header,
        "a write at an impossible cluster changed the file"
    );

    // An L2 entry naming the last 46-bit host cluster (with valid check bits).
    let l2p = d.path().join("l2.strata");
    let (_, l2_entry) = written_layer(&l2p);
    let bad = Entry {
        host: format::MAX_HOST_CLUSTER,
        alloc: 0xffff,
        zero: 0,
    }
    .encode(0);
    let f = std::fs::OpenOptions::new().write(true).open(&l2p).unwrap();
    f.write_all_at(&bad, l2_entry).unwrap();
    drop(f);
    let c = Chain::open(&l2p, ro()).unwrap();
    let e = error_chain(&c.read_at(0, &mut [0u8; 512]).unwrap_err());
    assert!(
        e.contains("l2.strata") && e.contains("outside the data area"),
        "{e}"
    );
    drop(c);
    assert!(!check(&l2p, false).unwrap().is_clean());

    // An L1 entry naming it.
    let l1p = d.path().join("l1.strata");
    let (l1_entry, _) = written_layer(&l1p);
    let f = std::fs::OpenOptions::new().write(true).open(&l1p).unwrap();
    f.write_all_at(
        &format::l1_encode(0, format::MAX_HOST_CLUSTER).to_le_bytes(),
        l1_entry,
    )
    .unwrap();
    drop(f);
    let e = open_err(&l1p, &ParentPolicy::default());
    assert!(
        e.contains("l1.strata") && e.contains("outside the data area"),
        "{e}"
    );
}

#[test]
fn the_folding_flag_does_not_switch_the_identity_check_off() {
    let d = tempfile::tempdir().unwrap();
    // Layer parent: FOLDING set, parent replaced by a layer with the same id but other data.
    let base = d.path().join("base.strata");
    create_empty(&base, 1 << 20, CreateOptions::default()).unwrap();
    let top = d.path().join("fold.strata");
    create_layer(&base, &top).unwrap();
    let mut raw = [0u8; format::HEADER_SIZE];
    std::fs::File::open(&top)
        .unwrap()
        .read_exact_at(&mut raw, 0)
        .unwrap();
    let mut h = Header::parse(&raw).unwrap();
    h.flags |= format::FLAG_FOLDING;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&top)
        .unwrap()
        .write_all_at(&h.encode(), 0)
        .unwrap();
    // Writing the base renews its data id: the content changed, not by a merge of `top`.
    let mut c = Chain::open(&base, OpenOptions::default()).unwrap();
    c.write_at(0, &[9u8; 512]).unwrap();
    drop(c);
    let e = open_err(&top, &ParentPolicy::default());
    assert!(
        e.contains("fold.strata") && e.contains("base.strata") && e.contains("modified"),
        "{e}"
    );

    // Raw parent: FOLDING with the inode recorded; another file swapped in is refused, the
    // file the merge was writing (same inode, new content and mtime) is accepted.
    let rbase = d.path().join("rbase.raw");
    std::fs::write(&rbase, vec![1u8; 1 << 20]).unwrap();
    let rtop = d.path().join("rfold.strata");
    create_layer(&rbase, &rtop).unwrap();
    let mut c = Chain::open(&rtop, OpenOptions::default()).unwrap();
    c.write_at(0, &[3u8; 3 * 65_536]).unwrap();
    c.begin_merge(1, MergeDirection::IntoParent).unwrap();
    assert!(!c.merge_step(1).unwrap().finished);
    // Interrupted: the chain is dropped before the last step.
    drop(c);
    let c = Chain::open(&rtop, ro()).unwrap();
    let mut b = vec![0u8; 3 * 65_536];
    c.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    drop(c);
    let swapped = d.path().join("swap.raw");
    std::fs::copy(&rbase, &swapped).unwrap();
    std::fs::rename(&swapped, &rbase).unwrap();
    let e = open_err(&rtop, &ParentPolicy::default());
    assert!(
        e.contains("rfold.strata") && e.contains("inode") && e.contains("another file"),
        "{e}"
    );
    // A crafted FOLDING header that records no parent identity is not a layer at all.
    let mut raw = [0u8; format::HEADER_SIZE];
    std::fs::File::open(&rtop)
        .unwrap()
        .read_exact_at(&mut raw, 0)
        .unwrap();
    raw[96..104].fill(0);
    fix_crc(&mut raw);
    let bare = d.path().join("bare-fold.strata");
    std::fs::copy(&rtop, &bare).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bare)
        .unwrap()
        .write_all_at(&raw, 0)
        .unwrap();
    let e = open_err(&bare, &ParentPolicy::anywhere());
    assert!(
        e.contains("bare-fold.strata") && e.contains("parent_fold_ino"),
        "{e}"
    );
}

#[test]
fn an_interrupted_merge_into_a_layer_reopens_and_finishes() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.strata");
    create_empty(&base, 1 << 20, CreateOptions::default()).unwrap();
    let (x, y) = (d.path().join("x.strata"), d.path().join("y.strata"));
    create_layer(&base, &x).unwrap();
    create_layer(&base, &y).unwrap();
    let mut c = Chain::open(&x, OpenOptions::default()).unwrap();
    c.write_at(0, &[5u8; 200_000]).unwrap();
    c.begin_merge(1, MergeDirection::IntoParent).unwrap();
    assert!(!c.merge_step(1).unwrap().finished);
    drop(c);
    // x (FOLDING) accepts the identity the merge gave its parent; its sibling y does not.
    let c = Chain::open(&x, ro()).unwrap();
    let mut b = vec![0u8; 200_000];
    c.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&v| v == 5));
    drop(c);
    let e = open_err(&y, &ParentPolicy::default());
    assert!(e.contains("y.strata") && e.contains("modified"), "{e}");
    merge(&x, None, MergeDirection::IntoParent, &mut |_, _| {}).unwrap();
    assert!(!x.exists());
    let c = Chain::open(&base, ro()).unwrap();
    c.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&v| v == 5));
}

#[test]
fn a_merge_never_writes_outside_the_chains_directory() {
    let (_outer, dir, secret) = victim_setup();
    let before = std::fs::read(&secret).unwrap();
    let when = mtime(&secret).unwrap();
    for (name, recorded) in [
        ("abs.strata", secret.to_str().unwrap().to_string()),
        ("up.strata", "../secret.raw".to_string()),
    ] {
        let top = dir.join(name);
        layer_over_raw(&top, &recorded, &secret).unwrap();
        let e = error_chain(
            &merge(&top, None, MergeDirection::IntoParent, &mut |_, _| {}).unwrap_err(),
        );
        assert!(e.contains(name) && e.contains("outside"), "{e}");
        let e = error_chain(
            &disk::ops::merge_with(
                &top,
                None,
                MergeDirection::IntoParent,
                &ParentPolicy::with_dirs([&dir]),
                &mut |_, _| {},
            )
            .unwrap_err(),
        );
        assert!(e.contains("outside"), "{e}");
        // Nor does creating a layer over it, or converting it.
        let e = error_chain(&create_layer(&top, dir.join("child.strata")).unwrap_err());
        assert!(e.contains("outside"), "{e}");
        let e = error_chain(
            &disk::ops::convert(
                &top,
                &dir.join("out.raw"),
                disk::ops::ConvertFormat::Raw,
                &mut |_, _| {},
            )
            .unwrap_err(),
        );
        assert!(e.contains("outside"), "{e}");
    }
    assert_eq!(std::fs::read(&secret).unwrap(), before);
    assert_eq!(mtime(&secret).unwrap(), when);
    // `check` does not follow it either: a warning, not corruption.
    let r = check(&dir.join("up.strata"), false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(
        r.files
            .iter()
            .any(|f| f.warnings.iter().any(|w| w.contains("outside"))),
        "{r:?}"
    );
}

#[test]
fn creating_a_layer_over_a_parent_outside_its_directory_needs_the_opt_in() {
    let (_outer, dir, secret) = victim_setup();
    let child = dir.join("child.strata");
    let e = error_chain(&create_layer(&secret, &child).unwrap_err());
    assert!(e.contains("child.strata") && e.contains("outside"), "{e}");
    assert!(!child.exists());
    create_layer_with(&secret, &child, &ParentPolicy::anywhere()).unwrap();
    let c = Chain::open_with(&child, ro(), &ParentPolicy::anywhere()).unwrap();
    assert_eq!(c.depth(), 2);
    drop(c);
    // A parent below the child's directory is recorded relative to it.
    std::fs::create_dir(dir.join("images")).unwrap();
    let base = dir.join("images/base.raw");
    std::fs::write(&base, vec![4u8; 65_536]).unwrap();
    let over = dir.join("over.strata");
    create_layer(&base, &over).unwrap();
    let info = disk::info(&over).unwrap();
    assert_eq!(info.layers[1].parent.as_deref(), Some("images/base.raw"));
}

/// base.raw (0xAB) <- top.strata, with a fault plan on the chain's files.
fn faulty_chain(d: &Path) -> (PathBuf, Chain, std::sync::Arc<Faults>) {
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0xabu8; 4 << 20]).unwrap();
    let top = d.join("top.strata");
    create_layer(&base, &top).unwrap();
    let mut c = Chain::open(&top, OpenOptions::default()).unwrap();
    let faults = Faults::new();
    faults.lose_unsynced(true);
    c.inject_faults(faults.clone());
    (top, c, faults)
}

fn read(c: &Chain, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    c.read_at(off, &mut b).unwrap();
    b
}

#[test]
fn a_failed_fdatasync_poisons_the_chain_and_publishes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (top, mut c, faults) = faulty_chain(d.path());
    c.write_at(0, &[0x11u8; 65_536]).unwrap();
    c.flush().unwrap();
    // A write into fresh clusters, then a flush whose first fdatasync fails (and, as the
    // kernel does, drops the unsynced pages).
    c.write_at(1 << 20, &[0x22u8; 65_536]).unwrap();
    faults.fail_syncs_after(0);
    let e = error_chain(&c.flush().unwrap_err());
    assert!(e.contains("top.strata") && e.contains("fdatasync"), "{e}");
    // The disk recovers: a retried sync would succeed. The chain must not retry.
    faults.heal();
    for _ in 0..3 {
        let e = error_chain(&c.flush().unwrap_err());
        assert!(e.contains("top.strata") && e.contains("reopened"), "{e}");
    }
    let e = error_chain(&c.write_at(2 << 20, &[0x33u8; 4096]).unwrap_err());
    assert!(e.contains("reopened"), "{e}");
    let (syncs, failed) = faults.counts();
    assert_eq!(failed, 1, "{syncs} syncs");
    drop(c);
    // Reopened: what was flushed is there; the lost write is not, and no table entry points
    // at where it was (that would read zeroes, not the parent's 0xAB).
    let c = Chain::open(&top, ro()).unwrap();
    assert!(read(&c, 0, 65_536).iter().all(|&x| x == 0x11));
    let lost = read(&c, 1 << 20, 65_536);
    assert!(
        lost.iter().all(|&x| x == 0xab),
        "a table entry was published for data that never reached the disk: {:x?}",
        &lost[..16]
    );
    drop(c);
    let r = check(&top, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn a_failed_fdatasync_of_the_tables_poisons_too() {
    let d = tempfile::tempdir().unwrap();
    let (top, mut c, faults) = faulty_chain(d.path());
    c.write_at(0, &[0x11u8; 65_536]).unwrap();
    c.flush().unwrap();
    // Change an existing table (step 2's sync) and fail only that sync.
    c.write_at(65_536, &[0x44u8; 65_536]).unwrap();
    faults.fail_syncs_after(1);
    assert!(c.flush().is_err());
    faults.heal();
    let e = error_chain(&c.flush().unwrap_err());
    assert!(e.contains("reopened"), "{e}");
    drop(c);
    let c = Chain::open(&top, ro()).unwrap();
    assert!(read(&c, 0, 65_536).iter().all(|&x| x == 0x11));
    let v = read(&c, 65_536, 65_536);
    assert!(
        v.iter().all(|&x| x == 0xab) || v.iter().all(|&x| x == 0x44),
        "torn: {:x?}",
        &v[..16]
    );
    drop(c);
    assert!(check(&top, false).unwrap().is_clean());
    // A new open writes and flushes again.
    let mut c = Chain::open(&top, OpenOptions::default()).unwrap();
    c.write_at(0, &[0x55u8; 512]).unwrap();
    c.flush().unwrap();
}

#[test]
fn a_crashed_create_never_blocks_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.strata");
    // What crashed creates of earlier builds and of the named fallback leave behind.
    std::fs::write(d.path().join(".disk.strata.tmp"), b"half").unwrap();
    std::fs::write(d.path().join(".disk.strata.12345-abcdef.tmp"), b"half").unwrap();
    create_empty(&p, 1 << 20, CreateOptions::default()).unwrap();
    assert!(Chain::open(&p, ro()).is_ok());
    // A create leaves no file of its own besides the one it made, and never replaces one.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let e = error_chain(&create_empty(&p, 1 << 20, CreateOptions::default()).unwrap_err());
    assert!(e.contains("disk.strata") && e.contains("exists"), "{e}");
    let layer = d.path().join("layer.strata");
    std::fs::write(d.path().join(".layer.strata.tmp"), b"half").unwrap();
    create_layer(&p, &layer).unwrap();
    assert_eq!(Chain::open(&layer, ro()).unwrap().depth(), 2);
}

#[test]
fn a_merge_refuses_a_parent_replaced_while_the_chain_was_open() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.strata");
    create_empty(&base, 1 << 20, CreateOptions::default()).unwrap();
    let top = d.path().join("top.strata");
    create_layer(&base, &top).unwrap();
    let mut c = Chain::open(&top, OpenOptions::default()).unwrap();
    c.write_at(0, &[6u8; 4096]).unwrap();
    // Another file takes the parent's name (the open chain still holds the old one).
    let other = d.path().join("other.strata");
    create_empty(&other, 1 << 20, CreateOptions::default()).unwrap();
    let before = std::fs::read(&other).unwrap();
    std::fs::rename(&other, &base).unwrap();
    let e = error_chain(&c.begin_merge(1, MergeDirection::IntoParent).unwrap_err());
    assert!(
        e.contains("base.strata") && e.contains("replaced by another file"),
        "{e}"
    );
    drop(c);
    assert_eq!(std::fs::read(&base).unwrap(), before);
}
