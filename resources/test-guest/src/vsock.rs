//! The virtio-vsock driver and its two services: the agent on port 52
//! ([`crate::agent`], one JSON object per line; not with `strata.agent=off`
//! on the command line) and an echo service on port 7 (everything received
//! is sent back). Stream sockets only; the guest only listens
//! (host-initiated connections).
//!
//! Everything runs on the BSP, in its idle loop ([`poll`]): no locks. The
//! device interrupts (acknowledged in [`crate::virtio`]) only end the
//! BSP's `hlt`.
//!
//! `vsock reset` resets the device and brings it up again with fresh
//! queues and no connections; `hostile vsock avail-idx` breaks the tx queue
//! on purpose, after which the driver does nothing until that reset.
//!
//! Flow control (virtio 1.2, 5.10.6.3): each connection advertises
//! `buf_alloc` = [`IN_SIZE`], the size of its receive ring, and `fwd_cnt` =
//! bytes taken out of that ring (by the agent's line reader, or sent back by
//! the echo service). Every packet we send carries both; a CREDIT_UPDATE is
//! sent when half the ring was freed since we last told the peer, or when
//! it asks (CREDIT_REQUEST). We send at most the peer's free credit.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::pattern::splitmix64;
use crate::sync::Global;
use crate::virtio::{self, Queue, Ring, DESC_WRITE, F_VERSION_1};
use crate::{agent, bootparams, console, time};

/// The agent's port.
pub const AGENT_PORT: u32 = 52;
/// The echo service's port.
pub const ECHO_PORT: u32 = 7;
/// Most connections at once.
pub const MAX_CONNS: usize = 32;
/// Receive ring of a connection (our `buf_alloc`), a power of two.
pub const IN_SIZE: usize = 64 * 1024;
/// Pending output of an agent connection.
const OUT_SIZE: usize = 16 * 1024;
/// Longest agent request line.
pub const LINE_MAX: usize = 4096;
/// Free output space needed before the agent handles a line.
const RESPONSE_MAX: usize = agent::RESPONSE_MAX;

const HDR_LEN: usize = 44;
const PKT_DATA: usize = 4096;
const RX_BUFS: usize = 32;
const TX_SLOTS: usize = 32;
const EVENT_BUFS: usize = 4;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;

#[repr(C)]
struct PktBuf {
    hdr: [u8; HDR_LEN],
    data: [u8; PKT_DATA],
}

const PKT_LEN: usize = HDR_LEN + PKT_DATA;

#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = b.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

