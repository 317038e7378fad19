//! virtio-vsock on a live device: guest packets on the tx queue (well-formed headers with
//! arbitrary fields, and raw bytes split over descriptors), host clients connecting through the
//! Unix socket with arbitrary handshake lines, writing, reading and closing, rx buffers given
//! back, transport resets. The device runs on an event manager driven here, one step at a
//! time, so a run is deterministic and needs no thread.
//!
//! Checked: nothing panics; the device keeps at most its connection bound
//! ([`devices::virtio::vsock::Vsock::max_connections`]). (A step runs at most
//! 64 event-loop rounds; libFuzzer's `-timeout` catches a handler that never
//! returns.)

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use devices::virtio::vsock::packet::{Header, HDR_LEN};
use devices::virtio::vsock::testing::{Ring, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use devices::virtio::vsock::{Vsock, HOST_CID, RX_QUEUE, TX_QUEUE};
use devices::virtio::{GuestMemory, Interrupt, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const CID: u64 = 3;
const QSIZE: u16 = 32;
const RING_SPAN: u64 = 0x4000;
const RX_BUFS: u16 = 16;
const RX_BUF: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 0x1000;
const TX_BUF: u64 = 0x2_0000;
const MEM_SIZE: u64 = 0x4_0000;
/// The host port a listener serves (guest connections there succeed).
const LISTENING_PORT: u32 = 1234;
/// The first port the device gives host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most host clients one input opens.
const MAX_CLIENTS: usize = 16;
/// Most event-loop rounds one step may take before the target calls the device busy.
const MAX_ROUNDS: usize = 64;

/// A temp dir with the device's socket path and a listener on `<path>_1234`, kept per thread.
struct Place {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

thread_local! {
    static PLACE: RefCell<Option<Place>> = const { RefCell::new(None) };
}

fn place() -> Option<(PathBuf, UnixListener)> {
    PLACE.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_none() {
            let dir = tempfile::tempdir().ok()?;
            let path = dir.path().join("v.sock");
            let port = devices::virtio::vsock::uds::port_path(&path, LISTENING_PORT);
            let listener = UnixListener::bind(port).ok()?;
            listener.set_nonblocking(true).ok()?;
            *p = Some(Place {
                _dir: dir,
                path,
                listener,
            });
        }
        let p = p.as_ref()?;
        Some((p.path.clone(), p.listener.try_clone().ok()?))
    })
}

#[derive(Arbitrary, Debug)]
enum Cid {
    Guest,
    Host,
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Port {
    Listening,
    Agent,
    Local(u8),
    Small(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum PayloadLen {
    Exact,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
struct Packet {
    src_cid: Cid,
    dst_cid: Cid,
    src_port: Port,
    dst_port: Port,
    len: PayloadLen,
    stream: bool,
    op: u8,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Packet),
    TxRaw { bytes: Vec<u8>, split: u16 },
    Connect(Vec<u8>),
    ConnectPort(Port),
    Write { client: u8, data: Vec<u8> },
    Read(u8),
    Close(u8),
    RxRefill,
    TransportReset,
    AcceptGuestConnections,
}

fn cid(c: &Cid) -> u64 {
    match c {
        Cid::Guest => CID,
        Cid::Host => HOST_CID,
        Cid::Raw(r) => *r,
    }
}

fn port(p: &Port) -> u32 {
    match p {
        Port::Listening => LISTENING_PORT,
        Port::Agent => 52,
        Port::Local(n) => FIRST_LOCAL_PORT + u32::from(*n % 8),
        Port::Small(n) => u32::from(*n),
        Port::Raw(r) => *r,
    }
}

struct Guest {
    mem: GuestMemory,
    rx: Ring,
    tx: Ring,
    evts: Vec<EventFd>,
    tx_next: u16,
}

impl Guest {
    /// Puts `bytes` on the tx queue in one or two descriptors (split at `split`) and kicks.
    fn send(&mut self, bytes: &[u8], split: usize) {
        let bytes = &bytes[..bytes.len().min(0x8000)];
        let slot = self.tx_next % (QSIZE / 2);
        self.tx_next = self.tx_next.wrapping_add(1);
        let base = TX_BUF + u64::from(slot) * 0x1000;
        let d0 = slot * 2;
        let split = split.min(bytes.len());
        if self.mem.write_slice(bytes, GuestAddress(base)).is_err() {
            // Longer than the slot: let it run into the next slots (the ring does not care).
            let _ = self
                .mem
                .write_slice(&bytes[..bytes.len().min(0x1000)], GuestAddress(base));
        }
        if split == 0 || split == bytes.len() {
            self.tx
                .set_desc(&self.mem, d0, base, bytes.len() as u32, 0, 0);
        } else {
            self.tx
                .set_desc(&self.mem, d0, base, split as u32, VIRTQ_DESC_F_NEXT, d0 + 1);
            self.tx.set_desc(
                &self.mem,
                d0 + 1,
                base + split as u64,
                (bytes.len() - split) as u32,
                0,
                0,
            );
        }
        self.tx.offer(&self.mem, d0);
        let _ = self.evts[TX_QUEUE].write(1);
    }

    /// Takes what the device put on the rx queue and gives the buffers back.
    fn refill(&mut self) {
        while let Some((id, _len)) = self.rx.poll_used(&self.mem) {
            self.rx.offer(&self.mem, (id % u32::from(RX_BUFS)) as u16);
        }
        while self.tx.poll_used(&self.mem).is_some() {}
        let _ = self.evts[RX_QUEUE].write(1);
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(ops) = Vec::<Op>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Some((path, listener)) = place() else {
        return;
    };
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) else {
        return;
    };
    let Ok(mut vsock) = Vsock::new(CID, &path) else {
        return;
    };
    let Ok(evts) = vsock.queue_events() else {
        return;
    };
    let (mut rx, rxq) = Ring::new(0, QSIZE);
    let (tx, txq) = Ring::new(RING_SPAN, QSIZE);
    let (_ev, evq) = Ring::new(2 * RING_SPAN, QSIZE);
    for i in 0..RX_BUFS {
        let addr = RX_BUF + u64::from(i) * u64::from(RX_BUF_LEN);
        rx.set_desc(&mem, i, addr, RX_BUF_LEN, VIRTQ_DESC_F_WRITE, 0);
        rx.offer(&mem, i);
    }
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    if vsock
        .activate(mem.clone(), Interrupt::new(irq), vec![rxq, txq, evq], 0)
        .is_err()
    {
        return;
    }
    let bound = vsock.max_connections();
    let dev = Arc::new(Mutex::new(vsock));
    let Ok(mut em) = EventManager::<Arc<Mutex<Vsock>>>::new() else {
        return;
    };
    em.add_subscriber(dev.clone());
    let mut guest = Guest {
        mem,
        rx,
        tx,
        evts,
        tx_next: 0,
    };
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    for op in ops.iter().take(48) {
        match op {
            Op::Tx(p) => {
                let h = Header {
                    src_cid: cid(&p.src_cid),
                    dst_cid: cid(&p.dst_cid),
                    src_port: port(&p.src_port),
                    dst_port: port(&p.dst_port),
                    len: match p.len {
                        PayloadLen::Exact => p.payload.len() as u32,
                        PayloadLen::Raw(r) => r,
                    },
                    kind: if p.stream { 1 } else { 2 },
                    op: u16::from(p.op % 9),
                    flags: u32::from(p.flags % 4),
                    buf_alloc: p.buf_alloc,
                    fwd_cnt: p.fwd_cnt,
                };
                let mut bytes = h.to_bytes().to_vec();
                bytes.extend_from_slice(&p.payload);
                guest.send(&bytes, HDR_LEN);
            }
            Op::TxRaw { bytes, split } => guest.send(bytes, usize::from(*split)),
            Op::Connect(line) => {
                if clients.len() < MAX_CLIENTS {
                    if let Ok(mut c) = UnixStream::connect(&path) {
                        let _ = c.set_nonblocking(true);
                        let _ = c.write(line);
                        clients.push(c);
                    }
                }
            }
            Op::ConnectPort(p) => {
                if clients.len() < MAX_CLIENTS {
                    if let Ok(mut c) = UnixStream::connect(&path) {
                        let _ = c.set_nonblocking(true);
                        let _ = c.write(format!("CONNECT {}\n", port(p)).as_bytes());
                        clients.push(c);
                    }
                }
            }
            Op::Write { client, data } => {
                if let Some(c) = pick(&mut clients, &mut accepted, *client) {
                    let _ = c.write(data);
                }
            }
            Op::Read(client) => {
                if let Some(c) = pick(&mut clients, &mut accepted, *client) {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                }
            }
            Op::Close(client) => {
                let n = clients.len() + accepted.len();
                if n > 0 {
                    let i = usize::from(*client) % n;
                    if i < clients.len() {
                        clients.swap_remove(i);
                    } else {
                        accepted.swap_remove(i - clients.len());
                    }
                }
            }
            Op::RxRefill => guest.refill(),
            Op::TransportReset => {
                if let Ok(mut d) = dev.lock() {
                    d.send_transport_reset();
                }
            }
            Op::AcceptGuestConnections => {
                while let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    if accepted.len() < MAX_CLIENTS {
                        accepted.push(s);
                    }
                }
            }
        }
        step(&mut em);
        if let Ok(d) = dev.lock() {
            assert!(
                d.connection_count() <= bound,
                "{} connections, above the bound of {bound}",
                d.connection_count()
            );
        }
    }
    // Whatever the guest left for the listener goes with this input.
    while listener.accept().is_ok() {}
}

fn pick<'a>(
    clients: &'a mut [UnixStream],
    accepted: &'a mut [UnixStream],
    i: u8,
) -> Option<&'a mut UnixStream> {
    let n = clients.len() + accepted.len();
    if n == 0 {
        return None;
    }
    let i = usize::from(i) % n;
    if i < clients.len() {
        clients.get_mut(i)
    } else {
        accepted.get_mut(i - clients.len())
    }
}

/// Lets the device handle what is pending: event-loop rounds until none has events.
fn step(em: &mut EventManager<Arc<Mutex<Vsock>>>) {
    for _ in 0..MAX_ROUNDS {
        match em.run_with_timeout(0) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
