//! A guest driver for the vsock device on mock guest memory, shared by the device tests and
//! the `vsock` bench (compiled for tests and with the `bench-utils` feature).
//!
//! [`Harness`] builds a real [`Vsock`] on host-allocated guest memory, activates it with three
//! split virtqueues laid out by [`Config`], and runs it on its own [`EventLoop`] thread, as
//! the VMM would. The caller then plays the guest driver: it puts packets on the tx queue
//! ([`Harness::tx_submit_raw`], [`Harness::send`]), takes packets from the rx queue and gives
//! the buffers back ([`Harness::rx_next`], [`Harness::recv`]), notifies the device the way a
//! driver does (honouring `VRING_USED_F_NO_NOTIFY`), and sleeps on the device's interrupt
//! eventfd ([`Harness::wait_irq`]). Host clients are real Unix sockets in a temp dir.
//!
//! Everything here panics on failure: it is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, Header, HDR_LEN, TYPE_STREAM};
use super::{Vsock, HANDSHAKE_TIMEOUT, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::virtio::{EventLoop, GuestMemory, Interrupt, VirtioDevice};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// How long the blocking helpers wait before they panic.
pub const WAIT: Duration = Duration::from_secs(5);
/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Used ring flag: the device does not want to be notified.
const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Bytes each ring gets (descriptor table, available ring, used ring), for up to 256 entries.
const RING_SPAN: u64 = 0x4000;
/// Where the buffers start, after the three rings.
const BUF_BASE: u64 = 0x10_0000;
/// Room of one tx slot: a header and a largest payload, page-rounded.
pub const TX_SLOT_LEN: u64 = 0x1_1000;

/// The driver's choices: queue size and buffers.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Size of each of the three queues (a power of two, at most [`super::QUEUE_SIZE`]).
    pub queue_size: u16,
    /// Receive buffers kept on the rx queue (at most `queue_size`).
    pub rx_bufs: u16,
    /// Bytes of each receive buffer, header included.
    pub rx_buf_len: u32,
    /// Packets the tx queue can hold at once; each takes two descriptors and
    /// [`TX_SLOT_LEN`] bytes (at most `queue_size / 2`).
    pub tx_slots: u16,
    /// The device's handshake timeout.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    /// What the device tests use: small queues, 8 KiB receive buffers.
    fn default() -> Self {
        Self {
            queue_size: 64,
            rx_bufs: 16,
            rx_buf_len: 0x2000,
            tx_slots: 32,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Where things are in guest memory for a [`Config`].
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// First receive buffer; buffer `i` is at `rx_buf + i * rx_buf_len`.
    pub rx_buf: u64,
    /// First tx slot; slot `i` is at `tx_buf + i * TX_SLOT_LEN`.
    pub tx_buf: u64,
    /// A page for event-queue buffers.
    pub ev_buf: u64,
    /// Size of guest memory.
    pub mem_size: u64,
}

impl Layout {
    fn new(cfg: &Config) -> Self {
        let mib = |x: u64| x.div_ceil(0x10_0000) * 0x10_0000;
        let rx_buf = BUF_BASE;
        let tx_buf = mib(rx_buf + u64::from(cfg.rx_bufs) * u64::from(cfg.rx_buf_len));
        let ev_buf = mib(tx_buf + u64::from(cfg.tx_slots) * TX_SLOT_LEN);
        Self {
            rx_buf,
            tx_buf,
            ev_buf,
            mem_size: ev_buf + 0x10_0000,
        }
    }
}

/// A split virtqueue as the guest driver sees it.
pub struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
}

impl Ring {
    /// A ring of `size` entries at `base` (zeroed memory), and the device's queue for it.
    pub fn new(base: u64, size: u16) -> (Ring, Queue) {
        let ring = Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_idx: 0,
        };
        let lo = |a: u64| Some(a as u32);
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(lo(ring.desc), Some(0));
        q.set_avail_ring_address(lo(ring.avail), Some(0));
        q.set_used_ring_address(lo(ring.used), Some(0));
        q.set_ready(true);
        (ring, q)
    }

    /// Writes descriptor `idx`.
    pub fn set_desc(
        &self,
        mem: &GuestMemory,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(idx));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Publishes `idx` as the avail index without offering anything (a broken driver).
    pub fn publish_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Makes the chain at `head` available to the device (without notifying it).
    pub fn offer(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    /// The next used element (descriptor id, bytes written), if the device returned one.
    pub fn poll_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        fence(Ordering::SeqCst);
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        if idx == self.used_idx {
            return None;
        }
        fence(Ordering::Acquire);
        let at = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        self.used_idx = self.used_idx.wrapping_add(1);
        Some((id, len))
    }

    /// Whether the device wants a notification for new buffers (no `VRING_USED_F_NO_NOTIFY`).
    /// Call after [`Self::offer`], as a driver checks after publishing the index.
    pub fn needs_kick(&self, mem: &GuestMemory) -> bool {
        fence(Ordering::SeqCst);
        let flags = u16::from_le(mem.read_obj(GuestAddress(self.used)).unwrap());
        flags & VRING_USED_F_NO_NOTIFY == 0
    }
}