impl Header {
    fn decode(b: &[u8]) -> Self {
        Self {
            src_cid: get_u64(b, 0),
            dst_cid: get_u64(b, 8),
            src_port: get_u32(b, 16),
            dst_port: get_u32(b, 20),
            len: get_u32(b, 24),
            kind: get_u16(b, 28),
            op: get_u16(b, 30),
            flags: get_u32(b, 32),
            buf_alloc: get_u32(b, 36),
            fwd_cnt: get_u32(b, 40),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        put(b, 0, &self.src_cid.to_le_bytes());
        put(b, 8, &self.dst_cid.to_le_bytes());
        put(b, 16, &self.src_port.to_le_bytes());
        put(b, 20, &self.dst_port.to_le_bytes());
        put(b, 24, &self.len.to_le_bytes());
        put(b, 28, &self.kind.to_le_bytes());
        put(b, 30, &self.op.to_le_bytes());
        put(b, 32, &self.flags.to_le_bytes());
        put(b, 36, &self.buf_alloc.to_le_bytes());
        put(b, 40, &self.fwd_cnt.to_le_bytes());
    }
}

/// One connection's bookkeeping (its buffers are in [`BUFS`]).
#[derive(Clone, Copy)]
struct Conn {
    used: bool,
    peer_cid: u64,
    peer_port: u32,
    local_port: u32,
    /// Bytes received (wrapping), our view of the peer's tx_cnt.
    rx_cnt: u32,
    /// Bytes taken out of the receive ring (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` we last told the peer.
    told_fwd: u32,
    /// Bytes sent (wrapping).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    in_head: usize,
    in_len: usize,
    out_start: usize,
    out_end: usize,
    line_len: usize,
    line_overflow: bool,
    need_response: bool,
    need_credit_update: bool,
    asked_credit: bool,
    /// The peer sends no more (SHUTDOWN): close once our output is out.
    draining: bool,
}

const IDLE: Conn = Conn {
    used: false,
    peer_cid: 0,
    peer_port: 0,
    local_port: 0,
    rx_cnt: 0,
    fwd_cnt: 0,
    told_fwd: 0,
    tx_cnt: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    in_head: 0,
    in_len: 0,
    out_start: 0,
    out_end: 0,
    line_len: 0,
    line_overflow: false,
    need_response: false,
    need_credit_update: false,
    asked_credit: false,
    draining: false,
};

struct ConnBufs {
    input: [u8; IN_SIZE],
    output: [u8; OUT_SIZE],
    line: [u8; LINE_MAX],
}

struct Dev {
    /// A virtio-vsock transport exists.
    found: bool,
    /// The driver is up (queues set, DRIVER_OK).
    present: bool,
    /// The driver gave its queues up (`hostile`): nothing runs until reset.
    stale: bool,
    /// The agent listens on [`AGENT_PORT`] (not with `strata.agent=off` on
    /// the command line: then that port is as unbound as any other).
    agent: bool,
    base: u64,
    cid: u64,
    rx: Option<Queue>,
    tx: Option<Queue>,
    event: Option<Queue>,
    /// Bit i set: tx slot i is free.
    tx_free: u64,
    conns: [Conn; MAX_CONNS],
    /// RSTs owed to peers without a connection: (cid, their port, our port).
    rst_pending: [(u64, u32, u32); 8],
    rst_len: usize,
    rng: u64,
    /// Whether tx completions interrupt (only while no slot is free).
    tx_irq: bool,
    stats: Stats,
    transport: usize,
}

/// Counters for the `vsock` console command.
#[derive(Clone, Copy)]
pub struct Stats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// `poll` calls that found work.
    pub busy_polls: u64,
    /// TSC ticks spent in those.
    pub busy_ticks: u64,
}

static DEV: Global<Dev> = Global::new(Dev {
    found: false,
    present: false,
    stale: false,
    agent: true,
    base: 0,
    cid: 0,
    rx: None,
    tx: None,
    event: None,
    tx_free: 0,
    conns: [IDLE; MAX_CONNS],
    rst_pending: [(0, 0, 0); 8],
    rst_len: 0,
    rng: 0,
    tx_irq: true,
    stats: Stats {
        rx_packets: 0,
        tx_packets: 0,
        busy_polls: 0,
        busy_ticks: 0,
    },
    transport: 0,
});
static RINGS: Global<[Ring; 3]> = Global::new([const { Ring::new() }; 3]);
static EVENTS: Global<[[u8; 8]; EVENT_BUFS]> = Global::new([[0; 8]; EVENT_BUFS]);
// Never zeroed (boot time): the device or we write them before they are read.
#[link_section = ".bss.noinit.vsock_rx"]
static RX: Global<[PktBuf; RX_BUFS]> = Global::new(
    [const {
        PktBuf {
            hdr: [0; HDR_LEN],
            data: [0; PKT_DATA],
        }
    }; RX_BUFS],
);
#[link_section = ".bss.noinit.vsock_tx"]
static TX: Global<[PktBuf; TX_SLOTS]> = Global::new(
    [const {
        PktBuf {
            hdr: [0; HDR_LEN],
            data: [0; PKT_DATA],
        }
    }; TX_SLOTS],
);
#[link_section = ".bss.noinit.vsock_conns"]
static BUFS: Global<[ConnBufs; MAX_CONNS]> = Global::new(
    [const {
        ConnBufs {
            input: [0; IN_SIZE],
            output: [0; OUT_SIZE],
            line: [0; LINE_MAX],
        }
    }; MAX_CONNS],
);

