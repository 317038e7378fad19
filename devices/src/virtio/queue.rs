//! The one queue-service helper every virtio device uses, and the saved form of a queue.
//!
//! [`VirtQueue`] wraps `virtio_queue`'s split [`Queue`] with the checks a queue the guest may
//! have broken needs, because `virtio_queue` alone does not report them: `pop_descriptor_chain`
//! logs and returns `None` on an avail index more than a queue size ahead while
//! `enable_notification` keeps returning true (a service loop spins), and a `DescriptorChain`
//! silently stops early at a loop, a next index past the table, a bad indirect table or 4 GiB.
//! Here each of these is a [`QueueError`], and so is any descriptor outside guest memory or
//! beyond the device's limits ([`ChainLimits`]). virtio 1.2, 2.1.2: the device then sets
//! DEVICE_NEEDS_RESET and stops using the queue; the caller does that.
//!
//! [`VirtQueue::serve`] is the service loop: it pops at most `budget` chains, hands each, fully
//! walked and checked, to the device's handler, returns the used element, and raises the
//! used-buffer interrupt when the driver wants one. It never loops on a ring that does not
//! move. Between two chains it checks whether the driver reset the device
//! ([`Interrupt::reset_pending`]): then it stops, and the chain in hand, if any, is not
//! returned (the driver gave it up), so that a reset waits for at most one request and nothing
//! reaches the rings once the driver asked for it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use snapshot::StateError;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

use super::{GuestMemory, Interrupt, INT_VRING};

/// What a device accepts in one descriptor chain. A chain beyond these limits breaks the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLimits {
    /// Most descriptors in one chain (indirect ones counted by their table entries).
    pub max_descriptors: usize,
    /// Largest length of one descriptor, in bytes.
    pub max_len: u32,
}

/// Why a queue is unusable: the guest broke it, and the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The avail index is more than a queue size ahead of the device.
    #[error("avail index {avail} is {} entries ahead of the device's {next} (queue size {size})", avail.wrapping_sub(*next))]
    AvailIndex {
        /// The driver's avail index.
        avail: u16,
        /// The device's next avail index.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// A head index in the available ring is not below the queue size.
    #[error("head index {head} is not below the queue size {size}")]
    HeadIndex {
        /// The head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The chain's walk stopped before a descriptor without NEXT.
    #[error(
        "the chain at head {head} is cut short: a loop, a next index past the table, a bad \
         indirect table, an unreadable descriptor or more than 4 GiB"
    )]
    ChainCut {
        /// The chain's head.
        head: u16,
    },
    /// The chain has more descriptors than the device accepts.
    #[error("the chain at head {head} has more than {max} descriptors")]
    ChainTooLong {
        /// The chain's head.
        head: u16,
        /// The device's limit.
        max: usize,
    },
    /// A descriptor is longer than the device accepts.
    #[error("a descriptor of {len} bytes in the chain at head {head} exceeds the device's {max}")]
    TooLarge {
        /// The chain's head.
        head: u16,
        /// The descriptor's length.
        len: u32,
        /// The device's limit.
        max: u32,
    },
    /// A descriptor's buffer is not inside guest memory.
    #[error("the chain at head {head} has a buffer {addr:#x}+{len:#x} outside guest memory")]
    Address {
        /// The chain's head.
        head: u16,
        /// The buffer's address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A ring access failed (the rings were checked at activation; the guest moved them).
    #[error("{what}")]
    Ring {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
}

fn ring(what: &'static str) -> impl FnOnce(virtio_queue::Error) -> QueueError {
    move |source| QueueError::Ring { what, source }
}

/// One chain handed to a device: its head index, its descriptors (walked and checked: every
/// buffer inside guest memory and within the limits, the last without NEXT), and the chain
/// itself for `virtio_queue`'s reader and writer.
pub struct Chain<'a> {
    /// The head index.
    pub head: u16,
    /// The descriptors in order.
    pub descs: &'a [Descriptor],
    /// The chain, to read or write it as a stream.
    pub chain: DescriptorChain<&'a GuestMemory>,
}

/// What a handler did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done: return it to the driver with this used length.
    Used(u32),
    /// Not now: leave it on the available ring and stop (vsock rx with nothing to send).
    Later,
}

/// What one [`VirtQueue::serve`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Chains returned to the driver.
    pub used: usize,
    /// The budget ran out with chains still available: serve again later.
    pub more: bool,
}

/// A split virtqueue owned by a device thread.
pub struct VirtQueue {
    queue: Queue,
    limits: ChainLimits,
    /// The current chain's descriptors; capacity `limits.max_descriptors`, reused.
    descs: Vec<Descriptor>,
}

