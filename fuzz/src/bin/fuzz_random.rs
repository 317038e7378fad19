//! A seeded random driver with a time budget, for long runs without instrumentation:
//!
//! ```sh
//! cargo run --release -p strata-fuzz --bin fuzz-random -- TARGET [--seconds N] [--seed N]
//! cargo run --release -p strata-fuzz --bin fuzz-random -- TARGET --replay FILE
//! cargo run --release -p strata-fuzz --bin fuzz-random -- --list
//! ```
//!
//! It keeps a small pool of inputs (random ones and mutations of earlier ones), runs the
//! target on each, and on a failure saves the input under `fuzz/findings/` (or `--out DIR`),
//! prints the file and exits 1. At the end it prints the executions, the rate and the seed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use strata_fuzz::targets::by_name;
use strata_fuzz::{seed_from_env, Rng, TARGETS};

const POOL: usize = 256;

fn usage() -> ExitCode {
    eprintln!(
        "usage: fuzz-random TARGET [--seconds N] [--seed N] [--out DIR] | TARGET --replay FILE | --list"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for t in TARGETS {
            println!("{:20} {}", t.name, t.what);
        }
        return ExitCode::SUCCESS;
    }
    let Some(target) = args.first().and_then(|n| by_name(n)) else {
        return usage();
    };
    let mut seconds = 60u64;
    let mut seed = seed_from_env();
    let mut out = PathBuf::from("fuzz/findings");
    let mut replay = None;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let v = it.next();
        match (a.as_str(), v) {
            ("--seconds", Some(v)) => seconds = v.parse().unwrap_or(seconds),
            ("--seed", Some(v)) => seed = v.parse().unwrap_or(seed),
            ("--out", Some(v)) => out = PathBuf::from(v),
            ("--replay", Some(v)) => replay = Some(PathBuf::from(v)),
            _ => return usage(),
        }
    }
    if let Some(file) = replay {
        let data = match std::fs::read(&file) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        (target.run)(&data);
        println!("{}: {} ran without failing", target.name, file.display());
        return ExitCode::SUCCESS;
    }
    // Panics are reported by this driver, with the input; the hook's message is enough.
    let mut rng = Rng::new(seed);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let started = Instant::now();
    let budget = Duration::from_secs(seconds);
    let mut execs = 0u64;
    let mut last_report = Instant::now();
    while started.elapsed() < budget {
        let input = if !pool.is_empty() && rng.below(4) != 0 {
            let mut v = pool[rng.below(pool.len())].clone();
            rng.mutate(&mut v, target.max_len);
            v
        } else {
            rng.input(target.max_len)
        };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            let _ = std::fs::create_dir_all(&out);
            let file = out.join(format!("{}-seed{seed}-exec{execs}.bin", target.name));
            let _ = std::fs::write(&file, &input);
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!(
                "{}: FAILED after {execs} executions: {why}\ninput saved to {}",
                target.name,
                file.display()
            );
            return ExitCode::from(1);
        }
        execs += 1;
        if pool.len() < POOL {
            pool.push(input);
        } else if rng.below(8) == 0 {
            let i = rng.below(POOL);
            pool[i] = input;
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            println!(
                "{}: {execs} executions in {:.0?}",
                target.name,
                started.elapsed()
            );
        }
    }
    let took = started.elapsed();
    println!(
        "{}: {execs} executions in {took:.1?} ({:.0}/s), seed {seed}, no failure",
        target.name,
        execs as f64 / took.as_secs_f64()
    );
    ExitCode::SUCCESS
}