/// Set while [`poll`] runs: an agent `exec` runs console commands from
/// inside it, and those must not reset or break the device under it.
static IN_POLL: AtomicBool = AtomicBool::new(false);

/// Why a command cannot touch the vsock device now.
pub const NOT_OVER_VSOCK: &str = "not over vsock";

fn dev() -> &'static mut Dev {
    // SAFETY: BSP only, never from interrupt handlers; callers do not keep
    // it across calls that take it again.
    unsafe { &mut *DEV.get() }
}

fn bufs(i: usize) -> Option<&'static mut ConnBufs> {
    // SAFETY: as in `dev`.
    unsafe { (*BUFS.get()).get_mut(i) }
}

/// Initialises the first virtio-vsock transport, if any.
pub fn init() {
    let Some((index, t)) = virtio::transports()
        .iter()
        .enumerate()
        .find(|(_, t)| t.device_id == virtio::ID_VSOCK)
    else {
        return;
    };
    let d = dev();
    d.transport = index;
    d.found = true;
    d.agent = agent::enabled_by(bootparams::get().cmdline());
    if let Err(e) = setup(d, t.base) {
        let mut out = console::lock();
        out.str("virtio-vsock: ");
        out.str(e);
        out.nl();
    }
}

/// The full initialisation (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE,
/// DRIVER, features, FEATURES_OK, the three queues (rx and event buffers
/// posted), DRIVER_OK. Starts with no connections and every tx slot free.
fn setup(d: &mut Dev, base: u64) -> Result<(), &'static str> {
    d.present = false;
    d.stale = false;
    d.rx = None;
    d.tx = None;
    d.event = None;
    d.conns = [IDLE; MAX_CONNS];
    d.rst_len = 0;
    d.tx_irq = true;
    virtio::negotiate(base, F_VERSION_1)?;
    let rings = RINGS.get() as *mut Ring;
    // SAFETY: three distinct rings of the static array.
    let (r0, r1, r2) = unsafe { (rings, rings.add(1), rings.add(2)) };
    let mut rx = Queue::setup(base, 0, r0)?;
    let tx = Queue::setup(base, 1, r1)?;
    let mut event = Queue::setup(base, 2, r2)?;
    for i in 0..RX_BUFS {
        rx.set_desc(i, rx_addr(i), PKT_LEN as u32, DESC_WRITE, 0);
        rx.push(i as u16);
    }
    for i in 0..EVENT_BUFS {
        // SAFETY: address only.
        let addr = unsafe { (EVENTS.get() as *mut [u8; 8]).add(i) } as u64;
        event.set_desc(i, addr, 8, DESC_WRITE, 0);
        event.push(i as u16);
    }
    if !virtio::driver_ok(base) {
        return Err("device refused DRIVER_OK");
    }
    rx.notify();
    event.notify();
    d.cid = virtio::config_u64(base, 0);
    d.base = base;
    d.rx = Some(rx);
    d.tx = Some(tx);
    d.event = Some(event);
    d.tx_free = (1u64 << TX_SLOTS) - 1;
    d.rng = splitmix64(time::rdtsc());
    d.present = true;
    Ok(())
}

fn rx_addr(i: usize) -> u64 {
    // SAFETY: address only.
    unsafe { (RX.get() as *mut PktBuf).add(i) as u64 }
}

fn tx_slot(i: usize) -> Option<&'static mut PktBuf> {
    // SAFETY: a free slot is ours until it is handed to the device.
    unsafe { (*TX.get()).get_mut(i) }
}

/// `vsock reset`: resets the device (status 0, waiting until it reads 0)
/// and brings it up again, dropping every connection; the services listen
/// again afterwards.
pub fn reset() -> Result<(), &'static str> {
    if IN_POLL.load(Ordering::Relaxed) {
        return Err(NOT_OVER_VSOCK);
    }
    let d = dev();
    let t = virtio::transports().get(d.transport).copied();
    let (true, Some(t)) = (d.found, t) else {
        return Err("no vsock device");
    };
    setup(d, t.base)
}