/// A used rx buffer the driver has not given back yet.
#[derive(Clone, Copy, Debug)]
pub struct RxBuf {
    /// Its descriptor (and buffer) index, for [`Harness::rx_return`].
    pub id: u16,
    /// The packet's header.
    pub hdr: Header,
    /// Where the payload (`hdr.len` bytes) is.
    pub payload: GuestAddress,
    /// Bytes the device wrote, header included.
    pub written: u32,
}

/// A running vsock device and the driver state of the guest that owns it.
pub struct Harness {
    /// The temp dir holding the device's sockets.
    pub dir: tempfile::TempDir,
    /// The device's Unix socket (`PATH`).
    pub path: PathBuf,
    /// Guest memory.
    pub mem: GuestMemory,
    /// Where the buffers are.
    pub layout: Layout,
    /// The device, shared with its event loop.
    pub dev: Arc<Mutex<Vsock>>,
    /// The queue notification eventfds (rx, tx, event).
    pub evts: Vec<EventFd>,
    /// The rx queue.
    pub rx: Ring,
    /// The tx queue.
    pub tx: Ring,
    /// The event queue.
    pub ev: Ring,
    cfg: Config,
    irq: EventFd,
    tx_free: VecDeque<u16>,
    // Last, so the loop stops before the rest goes away.
    /// The device thread.
    pub el: EventLoop,
}

