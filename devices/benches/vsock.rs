//! Device-level virtio-vsock benchmark: the real device on its own event loop thread, real
//! Unix sockets on the host side, and this program playing the guest driver on
//! host-allocated guest memory (no KVM), through the driver in
//! `devices::virtio::vsock::testing` that the device tests use too.
//!
//! - guest → host: the guest keeps the tx queue stocked with 64 KiB RW packets, within the
//!   credit the device grants (it advertises `CONN_BUF_SIZE` per connection and returns
//!   credit with CREDIT_UPDATE); one host thread per connection reads its Unix socket.
//! - host → guest: one host thread per connection writes its Unix socket; the guest keeps
//!   the rx queue full of 64 KiB buffers, consumes each packet at once and returns credit
//!   with CREDIT_UPDATE as Linux does (advertising 256 KiB, updating once less than one
//!   largest packet of it is left).
//! - round trip: the host writes a 64-byte request and reads the guest's 64-byte answer.
//!
//! The guest sleeps on the device's interrupt eventfd and notifies queues only when the
//! device asks for it, as a driver would. Its own work is kept small (payloads are written
//! once, received payloads are not copied out) so that the device and the sockets dominate;
//! still, guest, device loop and host threads share the machine's cores.
//!
//! `cargo bench -p devices --bench vsock`. `cargo test` runs it too, without the `--bench` flag:
//! then each case runs once on 1/64 of the data (a smoke run that keeps the bench from rotting;
//! its figures mean nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::vsock::packet::{op, Header, HDR_LEN};
use devices::virtio::vsock::testing::{ghdr, Config, Harness};
use devices::virtio::vsock::{MAX_PKT_LEN, QUEUE_SIZE};
use vm_memory::{Bytes, GuestAddress};

/// Payload of a bulk packet.
const PKT: u32 = MAX_PKT_LEN;
/// The guest's receive buffer per connection (Linux's default `buf_alloc`).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Bytes per throughput run of a full run, split evenly between the connections.
const BULK_BYTES: u64 = 1 << 30;
/// Runs per throughput case of a full run; the median is reported.
const RUNS: usize = 5;
/// Round trips measured in a full run (after `RTT_WARMUP` unmeasured ones).
const RTT_COUNT: usize = 5000;
const RTT_WARMUP: usize = 200;

/// By how much a smoke run (`cargo test`, no `--bench` flag) shrinks sizes and counts.
fn scale() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        1
    } else {
        64
    }
}

/// Bytes per throughput run of this run.
fn bulk_bytes() -> u64 {
    BULK_BYTES / scale() as u64
}

/// Runs per throughput case of this run.
fn runs() -> usize {
    RUNS.div_ceil(scale())
}
/// Size of a request and of its answer.
const MSG: usize = 64;
/// How long the guest sleeps on the interrupt before it looks at the rings anyway.
const IRQ_WAIT: Duration = Duration::from_millis(20);

fn config() -> Config {
    Config {
        queue_size: QUEUE_SIZE,
        rx_bufs: QUEUE_SIZE,
        rx_buf_len: HDR_LEN as u32 + PKT,
        tx_slots: QUEUE_SIZE / 2,
        ..Config::default()
    }
}

/// The guest's side of one connection.
struct GuestConn {
    /// Guest port.
    port: u32,
    /// The device's port.
    local: u32,
    /// Guest → host: bytes sent, and the device's credit fields.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Host → guest: bytes consumed, and the count last advertised.
    fwd_cnt: u32,
    last_fwd_cnt: u32,
    /// Bytes still to send (guest → host) or received (host → guest).
    to_send: u64,
    received: u64,
}

impl GuestConn {
    fn new(port: u32, req: &Header) -> Self {
        Self {
            port,
            local: req.src_port,
            tx_cnt: 0,
            peer_buf_alloc: req.buf_alloc,
            peer_fwd_cnt: req.fwd_cnt,
            fwd_cnt: 0,
            last_fwd_cnt: 0,
            to_send: 0,
            received: 0,
        }
    }

    /// Bytes the device can still take.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// A header for a packet to the device, carrying our credit fields.
    fn header(&mut self, op: u16, len: u32) -> Header {
        let mut h = ghdr(op, self.port, self.local);
        h.len = len;
        h.buf_alloc = GUEST_BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt = self.fwd_cnt;
        h
    }

    /// Linux's rule: update the device once less than a largest packet of credit is left.
    fn credit_update_due(&self) -> bool {
        GUEST_BUF_ALLOC - self.fwd_cnt.wrapping_sub(self.last_fwd_cnt) < MAX_PKT_LEN
    }
}

/// Connects `n` host clients to guest ports 1000.., the guest advertising `GUEST_BUF_ALLOC`.
fn connect(h: &mut Harness, n: usize) -> (Vec<GuestConn>, Vec<UnixStream>) {
    (0..n)
        .map(|i| {
            let port = 1000 + i as u32;
            let (s, req) = h.host_connect_req(port, GUEST_BUF_ALLOC);
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            (GuestConn::new(port, &req), s)
        })
        .unzip()
}

