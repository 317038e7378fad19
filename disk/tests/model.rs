//! Property test: random reads, writes, write-zeroes, discards, flushes, reopens, layer
//! creations and online merges in both directions against an in-memory model of the disk.
//! After every operation the whole chain must read what the model says. Ranges are often
//! smaller than a cluster and unaligned, so writes, write-zeroes and discards hit single
//! sub-clusters and partial ones; one test runs with caches of one table and one cluster, so
//! every lookup goes through eviction and reload (memory pressure) and writes flush by
//! themselves when changed tables pile up.
//!
//! Seeded: each test prints `seed = N (replay with STRATA_TEST_SEED=N)` (shown when it fails);
//! run it again with `STRATA_TEST_SEED=N` to replay the same cases (see `common/mod.rs`).

// Test code: helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use disk::{
    create_empty, create_layer, CacheLimits, Chain, CreateOptions, MergeDirection, OpenOptions,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

mod common;

const SIZE: u64 = 64 * 4096 + 1024; // 33 clusters of 8 KiB (512-byte sub-clusters), the last partial
const CLUSTER_BITS: u32 = 13;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
    NewLayer,
    /// Merge layer `pick % depth` (clamped to a valid one) into its parent or child, in
    /// `steps`-cluster steps, writing between steps when `write_between`.
    Merge {
        pick: usize,
        into_child: bool,
        steps: u64,
        write_between: bool,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Sector-aligned starts, any length.
        (0..SIZE, 1..20_000u64).prop_map(|(o, l)| {
            let o = o & !511;
            (o, l.min(SIZE - o).max(1))
        }),
        // Small and unaligned: inside one sub-cluster or across two or three.
        (0..SIZE, 1..9000u64).prop_map(|(o, l)| (o, l.min(SIZE - o).max(1))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => Just(Op::NewLayer),
        2 => (any::<usize>(), any::<bool>(), 1..40u64, any::<bool>())
            .prop_map(|(pick, into_child, steps, write_between)| Op::Merge { pick, into_child, steps, write_between }),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((off + i) % 253) as u8) | 1)
        .collect()
}

struct Harness {
    dir: PathBuf,
    chain: Option<Chain>,
    model: Vec<u8>,
    n: usize,
    tiny: bool,
}

impl Harness {
    fn open(&self, top: &std::path::Path) -> Chain {
        let mut c = Chain::open(top, OpenOptions::default()).unwrap();
        if self.tiny {
            c.set_cache_limits(CacheLimits {
                l2_bytes: 1,
                resolved_clusters: 1,
            });
        }
        c
    }

    fn chain(&mut self) -> &mut Chain {
        self.chain.as_mut().unwrap()
    }

    fn verify(&self) -> Result<(), TestCaseError> {
        let c = self.chain.as_ref().unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        c.read_at(0, &mut buf).unwrap();
        for (i, (a, b)) in buf.iter().zip(&self.model).enumerate() {
            prop_assert_eq!(a, b, "byte {} differs (depth {})", i, c.depth());
        }
        Ok(())
    }

    fn write(&mut self, off: u64, len: u64, seed: u8) {
        let data = pattern(seed, off, len);
        self.chain().write_at(off, &data).unwrap();
        self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Write { off, len, seed } => self.write(off, len, seed),
            Op::Zero { off, len } => {
                self.chain().write_zeroes(off, len).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                self.chain().discard(off, len).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let mut b = vec![0u8; len as usize];
                self.chain().read_at(off, &mut b).unwrap();
                prop_assert_eq!(&b[..], &self.model[off as usize..(off + len) as usize]);
            }
            Op::Flush => self.chain().flush().unwrap(),
            Op::Reopen => {
                let top = self.chain().top_path().to_path_buf();
                self.chain = None;
                self.chain = Some(self.open(&top));
            }
            Op::NewLayer => {
                if self.chain().depth() >= 8 {
                    return Ok(());
                }
                let top = self.chain().top_path().to_path_buf();
                self.chain = None;
                self.n += 1;
                let new = self.dir.join(format!("l{}.strata", self.n));
                create_layer(&top, &new).unwrap();
                self.chain = Some(self.open(&new));
            }
            Op::Merge {
                pick,
                into_child,
                steps,
                write_between,
            } => {
                let depth = self.chain().depth();
                let (layer, dir) = if into_child {
                    if depth < 2 {
                        return Ok(());
                    }
                    (pick % (depth - 1), MergeDirection::IntoChild)
                } else {
                    if depth < 2 {
                        return Ok(());
                    }
                    (1 + pick % (depth - 1), MergeDirection::IntoParent)
                };
                self.chain().begin_merge(layer, dir).unwrap();
                let mut k = 0u64;
                loop {
                    let p = self.chain().merge_step(steps).unwrap();
                    if p.finished {
                        break;
                    }
                    // A few guest writes during the merge (a guest that writes faster than the
                    // merge copies would keep a fold of the top layer going forever).
                    if write_between && k < 4 {
                        k += 1;
                        let off = (k * 7919 * 512) % (SIZE - 600);
                        self.write(off, 600, k as u8);
                    }
                    self.verify()?;
                }
                prop_assert_eq!(self.chain().depth(), depth - 1);
            }
        }
        self.verify()
    }
}

fn run(ops: &[Op], raw_base: bool, tiny: bool) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let base: PathBuf = if raw_base {
        let p = d.path().join("base.img");
        model = pattern(77, 0, SIZE);
        std::fs::write(&p, &model).unwrap();
        p
    } else {
        let p = d.path().join("base.strata");
        create_empty(
            &p,
            SIZE,
            CreateOptions {
                cluster_bits: Some(CLUSTER_BITS),
            },
        )
        .unwrap();
        p
    };
    let top = if raw_base {
        let t = d.path().join("l0.strata");
        // A layer over a raw base takes the default 64 KiB clusters.
        create_layer(&base, &t).unwrap();
        t
    } else {
        base
    };
    let mut h = Harness {
        dir: d.path().to_path_buf(),
        chain: None,
        model,
        n: 0,
        tiny,
    };
    h.chain = Some(h.open(&top));
    for op in ops {
        h.apply(op)?;
    }
    // Everything survives a clean close and a check.
    let top = h.chain().top_path().to_path_buf();
    h.chain = None;
    let report = disk::check(&top, false).unwrap();
    prop_assert!(report.is_clean(), "{:?}", report);
    h.chain = Some(h.open(&top));
    h.verify()?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(common::announce()),
        ..ProptestConfig::default()
    })]

    #[test]
    fn chain_over_strata_base_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(&ops, false, false)?;
    }

    #[test]
    fn chain_with_tiny_caches_matches_model(ops in proptest::collection::vec(op(), 1..40), raw in any::<bool>()) {
        run(&ops, raw, true)?;
    }

    #[test]
    fn chain_over_raw_base_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
        run(&ops, true, false)?;
    }
}
