//! Side-by-side benchmark: Strata chains against `qemu-img bench` on raw and qcow2, with the
//! same request sizes, counts and offsets, on images in one temporary directory on one disk.
//! Run with `cargo bench -p disk --bench io` (images go to the temp dir; set `STRATA_BENCH_DIR` to pick another disk).
//!
//! Both sides go through the page cache (`qemu-img bench -t writeback -i threads -d 1`, and
//! Strata's buffered `pread`/`pwrite`), with no flush inside the timed loop. Random 4 KiB
//! requests use `qemu-img bench`'s step: offset += 7919 × 4 KiB modulo the image size, which
//! visits every 4 KiB block once in a scattered order; Strata issues the identical sequence.
//! Chains: a raw base filled with data, under 1 or 32 empty layers (reads fall through every
//! layer; writes allocate in the top with copy-on-write of 64 KiB clusters).
//!
//! `cargo test` runs this bench too (it is a test target), without the `--bench` flag that
//! `cargo bench` passes: then every case runs once on 1/64 of the data, so the bench is
//! compiled and exercised by the test suite and cannot rot. Its figures mean nothing then.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use disk::{create_layer, Chain, MergeDirection, OpenOptions};

/// The image size of a full run.
const SIZE: u64 = 256 << 20;
const SEQ: (u64, u64) = (1 << 20, 256); // 1 MiB × 256
const RND: (u64, u64) = (4096, 16384); // 4 KiB × 16384
const RND_STEP: u64 = 4096 * 7919;

#[derive(Clone, Copy)]
struct Test {
    name: &'static str,
    size: u64,
    count: u64,
    step: u64,
    write: bool,
}

const TESTS: [Test; 4] = [
    Test {
        name: "seq read 1M",
        size: SEQ.0,
        count: SEQ.1,
        step: SEQ.0,
        write: false,
    },
    Test {
        name: "rand read 4K",
        size: RND.0,
        count: RND.1,
        step: RND_STEP,
        write: false,
    },
    Test {
        name: "seq write 1M",
        size: SEQ.0,
        count: SEQ.1,
        step: SEQ.0,
        write: true,
    },
    Test {
        name: "rand write 4K",
        size: RND.0,
        count: RND.1,
        step: RND_STEP,
        write: true,
    },
];

/// By how much a smoke run (`cargo test`, no `--bench` flag) shrinks sizes and counts.
fn scale() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1
    } else {
        64
    }
}

/// The image size of this run.
fn image_size() -> u64 {
    SIZE / scale()
}

/// Writes back the dirty pages earlier steps left (outside any timed loop), so a timed run does
/// not pay for the writeback of the images set up or written before it. Both sides get it.
fn settle() {
    let _ = Command::new("sync").status();
}

fn strata_run(top: &Path, t: Test) -> f64 {
    let mut c = Chain::open(top, OpenOptions::default()).unwrap();
    settle();
    let mut buf = vec![0xa5u8; t.size as usize];
    let mut off = 0u64;
    let size = image_size();
    let start = Instant::now();
    for _ in 0..t.count {
        if t.write {
            c.write_at(off, &buf).unwrap();
        } else {
            c.read_at(off, &mut buf).unwrap();
        }
        off = (off + t.step) % size;
    }
    start.elapsed().as_secs_f64()
}

fn qemu_run(img: &Path, fmt: &str, t: Test) -> f64 {
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench",
        "-f",
        fmt,
        "-t",
        "writeback",
        "-i",
        "threads",
        "-d",
        "1",
    ])
    .args([
        "-c",
        &t.count.to_string(),
        "-s",
        &t.size.to_string(),
        "-S",
        &t.step.to_string(),
    ]);
    if t.write {
        cmd.arg("-w");
    }
    settle();
    let out = cmd.arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "qemu-img bench failed: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn qemu(args: &[&str]) {
    let st = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        st.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

fn make_base(path: &Path) {
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    let size = image_size();
    let mut data = Vec::with_capacity(size as usize);
    while (data.len() as u64) < size {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(path, data).unwrap();
}

fn strata_chain(dir: &Path, base: &Path, depth: usize) -> PathBuf {
    let mut top = base.to_path_buf();
    for i in 0..depth {
        let next = dir.join(format!("s{depth}-{i}.strata"));
        create_layer(&top, &next).unwrap();
        top = next;
    }
    top
}

fn qcow2_chain(dir: &Path, base: &Path, depth: usize) -> PathBuf {
    let mut top = base.to_path_buf();
    let mut fmt = "raw";
    for i in 0..depth {
        let next = dir.join(format!("q{depth}-{i}.qcow2"));
        qemu(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            top.to_str().unwrap(),
            "-F",
            fmt,
            next.to_str().unwrap(),
        ]);
        top = next;
        fmt = "qcow2";
    }
    top
}