/// `hostile vsock avail-idx`: publishes a bogus avail index on the tx
/// queue, notifies, and gives the driver up until [`reset`].
pub fn hostile_avail_idx() -> Result<(), &'static str> {
    if IN_POLL.load(Ordering::Relaxed) {
        return Err(NOT_OVER_VSOCK);
    }
    let d = dev();
    if !d.found {
        return Err("no vsock device");
    }
    let Some(tx) = d.tx.as_mut() else {
        return Err("driver needs reset");
    };
    d.stale = true;
    tx.publish_bogus_avail_idx();
    tx.notify();
    Ok(())
}

/// Gives the driver up until [`reset`] (`hostile mmio` wrote the device's
/// registers). Not from inside [`poll`].
pub fn abandon() {
    if !IN_POLL.load(Ordering::Relaxed) {
        dev().stale = true;
    }
}

/// Whether an agent `exec` is running a command (inside [`poll`]).
pub fn in_poll() -> bool {
    IN_POLL.load(Ordering::Relaxed)
}

/// Whether the device has something for us (cheap: memory reads only).
pub fn pending() -> bool {
    let d = dev();
    d.present
        && !d.stale
        && (d.rx.as_ref().is_some_and(Queue::has_used)
            || d.tx.as_ref().is_some_and(Queue::has_used)
            || d.event.as_ref().is_some_and(Queue::has_used))
}

/// Does all the work there is; returns whether anything happened.
pub fn poll() -> bool {
    let d = dev();
    if !d.present || d.stale {
        return false;
    }
    let start = time::rdtsc();
    IN_POLL.store(true, Ordering::Relaxed);
    let did = poll_inner(d);
    IN_POLL.store(false, Ordering::Relaxed);
    if did {
        d.stats.busy_polls += 1;
        d.stats.busy_ticks += time::rdtsc().wrapping_sub(start);
    }
    did
}

fn poll_inner(d: &mut Dev) -> bool {
    let mut did = false;
    // Finished transmissions free their slots.
    if let Some(tx) = d.tx.as_mut() {
        while let Some((id, _)) = tx.pop_used() {
            if (id as usize) < TX_SLOTS {
                d.tx_free |= 1 << id;
            }
            did = true;
        }
    }
    // Transport events (only TRANSPORT_RESET exists): drop everything.
    if let Some(ev) = d.event.as_mut() {
        let mut reset = false;
        while let Some((id, _)) = ev.pop_used() {
            reset = true;
            ev.push(id as u16);
        }
        if reset {
            ev.notify();
            for c in d.conns.iter_mut() {
                *c = IDLE;
            }
            d.rst_len = 0;
            d.cid = virtio::config_u64(d.base, 0);
            did = true;
        }
    }
    // Received packets.
    let mut reposted = false;
    while let Some((id, len)) = d.rx.as_mut().and_then(Queue::pop_used) {
        let i = id as usize;
        if i < RX_BUFS {
            // SAFETY: the device is done with buffer i until we repost it.
            if let Some(pkt) = unsafe { (*RX.get()).get(i) } {
                let n = (len as usize).min(PKT_LEN);
                if n >= HDR_LEN {
                    let h = Header::decode(&pkt.hdr);
                    let payload_len = (h.len as usize).min(n - HDR_LEN);
                    let payload = pkt.data.get(..payload_len).unwrap_or_default();
                    d.stats.rx_packets += 1;
                    receive(d, &h, payload);
                }
            }
            if let Some(rx) = d.rx.as_mut() {
                rx.set_desc(i, rx_addr(i), PKT_LEN as u32, DESC_WRITE, 0);
                rx.push(id as u16);
            }
            reposted = true;
        }
        did = true;
    }
    if reposted {
        if let Some(rx) = d.rx.as_ref() {
            rx.notify();
        }
    }
    // Work on the connections and send what we can.
    let mut sent = false;
    while d.rst_len > 0 {
        let Some(&(cid, peer_port, local_port)) = d.rst_pending.get(d.rst_len - 1) else {
            break;
        };
        let h = Header {
            src_cid: d.cid,
            dst_cid: cid,
            src_port: local_port,
            dst_port: peer_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        };
        if !send(d, &h, &[]) {
            break;
        }
        d.rst_len -= 1;
        sent = true;
    }
    for i in 0..MAX_CONNS {
        sent |= service(d, i);
    }
    if sent {
        if let Some(tx) = d.tx.as_ref() {
            tx.notify();
        }
        did = true;
    }
    // Completed transmissions are reaped here, so they need no interrupt
    // unless every slot is in flight (then their completion must wake us).
    let want = d.tx_free == 0;
    if want != d.tx_irq {
        if let Some(tx) = d.tx.as_mut() {
            tx.set_interrupts(want);
        }
        d.tx_irq = want;
    }
    did
}