impl VirtQueue {
    /// Serves `queue` within `limits`.
    pub fn new(queue: Queue, limits: ChainLimits) -> Self {
        Self {
            queue,
            limits,
            descs: Vec::with_capacity(limits.max_descriptors),
        }
    }

    /// The queue (for its state).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Takes the next available chain's head index, after checking the avail index and the head.
    fn pop<'m>(
        &mut self,
        mem: &'m GuestMemory,
    ) -> Result<Option<DescriptorChain<&'m GuestMemory>>, QueueError> {
        let size = self.queue.size();
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(ring("reading the avail index"))?
            .0;
        let next = self.queue.next_avail();
        let pending = avail.wrapping_sub(next);
        if pending == 0 {
            return Ok(None);
        }
        if pending > size {
            return Err(QueueError::AvailIndex { avail, next, size });
        }
        let chain = self
            .queue
            .pop_descriptor_chain(mem)
            .ok_or(QueueError::Ring {
                what: "reading the available ring",
                source: virtio_queue::Error::InvalidAvailRingIndex,
            })?;
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError::HeadIndex { head, size });
        }
        Ok(Some(chain))
    }

    /// Walks `chain` into `self.descs`, checking every descriptor.
    fn walk(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<(), QueueError> {
        let head = chain.head_index();
        self.descs.clear();
        for d in chain {
            if self.descs.len() == self.limits.max_descriptors {
                return Err(QueueError::ChainTooLong {
                    head,
                    max: self.limits.max_descriptors,
                });
            }
            if d.len() > self.limits.max_len {
                return Err(QueueError::TooLarge {
                    head,
                    len: d.len(),
                    max: self.limits.max_len,
                });
            }
            if d.len() > 0 && !mem.check_range(d.addr(), d.len() as usize) {
                return Err(QueueError::Address {
                    head,
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            self.descs.push(d);
        }
        // The walk ends early, without an error, at everything the guest can break.
        match self.descs.last() {
            Some(d) if !d.has_next() => Ok(()),
            _ => Err(QueueError::ChainCut { head }),
        }
    }

    /// Serves at most `budget` chains with `handle`, then raises `interrupt` if the driver
    /// wants to hear of the used buffers. Notifications are left enabled unless the budget ran
    /// out (`more`; the caller comes back). Stops early, touching the rings no more, once a
    /// reset is pending; a chain whose handler ran when the reset came is not returned.
    pub fn serve<F>(
        &mut self,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        budget: usize,
        mut handle: F,
    ) -> Result<Served, QueueError>
    where
        F: FnMut(Chain<'_>) -> Handled,
    {
        let mut served = Served::default();
        if interrupt.reset_pending() {
            return Ok(served);
        }
        let result = self.serve_inner(mem, interrupt, budget, &mut served, &mut handle);
        if served.used > 0
            && !interrupt.reset_pending()
            && self
                .queue
                .needs_notification(mem)
                .map_err(ring("reading the used event"))?
        {
            interrupt.trigger(INT_VRING);
        }
        result.map(|()| served)
    }

    fn serve_inner<F>(
        &mut self,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        budget: usize,
        served: &mut Served,
        handle: &mut F,
    ) -> Result<(), QueueError>
    where
        F: FnMut(Chain<'_>) -> Handled,
    {
        self.queue
            .disable_notification(mem)
            .map_err(ring("disabling notifications"))?;
        // Every turn either pops a chain or finds the ring empty; a guest that keeps moving its
        // avail index back and forth still cannot keep this loop going past twice the budget.
        for _ in 0..budget.saturating_mul(2).max(2) {
            if served.used >= budget {
                served.more = true;
                return Ok(());
            }
            if interrupt.reset_pending() {
                // The driver reset the device: its event loop does the reset next.
                return Ok(());
            }
            let Some(chain) = self.pop(mem)? else {
                if self
                    .queue
                    .enable_notification(mem)
                    .map_err(ring("enabling notifications"))?
                {
                    // More arrived while notifications were off.
                    self.queue
                        .disable_notification(mem)
                        .map_err(ring("disabling notifications"))?;
                    continue;
                }
                return Ok(());
            };
            let head = chain.head_index();
            self.walk(mem, chain.clone())?;
            let handled = handle(Chain {
                head,
                descs: &self.descs,
                chain,
            });
            if interrupt.reset_pending() {
                // The driver gave this chain up when it reset the device: nothing more goes on
                // the rings it is reclaiming.
                return Ok(());
            }
            match handled {
                Handled::Used(len) => {
                    self.queue
                        .add_used(mem, head, len)
                        .map_err(ring("writing the used ring"))?;
                    served.used += 1;
                }
                Handled::Later => {
                    self.queue
                        .set_next_avail(self.queue.next_avail().wrapping_sub(1));
                    self.queue
                        .enable_notification(mem)
                        .map_err(ring("enabling notifications"))?;
                    return Ok(());
                }
            }
        }
        served.more = true;
        Ok(())
    }
}

/// A queue as saved: plain data, untrusted on restore ([`restore_queue`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedQueue {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum, the driver's choice.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The device's next avail index.
    pub next_avail: u16,
    /// The device's next used index.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx: bool,
}

impl From<QueueState> for SavedQueue {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

/// Rebuilds a queue from `saved` for a device whose QueueNumMax is `max_size`, checking every
/// field: the maximum matches, the size is a power of two no larger, and a ready queue's rings
/// are aligned (virtio 1.2, 2.7: 16, 2 and 4 bytes) and inside `mem`.
pub fn restore_queue(
    saved: &SavedQueue,
    max_size: u16,
    mem: &GuestMemory,
) -> Result<Queue, StateError> {
    snapshot::check(saved.max_size == max_size, "max_size", || {
        format!("{} but the device offers {max_size}", saved.max_size)
    })?;
    snapshot::check(
        saved.size.is_power_of_two() && saved.size <= max_size,
        "size",
        || format!("{} is not a power of two up to {max_size}", saved.size),
    )?;
    let size = u64::from(saved.size);
    let rings = [
        ("desc_table", saved.desc_table, 16, 16 * size),
        ("avail_ring", saved.avail_ring, 2, 6 + 2 * size),
        ("used_ring", saved.used_ring, 4, 6 + 8 * size),
    ];
    for (field, addr, align, len) in rings {
        snapshot::check(addr % align == 0, field, || {
            format!("{addr:#x} is not {align}-byte aligned")
        })?;
        if saved.ready {
            snapshot::check(
                usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len)),
                field,
                || format!("{addr:#x}+{len:#x} is not inside guest memory"),
            )?;
        }
    }
    let state = QueueState {
        max_size: saved.max_size,
        next_avail: saved.next_avail,
        next_used: saved.next_used,
        event_idx_enabled: saved.event_idx,
        size: saved.size,
        ready: saved.ready,
        desc_table: saved.desc_table,
        avail_ring: saved.avail_ring,
        used_ring: saved.used_ring,
    };
    Queue::try_from(state).map_err(|e| StateError::new("queue", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EventFd;

    const LIMITS: ChainLimits = ChainLimits {
        max_descriptors: 4,
        max_len: 0x1000,
    };

    fn setup() -> (GuestMemory, VirtQueue, u64, std::sync::Arc<Interrupt>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let q: Queue = mock.create_queue().unwrap();
        let avail = mock.avail_addr().0;
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (mem, VirtQueue::new(q, LIMITS), avail, irq)
    }

    fn desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mem.write_obj(d, GuestAddress(u64::from(i) * 16)).unwrap();
    }

    fn offer(mem: &GuestMemory, avail: u64, slot: u16, head: u16) {
        mem.write_obj(head, GuestAddress(avail + 4 + u64::from(slot) * 2))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(avail + 2)).unwrap();
    }

    fn serve(q: &mut VirtQueue, mem: &GuestMemory, irq: &Interrupt) -> Result<Served, QueueError> {
        q.serve(mem, irq, 16, |c| Handled::Used(c.descs.len() as u32))
    }

    #[test]
    fn a_good_chain_is_served_and_interrupts() {
        let (mem, mut q, avail, irq) = setup();
        desc(&mem, 0, 0x8000, 16, 1, 1);
        desc(&mem, 1, 0x9000, 1, 2, 0);
        offer(&mem, avail, 0, 0);
        assert_eq!(serve(&mut q, &mem, &irq).unwrap().used, 1);
        assert_ne!(irq.status() & INT_VRING, 0);
        assert_eq!(q.queue().next_used(), 1);
    }

    #[test]
    fn each_kind_of_broken_ring_is_an_error() {
        type Case = (&'static str, fn(&GuestMemory, u64), fn(&QueueError) -> bool);
        let cases: [Case; 6] = [
            (
                "avail index ahead",
                |m, a| m.write_obj(17u16, GuestAddress(a + 2)).unwrap(),
                |e| matches!(e, QueueError::AvailIndex { avail: 17, .. }),
            ),
            (
                "head past the queue",
                |m, a| offer(m, a, 0, 16),
                |e| matches!(e, QueueError::HeadIndex { head: 16, .. }),
            ),
            (
                "loop",
                |m, a| {
                    desc(m, 0, 0x8000, 16, 1, 1);
                    desc(m, 1, 0x9000, 16, 1, 0);
                    offer(m, a, 0, 0);
                },
                |e| {
                    matches!(
                        e,
                        QueueError::ChainTooLong { .. } | QueueError::ChainCut { .. }
                    )
                },
            ),
            (
                "next past the table",
                |m, a| {
                    desc(m, 0, 0x8000, 16, 1, 40);
                    offer(m, a, 0, 0);
                },
                |e| matches!(e, QueueError::ChainCut { head: 0 }),
            ),
            (
                "outside guest memory",
                |m, a| {
                    desc(m, 0, 0x10_0000 - 8, 16, 0, 0);
                    offer(m, a, 0, 0);
                },
                |e| matches!(e, QueueError::Address { .. }),
            ),
            (
                "too large",
                |m, a| {
                    desc(m, 0, 0x8000, 0x4000_0000, 0, 0);
                    offer(m, a, 0, 0);
                },
                |e| {
                    matches!(
                        e,
                        QueueError::TooLarge {
                            len: 0x4000_0000,
                            ..
                        }
                    )
                },
            ),
        ];
        for (what, arrange, want) in cases {
            let (mem, mut q, avail, irq) = setup();
            arrange(&mem, avail);
            let err = serve(&mut q, &mem, &irq).unwrap_err();
            assert!(want(&err), "{what}: {err}");
            assert_eq!(q.queue().next_used(), 0, "{what}");
        }
    }

    #[test]
    fn the_budget_bounds_one_call() {
        let (mem, mut q, avail, irq) = setup();
        for i in 0..8u16 {
            desc(&mem, i, 0x8000, 16, 0, 0);
            offer(&mem, avail, i, i);
        }
        let s = q.serve(&mem, &irq, 3, |_| Handled::Used(0)).unwrap();
        assert_eq!(
            s,
            Served {
                used: 3,
                more: true
            }
        );
        let s = q.serve(&mem, &irq, 16, |_| Handled::Used(0)).unwrap();
        assert_eq!(
            s,
            Served {
                used: 5,
                more: false
            }
        );
    }

    #[test]
    fn later_leaves_the_chain_available() {
        let (mem, mut q, avail, irq) = setup();
        desc(&mem, 0, 0x8000, 16, 0, 0);
        offer(&mem, avail, 0, 0);
        let s = q.serve(&mem, &irq, 16, |_| Handled::Later).unwrap();
        assert_eq!(s.used, 0);
        assert_eq!(q.queue().next_avail(), 0);
        assert_eq!(serve(&mut q, &mem, &irq).unwrap().used, 1);
    }

    #[test]
    fn a_pending_reset_stops_the_service_between_chains_and_the_chain_in_hand_is_not_returned() {
        let (mem, mut q, avail, irq) = setup();
        for i in 0..3u16 {
            desc(&mem, i, 0x8000, 16, 0, 0);
            offer(&mem, avail, i, i);
        }
        // The driver resets the device while the device handles the second chain.
        let mut handled = 0;
        let s = q
            .serve(&mem, &irq, 16, |_| {
                handled += 1;
                if handled == 2 {
                    irq.post_reset();
                }
                Handled::Used(0)
            })
            .unwrap();
        assert_eq!(handled, 2, "no chain after the reset was posted");
        assert_eq!(s.used, 1);
        assert_eq!(
            q.queue().next_used(),
            1,
            "the chain in hand was not returned"
        );
        let used_idx: u16 = mem
            .read_obj(GuestAddress(q.queue().used_ring() + 2))
            .unwrap();
        assert_eq!(used_idx, 1);
        assert_eq!(
            irq.status() & INT_VRING,
            0,
            "no interrupt once the reset is posted"
        );
        // Nothing more while it is pending.
        let s = q.serve(&mem, &irq, 16, |_| panic!("served")).unwrap();
        assert_eq!(s, Served::default());
    }

    #[test]
    fn saved_queues_are_checked_field_by_field() {
        let (mem, q, _, _) = setup();
        let good = SavedQueue::from(q.queue().state());
        assert!(restore_queue(&good, 16, &mem).is_ok());
        let bad = |f: fn(&mut SavedQueue), field: &str| {
            let mut s = good;
            f(&mut s);
            let e = restore_queue(&s, 16, &mem).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        };
        bad(|s| s.max_size = 32, "max_size");
        bad(|s| s.size = 12, "size");
        bad(|s| s.size = 0, "size");
        bad(|s| s.desc_table = 0x1008, "desc_table");
        bad(|s| s.avail_ring = 0x10_0000, "avail_ring");
        bad(|s| s.used_ring = 0xf_fffc, "used_ring");
    }
}
