//! Side-by-side benchmark: Strata chains against `qemu-img bench` on raw and qcow2, with the
//! same request sizes, counts and offsets, on images in one temporary directory on one disk.
//! Run with `cargo bench -p disk --bench io` (images go to the temp dir; set `STRATA_BENCH_DIR` to pick another disk).
//!
//! Both sides go through the page cache (`qemu-img bench -t writeback -i threads -d 1`, and
//! Strata's buffered `pread`/`pwrite`), with no flush inside the timed loop. Random 4 KiB
//! requests use `qemu-img bench`'s step: offset += 7919 × 4 KiB modulo the image size, which
//! visits every 4 KiB block once in a scattered order; Strata issues the identical sequence.
//! Chains: a raw base filled with data, under 1 or 32 empty layers (reads fall through every
//! layer; writes allocate in the top, copying only the 4 KiB sub-clusters they touch).
//!
//! Format-v2 cases, also side by side with `qemu-img`: open and `info` of a 1 TiB chain of 1
//! and of 32 layers (wall time and peak RSS of a child process, measured with `wait4`), a new
//! layer put on top of an open 1 TiB × 32 chain, and the write amplification of random 4 KiB
//! writes into a fresh layer above a fully written base (bytes the process wrote to the layer
//! file, and blocks the file gains, per guest byte). These run at full size in smoke mode
//! too: they cost next to nothing.
//!
//! `cargo test` runs this bench too (it is a test target), without the `--bench` flag that
//! `cargo bench` passes: then every case runs once on 1/64 of the data, so the bench is
//! compiled and exercised by the test suite and cannot rot. Its figures mean nothing then.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use disk::{create_empty, create_layer, Chain, CreateOptions, MergeDirection, OpenOptions};

/// Set in the environment of a child that opens a chain (`info` or `open`), see [`child`].
const CHILD: &str = "STRATA_BENCH_CHILD";
const TIB: u64 = 1 << 40;

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