fn find(d: &Dev, h: &Header) -> Option<usize> {
    d.conns.iter().position(|c| {
        c.used && c.peer_cid == h.src_cid && c.peer_port == h.src_port && c.local_port == h.dst_port
    })
}

fn queue_rst(d: &mut Dev, h: &Header) {
    if h.op == OP_RST {
        return;
    }
    if let Some(slot) = d.rst_pending.get_mut(d.rst_len) {
        *slot = (h.src_cid, h.src_port, h.dst_port);
        d.rst_len += 1;
    }
}

/// Handles one received packet.
fn receive(d: &mut Dev, h: &Header, payload: &[u8]) {
    if h.kind != TYPE_STREAM || h.dst_cid != d.cid {
        queue_rst(d, h);
        return;
    }
    let found = find(d, h);
    if h.op == OP_REQUEST {
        let listening = (h.dst_port == AGENT_PORT && d.agent) || h.dst_port == ECHO_PORT;
        let slot = match found {
            // A repeated request replaces the old connection.
            Some(i) => Some(i),
            None => d.conns.iter().position(|c| !c.used),
        };
        match (listening, slot.and_then(|i| d.conns.get_mut(i))) {
            (true, Some(c)) => {
                *c = Conn {
                    used: true,
                    peer_cid: h.src_cid,
                    peer_port: h.src_port,
                    local_port: h.dst_port,
                    peer_buf_alloc: h.buf_alloc,
                    peer_fwd_cnt: h.fwd_cnt,
                    need_response: true,
                    ..IDLE
                };
            }
            _ => queue_rst(d, h),
        }
        return;
    }
    let Some(c) = found.and_then(|i| d.conns.get_mut(i)) else {
        queue_rst(d, h);
        return;
    };
    c.peer_buf_alloc = h.buf_alloc;
    c.peer_fwd_cnt = h.fwd_cnt;
    c.asked_credit = false;
    match h.op {
        OP_RW => {
            let i = found.unwrap_or(0);
            if let Some(b) = bufs(i) {
                let room = IN_SIZE - c.in_len;
                let take = payload.len().min(room);
                // At most two pieces (the ring wraps), each one `rep movsb`.
                let tail = (c.in_head + c.in_len) & (IN_SIZE - 1);
                let first = take.min(IN_SIZE - tail);
                if let (Some(dst), Some(src)) =
                    (b.input.get_mut(tail..tail + first), payload.get(..first))
                {
                    dst.copy_from_slice(src);
                }
                if let (Some(dst), Some(src)) =
                    (b.input.get_mut(..take - first), payload.get(first..take))
                {
                    dst.copy_from_slice(src);
                }
                c.in_len += take;
                c.rx_cnt = c.rx_cnt.wrapping_add(take as u32);
            }
        }
        OP_CREDIT_REQUEST => c.need_credit_update = true,
        OP_SHUTDOWN => {
            if h.flags & SHUTDOWN_RCV != 0 {
                // The peer reads no more: nothing left to do but close.
                c.out_start = 0;
                c.out_end = 0;
                c.in_len = 0;
            }
            c.draining = true;
        }
        OP_RST => *c = IDLE,
        OP_CREDIT_UPDATE => {}
        // RESPONSE (we never connect) or unknown: reset.
        _ => {
            *c = IDLE;
            queue_rst(d, h);
        }
    }
}

