//! Fuzz entry points for the parsers of Strata's untrusted input, on the stable toolchain.
//!
//! Each target in [`targets`] is a function `run(data: &[u8])` that turns arbitrary bytes into
//! a structured input with the [`arbitrary`] crate and drives one parser with it. A target
//! panics if and only if the code under test breaks its contract (a panic, an invariant the
//! target checks, a bound it exceeds); any other input, however malformed, returns normally.
//! Three drivers run the same functions:
//!
//! - the smoke test (`tests/smoke.rs`, part of `cargo test`): a few thousand seeded random
//!   inputs per target, a few seconds each;
//! - `fuzz-random` (`src/bin/fuzz_random.rs`): the same generator with mutation and a time
//!   budget, for long runs without instrumentation;
//! - the libFuzzer binaries (`fuzz_targets/`, feature `libfuzzer`): coverage-guided, built on
//!   stable with LLVM's sanitizer-coverage pass (`README.md` has the command).

pub mod targets;

pub use targets::TARGETS;

/// A small, fast, seedable generator (SplitMix64) for the smoke test and the random driver.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// An input for a target: random bytes of a random length up to `max_len`, biased to short
    /// ones; sometimes with long runs of one byte (zeroes and 0xff reach other branches than
    /// noise does).
    pub fn input(&mut self, max_len: usize) -> Vec<u8> {
        let len = match self.below(4) {
            0 => self.below(64.min(max_len + 1)),
            1 => self.below(512.min(max_len + 1)),
            _ => self.below(max_len + 1),
        };
        let mut v = self.bytes(len);
        if len > 0 && self.below(3) == 0 {
            let fill = [0u8, 0xff, 1][self.below(3)];
            let start = self.below(len);
            let end = start + self.below(len - start + 1);
            v[start..end].fill(fill);
        }
        v
    }

    /// Mutates `v` in place: bit flips, byte pokes, interesting values, splices of random
    /// bytes, truncation or duplication of a range.
    pub fn mutate(&mut self, v: &mut Vec<u8>, max_len: usize) {
        for _ in 0..=self.below(4) {
            let len = v.len();
            match self.below(7) {
                0 if len > 0 => {
                    let i = self.below(len);
                    v[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    v[i] = self.next_u64() as u8;
                }
                2 if len > 0 => {
                    let i = self.below(len);
                    let vals = [0u8, 1, 0x7f, 0x80, 0xff, 0xfe, 0x10, 0x40];
                    v[i] = vals[self.below(vals.len())];
                }
                3 => {
                    let i = self.below(len + 1);
                    let n = self.below(32);
                    let extra = self.bytes(n);
                    v.splice(i..i, extra);
                }
                4 if len > 0 => {
                    let i = self.below(len);
                    v.truncate(i);
                }
                5 if len > 0 => {
                    let start = self.below(len);
                    let end = start + self.below((len - start).min(64) + 1);
                    let copy = v[start..end].to_vec();
                    let at = self.below(len + 1);
                    v.splice(at..at, copy);
                }
                _ => {
                    let n = self.below(16);
                    let extra = self.bytes(n);
                    v.extend_from_slice(&extra);
                }
            }
        }
        v.truncate(max_len);
    }
}

/// The seed of a randomised run: `STRATA_TEST_SEED` if set (to replay), else from the clock.
pub fn seed_from_env() -> u64 {
    std::env::var("STRATA_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        })
}