/// Repetitions of each throughput case (each on fresh images): the figure is their median,
/// since one run of a write case swings with the page cache's writeback.
fn reps() -> usize {
    if scale() == 1 {
        5
    } else {
        1
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
    if t.write {
        // The once-per-open header update (new data_id, fdatasync) happens before the clock
        // starts, as qemu-img bench opens its image before it does.
        c.prepare_write().unwrap();
    }
    settle();
    // Page-aligned, like qemu-img bench's buffers (and a guest's pages under virtio-blk).
    let mut backing = vec![0xa5u8; t.size as usize + 4096];
    let skew = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skew..skew + t.size as usize];
    let mut off = 0u64;
    let size = image_size();
    let start = Instant::now();
    for _ in 0..t.count {
        if t.write {
            c.write_at(off, buf).unwrap();
        } else {
            c.read_at(off, buf).unwrap();
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

fn strata_chain(dir: &Path, base: &Path, depth: usize, rep: usize) -> PathBuf {
    let mut top = base.to_path_buf();
    for i in 0..depth {
        let next = dir.join(format!("s{depth}-{rep}-{i}.strata"));
        create_layer(&top, &next).unwrap();
        top = next;
    }
    top
}

/// Creates the qcow2 image `out` over `backing` (of format `backing_fmt`).
fn qcow2_over(backing: &Path, backing_fmt: &str, out: &Path) {
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        "-F",
        backing_fmt,
        out.to_str().unwrap(),
    ]);
}

fn qcow2_chain(dir: &Path, base: &Path, depth: usize, rep: usize) -> PathBuf {
    let mut top = base.to_path_buf();
    let mut fmt = "raw";
    for i in 0..depth {
        let next = dir.join(format!("q{depth}-{rep}-{i}.qcow2"));
        qcow2_over(&top, fmt, &next);
        top = next;
        fmt = "qcow2";
    }
    top
}

fn mbps(t: Test, secs: f64) -> f64 {
    (t.size * t.count) as f64 / secs / 1e6
}

/// Prints the median (with the range) of one case's runs in MB/s and IOPS; returns the median.
fn row(name: &str, t: Test, mut mb: Vec<f64>) -> f64 {
    mb.sort_by(f64::total_cmp);
    let med = mb[mb.len() / 2];
    let iops = med * 1e6 / t.size as f64;
    println!(
        "  {name:<16} {:<14} {med:>10.1} MB/s {iops:>10.0} IOPS   ({:.0}-{:.0})",
        t.name,
        mb[0],
        mb[mb.len() - 1]
    );
    med
}

/// Child: `info PATH` runs `disk::info`, `open PATH` opens the chain writable and reads 4 KiB;
/// prints the in-process time in seconds.
fn child(mode: &str) {
    let (op, path) = mode.split_once(' ').unwrap();
    let start = Instant::now();
    match op {
        "info" => {
            let i = disk::info(Path::new(path)).unwrap();
            assert!(!i.layers.is_empty());
        }
        _ => {
            let c = Chain::open(path, OpenOptions::default()).unwrap();
            let mut b = vec![0u8; 4096];
            c.read_at(123 << 30, &mut b).unwrap();
        }
    }
    let t = start.elapsed().as_secs_f64();
    let hwm = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    println!("{t} {hwm}");
}

/// Runs `cmd` to its end; returns its wall time, its peak RSS in KiB (from `wait4`) and its
/// stdout.
// The child is reaped by `wait4` (which std's `wait` cannot do: it gives no rusage).
#[allow(clippy::zombie_processes)]
fn measured(cmd: &mut Command) -> (f64, u64, String) {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (not yet reaped: std's handle is never waited on), with
    // pointers to two live locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status:#x})"
    );
    (start.elapsed().as_secs_f64(), ru.ru_maxrss as u64, out)
}

/// A 1 TiB chain of `depth` files (an empty base and empty layers), Strata and qcow2.
fn tib_chains(dir: &Path, depth: usize) -> (PathBuf, PathBuf) {
    let mut s = dir.join(format!("t{depth}-0.strata"));
    create_empty(&s, TIB, CreateOptions::default()).unwrap();
    let mut q = dir.join(format!("t{depth}-0.qcow2"));
    qemu(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1T"]);
    for i in 1..depth {
        let (ns, nq) = (
            dir.join(format!("t{depth}-{i}.strata")),
            dir.join(format!("t{depth}-{i}.qcow2")),
        );
        create_layer(&s, &ns).unwrap();
        qcow2_over(&q, "qcow2", &nq);
        (s, q) = (ns, nq);
    }
    (s, q)
}

/// Open/info of 1 TiB chains (run first, while this process is small: a child's peak RSS
/// from `wait4` includes what it shared with this process when it was forked).
fn open_cases(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let me = std::env::current_exe().unwrap();
    println!("open and info of a 1 TiB chain (whole process: wall time, peak RSS):");
    let mut tops = Vec::new();
    for depth in [1usize, 32] {
        let (s, q) = tib_chains(dir, depth);
        for op in ["info", "open"] {
            let (wall, rss, out) =
                measured(Command::new(&me).env(CHILD, format!("{op} {}", s.display())));
            let (inner, hwm) = out.trim().split_once(' ').unwrap();
            let inner: f64 = inner.parse().unwrap();
            let hwm: f64 = hwm.parse().unwrap();
            println!(
                "  strata {op:<4} 1 TiB x {depth:>2}: {:>8.2} ms process, {:>8.2} ms in-process, {:>7.1} MiB peak RSS ({:.1} MiB VmHWM)",
                wall * 1e3,
                inner * 1e3,
                rss as f64 / 1024.0,
                hwm / 1024.0
            );
        }
        let (wall, rss, _) = measured(
            Command::new("qemu-img")
                .args(["info", "--backing-chain"])
                .arg(&q),
        );
        println!(
            "  qemu-img info 1 TiB x {depth:>2}: {:>8.2} ms process, {:>7.1} MiB peak RSS",
            wall * 1e3,
            rss as f64 / 1024.0
        );
        tops.push((s, q));
    }
    tops
}

/// A layer on an open chain, write amplification.
fn v2_cases(dir: &Path, base: &Path, tops: &[(PathBuf, PathBuf)]) {
    println!("a new layer on top of an open 1 TiB x 32 chain:");
    let (s, q) = &tops[1];
    let mut c = Chain::open(s, OpenOptions::default()).unwrap();
    c.write_at(7 << 30, &[1u8; 4096]).unwrap();
    let start = Instant::now();
    c.push_layer(dir.join("t32-top.strata")).unwrap();
    let t = start.elapsed().as_secs_f64();
    drop(c);
    println!("  strata Chain::push_layer:   {:>8.2} ms", t * 1e3);
    let (wall, _, _) = measured(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        q.to_str().unwrap(),
        dir.join("t32-top.qcow2").to_str().unwrap(),
    ]));
    println!(
        "  qemu-img create -b (process): {:>8.2} ms (qemu has no open chain outside QEMU)",
        wall * 1e3
    );

    // Write amplification: random 4 KiB writes (the random-write case's sequence) into a fresh
    // layer above the fully written raw base.
    let count = RND.1 / scale();
    let guest = count * 4096;
    println!(
        "write amplification, {count} random 4 KiB writes into a fresh layer above a full base:"
    );
    let sl = dir.join("wa.strata");
    create_layer(base, &sl).unwrap();
    let b0 = std::fs::metadata(&sl).unwrap().blocks() * 512;
    let mut c = Chain::open(&sl, OpenOptions::default()).unwrap();
    let before = c.bytes_written(1);
    let buf = vec![0x5au8; 4096];
    let mut off = 0u64;
    for _ in 0..count {
        c.write_at(off, &buf).unwrap();
        off = (off + RND_STEP) % image_size();
    }
    c.flush().unwrap();
    let written = c.bytes_written(1) - before;
    drop(c);
    let b1 = std::fs::metadata(&sl).unwrap().blocks() * 512;
    println!(
        "  strata: {:.3} bytes written to the layer per guest byte; {:.3} (blocks the file gained per guest byte)",
        written as f64 / guest as f64,
        (b1 - b0) as f64 / guest as f64
    );
    for (name, opts) in [
        ("qcow2", "cluster_size=64k"),
        ("qcow2 extended_l2", "cluster_size=64k,extended_l2=on"),
    ] {
        let ql = dir.join(format!("wa-{}.qcow2", name.len()));
        qemu(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            ql.to_str().unwrap(),
        ]);
        let b0 = std::fs::metadata(&ql).unwrap().blocks() * 512;
        let t = Test {
            name: "rand write 4K",
            size: 4096,
            count,
            step: RND_STEP,
            write: true,
        };
        qemu_run(&ql, "qcow2", t);
        let b1 = std::fs::metadata(&ql).unwrap().blocks() * 512;
        println!(
            "  {name}: {:.3} (blocks the file gained per guest byte)",
            (b1 - b0) as f64 / guest as f64
        );
    }
    println!();
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD) {
        child(&mode);
        return;
    }
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
    let tops = open_cases(dir);
    let base = dir.join("base.raw");
    make_base(&base);
    v2_cases(dir, &base, &tops);

    // (label, results per test in MB/s)
    let mut results: Vec<(String, Vec<f64>)> = Vec::new();
    for depth in [0usize, 1, 32] {
        let (label_s, label_q) = if depth == 0 {
            ("strata raw".to_string(), "qemu raw".to_string())
        } else {
            (format!("strata d{depth}"), format!("qcow2 d{depth}"))
        };
        // runs[test] = (Strata MB/s, qemu MB/s) per repetition.
        let mut runs = vec![Vec::new(); tests.len()];
        for rep in 0..reps() {
            // Fresh images each repetition, since the write cases change them.
            let s_top = if depth == 0 {
                let s = dir.join(format!("raw-s{rep}.raw"));
                std::fs::copy(&base, &s).unwrap();
                s
            } else {
                strata_chain(dir, &base, depth, rep)
            };
            let (q_top, q_fmt) = if depth == 0 {
                let q = dir.join(format!("raw-q{rep}.raw"));
                std::fs::copy(&base, &q).unwrap();
                (q, "raw")
            } else {
                (qcow2_chain(dir, &base, depth, rep), "qcow2")
            };
            for (i, t) in tests.iter().enumerate() {
                runs[i].push((
                    mbps(*t, strata_run(&s_top, *t)),
                    mbps(*t, qemu_run(&q_top, q_fmt, *t)),
                ));
            }
            // The tops hold what was written: give the space and page cache back.
            std::fs::remove_file(&s_top).unwrap();
            std::fs::remove_file(&q_top).unwrap();
        }
        println!("depth {depth} (median of {} runs, min-max):", reps());
        let (mut rs, mut rq) = (Vec::new(), Vec::new());
        for (t, r) in tests.iter().zip(&runs) {
            rs.push(row(&label_s, *t, r.iter().map(|x| x.0).collect()));
            rq.push(row(&label_q, *t, r.iter().map(|x| x.1).collect()));
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
    // The same data folded the other way (a checkpoint delete's into-child merge): a hidden
    // layer holding it folds into an empty child layer.
    let hidden = dir.join("h.strata");
    let child = dir.join("hc.strata");
    create_layer(&base, &hidden).unwrap();
    let mut c = Chain::open(&hidden, OpenOptions::default()).unwrap();
    for i in 0..merged_mib {
        c.write_at(i * 2 * (1 << 20), &buf).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    create_layer(&hidden, &child).unwrap();
    let mut c = Chain::open(&child, OpenOptions::default()).unwrap();
    let start = Instant::now();
    c.merge(1, MergeDirection::IntoChild, &mut |_, _| {})
        .unwrap();
    c.flush().unwrap();
    let s = start.elapsed().as_secs_f64();
    drop(c);
    println!(
        "merge: strata layer ({merged_mib} MiB) into its child layer: {:.1} MB/s ({s:.2} s, incl. fdatasync)",
        merged_mb / s
    );
    // Against the raw sequential write speed of the same file system: the same bytes in 1 MiB
    // writes to a new raw file, then fdatasync.
    let raw = dir.join("seq.raw");
    let f = std::fs::File::create(&raw).unwrap();
    let start = Instant::now();
    for i in 0..merged_mib {
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, i * (1 << 20)).unwrap();
    }
    f.sync_data().unwrap();
    let s = start.elapsed().as_secs_f64();
    println!(
        "raw sequential write ({merged_mib} MiB, 1 MiB writes, fdatasync): {:.1} MB/s ({s:.2} s)",
        merged_mb / s
    );
    let q = dir.join("m.qcow2");
    qcow2_over(&base, "raw", &q);
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
