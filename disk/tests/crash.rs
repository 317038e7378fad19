//! Crash tests. The test binary re-executes itself as a child process that writes and flushes,
//! or merges, and reports on stdout; the parent SIGKILLs it at a random moment, then checks the
//! files and verifies the data.
//!
//! SIGKILL leaves the page cache intact, so this tests the process-crash half of the contract
//! (every write completed before the last flush is there, check is clean); the power-loss half
//! rests on the write ordering argued in FORMAT.md ("Crash consistency").
//!
//! This target has its own `main` (`harness = false` in Cargo.toml): when the environment
//! variable [`CHILD`] is set it is the child and runs until killed; otherwise it runs the tests
//! through libtest-mimic, which takes libtest's arguments (`--list`, filters, `--exact`, ...) and
//! prints the usual `test result:` line. So the child is never a test of its own, and its output
//! goes to its parent through pipes, never to the terminal.
//!
//! Seeded: every random choice (the operations of the children, which layer to merge, when to
//! kill) comes from one seed, `STRATA_TEST_SEED` if set, else random (see `common/mod.rs`). A
//! failure message ends with `seed = N (replay with STRATA_TEST_SEED=N)`; replaying repeats the
//! same operations, though the kill lands where the clock puts it, so not always in the same
//! place.

// Test code: helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Rng;
use disk::{check, create_layer, Chain, MergeDirection, OpenOptions};
use libtest_mimic::{Arguments, Failed, Trial};

/// Set (to `write` or `merge`) in the environment of a child; the other parameters of the child
/// are in the variables below.
const CHILD: &str = "STRATA_DISK_CRASH_CHILD";
const CHILD_PATH: &str = "STRATA_DISK_CRASH_PATH";
const CHILD_SEED: &str = "STRATA_DISK_CRASH_SEED";
const SEQ_BASE: &str = "STRATA_DISK_CRASH_SEQ_BASE";
const MERGE_LAYER: &str = "STRATA_DISK_CRASH_MERGE_LAYER";
const MERGE_DIR: &str = "STRATA_DISK_CRASH_MERGE_DIR";
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 512; // a 2 MiB disk: 32 clusters of 64 KiB

fn main() {
    if let Ok(mode) = std::env::var(CHILD) {
        match mode.as_str() {
            "write" => write_child(),
            "merge" => merge_child(),
            _ => panic!("{CHILD}={mode:?}: expected write or merge"),
        }
    }
    let args = Arguments::from_args();
    let trials = vec![
        trial(
            "sigkill_during_writes_loses_no_flushed_write",
            sigkill_during_writes_loses_no_flushed_write,
        ),
        trial(
            "sigkill_during_merge_leaves_a_chain_that_reads_the_same",
            sigkill_during_merge_leaves_a_chain_that_reads_the_same,
        ),
    ];
    libtest_mimic::run(&args, trials).exit()
}

/// A test that gets its seed when it starts and names it when it fails (libtest-mimic does not
/// capture output, so the seed goes in the failure message rather than on stdout).
fn trial(name: &'static str, test: fn(u64)) -> Trial {
    Trial::test(name, move || {
        let seed = common::seed();
        std::panic::catch_unwind(move || test(seed)).map_err(|payload| {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Failed::from(format!("{msg}\n{}", common::replay_hint(seed)))
        })
    })
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child: {name} is not set"))
}

/// Block content written by write number `seq` (0 = zeroes).
fn block(seq: u64, b: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BLOCK as usize];
    }
    (0..BLOCK / 8)
        .flat_map(|w| ((seq << 24) ^ (b << 12) ^ w).to_le_bytes())
        .collect()
}

/// Child: random writes, write-zeroes and discards of whole blocks, flushing now and then.
/// Prints `W seq first count zero` before each write (`zero` is 1 for write-zeroes and
/// discards) and `F seq` after each flush that covered writes up to seq. Runs until killed.
fn write_child() -> ! {
    let first_seq: u64 = env(SEQ_BASE).parse().unwrap();
    let mut rng = Rng::new(env(CHILD_SEED).parse().unwrap());
    let mut chain = Chain::open(env(CHILD_PATH), OpenOptions::default()).unwrap();
    if rng.one_in(2) {
        // Memory pressure: tables evicted and reloaded, writes that flush by themselves.
        chain.set_cache_limits(disk::CacheLimits {
            l2_bytes: 1,
            resolved_clusters: 1,
        });
    }
    let mut out = std::io::stdout();
    let mut seq = first_seq;
    loop {
        seq += 1;
        let b = rng.below(BLOCKS);
        let n = (1 + rng.below(24)).min(BLOCKS - b);
        let kind = rng.below(10);
        writeln!(out, "W {seq} {b} {n} {}", u8::from(kind >= 8)).unwrap();
        out.flush().unwrap();
        if kind < 8 {
            let data: Vec<u8> = (b..b + n).flat_map(|x| block(seq, x)).collect();
            chain.write_at(b * BLOCK, &data).unwrap();
        } else if kind == 8 {
            chain.write_zeroes(b * BLOCK, n * BLOCK).unwrap();
        } else {
            chain.discard(b * BLOCK, n * BLOCK).unwrap();
        }
        if rng.one_in(4) {
            chain.flush().unwrap();
            writeln!(out, "F {seq}").unwrap();
            out.flush().unwrap();
        }
    }
}

