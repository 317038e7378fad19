//! virtio-vsock (virtio 1.2, section 5.10) with the Unix-socket backend Firecracker users know.
//!
//! Queues: rx (0, device → guest), tx (1, guest → device), event (2, TRANSPORT_RESET only).
//! The host is CID 2 ([`HOST_CID`]); only stream sockets exist. The config space is the
//! guest's CID as a little-endian u64.
//!
//! Host side, all on the device's own event loop thread:
//! - **host → guest**: the device listens on a Unix socket `PATH`. A client connects and
//!   writes `CONNECT <port>\n` (at most [`uds::MAX_LINE`] bytes, within the handshake timeout,
//!   else it is closed); the device sends the guest a REQUEST from a fresh local port
//!   (≥ 2^30); on the guest's RESPONSE it writes `OK <local-port>\n` to the client and relays
//!   bytes both ways; on RST (nobody listens in the guest), or no answer within the handshake
//!   timeout, the client's socket is closed.
//! - **guest → host**: a REQUEST to host port P connects to the Unix socket `PATH_P`
//!   (non-blocking); success → RESPONSE, failure → RST.
//! - **flow control** ([`conn`]): the device advertises [`CONN_BUF_SIZE`] per connection,
//!   never sends the guest more than its credit, and sends CREDIT_UPDATE once half the buffer
//!   was forwarded since the last update, and on CREDIT_REQUEST.
//! - **shutdown**: host EOF → SHUTDOWN(SEND) to the guest after the data; guest SHUTDOWN(SEND)
//!   → `shutdown(Write)` on the host socket once its data is written; guest SHUTDOWN with both
//!   flags → the host socket is closed once the data is written, and the guest gets an RST.
//!   Either side going away otherwise resets the connection.
//!
//! Host sockets are registered with the event loop dynamically, edge-triggered; each
//! connection keeps a readable and a writable flag, so a connection blocked on credit or on rx
//! buffers does not spin the loop. Sockets closed outside the loop (device reset, transport
//! reset) are parked until the loop unregisters them, woken through an internal eventfd.
//!
//! Everything from the guest is checked: a malformed tx packet (short header, `len` beyond the
//! payload or [`MAX_PKT_LEN`], wrong CIDs, a type other than stream, an unknown op, a packet
//! for an unknown connection) is dropped, with an RST when it names a connection, and the
//! device keeps serving.
//!
//! Choices where the spec is silent: the socket file at `PATH` is replaced if it is a stale
//! socket (anything else at `PATH` is an error) and is left in place when the device goes
//! away; the handshake timeout is 5 s; at most [`MAX_PENDING_CLIENTS`] clients mid-handshake
//! and [`Vsock::max_connections`] connections exist at once. That bound is read from the
//! open-file limit when the device is created ([`connection_bound`]: what the limit leaves
//! after [`FD_RESERVE`] descriptors for the rest of the VMM and the pending clients, at most
//! [`MAX_CONNECTIONS`]), so a guest or host clients opening connections are refused (a guest
//! REQUEST gets an RST, a host client is closed after its `CONNECT` line) before the VMM runs
//! out of descriptors. Should `accept` still fail for want of descriptors, the listener is
//! left unwatched until the next timer tick rather than spinning the loop. Log lines the guest
//! or host clients can trigger are rate-limited ([`crate::ratelimit`]).

pub mod conn;
pub mod packet;
mod rx;
mod tx;
pub mod uds;