fn row(name: &str, t: Test, secs: f64) -> (f64, f64) {
    let mb = (t.size * t.count) as f64 / secs / 1e6;
    let iops = t.count as f64 / secs;
    println!(
        "  {name:<16} {:<14} {mb:>10.1} MB/s {iops:>10.0} IOPS",
        t.name
    );
    (mb, iops)
}

fn main() {
    assert!(
        Command::new("qemu-img").arg("--version").output().is_ok(),
        "qemu-img not found: install Debian's qemu-utils (apt-get install qemu-utils)"
    );
    let tests = TESTS.map(|t| Test {
        count: t.count / scale(),
        ..t
    });
    let root = std::env::var_os("STRATA_BENCH_DIR").map(PathBuf::from);
    let d = match root {
        Some(r) => tempfile::tempdir_in(r).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let dir = d.path();
    println!(
        "images in {} (page cache on both sides, depth-1 queue)",
        dir.display()
    );
    let base = dir.join("base.raw");
    make_base(&base);

    // (label, results per test in MB/s)
    let mut results: Vec<(String, Vec<f64>)> = Vec::new();
    for depth in [0usize, 1, 32] {
        // Raw (depth 0) gets its own copy since writes change it.
        let raw_copy = dir.join(format!("raw-{depth}.raw"));
        if depth == 0 {
            std::fs::copy(&base, &raw_copy).unwrap();
        }
        let s_top = if depth == 0 {
            raw_copy.clone()
        } else {
            strata_chain(dir, &base, depth)
        };
        let (q_top, q_fmt) = if depth == 0 {
            let q = dir.join("raw-q.raw");
            std::fs::copy(&base, &q).unwrap();
            (q, "raw")
        } else {
            (qcow2_chain(dir, &base, depth), "qcow2")
        };
        let label_s = if depth == 0 {
            "strata raw".to_string()
        } else {
            format!("strata d{depth}")
        };
        let label_q = if depth == 0 {
            "qemu raw".to_string()
        } else {
            format!("qcow2 d{depth}")
        };
        println!("depth {depth}:");
        let (mut rs, mut rq) = (Vec::new(), Vec::new());
        for t in tests {
            rs.push(row(&label_s, t, strata_run(&s_top, t)).0);
            rq.push(row(&label_q, t, qemu_run(&q_top, q_fmt, t)).0);
        }
        results.push((label_s, rs));
        results.push((label_q, rq));
    }
    println!();
    println!("ratios (MB/s):");
    let get = |l: &str| {
        results
            .iter()
            .find(|r| r.0 == l)
            .map(|r| r.1.clone())
            .unwrap()
    };
    let pairs = [
        ("strata d1", "qcow2 d1"),
        ("strata d32", "qcow2 d32"),
        ("strata d1", "qemu raw"),
        ("strata d32", "strata d1"),
        ("qcow2 d32", "qcow2 d1"),
    ];
    for (a, b) in pairs {
        let (x, y) = (get(a), get(b));
        let parts: Vec<String> = tests
            .iter()
            .zip(x.iter().zip(&y))
            .map(|(t, (p, q))| format!("{}: {:.2}", t.name, p / q))
            .collect();
        println!("  {a:>10} / {b:<10} {}", parts.join("  "));
    }

    // Merge throughput: a layer holding 128 MiB (half the image) over the raw base.
    println!();
    let merged_mib = 128 / scale();
    let mtop = dir.join("m.strata");
    create_layer(&base, &mtop).unwrap();
    let mut c = Chain::open(&mtop, OpenOptions::default()).unwrap();
    let buf = vec![7u8; 1 << 20];
    for i in 0..merged_mib {
        c.write_at(i * 2 * (1 << 20), &buf).unwrap();
    }
    c.flush().unwrap();
    let start = Instant::now();
    c.merge(1, MergeDirection::IntoParent, &mut |_, _| {})
        .unwrap();
    let s = start.elapsed().as_secs_f64();
    drop(c);
    let merged_mb = (merged_mib << 20) as f64 / 1e6;
    println!(
        "merge: strata layer ({merged_mib} MiB) into raw base: {:.1} MB/s ({s:.2} s, incl. fdatasync)",
        merged_mb / s
    );
    let q = dir.join("m.qcow2");
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        q.to_str().unwrap(),
    ]);
    let cmds: Vec<String> = (0..merged_mib)
        .map(|i| format!("write -P 7 {} 1M", i * 2 * (1 << 20)))
        .collect();
    qemu_io(&q, &cmds);
    let start = Instant::now();
    qemu(&["commit", "-q", "-t", "writeback", q.to_str().unwrap()]);
    let s = start.elapsed().as_secs_f64();
    println!("merge: qemu-img commit qcow2 ({merged_mib} MiB) into raw base: {:.1} MB/s ({s:.2} s, whole process)", merged_mb / s);
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let st = c.arg(img).output().unwrap();
    assert!(
        st.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}
