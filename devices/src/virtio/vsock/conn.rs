//! One stream connection between a guest port and a host Unix socket, with virtio-vsock
//! credit-based flow control (virtio 1.2, 5.10.6.3) in both directions.
//!
//! Host → guest: bytes are read from the host socket only while the guest has credit
//! (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`), into a staging buffer of at most one packet;
//! so a guest that never returns credit stalls only this connection, and nothing is read that
//! the guest could not take.
//! Guest → host: the device advertises [`CONN_BUF_SIZE`] and buffers at most that much of what
//! the host socket did not take yet; `fwd_cnt` counts what reached the socket. A guest that
//! sends beyond its credit breaks the protocol and the connection is reset.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{op, SHUTDOWN_SEND};

/// Receive buffer the device advertises per connection (`buf_alloc`).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet, either way.
pub const MAX_PKT_LEN: u32 = 64 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE until the
    /// deadline.
    Connecting(Instant),
    /// Data flows.
    Established,
}

/// A packet the connection wants to send to the guest (the device fills in the addresses
/// and the credit fields).
#[derive(Debug)]
pub struct RxPacket {
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Payload (RW only).
    pub data: Vec<u8>,
}

/// The connection's failure that ends it with an RST.
#[derive(Debug)]
pub struct Fatal;

/// One connection.
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Lifecycle state.
    pub state: State,
    /// A REQUEST is due (host-initiated).
    pub send_request: bool,
    /// A RESPONSE is due (guest-initiated).
    pub send_response: bool,
    /// A CREDIT_UPDATE is due.
    pub send_credit_update: bool,
    /// The host socket may have data or EOF to read (edge-triggered readiness).
    pub readable: bool,
    /// The host socket may take more data (edge-triggered readiness).
    pub writable: bool,
    /// The guest sent SHUTDOWN with both flags: reset once the buffered data reached the host.
    pub closing: bool,

    // Host → guest.
    staged: Vec<u8>,
    host_eof: bool,
    shutdown_sent: bool,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    guest_shut_rcv: bool,

    // Guest → host.
    out: Vec<u8>,
    /// Leading bytes of `out` that are ours (the `OK` line), not the guest's.
    out_own: usize,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    guest_shut_send: bool,
    host_write_shut: bool,
}

impl Connection {
    /// A connection in `state` over `stream`; `staged` is data the host already sent.
    pub fn new(stream: UnixStream, state: State, staged: Vec<u8>) -> Self {
        Self {
            stream,
            state,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            readable: true,
            writable: true,
            closing: false,
            staged,
            host_eof: false,
            shutdown_sent: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_shut_rcv: false,
            out: Vec::new(),
            out_own: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_shut_send: false,
            host_write_shut: false,
        }
    }

    /// Records the guest's credit fields from one of its packets.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our `fwd_cnt`.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// Reads from the host socket what the guest has credit for (at most one packet).
    pub fn fill_from_host(&mut self) -> Result<(), Fatal> {
        if self.state != State::Established || !self.readable || self.host_eof {
            return Ok(());
        }
        if self.guest_shut_rcv {
            return Ok(());
        }
        let limit = self.peer_credit().min(MAX_PKT_LEN) as usize;
        while self.staged.len() < limit {
            let old = self.staged.len();
            self.staged.resize(limit, 0);
            let r = self.stream.read(&mut self.staged[old..]);
            match r {
                Ok(0) => {
                    self.staged.truncate(old);
                    self.host_eof = true;
                    return Ok(());
                }
                Ok(n) => self.staged.truncate(old + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.staged.truncate(old),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.staged.truncate(old);
                    self.readable = false;
                    return Ok(());
                }
                Err(e) => {
                    self.staged.truncate(old);
                    log::debug!("virtio-vsock: host socket read failed: {e}");
                    return Err(Fatal);
                }
            }
        }
        Ok(())
    }

    /// Whether [`Self::take_packet`] has something to send.
    pub fn has_rx_work(&self) -> bool {
        if self.send_request || self.send_response || self.send_credit_update {
            return true;
        }
        if self.state != State::Established {
            return false;
        }
        (!self.staged.is_empty() && self.peer_credit() > 0)
            || (self.host_eof && self.staged.is_empty() && !self.shutdown_sent)
    }

