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
    let seeds = seeds(name);
    let mut last = Vec::new();
    for case in 0..target.smoke_inputs {
        // The seeds as they are first, then half fresh inputs, half mutations of the one before
        // or of a seed (they reach further).
        let input = if let Some(seed) = seeds.get(case) {
            seed.clone()
        } else if case % 4 == 2 && !seeds.is_empty() {
            let mut v = seeds[rng.below(seeds.len())].clone();
            let max = v.len() + 64;
            rng.mutate(&mut v, max);
            v
        } else if case % 2 == 1 && !last.is_empty() {
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

/// The inputs in `fuzz/seeds/<target>/`, if any.
fn seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

#[test]
fn snapshot_seeds_pass_the_restore_checks() {
    // The seed is a real checkpoint's state: it must get through the decoding and the checks,
    // or the target would stop at the first field and fuzz nothing behind it.
    let seeds = seeds("snapshot_state");
    let saved = seeds
        .iter()
        .find_map(|s| serde_json::from_slice::<vmm::checkpoint::SavedVm>(s).ok())
        .expect("a SavedVm seed");
    let config = saved.machine.to_config(&host());
    let caps = vmm::vstate::vcpu::StateCaps {
        msrs: saved.vm.vcpus[0].msrs.iter().map(|m| m.index).collect(),
        xsave_size: 4096,
        refused_msrs: Vec::new(),
    };
    saved.vm.check(&config, &caps).unwrap();
}

fn host() -> vmm::config::VmConfig {
    vmm::config::VmConfig {
        kernel: vmm::config::Kernel::TestGuest,
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory: 64 << 20,
        reboot: false,
        console: vmm::config::ConsoleConfig::None,
        disks: Vec::new(),
        vsock: None,
        api_socket: None,
        checkpoint: Default::default(),
    }
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