#[cfg(any(test, feature = "bench-utils"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use snapshot::{check, Persist, StateError};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{ChainLimits, Handled, QueueError, VirtQueue};
use super::{
    ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use conn::{Connection, State};
pub use conn::{CONN_BUF_SIZE, MAX_PKT_LEN};
use packet::{op, Header, TYPE_STREAM};

/// The virtio device id of a socket device.
pub const DEVICE_TYPE: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// The tx queue.
pub const TX_QUEUE: usize = 1;
/// The event queue.
pub const EVENT_QUEUE: usize = 2;
/// `struct virtio_vsock_event` id: the transport was reset (virtio 1.2, 5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Most connections at once (each holds a host file descriptor and up to [`CONN_BUF_SIZE`] of
/// buffers), however high the open-file limit is; a lower limit lowers the bound
/// ([`connection_bound`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have not finished the handshake.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// File descriptors the connection bound leaves to the rest of the VMM (disks, eventfds,
/// vCPUs, API connections, checkpoint files) besides the pending clients.
pub const FD_RESERVE: u64 = 256;
/// Default time a host client has to send `CONNECT`, and the guest to answer the REQUEST.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// RSTs queued for the guest (for packets without a connection) beyond which more are dropped.
const MAX_QUEUED_RST: usize = 1024;
/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection's key: (host port, guest port).
type Key = (u32, u32);

/// A host client that has not sent its `CONNECT` line yet.
struct PendingClient {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<VirtQueue>,
    broken: bool,
}

/// What the queues accept: no chain longer than a queue (the spec's limit for a direct chain,
/// applied to indirect tables too); the device advertises no buffer size limit.
const LIMITS: ChainLimits = ChainLimits {
    max_descriptors: QUEUE_SIZE as usize,
    max_len: u32::MAX,
};

/// Chains served per queue per wakeup; with more left the loop comes back after other events.
const BUDGET: usize = QUEUE_SIZE as usize;

/// A virtio-vsock device with the Unix-socket backend.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    queue_evts: Vec<EventFd>,
    /// Wakes the loop to unregister sockets closed elsewhere.
    kick: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    handshake_timeout: Duration,
    active: Option<Active>,
    conns: HashMap<Key, Connection>,
    conn_fds: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingClient>,
    rst_queue: VecDeque<Header>,
    /// Closed sockets still registered with the event loop.
    dead: Vec<UnixStream>,
    next_local_port: u32,
    /// Restored from a snapshot: tell the guest its connections are gone once it is active.
    transport_reset_due: bool,
    /// Most connections at once ([`connection_bound`] of the open-file limit at creation).
    max_connections: usize,
    /// `accept` failed for want of descriptors: the listener is not watched until the next
    /// timer tick, so that a listener that stays readable does not spin the loop.
    listener_paused: bool,
}

/// What the loop watches on a host socket.
fn socket_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP
}

/// Removes a stale socket file at `path`; anything else there is left alone and an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The process's soft limit on open files (`RLIMIT_NOFILE`), `None` if it cannot be read;
/// no limit reads as `u64::MAX`.
pub fn open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which lives across the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return None;
    }
    Some(if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    })
}

/// The most connections a device may hold under an open-file limit of `limit`: what is left
/// after [`FD_RESERVE`] and [`MAX_PENDING_CLIENTS`], at most [`MAX_CONNECTIONS`]. Each
/// connection holds one descriptor, so the device can never be the one that exhausts them.
pub fn connection_bound(limit: u64) -> usize {
    let left = limit.saturating_sub(FD_RESERVE + MAX_PENDING_CLIENTS as u64);
    usize::try_from(left).map_or(MAX_CONNECTIONS, |l| l.min(MAX_CONNECTIONS))
}