/// Takes every filled rx buffer, gives it back and notifies the device once. RW payloads
/// count as consumed at once; `on_rw` sees them. Returns how many buffers were taken.
fn drain_rx(
    h: &mut Harness,
    conns: &mut [GuestConn],
    mut on_rw: impl FnMut(&mut Harness, usize, GuestAddress, u32),
) -> usize {
    let mut n = 0;
    while let Some(b) = h.rx_next() {
        let i = conns
            .iter()
            .position(|c| c.local == b.hdr.src_port && c.port == b.hdr.dst_port)
            .expect("packet for an unknown connection");
        let c = &mut conns[i];
        c.peer_buf_alloc = b.hdr.buf_alloc;
        c.peer_fwd_cnt = b.hdr.fwd_cnt;
        match b.hdr.op {
            op::RW => {
                assert_eq!(b.written, HDR_LEN as u32 + b.hdr.len);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(b.hdr.len);
                c.received += u64::from(b.hdr.len);
                on_rw(h, i, b.payload, b.hdr.len);
            }
            op::CREDIT_UPDATE => {}
            other => panic!("unexpected op {other} from the device"),
        }
        h.rx_return(b.id);
        n += 1;
    }
    if n > 0 {
        h.kick_rx();
    }
    n
}

/// Why the guest went to sleep with data left to send.
#[derive(Default)]
struct Stalls {
    credit: u64,
    slots: u64,
}

struct Bulk {
    mbps: f64,
    /// Guest → host only.
    stalls: Option<Stalls>,
}

/// Guest → host: `bulk_bytes()` over `n` connections.
fn guest_to_host(n: usize) -> Bulk {
    let mut h = Harness::new(config());
    // Payloads are written once: every packet reuses its slot's bytes after the header.
    let pattern: Vec<u8> = (0..PKT).map(|i| (i % 251) as u8).collect();
    for s in 0..h.config().tx_slots {
        let at = h.tx_slot_addr(s) + HDR_LEN as u64;
        h.mem.write_slice(&pattern, GuestAddress(at)).unwrap();
    }
    let (mut conns, streams) = connect(&mut h, n);
    let per_conn = bulk_bytes() / n as u64;
    for c in &mut conns {
        c.to_send = per_conn;
    }
    let readers: Vec<JoinHandle<(Instant, UnixStream)>> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while got < per_conn {
                    let r = s.read(&mut buf).unwrap();
                    assert!(r > 0, "early EOF");
                    got += r as u64;
                }
                // Closed only once every reader is done (EOF would send SHUTDOWN).
                (Instant::now(), s)
            })
        })
        .collect();
    let mut stalls = Stalls::default();
    let start = Instant::now();
    loop {
        let mut progress = h.tx_reap() > 0;
        progress |= drain_rx(&mut h, &mut conns, |_, _, _, _| {}) > 0;
        // One packet per connection per pass, so that they share the queue.
        let mut submitted = false;
        loop {
            let mut any = false;
            for c in conns.iter_mut() {
                let len = c.to_send.min(u64::from(PKT)) as u32;
                if len == 0 || c.credit() < len || h.tx_free() == 0 {
                    continue;
                }
                let hdr = c.header(op::RW, len).to_bytes();
                assert!(h.tx_submit_raw(&hdr, &[(0, HDR_LEN as u32 + len)]));
                c.tx_cnt = c.tx_cnt.wrapping_add(len);
                c.to_send -= u64::from(len);
                any = true;
            }
            if !any {
                break;
            }
            submitted = true;
        }
        if submitted {
            h.kick_tx();
            progress = true;
        }
        let left = conns.iter().any(|c| c.to_send > 0);
        if !left && h.tx_in_flight() == 0 {
            break;
        }
        if !progress {
            if left && h.tx_free() == 0 {
                stalls.slots += 1;
            } else if left {
                stalls.credit += 1;
            }
            h.wait_irq(IRQ_WAIT);
        }
    }
    let (ends, streams): (Vec<Instant>, Vec<UnixStream>) =
        readers.into_iter().map(|r| r.join().unwrap()).unzip();
    drop(streams);
    let end = ends.into_iter().max().unwrap();
    let secs = (end - start).as_secs_f64();
    Bulk {
        mbps: (per_conn * n as u64) as f64 / secs / 1e6,
        stalls: Some(stalls),
    }
}