    /// The next packet for the guest, with at most `room` payload bytes; updates the
    /// connection as if it was sent. Control packets come before data, SHUTDOWN after it.
    pub fn take_packet(&mut self, room: usize) -> Option<RxPacket> {
        let packet = |op, flags, data| Some(RxPacket { op, flags, data });
        if self.send_request {
            self.send_request = false;
            return packet(op::REQUEST, 0, Vec::new());
        }
        if self.send_response {
            self.send_response = false;
            return packet(op::RESPONSE, 0, Vec::new());
        }
        if self.state == State::Established {
            let n = self.staged.len().min(self.peer_credit() as usize).min(room);
            if n > 0 {
                let rest = self.staged.split_off(n);
                let data = std::mem::replace(&mut self.staged, rest);
                self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                self.send_credit_update = false;
                return packet(op::RW, 0, data);
            }
            if self.host_eof && self.staged.is_empty() && !self.shutdown_sent {
                self.shutdown_sent = true;
                self.send_credit_update = false;
                return packet(op::SHUTDOWN, SHUTDOWN_SEND, Vec::new());
            }
        }
        if self.send_credit_update {
            self.send_credit_update = false;
            return packet(op::CREDIT_UPDATE, 0, Vec::new());
        }
        None
    }

    /// Notes that a header carrying our current `fwd_cnt` went to the guest.
    pub fn credit_sent(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// The guest's RESPONSE arrived: tell the host client `OK <local_port>`.
    pub fn establish(&mut self, local_port: u32) -> Result<(), Fatal> {
        self.state = State::Established;
        let line = format!("OK {local_port}\n").into_bytes();
        self.out_own = line.len();
        self.out.splice(0..0, line);
        self.flush_to_host()
    }

    /// Data from the guest for the host socket.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<(), Fatal> {
        if self.guest_shut_send || self.closing {
            return Err(Fatal);
        }
        let buffered = self.out.len() - self.out_own;
        if buffered + data.len() > CONN_BUF_SIZE as usize {
            log::debug!("virtio-vsock: guest sent beyond its credit");
            return Err(Fatal);
        }
        self.out.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes buffered guest data to the host socket while it takes it.
    pub fn flush_to_host(&mut self) -> Result<(), Fatal> {
        while !self.out.is_empty() && self.writable {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(Fatal),
                Ok(n) => {
                    let own = n.min(self.out_own);
                    self.out_own -= own;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) => {
                    log::debug!("virtio-vsock: host socket write failed: {e}");
                    return Err(Fatal);
                }
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CONN_BUF_SIZE / 2 {
            self.send_credit_update = true;
        }
        if self.out.is_empty() && self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Everything the guest sent reached the host socket.
    pub fn flushed(&self) -> bool {
        self.out.is_empty()
    }

    /// The guest's SHUTDOWN flags.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), Fatal> {
        if flags & super::packet::SHUTDOWN_RCV != 0 {
            self.guest_shut_rcv = true;
            self.staged.clear();
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_shut_send = true;
        }
        self.flush_to_host()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn established() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, State::Established, Vec::new()), b)
    }

    #[test]
    fn host_data_is_read_only_within_guest_credit() {
        let (mut c, mut peer) = established();
        peer.write_all(&[7u8; 100]).unwrap();
        c.fill_from_host().unwrap();
        assert!(!c.has_rx_work(), "no credit yet");
        c.update_peer_credit(30, 0);
        c.fill_from_host().unwrap();
        let p = c.take_packet(4096).unwrap();
        assert_eq!((p.op, p.data.len()), (op::RW, 30));
        assert_eq!(c.peer_credit(), 0);
        c.fill_from_host().unwrap();
        assert!(c.take_packet(4096).is_none());
        c.update_peer_credit(30, 30);
        c.fill_from_host().unwrap();
        assert_eq!(c.take_packet(10).unwrap().data.len(), 10);
    }

    #[test]
    fn guest_data_beyond_the_buffer_is_fatal() {
        let (mut c, _peer) = established();
        c.writable = false; // the host does not read
        c.push_from_guest(&vec![0; CONN_BUF_SIZE as usize]).unwrap();
        assert!(c.push_from_guest(&[0]).is_err());
    }

    #[test]
    fn credit_update_is_due_after_half_the_buffer_is_forwarded() {
        let (mut c, mut peer) = established();
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0; CONN_BUF_SIZE as usize];
            peer.read_exact(&mut sink).unwrap();
        });
        let chunk = vec![1u8; (CONN_BUF_SIZE / 4) as usize];
        for _ in 0..4 {
            c.push_from_guest(&chunk).unwrap();
            while !c.flushed() {
                c.writable = true;
                c.flush_to_host().unwrap();
            }
        }
        reader.join().unwrap();
        assert!(c.send_credit_update);
        assert_eq!(c.fwd_cnt(), CONN_BUF_SIZE);
    }

    #[test]
    fn host_eof_sends_shutdown_after_the_data() {
        let (mut c, mut peer) = established();
        c.update_peer_credit(1024, 0);
        peer.write_all(b"bye").unwrap();
        drop(peer);
        c.fill_from_host().unwrap();
        assert_eq!(c.take_packet(4096).unwrap().data, b"bye");
        c.fill_from_host().unwrap();
        let p = c.take_packet(4096).unwrap();
        assert_eq!((p.op, p.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        assert!(c.take_packet(4096).is_none());
    }
}