/// Runs a child (`mode` and its environment) until it is killed `kill_after_ms` after its first
/// report; returns its report lines. Fails if the child dies of anything but that kill.
fn run_and_kill(mode: &str, env: &[(&str, String)], kill_after_ms: u64) -> Vec<String> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD, mode);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Start the clock at the child's first report, so the kill lands mid-work.
    let first = rx.recv_timeout(Duration::from_secs(30));
    if first.is_ok() {
        std::thread::sleep(Duration::from_millis(kill_after_ms));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let errors = errors.join().unwrap();
    let Ok(first) = first else {
        panic!("{mode} child never reported ({status}); its stderr:\n{errors}");
    };
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{mode} child ended by itself ({status}) before it was killed; its stderr:\n{errors}"
    );
    std::iter::once(first).chain(rx.try_iter()).collect()
}

/// The two tests spawn children while holding exclusive locks; a child forked by one test
/// carries the other's lock until it execs, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sigkill_during_writes_loses_no_flushed_write(seed: u64) {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.img");
    let mut expect: Vec<u64> = (0..BLOCKS).map(|b| 1_000_000 + b).collect(); // seq per block
    let base_data: Vec<u8> = (0..BLOCKS)
        .flat_map(|b| block(expect[b as usize], b))
        .collect();
    std::fs::write(&base, base_data).unwrap();
    let top = d.path().join("top.strata");
    create_layer(&base, &top).unwrap();
    let mut rng = Rng::new(seed);
    let iterations: u64 = 80;
    let mut total_writes = 0;
    for it in 0..iterations {
        let seq_base = (it + 1) << 32;
        let lines = run_and_kill(
            "write",
            &[
                (CHILD_PATH, top.display().to_string()),
                (SEQ_BASE, seq_base.to_string()),
                (CHILD_SEED, rng.next().to_string()),
            ],
            5 + rng.below(150),
        );
        // Parse: per block, the writes in order; and the last flushed seq.
        let mut writes: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut flushed = 0u64;
        for l in &lines {
            let f: Vec<u64> = l[2..].split(' ').map(|x| x.parse().unwrap()).collect();
            match &l[..1] {
                "W" => {
                    total_writes += 1;
                    let content = if f[3] == 1 { 0 } else { f[0] };
                    for b in f[1]..f[1] + f[2] {
                        writes.entry(b).or_default().push(content);
                        // Remember the issuing seq too, to know which writes were flushed.
                        writes.entry(b + (1 << 40)).or_default().push(f[0]);
                    }
                }
                "F" => flushed = f[0],
                _ => panic!("bad line {l}"),
            }
        }
        let report = check(&top, false).unwrap();
        assert!(
            report.is_clean(),
            "iteration {it}: check found corruption: {report:?}"
        );
        let chain = Chain::open(
            &top,
            OpenOptions {
                read_only: true,
                format: None,
            },
        )
        .unwrap_or_else(|e| panic!("iteration {it}: {}", disk::error_chain(&e)));
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..BLOCKS {
            chain.read_at(b * BLOCK, &mut buf).unwrap();
            let contents = writes.get(&b).cloned().unwrap_or_default();
            let seqs = writes.get(&(b + (1 << 40))).cloned().unwrap_or_default();
            // The newest flushed write (or what the block held before), then any later one.
            let last_flushed = seqs.iter().rposition(|&s| s <= flushed);
            let mut ok: Vec<u64> = match last_flushed {
                Some(i) => contents[i..].to_vec(),
                None => std::iter::once(expect[b as usize])
                    .chain(contents.iter().copied())
                    .collect(),
            };
            ok.dedup();
            let got = ok.iter().copied().find(|&s| block(s, b) == buf);
            let Some(s) = got else {
                let w = u64::from_le_bytes(buf[..8].try_into().unwrap());
                panic!("iteration {it}: block {b} holds none of {ok:?} (flushed up to {flushed}); it holds seq {} (word {w:#x})", w >> 24);
            };
            expect[b as usize] = s;
        }
    }
    assert!(
        total_writes > iterations * 5,
        "children did too little work: {total_writes}"
    );
}