/// Queues one packet (header + payload) on the tx queue; false if no slot
/// is free.
fn send(d: &mut Dev, h: &Header, payload: &[u8]) -> bool {
    if d.tx_free == 0 {
        return false;
    }
    let slot = d.tx_free.trailing_zeros() as usize;
    let Some(buf) = tx_slot(slot) else {
        return false;
    };
    let len = payload.len().min(PKT_DATA);
    let mut h = *h;
    h.len = len as u32;
    h.encode(&mut buf.hdr);
    if let (Some(dst), Some(src)) = (buf.data.get_mut(..len), payload.get(..len)) {
        dst.copy_from_slice(src);
    }
    let addr = &raw const *buf as u64;
    let Some(tx) = d.tx.as_mut() else {
        return false;
    };
    tx.set_desc(slot, addr, (HDR_LEN + len) as u32, 0, 0);
    tx.push(slot as u16);
    d.tx_free &= !(1 << slot);
    d.stats.tx_packets += 1;
    true
}

fn conn_header(d: &Dev, c: &Conn, op: u16) -> Header {
    Header {
        src_cid: d.cid,
        dst_cid: c.peer_cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: IN_SIZE as u32,
        fwd_cnt: c.fwd_cnt,
        ..Header::default()
    }
}

/// Sends a control packet for connection `i`; false if no tx slot.
fn send_ctrl(d: &mut Dev, i: usize, op: u16) -> bool {
    let Some(c) = d.conns.get(i).copied() else {
        return false;
    };
    let h = conn_header(d, &c, op);
    if !send(d, &h, &[]) {
        return false;
    }
    if let Some(c) = d.conns.get_mut(i) {
        c.told_fwd = c.fwd_cnt;
    }
    true
}

/// Moves connection `i` forward: handshake, agent requests, output (within
/// the peer's credit), credit updates, closing. Returns whether it queued
/// packets.
fn service(d: &mut Dev, i: usize) -> bool {
    let Some(c) = d.conns.get(i).copied() else {
        return false;
    };
    if !c.used {
        return false;
    }
    let mut sent = false;
    if c.need_response {
        if !send_ctrl(d, i, OP_RESPONSE) {
            return false;
        }
        if let Some(c) = d.conns.get_mut(i) {
            c.need_response = false;
        }
        sent = true;
    }
    if c.local_port == AGENT_PORT {
        run_agent(d, i);
    }
    // Data out: the echo service sends its receive ring back, the agent its
    // output buffer.
    loop {
        let Some(c) = d.conns.get(i).copied() else {
            break;
        };
        let Some(b) = bufs(i) else {
            break;
        };
        let credit = c
            .peer_buf_alloc
            .wrapping_sub(c.tx_cnt.wrapping_sub(c.peer_fwd_cnt)) as usize;
        let credit = if credit > c.peer_buf_alloc as usize { 0 } else { credit };
        let echo = c.local_port == ECHO_PORT;
        let (data, contiguous): (&[u8], usize) = if echo {
            let first = (IN_SIZE - c.in_head).min(c.in_len);
            (
                b.input.get(c.in_head..c.in_head + first).unwrap_or_default(),
                first,
            )
        } else {
            (
                b.output.get(c.out_start..c.out_end).unwrap_or_default(),
                c.out_end - c.out_start,
            )
        };
        if contiguous == 0 {
            break;
        }
        if credit == 0 {
            if !c.asked_credit && send_ctrl(d, i, OP_CREDIT_REQUEST) {
                if let Some(c) = d.conns.get_mut(i) {
                    c.asked_credit = true;
                }
                sent = true;
            }
            break;
        }
        let n = contiguous.min(credit).min(PKT_DATA);
        let mut h = conn_header(d, &c, OP_RW);
        if echo {
            // The bytes leave the ring with this packet: count them.
            h.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        }
        if !send(d, &h, data.get(..n).unwrap_or_default()) {
            break;
        }
        sent = true;
        if let Some(c) = d.conns.get_mut(i) {
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            if echo {
                c.in_head = (c.in_head + n) & (IN_SIZE - 1);
                c.in_len -= n;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            } else {
                c.out_start += n;
                if c.out_start == c.out_end {
                    c.out_start = 0;
                    c.out_end = 0;
                }
            }
            c.told_fwd = c.fwd_cnt;
        }
    }
    let Some(c) = d.conns.get(i).copied() else {
        return sent;
    };
    let unread = c.fwd_cnt.wrapping_sub(c.told_fwd) as usize;
    if (c.need_credit_update || unread >= IN_SIZE / 2) && send_ctrl(d, i, OP_CREDIT_UPDATE) {
        if let Some(c) = d.conns.get_mut(i) {
            c.need_credit_update = false;
        }
        sent = true;
    }
    // Peer done sending and everything answered: close with RST.
    if c.draining && c.in_len == 0 && c.out_start == c.out_end && send_ctrl(d, i, OP_RST) {
        if let Some(c) = d.conns.get_mut(i) {
            *c = IDLE;
        }
        sent = true;
    }
    sent
}

