//! The seed of every randomised test in `disk`, in one place.
//!
//! The property tests (`src/format.rs`, `tests/model.rs`), the crash tests (`tests/crash.rs`)
//! and the fuzz smoke test (`fuzz/tests/smoke.rs`) take their seed from the environment
//! variable `STRATA_TEST_SEED` (decimal, or hex with `0x`) when it is set, and pick a random one
//! otherwise. The seed is printed as `seed = N (replay with STRATA_TEST_SEED=N)`: libtest tests
//! print it at their start (libtest shows a test's output only when it fails), the crash tests
//! put it in their failure message. Replay a failure with, for example,
//! `STRATA_TEST_SEED=N cargo test -p disk --test model chain_over_raw_base`.
//!
//! This file is shared, not copied: `mod common;` in `tests/*.rs`, `#[path]` from `src/lib.rs`
//! (unit tests) and from `fuzz/tests/`.

// Not every includer uses every item.
#![allow(dead_code)]

/// The environment variable that fixes the seed.
pub const SEED_VAR: &str = "STRATA_TEST_SEED";

/// The seed from `STRATA_TEST_SEED`, or a random one. Panics (this is test code) when the
/// variable is set but is not a number, rather than silently testing something else.
pub fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(v) => parse(&v)
            .unwrap_or_else(|| panic!("{SEED_VAR}={v:?} is not a seed (a u64, decimal or 0x-hex)")),
        Err(std::env::VarError::NotPresent) => random(),
        Err(std::env::VarError::NotUnicode(v)) => panic!("{SEED_VAR}={v:?} is not a seed"),
    }
}

/// [`seed`], printed on stdout with how to replay it; for libtest tests, which show a test's
/// stdout when it fails.
pub fn announce() -> u64 {
    let s = seed();
    println!("{}", replay_hint(s));
    s
}

/// `seed = N (replay with STRATA_TEST_SEED=N)`.
pub fn replay_hint(seed: u64) -> String {
    format!("seed = {seed} (replay with {SEED_VAR}={seed})")
}

fn parse(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// A fresh random seed from std's per-process hash keys and the clock (no dependency needed).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(t);
    h.write_u32(std::process::id());
    h.finish()
}

/// A small deterministic generator (SplitMix64): the same seed gives the same sequence, and
/// every seed, 0 included, is a good one.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator that starts from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
