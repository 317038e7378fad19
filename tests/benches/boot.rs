//! Boot benchmark: how long `strata run` takes from process start to the test guest's first
//! console line, and from process start to exit after an immediate `poweroff`.
//!
//! `cargo bench -p strata-tests --bench boot [-- RUNS]` (default 20 runs each). Prints the
//! median, min and max. This measures; it asserts nothing about speed. `cargo test` runs each
//! case once (see `bench_is_full`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::{bench_is_full, require_kvm, strata_bin};

fn first_line() -> Duration {
    let start = Instant::now();
    let mut child = Command::new(strata_bin())
        .args(["run", "--memory", "512M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let elapsed = start.elapsed();
    assert!(
        line.contains("strata test guest"),
        "unexpected first line {line:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    elapsed
}

fn poweroff() -> Duration {
    let start = Instant::now();
    let mut child = Command::new(strata_bin())
        .args(["run", "--memory", "512M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"poweroff\n")
        .unwrap();
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    assert!(status.success(), "strata exited with {status}");
    elapsed
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let n = samples.len();
    let median = if n % 2 == 1 {
        ms(samples[n / 2])
    } else {
        (ms(samples[n / 2 - 1]) + ms(samples[n / 2])) / 2.0
    };
    println!(
        "{name:<44} median {median:8.1} ms   min {:8.1} ms   max {:8.1} ms   ({n} runs)",
        ms(samples[0]),
        ms(samples[n - 1])
    );
}

fn main() {
    require_kvm();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if bench_is_full() { 20 } else { 1 });
    println!("strata boot benchmark: embedded test guest, 1 vCPU, 512 MiB");
    report(
        "process start -> first console line",
        (0..runs).map(|_| first_line()).collect(),
    );
    report(
        "process start -> exit after poweroff",
        (0..runs).map(|_| poweroff()).collect(),
    );
}
