//! The rx queue: RSTs and the connections' packets for the guest, one packet per connection
//! per pass so that connections share the guest's buffers.

use std::collections::VecDeque;
use std::io::Write;

use super::packet::{Header, HDR_LEN, TYPE_STREAM};
use super::{Key, Vsock, BUDGET, CONN_BUF_SIZE, HOST_CID, MAX_PKT_LEN, RX_QUEUE};
use crate::virtio::queue::{Chain, Handled, Served};

/// What goes next into an rx buffer: a queued RST (`None`) or a packet of a connection.
type Work = Option<Key>;

impl Vsock {
    /// Fills up to a queue's worth of the guest's rx buffers with queued RSTs and the
    /// connections' packets; with more left, wakes the loop to come back.
    pub(super) fn process_rx(&mut self) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let mut pass = VecDeque::new();
        let result = match a.queues.get_mut(RX_QUEUE) {
            Some(q) if !a.broken => q.serve(&a.mem, &a.interrupt, BUDGET, |chain| {
                self.fill_rx_buffer(chain, &mut pass)
            }),
            _ => Ok(Served::default()),
        };
        match result {
            Ok(served) if served.more => {
                let _ = self.kick.write(1);
            }
            Ok(_) => {}
            Err(e) => self.break_queue(&mut a, RX_QUEUE, &e),
        }
        self.active = Some(a);
    }

    /// Writes the next packet into the rx buffer `chain`, or leaves it for later when there is
    /// nothing to send.
    fn fill_rx_buffer(&mut self, chain: Chain<'_>, pass: &mut VecDeque<Work>) -> Handled {
        let mem = chain.chain.memory();
        let mut writer = match chain.chain.clone().writer(mem) {
            Ok(w) if w.available_bytes() >= HDR_LEN => w,
            _ => {
                // Unusable buffer: give it back empty; the packet waits for the next one.
                log::debug!("virtio-vsock: rx buffer too small or not writable");
                return Handled::Used(0);
            }
        };
        let room = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_LEN as usize);
        let Some((item, hdr, data)) = self.next_rx_packet(room, pass) else {
            return Handled::Later;
        };
        let ok = writer.write_all(&hdr.to_bytes()).is_ok() && writer.write_all(&data).is_ok();
        if !ok {
            log::debug!("virtio-vsock: rx buffer not writable");
            if let Some(key) = item {
                self.kill(key, true);
            }
            return Handled::Used(0);
        }
        Handled::Used((HDR_LEN + data.len()) as u32)
    }

    /// The next packet for the guest, at most `room` bytes of payload: round-robin over the
    /// queued RSTs and the connections with something to send, one per pass.
    fn next_rx_packet(
        &mut self,
        room: usize,
        pass: &mut VecDeque<Work>,
    ) -> Option<(Work, Header, Vec<u8>)> {
        for _ in 0..2 {
            while let Some(item) = pass.pop_front() {
                if let Some(packet) = self.packet_of(item, room) {
                    return Some((item, packet.0, packet.1));
                }
            }
            // A new pass: read what the host sockets have, then one packet per connection.
            let mut failed = Vec::new();
            for (&key, c) in self.conns.iter_mut() {
                if c.fill_from_host().is_err() {
                    failed.push(key);
                }
            }
            for key in failed {
                self.kill(key, true);
            }
            if !self.rst_queue.is_empty() {
                pass.push_back(None);
            }
            pass.extend(
                self.conns
                    .iter()
                    .filter(|(_, c)| c.has_rx_work())
                    .map(|(&k, _)| Some(k)),
            );
            if pass.is_empty() {
                return None;
            }
        }
        None
    }

    /// One packet of `item`, if it has one.
    fn packet_of(&mut self, item: Work, room: usize) -> Option<(Header, Vec<u8>)> {
        let Some(key) = item else {
            return self.rst_queue.pop_front().map(|h| (h, Vec::new()));
        };
        let cid = self.cid;
        let c = self.conns.get_mut(&key)?;
        let p = c.take_packet(room)?;
        c.credit_sent();
        let h = Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.0,
            dst_port: key.1,
            len: p.data.len() as u32,
            kind: TYPE_STREAM,
            op: p.op,
            flags: p.flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: c.fwd_cnt(),
        };
        Some((h, p.data))
    }
}