/// Feeds received bytes of agent connection `i` to its line reader and
/// answers complete lines while the output buffer has room.
fn run_agent(d: &mut Dev, i: usize) {
    let Some(b) = bufs(i) else {
        return;
    };
    let Some(c) = d.conns.get_mut(i) else {
        return;
    };
    while c.in_len > 0 {
        if OUT_SIZE - c.out_end < RESPONSE_MAX {
            // Make room by moving pending output to the front.
            if c.out_start > 0 && c.out_start <= c.out_end && c.out_end <= OUT_SIZE {
                let base = b.output.as_mut_ptr();
                // SAFETY: both ranges lie inside `output` (checked above);
                // `copy` allows overlap.
                unsafe { core::ptr::copy(base.add(c.out_start), base, c.out_end - c.out_start) };
                c.out_end -= c.out_start;
                c.out_start = 0;
            }
            if OUT_SIZE - c.out_end < RESPONSE_MAX {
                return;
            }
        }
        let byte = b.input.get(c.in_head).copied().unwrap_or(0);
        c.in_head = (c.in_head + 1) & (IN_SIZE - 1);
        c.in_len -= 1;
        c.fwd_cnt = c.fwd_cnt.wrapping_add(1);
        if byte != b'\n' {
            match b.line.get_mut(c.line_len) {
                Some(slot) => {
                    *slot = byte;
                    c.line_len += 1;
                }
                None => c.line_overflow = true,
            }
            continue;
        }
        let line = b.line.get(..c.line_len).unwrap_or_default();
        let out = b.output.get_mut(c.out_end..).unwrap_or_default();
        let written = if c.line_overflow {
            agent::error_response(out, "request too long")
        } else {
            agent::handle_line(line, out)
        };
        c.out_end += written;
        c.line_len = 0;
        c.line_overflow = false;
    }
}

/// The virtio transport index of the device.
pub fn transport() -> Option<usize> {
    let d = dev();
    d.present.then_some(d.transport)
}

/// (our CID, open connections, counters), or why there are none.
pub fn status() -> Result<(u64, usize, Stats), &'static str> {
    let d = dev();
    if !d.found {
        return Err("no vsock device");
    }
    if !d.present || d.stale {
        return Err("driver needs reset");
    }
    let open = d.conns.iter().filter(|c| c.used).count();
    Ok((d.cid, open, d.stats))
}
