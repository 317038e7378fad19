//! Pause and resume latency through the API: from sending the request to the answer, which
//! the VMM gives once every vCPU is out of the guest (pause) or running again (resume).
//!
//! `cargo build --release --bin strata && cargo bench -p strata-tests --bench lifecycle`
//! (`cargo test` runs it with two rounds, see `bench_is_full`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::{Client, LifecycleAction};
use strata_tests::{bench_is_full, require_kvm, strata_bin};

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<34} median {:8.0} us   min {:8.0} us   max {:8.0} us   ({} runs)",
        us(v[v.len() / 2]),
        us(v[0]),
        us(v[v.len() - 1]),
        v.len()
    );
}

fn main() {
    require_kvm();
    let rounds = if bench_is_full() { 50 } else { 2 };
    for vcpus in ["1", "4"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let mut child = Command::new(strata_bin())
            .args([
                "run",
                "--memory",
                "256M",
                "--console",
                "none",
                "--vcpus",
                vcpus,
                "--api-socket",
            ])
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let c = loop {
            if let Ok(c) = Client::new(&sock) {
                if c.vm().is_ok() {
                    break c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the API socket did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            c.lifecycle(LifecycleAction::Pause).unwrap();
            pause.push(t.elapsed());
            let t = Instant::now();
            c.lifecycle(LifecycleAction::Resume).unwrap();
            resume.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("test guest, {vcpus} vCPU(s), idle in hlt:");
        stats("  pause (request -> all stopped)", pause);
        stats("  resume", resume);
        let _ = child.kill();
        let _ = child.wait();
    }
}
