//! The rx queue: RSTs and the connections' packets for the guest, one packet per connection
//! per pass so that connections share the guest's buffers.

use std::io::Write;

use virtio_queue::QueueT;

use super::packet::{Header, HDR_LEN, TYPE_STREAM};
use super::{Key, Vsock, CONN_BUF_SIZE, HOST_CID, MAX_PKT_LEN, RX_QUEUE};
use crate::virtio::INT_VRING;

impl Vsock {
    /// Fills the guest's rx buffers with queued RSTs and the connections' packets.
    pub(super) fn process_rx(&mut self) {
        if self.active.as_ref().is_none_or(|a| a.broken) {
            return;
        }
        let mut used_any = false;
        'passes: loop {
            // One packet per connection per pass, so that connections share the buffers.
            let mut failed = Vec::new();
            for (&key, c) in self.conns.iter_mut() {
                if c.fill_from_host().is_err() {
                    failed.push(key);
                }
            }
            for key in failed {
                self.kill(key, true);
            }
            let mut work: Vec<Option<Key>> = Vec::new();
            if !self.rst_queue.is_empty() {
                work.push(None);
            }
            work.extend(
                self.conns
                    .iter()
                    .filter(|(_, c)| c.has_rx_work())
                    .map(|(&k, _)| Some(k)),
            );
            if work.is_empty() {
                break;
            }
            let mut sent = false;
            for item in work {
                match self.send_one(item) {
                    Sent::Yes => sent = true,
                    Sent::Nothing => {}
                    Sent::NoBuffer => break 'passes,
                    Sent::Broken => return,
                }
                used_any |= sent;
            }
            used_any |= sent;
            if !sent {
                break;
            }
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues.get_mut(RX_QUEUE) else {
            return;
        };
        if used_any && q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.trigger(INT_VRING);
        }
    }

    /// Sends one packet from the RST queue (`None`) or from connection `key`.
    fn send_one(&mut self, item: Option<Key>) -> Sent {
        let cid = self.cid;
        let Self {
            active,
            conns,
            rst_queue,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Sent::Broken;
        };
        let Some(q) = a.queues.get_mut(RX_QUEUE) else {
            return Sent::Broken;
        };
        let mem = &a.mem;
        let chain = loop {
            match q.pop_descriptor_chain(mem) {
                Some(chain) => break chain,
                None => match q.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => return Sent::NoBuffer,
                    Err(_) => {
                        a.broken = true;
                        return Sent::Broken;
                    }
                },
            }
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= HDR_LEN => w,
            _ => {
                // Unusable buffer: give it back empty; the packet waits for the next one.
                log::debug!("virtio-vsock: rx buffer too small or invalid");
                if q.add_used(mem, head, 0).is_err() {
                    a.broken = true;
                    return Sent::Broken;
                }
                return Sent::Yes;
            }
        };
        let room = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_LEN as usize);
        let packet = match item {
            None => rst_queue.pop_front().map(|h| (h, Vec::new())),
            Some(key) => conns.get_mut(&key).and_then(|c| {
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
            }),
        };
        let Some((hdr, data)) = packet else {
            // Nothing to send after all: un-pop the buffer.
            drop(writer);
            q.set_next_avail(q.next_avail().wrapping_sub(1));
            return Sent::Nothing;
        };
        let ok = writer.write_all(&hdr.to_bytes()).is_ok() && writer.write_all(&data).is_ok();
        let written = if ok { (HDR_LEN + data.len()) as u32 } else { 0 };
        if q.add_used(mem, head, written).is_err() {
            a.broken = true;
            return Sent::Broken;
        }
        if !ok {
            log::debug!("virtio-vsock: rx buffer not writable");
            if let Some(key) = item {
                self.kill(key, true);
            }
        }
        Sent::Yes
    }
}

/// What [`Vsock::send_one`] did.
enum Sent {
    Yes,
    Nothing,
    NoBuffer,
    Broken,
}
