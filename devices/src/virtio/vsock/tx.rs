//! The tx queue: packets from the guest, parsed defensively and acted on.

use std::io::Read;
use std::os::fd::AsRawFd;

use super::conn::{self, Connection, State};
use super::packet::{self, op, Header, HDR_LEN, TYPE_STREAM};
use super::{socket_events, uds, Key, Vsock, BUDGET, HOST_CID, MAX_PKT_LEN, TX_QUEUE};
use crate::virtio::queue::{Handled, Served};
use crate::virtio::GuestMemory;
use event_manager::{EventOps, Events};

impl Vsock {
    /// Serves up to a queue's worth of packets the guest put on the tx queue; with more left,
    /// signals the queue to come back after other events.
    pub(super) fn process_tx(&mut self, ops: &mut EventOps) {
        // The queues leave `self` while the handler acts on the connections.
        let Some(mut a) = self.active.take() else {
            return;
        };
        let result = match a.queues.get_mut(TX_QUEUE) {
            Some(q) if !a.broken => q.serve(&a.mem, &a.interrupt, BUDGET, |chain| {
                let packet = read_tx_packet(&a.mem, chain.chain);
                self.on_tx_packet(packet, ops);
                Handled::Used(0)
            }),
            _ => Ok(Served::default()),
        };
        match result {
            Ok(served) if served.more => {
                let _ = self.queue_evts[TX_QUEUE].write(1);
            }
            Ok(_) => {}
            Err(e) => self.break_queue(&mut a, TX_QUEUE, &e),
        }
        self.active = Some(a);
    }

    /// Acts on what one tx chain held.
    fn on_tx_packet(&mut self, packet: Result<(Header, Vec<u8>), Malformed>, ops: &mut EventOps) {
        match packet {
            Ok((h, data)) => self.handle_tx(h, &data, ops),
            Err(Malformed::NoHeader) => {
                log::debug!("virtio-vsock: tx packet without a header dropped");
            }
            Err(Malformed::BadLen(h)) => {
                log::debug!("virtio-vsock: tx packet with bad length {} dropped", h.len);
                if h.src_cid == self.cid && h.dst_cid == HOST_CID && h.op != op::RST {
                    let key = (h.dst_port, h.src_port);
                    if self.conns.contains_key(&key) {
                        self.kill(key, true);
                    } else {
                        self.queue_rst(key);
                    }
                }
            }
        }
    }

    /// Acts on one well-formed tx packet.
    fn handle_tx(&mut self, h: Header, data: &[u8], ops: &mut EventOps) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            log::debug!(
                "virtio-vsock: packet from CID {} to CID {} dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            if h.op != op::RST {
                if self.conns.contains_key(&key) {
                    self.kill(key, true);
                } else {
                    self.queue_rst(key);
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.guest_connect(key, h, ops),
                op::RST => {}
                _ => self.queue_rst(key),
            }
            return;
        };
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        let result = match h.op {
            op::RESPONSE if matches!(c.state, State::Connecting(_)) && !c.send_request => {
                c.establish(key.0)
            }
            op::RST => {
                self.kill(key, false);
                return;
            }
            op::SHUTDOWN => {
                let both = packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND;
                if h.flags & both == both {
                    c.closing = true;
                }
                c.guest_shutdown(h.flags)
            }
            op::RW if c.state == State::Established => c.push_from_guest(data),
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                c.send_credit_update = true;
                Ok(())
            }
            // A duplicate REQUEST, a RESPONSE or data out of turn, an unknown op.
            _ => Err(conn::Fatal),
        };
        let done = c.closing && c.flushed();
        if result.is_err() || done {
            self.kill(key, true);
        }
    }

    /// The guest connects to host port `key.0`: connect to `PATH_<port>`.
    fn guest_connect(&mut self, key: Key, h: Header, ops: &mut EventOps) {
        if self.at_bound() {
            self.queue_rst(key);
            return;
        }
        let path = uds::port_path(&self.uds_path, key.0);
        let stream = match uds::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                self.queue_rst(key);
                return;
            }
        };
        if let Err(e) = ops.add(Events::new(&stream, socket_events())) {
            crate::rate_limited!(
                log::Level::Warn,
                "virtio-vsock: cannot watch {}: {e}",
                path.display()
            );
            self.queue_rst(key);
            return;
        }
        let mut c = Connection::new(stream, State::Established, Vec::new());
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        c.send_response = true;
        self.conn_fds.insert(c.stream.as_raw_fd(), key);
        self.conns.insert(key, c);
    }
}

/// Why a tx packet was dropped.
#[derive(Debug)]
enum Malformed {
    /// Fewer than 44 readable bytes, or unreadable memory.
    NoHeader,
    /// `len` beyond the payload or [`MAX_PKT_LEN`].
    BadLen(Header),
}

/// Reads a tx packet's header and payload from `chain`.
fn read_tx_packet(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<(Header, Vec<u8>), Malformed> {
    let mut reader = chain.reader(mem).map_err(|_| Malformed::NoHeader)?;
    if reader.available_bytes() < HDR_LEN {
        return Err(Malformed::NoHeader);
    }
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| Malformed::NoHeader)?;
    let h = Header::from_bytes(&raw);
    if h.len > MAX_PKT_LEN || h.len as usize > reader.available_bytes() {
        return Err(Malformed::BadLen(h));
    }
    let mut data = vec![0u8; h.len as usize];
    reader
        .read_exact(&mut data)
        .map_err(|_| Malformed::BadLen(h))?;
    Ok((h, data))
}