/// A header from the guest: `op` from `guest_port` to host port `host_port`, advertising a
/// 64 KiB receive buffer and nothing consumed.
pub fn ghdr(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl Harness {
    /// Starts a device with the driver set up as `cfg` says, all rx buffers offered.
    pub fn new(cfg: Config) -> Harness {
        assert!(cfg.queue_size.is_power_of_two() && cfg.queue_size <= super::QUEUE_SIZE);
        assert!(cfg.rx_bufs <= cfg.queue_size && cfg.tx_slots <= cfg.queue_size / 2);
        let layout = Layout::new(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), layout.mem_size as usize)]).unwrap();
        let mut vsock = Vsock::new(GUEST_CID, &path).unwrap();
        vsock.set_handshake_timeout(cfg.handshake_timeout);
        let evts = vsock.queue_events().unwrap();
        let (mut rx, rxq) = Ring::new(0, cfg.queue_size);
        let (tx, txq) = Ring::new(RING_SPAN, cfg.queue_size);
        let (ev, evq) = Ring::new(2 * RING_SPAN, cfg.queue_size);
        for i in 0..cfg.rx_bufs {
            let addr = layout.rx_buf + u64::from(i) * u64::from(cfg.rx_buf_len);
            rx.set_desc(&mem, i, addr, cfg.rx_buf_len, VIRTQ_DESC_F_WRITE, 0);
            rx.offer(&mem, i);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        vsock
            .activate(mem.clone(), interrupt, vec![rxq, txq, evq], 0)
            .unwrap();
        let dev = Arc::new(Mutex::new(vsock));
        let el = EventLoop::start(
            "vsock-test",
            dev.clone(),
            crate::virtio::Mailbox::new().unwrap(),
            Arc::new(|f| panic!("{f}")),
        )
        .unwrap();
        Harness {
            dir,
            path,
            mem,
            layout,
            dev,
            evts,
            rx,
            tx,
            ev,
            cfg,
            irq,
            tx_free: (0..cfg.tx_slots).collect(),
            el,
        }
    }

    /// The driver's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Waits up to `timeout` for the device's interrupt and acknowledges it; returns whether
    /// it came. Check the rings after it either way.
    pub fn wait_irq(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0 && self.irq.read().is_ok()
    }

    /// Guest-physical address of tx slot `slot`.
    pub fn tx_slot_addr(&self, slot: u16) -> u64 {
        self.layout.tx_buf + u64::from(slot) * TX_SLOT_LEN
    }

    /// Tx slots free for [`Self::tx_submit_raw`].
    pub fn tx_free(&self) -> usize {
        self.tx_free.len()
    }

    /// Tx packets the device has not returned yet.
    pub fn tx_in_flight(&self) -> usize {
        usize::from(self.cfg.tx_slots) - self.tx_free.len()
    }

    /// Puts one packet on the tx queue without notifying the device: writes `bytes` at the
    /// start of a free slot and chains `descs` (offsets into the slot, lengths; at most two,
    /// and they may cover bytes already in the slot). Returns false when no slot is free.
    pub fn tx_submit_raw(&mut self, bytes: &[u8], descs: &[(u64, u32)]) -> bool {
        assert!((1..=2).contains(&descs.len()));
        let Some(slot) = self.tx_free.pop_front() else {
            return false;
        };
        let base = self.tx_slot_addr(slot);
        self.mem.write_slice(bytes, GuestAddress(base)).unwrap();
        // A slot's chain uses descriptors slot * 2 and slot * 2 + 1.
        let first = slot * 2;
        for (i, &(off, len)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (0, 0)
            } else {
                (VIRTQ_DESC_F_NEXT, idx + 1)
            };
            self.tx
                .set_desc(&self.mem, idx, base + off, len, flags, next);
        }
        self.tx.offer(&self.mem, first);
        true
    }

    /// Puts packet `h` with payload `data` (one descriptor) on the tx queue without notifying
    /// the device; returns false when no slot is free.
    pub fn tx_submit(&mut self, mut h: Header, data: &[u8]) -> bool {
        h.len = data.len() as u32;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        let len = bytes.len() as u32;
        self.tx_submit_raw(&bytes, &[(0, len)])
    }

    /// Frees the slots of the tx packets the device used; returns how many.
    pub fn tx_reap(&mut self) -> usize {
        let mut n = 0;
        while let Some((id, _)) = self.tx.poll_used(&self.mem) {
            self.tx_free.push_back(id as u16 / 2);
            n += 1;
        }
        n
    }

    /// Notifies the device of new tx packets, unless it said it does not need it.
    pub fn kick_tx(&self) {
        if self.tx.needs_kick(&self.mem) {
            self.evts[TX_QUEUE].write(1).unwrap();
        }
    }

    /// Notifies the device of new rx buffers, unless it said it does not need it.
    pub fn kick_rx(&self) {
        if self.rx.needs_kick(&self.mem) {
            self.evts[RX_QUEUE].write(1).unwrap();
        }
    }

    /// Puts `descs` on the tx queue (see [`Self::tx_submit_raw`]), notifies the device and
    /// waits until it used every tx packet and finished handling them.
    pub fn send_raw(&mut self, bytes: &[u8], descs: &[(u64, u32)]) {
        assert!(self.tx_submit_raw(bytes, descs), "no free tx slot");
        self.kick_tx();
        let deadline = Instant::now() + WAIT;
        loop {
            self.tx_reap();
            if self.tx_in_flight() == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "tx packet not used");
            self.wait_irq(Duration::from_millis(1));
        }
        // The device handles the packet after returning it: wait for it to let go.
        drop(self.dev.lock().unwrap());
    }

    /// Sends one well-formed packet (header + payload in one descriptor) and waits for the
    /// device to handle it.
    pub fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        let len = bytes.len() as u32;
        self.send_raw(&bytes, &[(0, len)]);
    }

    /// The next rx buffer the device filled; give it back with [`Self::rx_return`].
    pub fn rx_next(&mut self) -> Option<RxBuf> {
        let (id, written) = self.rx.poll_used(&self.mem)?;
        let addr = self.layout.rx_buf + u64::from(id) * u64::from(self.cfg.rx_buf_len);
        let mut raw = [0u8; HDR_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        Some(RxBuf {
            id: id as u16,
            hdr: Header::from_bytes(&raw),
            payload: GuestAddress(addr + HDR_LEN as u64),
            written,
        })
    }

    /// Offers rx buffer `id` to the device again (without notifying it).
    pub fn rx_return(&mut self, id: u16) {
        self.rx.offer(&self.mem, id);
    }

    /// The next packet the device put on the rx queue, if any; its buffer is offered again.
    pub fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let b = self.rx_next()?;
        assert_eq!(b.written as usize, HDR_LEN + b.hdr.len as usize);
        let mut data = vec![0u8; b.hdr.len as usize];
        self.mem.read_slice(&mut data, b.payload).unwrap();
        self.rx_return(b.id);
        self.kick_rx();
        Some((b.hdr, data))
    }

    /// The next packet the device put on the rx queue (its buffer is offered again).
    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(got) = self.try_recv() {
                return got;
            }
            assert!(Instant::now() < deadline, "no rx packet");
            self.wait_irq(Duration::from_millis(1));
        }
    }

    /// Asserts that no rx packet arrives within `ms`.
    pub fn expect_silence(&mut self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
        if let Some((h, _)) = self.try_recv() {
            panic!("unexpected packet {h:?}");
        }
    }

    /// A host client connected to the device's socket, reads timing out after [`WAIT`].
    pub fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// A host client connected to guest `port` through the whole handshake, the guest
    /// advertising `buf_alloc`; returns the client and the device's REQUEST (its `src_port`
    /// is the device's local port, its credit fields the device's).
    pub fn host_connect_req(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, Header) {
        let mut c = self.client();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (h, _) = self.recv();
        assert_eq!(h.op, op::REQUEST);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.dst_port),
            (HOST_CID, GUEST_CID, port)
        );
        let mut resp = ghdr(op::RESPONSE, port, h.src_port);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}", h.src_port));
        (c, h)
    }

    /// [`Self::host_connect_req`], returning the client and the device's local port.
    pub fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let (c, h) = self.host_connect_req(port, buf_alloc);
        (c, h.src_port)
    }
}

/// Reads one `\n`-terminated line (without it) byte by byte.
pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// True when the peer closed `s` (EOF or reset) within the read timeout.
pub fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
