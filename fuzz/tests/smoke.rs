//! The fuzz targets' smoke run, part of `cargo test`: every target over a few thousand seeded
//! random inputs (and each one's mutations), each target within a time budget. A failing input
//! is saved to `$TMPDIR/strata-fuzz-<target>-seed<N>-case<K>.bin`, which any driver replays
//! (`cargo run -p strata-fuzz --bin fuzz-random -- TARGET --replay FILE`); the seed is printed
//! and `STRATA_TEST_SEED=N` replays the whole run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use strata_fuzz::targets::{by_name, Target};
use strata_fuzz::{seed_from_env, Rng};

/// What one target may take in a debug build (its inputs are sized to take well under this).
const BUDGET: Duration = Duration::from_secs(20);

fn smoke(name: &str) {
    let target: &Target = by_name(name).expect("a target of that name");
    let seed = seed_from_env();
    println!("{name}: seed = {seed} (replay with STRATA_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut last = Vec::new();
    for case in 0..target.smoke_inputs {
        // Half fresh inputs, half mutations of the one before (they reach further).
        let input = if case % 2 == 1 && !last.is_empty() {
            let mut v = last.clone();
            rng.mutate(&mut v, target.max_len);
            v
        } else {
            rng.input(target.max_len)
        };
        let run = target.run;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&input))) {
            let file =
                std::env::temp_dir().join(format!("strata-fuzz-{name}-seed{seed}-case{case}.bin"));
            let _ = std::fs::write(&file, &input);
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{name}: input {case} of seed {seed} failed: {why}; saved to {}",
                file.display()
            );
        }
        last = input;
    }
    let took = started.elapsed();
    println!("{name}: {} inputs in {took:?}", target.smoke_inputs);
    assert!(
        took < BUDGET,
        "{name}: {} inputs took {took:?}, over the {BUDGET:?} budget",
        target.smoke_inputs
    );
}

#[test]
fn disk_header_table_survives_random_inputs() {
    smoke("disk_header_table");
}

#[test]
fn disk_chain_open_survives_crafted_files() {
    smoke("disk_chain_open");
}

#[test]
fn snapshot_state_survives_random_inputs() {
    smoke("snapshot_state");
}

#[test]
fn virtio_blk_survives_random_chains() {
    smoke("virtio_blk");
}

#[test]
fn vsock_survives_random_packets_and_clients() {
    smoke("vsock_packets");
}

#[test]
fn agent_protocol_survives_random_lines() {
    smoke("agent_protocol");
}

#[test]
fn api_request_parser_survives_random_requests() {
    smoke("api_request");
}

#[test]
fn every_target_has_a_smoke_test() {
    let names: Vec<&str> = strata_fuzz::TARGETS.iter().map(|t| t.name).collect();
    let this = include_str!("smoke.rs");
    for n in names {
        assert!(
            this.contains(&format!("smoke(\"{n}\")")),
            "{n} has no smoke test"
        );
    }
}
