//! vsock benchmark: round trip of an agent `ping` and echo throughput through the device's
//! Unix-socket backend, with the test guest on the other end.
//!
//! `cargo build --release --bin strata && cargo bench -p strata-tests --bench vsock`
//! (`cargo test` runs it at a small scale, see `bench_is_full`).
//!
//! On PVM the guest side (its driver copies every byte at emulated speed) bounds both numbers;
//! they measure the whole path, not the host side alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::{bench_is_full, require_kvm, strata_bin, vsock_connect};
use vmm::agent::AgentClient;

fn main() {
    require_kvm();
    let full = bench_is_full();
    let pings = if full { 200 } else { 4 };
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut child = Command::new(strata_bin())
        .args(["run", "--memory", "128M", "--console", "none"])
        .arg(format!("--vsock=cid=3,socket={}", uds.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = AgentClient::connect(&uds, Duration::from_secs(10)).unwrap();
    let mut rtt: Vec<Duration> = (0..pings)
        .map(|_| {
            let t = Instant::now();
            agent.ping().unwrap();
            t.elapsed()
        })
        .collect();
    rtt.sort();
    println!(
        "agent ping round trip: median {:.0} us, min {:.0} us, max {:.0} us ({pings} pings)",
        rtt[pings / 2].as_secs_f64() * 1e6,
        rtt[0].as_secs_f64() * 1e6,
        rtt[pings - 1].as_secs_f64() * 1e6
    );

    for conns in [1usize, 4] {
        let per: usize = if full { 4 << 20 } else { 64 << 10 };
        let t = Instant::now();
        let threads: Vec<_> = (0..conns)
            .map(|_| {
                let uds = uds.clone();
                std::thread::spawn(move || {
                    let s = vsock_connect(&uds, 7);
                    let mut w = s.try_clone().unwrap();
                    let writer = std::thread::spawn(move || w.write_all(&vec![0x5a; per]).unwrap());
                    let mut got = vec![0u8; per];
                    let mut r = s;
                    r.read_exact(&mut got).unwrap();
                    writer.join().unwrap();
                    assert!(got.iter().all(|&b| b == 0x5a), "echo changed the data");
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "echo, {conns} connection(s) x {} KiB each way: {:.2} MB/s each way in total",
            per >> 10,
            (conns * per) as f64 / secs / 1e6
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
