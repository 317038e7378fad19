//! `qemu-img compare` agrees that a converted chain equals the data written to it.
//!
//! Needs `qemu-img` (Debian's `qemu-utils`): without it the test fails, naming the package,
//! instead of passing without having tested anything. Its writes come from a fixed sequence, not
//! a seed, so it is the same on every run.

// Test code: helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::process::Command;

use disk::ops::ConvertFormat;
use disk::{convert, create_layer, Chain, OpenOptions};

/// Panics unless `qemu-img` runs: a missing prerequisite is a failure, not a skip.
fn require_qemu_img() {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "qemu-img --version failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("qemu-img not found: install Debian's qemu-utils (apt-get install qemu-utils)")
        }
        Err(e) => panic!("cannot run qemu-img ({e}): is Debian's qemu-utils installed?"),
    }
}

fn compare(a: &std::path::Path, fa: &str, b: &std::path::Path) -> i32 {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    out.status.code().unwrap_or(-1)
}

#[test]
fn converted_raw_image_equals_the_written_data_per_qemu_img() {
    require_qemu_img();
    let d = tempfile::tempdir().unwrap();
    let size = 8usize << 20;
    let mut expected: Vec<u8> = (0..size).map(|i| (i / 4096 % 200) as u8).collect();
    let base = d.path().join("base.img");
    std::fs::write(&base, &expected).unwrap();
    let mut top = base.clone();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for layer in 0..3 {
        let next = d.path().join(format!("l{layer}.strata"));
        create_layer(&top, &next).unwrap();
        let mut c = Chain::open(&next, OpenOptions::default()).unwrap();
        for _ in 0..60 {
            let off = rnd(size as u64 - 300_000) as usize;
            let len = 1 + rnd(300_000) as usize;
            if rnd(6) == 0 {
                c.discard(off as u64, len as u64).unwrap();
                expected[off..off + len].fill(0);
            } else {
                let v = 1 + rnd(255) as u8;
                c.write_at(off as u64, &vec![v; len]).unwrap();
                expected[off..off + len].fill(v);
            }
        }
        drop(c);
        top = next;
    }
    let want = d.path().join("expected.raw");
    std::fs::write(&want, &expected).unwrap();
    let out = d.path().join("out.raw");
    convert(&top, &out, ConvertFormat::Raw, &mut |_, _| {}).unwrap();
    assert_eq!(
        compare(&out, "raw", &want),
        0,
        "qemu-img compare found a difference"
    );
    // And the comparison is not vacuous.
    expected[12_345] ^= 0xff;
    std::fs::write(&want, &expected).unwrap();
    assert_eq!(compare(&out, "raw", &want), 1);
}