/// Host → guest: `bulk_bytes()` over `n` connections.
fn host_to_guest(n: usize) -> Bulk {
    let mut h = Harness::new(config());
    let (mut conns, streams) = connect(&mut h, n);
    let per_conn = bulk_bytes() / n as u64 / u64::from(PKT) * u64::from(PKT);
    let start = Instant::now();
    let writers: Vec<JoinHandle<UnixStream>> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let buf: Vec<u8> = (0..PKT).map(|i| (i % 253) as u8).collect();
                let mut sent = 0u64;
                while sent < per_conn {
                    s.write_all(&buf).unwrap();
                    sent += buf.len() as u64;
                }
                // Closed only once the guest has everything (EOF would send SHUTDOWN).
                s
            })
        })
        .collect();
    let total = n as u64 * per_conn;
    loop {
        let mut progress = drain_rx(&mut h, &mut conns, |_, _, _, _| {}) > 0;
        progress |= h.tx_reap() > 0;
        let mut submitted = false;
        for c in conns.iter_mut() {
            if c.credit_update_due() && h.tx_free() > 0 {
                let hdr = c.header(op::CREDIT_UPDATE, 0);
                assert!(h.tx_submit(hdr, &[]));
                submitted = true;
            }
        }
        if submitted {
            h.kick_tx();
            progress = true;
        }
        if conns.iter().map(|c| c.received).sum::<u64>() == total {
            break;
        }
        if !progress {
            h.wait_irq(IRQ_WAIT);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let streams: Vec<UnixStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    drop(streams);
    Bulk {
        mbps: total as f64 / secs / 1e6,
        stalls: None,
    }
}

/// Request/response round trips: the host writes `MSG` bytes, the guest answers with `MSG`.
fn round_trips() -> Vec<Duration> {
    let mut h = Harness::new(config());
    let (mut conns, mut streams) = connect(&mut h, 1);
    let mut s = streams.pop().unwrap();
    let warmup = RTT_WARMUP / scale();
    let rounds = warmup + RTT_COUNT / scale();
    let host = std::thread::spawn(move || {
        let req = [0x5au8; MSG];
        let mut resp = [0u8; MSG];
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            s.write_all(&req).unwrap();
            s.read_exact(&mut resp).unwrap();
            times.push(t.elapsed());
            assert_eq!(resp, [0xa5u8; MSG]);
        }
        times
    });
    let answer = [0xa5u8; MSG];
    let mut pending = 0usize; // request bytes not answered yet
    let mut answered = 0usize;
    while answered < rounds {
        h.tx_reap();
        let mut got = 0usize;
        drain_rx(&mut h, &mut conns, |h, _, payload, len| {
            // The application reads the request.
            let mut buf = vec![0u8; len as usize];
            h.mem.read_slice(&mut buf, payload).unwrap();
            got += buf.len();
        });
        pending += got;
        let mut submitted = false;
        while pending >= MSG {
            let hdr = conns[0].header(op::RW, MSG as u32);
            assert!(h.tx_submit(hdr, &answer), "tx queue full");
            conns[0].tx_cnt = conns[0].tx_cnt.wrapping_add(MSG as u32);
            pending -= MSG;
            answered += 1;
            submitted = true;
        }
        if submitted {
            h.kick_tx();
        } else {
            h.wait_irq(IRQ_WAIT);
        }
    }
    let mut times = host.join().unwrap();
    times.drain(..warmup);
    times
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    println!(
        "virtio-vsock device benchmark: host side, guest played on mock memory (no KVM), {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "queues {QUEUE_SIZE}, 64 KiB packets and rx buffers, device credit {} KiB/conn, \
         guest credit {} KiB/conn, {} MiB/run, median of {} runs",
        devices::virtio::vsock::CONN_BUF_SIZE / 1024,
        GUEST_BUF_ALLOC / 1024,
        bulk_bytes() >> 20,
        runs()
    );
    println!();
    println!(
        "{:<26} {:>5} {:>9} {:>9} {:>9} {:>22}",
        "throughput", "conns", "MB/s", "min", "max", "sleeps: credit / slots"
    );
    type Case = (&'static str, fn(usize) -> Bulk, usize);
    let cases: [Case; 4] = [
        ("guest -> host (tx)", guest_to_host, 1),
        ("guest -> host (tx)", guest_to_host, 4),
        ("host -> guest (rx)", host_to_guest, 1),
        ("host -> guest (rx)", host_to_guest, 4),
    ];
    for (name, run, n) in cases {
        let runs: Vec<Bulk> = (0..runs()).map(|_| run(n)).collect();
        let (lo, mid, hi) = median(runs.iter().map(|r| r.mbps).collect());
        let waits = runs
            .iter()
            .filter_map(|r| r.stalls.as_ref())
            .fold((0, 0), |(c, s), st| (c + st.credit, s + st.slots));
        let waits = match runs[0].stalls {
            Some(_) => {
                let k = runs.len() as u64;
                format!("{} / {}", waits.0 / k, waits.1 / k)
            }
            None => "-".to_string(),
        };
        println!("{name:<26} {n:>5} {mid:>9.0} {lo:>9.0} {hi:>9.0} {waits:>22}");
    }
    println!();
    let times = round_trips();
    let us: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let n = us.len();
    let mut sorted = us.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{:<26} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "round trip 64 B / 64 B", "count", "median", "min", "p99", "max"
    );
    println!(
        "{:<26} {:>7} {:>6.1} us {:>6.1} us {:>6.1} us {:>6.1} us",
        "host -> guest -> host",
        n,
        sorted[n / 2],
        sorted[0],
        sorted[n * 99 / 100],
        sorted[n - 1]
    );
}