/// Child: merges the layer named by MERGE_LAYER in MERGE_DIR, one cluster per step with a
/// pause, so the parent's kill lands inside it; then waits to be killed.
fn merge_child() -> ! {
    let layer = PathBuf::from(env(MERGE_LAYER));
    let into_child = env(MERGE_DIR) == "child";
    let mut chain = Chain::open(env(CHILD_PATH), OpenOptions::default()).unwrap();
    let idx = chain.layer_index(&layer).unwrap();
    let dir = if into_child {
        MergeDirection::IntoChild
    } else {
        MergeDirection::IntoParent
    };
    println!("B");
    chain.begin_merge(idx, dir).unwrap();
    loop {
        let p = chain.merge_step(1).unwrap();
        println!("S {} {}", p.done, p.total);
        if p.finished {
            break;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    println!("D");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// base.img <- l1 <- l2 <- l3, with overlapping writes and zeroes in every layer.
fn build_chain(d: &Path, rng: &mut Rng) -> Vec<PathBuf> {
    let base = d.join("base.img");
    let data: Vec<u8> = (0..BLOCKS).flat_map(|b| block(7, b)).collect();
    std::fs::write(&base, data).unwrap();
    let mut paths = vec![base];
    for i in 1..=3 {
        let p = d.join(format!("l{i}.strata"));
        create_layer(paths.last().unwrap(), &p).unwrap();
        let mut c = Chain::open(&p, OpenOptions::default()).unwrap();
        for _ in 0..12 {
            let b = rng.below(BLOCKS - 40);
            let n = 1 + rng.below(40);
            if rng.below(5) == 0 {
                c.write_zeroes(b * BLOCK, n * BLOCK).unwrap();
            } else {
                let data: Vec<u8> = (b..b + n)
                    .flat_map(|x| block(100 + rng.below(1000), x))
                    .collect();
                c.write_at(b * BLOCK, &data).unwrap();
            }
        }
        drop(c);
        paths.push(p);
    }
    paths
}

fn read_all(top: &Path) -> Vec<u8> {
    let c = Chain::open(
        top,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )
    .unwrap_or_else(|e| panic!("{}", disk::error_chain(&e)));
    let mut b = vec![0u8; c.virtual_size() as usize];
    c.read_at(0, &mut b).unwrap();
    b
}

fn sigkill_during_merge_leaves_a_chain_that_reads_the_same(seed: u64) {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::new(seed);
    // (layer to merge, into child?) over base.img <- l1 <- l2 <- l3.
    let cases = [
        (1, false),
        (2, false),
        (3, false),
        (1, true),
        (2, true),
        (0, true),
    ];
    for it in 0..36 {
        let d = tempfile::tempdir().unwrap();
        let paths = build_chain(d.path(), &mut rng);
        let top = paths[3].clone();
        let before = read_all(&top);
        let (layer, into_child) = cases[it % cases.len()];
        let lines = run_and_kill(
            "merge",
            &[
                (CHILD_PATH, top.display().to_string()),
                (MERGE_LAYER, paths[layer].display().to_string()),
                (
                    MERGE_DIR,
                    if into_child { "child" } else { "parent" }.to_string(),
                ),
            ],
            rng.below(60),
        );
        // Folding the top into its parent makes the parent the new top once committed.
        let now_top = if top.exists() {
            top.clone()
        } else {
            paths[2].clone()
        };
        let report = check(&now_top, false).unwrap();
        assert!(report.is_clean(), "case {it} ({lines:?}): {report:?}");
        assert!(
            read_all(&now_top) == before,
            "case {it}: data changed after a killed merge ({} lines)",
            lines.len()
        );
        // Running the merge again (if it had not committed) completes it.
        let still_there = Chain::open(
            &now_top,
            OpenOptions {
                read_only: true,
                format: None,
            },
        )
        .unwrap()
        .layer_index(&paths[layer])
        .is_some();
        if still_there {
            disk::merge(
                &paths[layer],
                Some(&now_top),
                if into_child {
                    MergeDirection::IntoChild
                } else {
                    MergeDirection::IntoParent
                },
                &mut |_, _| {},
            )
            .unwrap_or_else(|e| panic!("case {it}: rerun: {}", disk::error_chain(&e)));
            let now_top = if now_top.exists() {
                now_top
            } else {
                paths[2].clone()
            };
            assert!(
                read_all(&now_top) == before,
                "case {it}: data changed after re-running the merge"
            );
            assert!(check(&now_top, false).unwrap().is_clean());
        }
    }
}