/// Makes `fd` non-blocking: a timer disarmed earlier in the same epoll batch must not block
/// the loop when its stale event is served.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Vsock {
    /// A device for a guest with CID `cid` (3 ..= u32::MAX - 1), listening on `uds_path` (a
    /// stale socket there is replaced). The VMM binds the socket itself (owner-only, refusing
    /// a path another process listens on) and uses [`Vsock::with_listener`]; this is for tests.
    pub fn new(cid: u64, uds_path: impl Into<PathBuf>) -> io::Result<Self> {
        let uds_path = uds_path.into();
        remove_stale_socket(&uds_path)?;
        let listener = UnixListener::bind(&uds_path)?;
        Self::with_listener(cid, uds_path, listener)
    }

    /// A device for a guest with CID `cid` (3 ..= u32::MAX - 1) whose host clients connect to
    /// `listener`, bound at `uds_path` (guest-initiated connections to port P go to
    /// `<uds_path>_P`).
    pub fn with_listener(
        cid: u64,
        uds_path: impl Into<PathBuf>,
        listener: UnixListener,
    ) -> io::Result<Self> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {cid} is reserved or out of range"),
            ));
        }
        let uds_path = uds_path.into();
        listener.set_nonblocking(true)?;
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        let queue_evts = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let limit = open_file_limit();
        let max_connections = limit.map_or(MAX_CONNECTIONS, connection_bound);
        if max_connections < MAX_CONNECTIONS {
            log::warn!(
                "virtio-vsock: at most {max_connections} connections, as the open-file limit is \
                 {} (raise `ulimit -n` for more)",
                limit.unwrap_or_default()
            );
        }
        Ok(Self {
            cid,
            uds_path,
            listener,
            queue_evts,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            timer,
            timer_armed: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            active: None,
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            pending: HashMap::new(),
            rst_queue: VecDeque::new(),
            dead: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            transport_reset_due: false,
            max_connections,
            listener_paused: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Changes how long a host client has to send `CONNECT` and the guest to answer.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// The queues' notification eventfds (rx, tx, event), for the transport and the KVM
    /// ioeventfds.
    pub fn queue_events(&self) -> io::Result<Vec<EventFd>> {
        self.queue_evts.iter().map(EventFd::try_clone).collect()
    }

    /// Number of open connections (established or connecting).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Most connections at once: beyond it a guest REQUEST gets an RST and a host client is
    /// closed after its `CONNECT` line.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Lowers (or raises, up to the bound of the open-file limit) the most connections at once.
    pub fn set_max_connections(&mut self, n: usize) {
        let ceiling = open_file_limit().map_or(MAX_CONNECTIONS, connection_bound);
        self.max_connections = n.min(ceiling);
    }

    /// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue and drops every connection
    /// (their host sockets are closed). Used after restoring a VM: the guest's connections
    /// cannot survive. Returns whether the event reached the guest (false when the device is
    /// not active or the driver gave no event buffer).
    pub fn send_transport_reset(&mut self) -> bool {
        let mut delivered = false;
        if let Some(mut a) = self.active.take().filter(|a| !a.broken) {
            if let Some(q) = a.queues.get_mut(EVENT_QUEUE) {
                let result = q.serve(&a.mem, &a.interrupt, 1, |chain| {
                    let written = match chain.chain.writer(&a.mem) {
                        Ok(mut w) if w.available_bytes() >= 4 => w
                            .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                            .map(|()| 4)
                            .unwrap_or(0),
                        _ => 0,
                    };
                    delivered = written == 4;
                    Handled::Used(written)
                });
                if let Err(e) = result {
                    self.break_queue(&mut a, EVENT_QUEUE, &e);
                }
            }
            if !delivered {
                crate::rate_limited!(
                    log::Level::Warn,
                    "virtio-vsock: no event buffer for TRANSPORT_RESET"
                );
            }
            self.active = Some(a);
        }
        self.drop_all();
        delivered
    }

    /// The guest broke queue `index`: stop serving and ask for a reset (virtio 1.2, 2.1.2).
    fn break_queue(&mut self, a: &mut Active, index: usize, e: &QueueError) {
        crate::rate_limited!(
            log::Level::Warn,
            "virtio-vsock: queue {index} broken, device needs reset: {e}"
        );
        a.broken = true;
        a.interrupt.set_needs_reset();
        self.drop_all();
    }

    /// Whether the device stopped serving queues the guest broke.
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    /// Closes every connection and pending client without telling the guest.
    fn drop_all(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = c.stream.shutdown(Shutdown::Both);
            self.dead.push(c.stream);
        }
        for (_, p) in self.pending.drain() {
            self.dead.push(p.stream);
        }
        self.conn_fds.clear();
        self.rst_queue.clear();
        if !self.dead.is_empty() {
            let _ = self.kick.write(1);
        }
    }

    /// Ends connection `key`; with `rst` the guest is told.
    fn kill(&mut self, key: Key, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.conn_fds.remove(&c.stream.as_raw_fd());
            let _ = c.stream.shutdown(Shutdown::Both);
            self.dead.push(c.stream);
            if rst {
                self.queue_rst(key);
            }
        }
    }

    /// Queues an RST from host port `key.0` to guest port `key.1`.
    fn queue_rst(&mut self, key: Key) {
        if self.rst_queue.len() >= MAX_QUEUED_RST {
            log::debug!("virtio-vsock: RST queue full, dropping one");
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// Unregisters and closes the sockets parked in `dead`.
    fn reap(&mut self, ops: &mut EventOps) {
        for s in self.dead.drain(..) {
            let _ = ops.remove(Events::empty(&s));
        }
    }

    /// Arms the timer while someone waits on a handshake, disarms it otherwise.
    fn update_timer(&mut self) {
        let waiting = !self.pending.is_empty()
            || self.listener_paused
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, State::Connecting(_)));
        if waiting && !self.timer_armed {
            let tick = (self.handshake_timeout / 4).max(Duration::from_millis(10));
            match self.timer.reset(tick, Some(tick)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => crate::rate_limited!(
                    log::Level::Warn,
                    "virtio-vsock: cannot arm the handshake timer: {e}"
                ),
            }
        } else if !waiting && self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    /// Closes clients and connections whose handshake took too long.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            if let Some(p) = self.pending.remove(&fd) {
                log::debug!("virtio-vsock: host client sent no CONNECT in time");
                self.dead.push(p.stream);
            }
        }
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Connecting(d) if d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            log::debug!(
                "virtio-vsock: guest did not answer the REQUEST to port {}",
                key.1
            );
            self.kill(key, true);
        }
    }

    /// Watches the listener again after [`Self::accept`] paused it.
    fn resume_listener(&mut self, ops: &mut EventOps) {
        if self.listener_paused {
            self.listener_paused = false;
            if let Err(e) = ops.add(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN)) {
                crate::rate_limited!(
                    log::Level::Error,
                    "virtio-vsock: cannot watch {}: {e}",
                    self.uds_path.display()
                );
            }
        }
    }

    /// Accepts host clients.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::rate_limited!(
                        log::Level::Warn,
                        "virtio-vsock: accept on {}: {e}",
                        self.uds_path.display()
                    );
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        // The client stays in the backlog and the listener readable: stop
                        // watching it until the next timer tick instead of spinning.
                        let _ =
                            ops.remove(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN));
                        self.listener_paused = true;
                    }
                    return;
                }
            };
            if self.pending.len() >= MAX_PENDING_CLIENTS || stream.set_nonblocking(true).is_err() {
                continue; // dropping closes it
            }
            if let Err(e) = ops.add(Events::new(&stream, socket_events())) {
                crate::rate_limited!(
                    log::Level::Warn,
                    "virtio-vsock: cannot watch a host client: {e}"
                );
                continue;
            }
            let fd = stream.as_raw_fd();
            self.pending.insert(
                fd,
                PendingClient {
                    stream,
                    buf: Vec::new(),
                    deadline: Instant::now() + self.handshake_timeout,
                },
            );
            self.handshake(fd);
        }
    }

    /// Reads what a pending client sent; on `CONNECT <port>` sends the guest a REQUEST.
    fn handshake(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; uds::MAX_LINE + 2];
        let verdict = loop {
            match uds::parse_handshake(&p.buf) {
                uds::Handshake::Incomplete => {}
                done => break done,
            }
            match p.stream.read(&mut chunk) {
                Ok(0) => break uds::Handshake::Invalid,
                Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break uds::Handshake::Invalid,
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let port = match verdict {
            uds::Handshake::Connect { port, rest } if self.can_connect() => (port, rest),
            _ => {
                log::debug!("virtio-vsock: host client closed (bad handshake or no guest)");
                self.dead.push(p.stream);
                return;
            }
        };
        let (port, rest) = port;
        let local = self.alloc_local_port();
        let deadline = Instant::now() + self.handshake_timeout;
        let mut c = Connection::new(p.stream, State::Connecting(deadline), rest);
        c.send_request = true;
        self.conn_fds.insert(fd, (local, port));
        self.conns.insert((local, port), c);
    }

    fn can_connect(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.broken) && !self.at_bound()
    }

    /// Whether the device holds as many connections as it may; then one more is refused.
    fn at_bound(&self) -> bool {
        let full = self.conns.len() >= self.max_connections;
        if full {
            crate::rate_limited!(
                log::Level::Warn,
                "virtio-vsock: {} connections, the most this device keeps; refusing more",
                self.conns.len()
            );
        }
        full
    }

    /// A local port no connection uses.
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// A host socket of connection `key` became ready.
    fn socket_ready(&mut self, key: Key, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            c.writable = true;
        }
        let result = c.flush_to_host();
        let done = c.closing && c.flushed();
        if result.is_err() || done {
            self.kill(key, true);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn config_space(&self) -> Vec<u8> {
        // guest_cid, read-only.
        self.cid.to_le_bytes().to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(i));
        }
        self.drop_all();
        self.active = Some(Active {
            mem,
            // A device restored in DEVICE_NEEDS_RESET stays stopped until the driver resets it.
            broken: interrupt.needs_reset(),
            interrupt,
            queues: queues
                .into_iter()
                .map(|q| VirtQueue::new(q, LIMITS))
                .collect(),
        });
        if std::mem::take(&mut self.transport_reset_due) {
            // Restored: the guest's connections did not survive (virtio 1.2, 5.10.6.7).
            self.send_transport_reset();
        }
        // Packets may have been queued before DRIVER_OK: let the loop look.
        let _ = self.queue_evts[TX_QUEUE].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.drop_all();
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.queue().state()))
            .collect()
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[i].read();
            if i == TX_QUEUE {
                self.process_tx(ops);
            }
            // rx: new buffers, handled below; event: buffers for later.
        } else if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.expire();
            self.resume_listener(ops);
        } else if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if self.pending.contains_key(&fd) {
            self.handshake(fd);
        } else if let Some(&key) = self.conn_fds.get(&fd) {
            self.socket_ready(key, set);
        }
        self.process_rx();
        self.reap(ops);
        self.update_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch a queue: {e}");
            }
        }
        let fds = [
            self.kick.as_raw_fd(),
            self.timer.as_raw_fd(),
            self.listener.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch fd {fd}: {e}");
            }
        }
    }
}

/// A vsock device's saved state. Host connections cannot survive a restore: the restored device
/// has none, and the caller sends the guest a transport reset once it runs
/// ([`Vsock::send_transport_reset`]). Its queues are the transport's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VsockState {
    /// The guest's CID.
    pub cid: u64,
    /// The next local port for host-initiated connections.
    pub next_local_port: u32,
}

/// What a vsock device is restored on.
pub struct VsockResources {
    /// The Unix socket host clients connect to.
    pub uds_path: PathBuf,
    /// The listener bound there (by the VMM); `None` binds it here, replacing a stale socket.
    pub listener: Option<UnixListener>,
}

impl Persist for Vsock {
    type State = VsockState;
    type Resources = VsockResources;
    type Error = StateError;

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            next_local_port: self.next_local_port,
        }
    }

    fn restore(r: VsockResources, state: &VsockState) -> Result<Self, StateError> {
        check((3..u64::from(u32::MAX)).contains(&state.cid), "cid", || {
            format!("{} is reserved or out of range", state.cid)
        })?;
        check(
            state.next_local_port >= FIRST_LOCAL_PORT,
            "next_local_port",
            || format!("{} is below {FIRST_LOCAL_PORT}", state.next_local_port),
        )?;
        let made = match r.listener {
            Some(l) => Vsock::with_listener(state.cid, r.uds_path, l),
            None => Vsock::new(state.cid, r.uds_path),
        };
        let mut v = made.map_err(|e| StateError::new("uds_path", e.to_string()))?;
        v.next_local_port = state.next_local_port;
        v.transport_reset_due = true;
        Ok(v)
    }
}
