//! `hostile ...`: the test guest breaking the virtio rules on purpose, so
//! that end-to-end tests can check that the VMM survives such a guest
//! ("a guest cannot crash or hang the VMM"). Each command misbehaves,
//! notifies the queue it broke (if any) and answers at once, without
//! waiting for the device. The driver of the device then gives it up:
//! requests fail with `err driver needs reset` until `blk N reset` /
//! `vsock reset`. Everything else in the guest keeps working (as far as
//! the VMM lets it).

use crate::blk::{self, Attack};
use crate::commands::{parse_u64, words, Fail, Reply};
use crate::pattern::splitmix64;
use crate::{virtio, vsock};

const USAGE: &str = "usage: hostile blk N avail-idx|desc-loop|huge|oob | \
hostile vsock avail-idx | hostile mmio SEED";

/// `hostile mmio` writes and reads the registers from 0x000 to here: the
/// common registers (0x000..0x100) and the first 64 bytes of the device's
/// configuration space.
const MMIO_END: u64 = 0x140;

/// Runs `hostile ARGS`.
pub fn command(args: &[u8]) -> Reply {
    let mut w = words(args);
    let (target, a, b, extra) = (w.next(), w.next(), w.next(), w.next());
    if extra.is_some() {
        return Err(Fail::Reason(USAGE));
    }
    match (target, a, b) {
        (Some(b"blk"), Some(n), Some(attack)) => {
            let n = parse_u64(n).ok_or(Fail::Reason(USAGE))?;
            let attack = match attack {
                b"avail-idx" => Attack::AvailIdx,
                b"desc-loop" => Attack::DescLoop,
                b"huge" => Attack::Huge,
                b"oob" => Attack::Oob,
                _ => return Err(Fail::Reason(USAGE)),
            };
            blk::hostile(n, attack).map_err(|e| Fail::Reason(e.reason()))
        }
        (Some(b"vsock"), Some(b"avail-idx"), None) => {
            vsock::hostile_avail_idx().map_err(Fail::Reason)
        }
        (Some(b"mmio"), Some(seed), None) => {
            let seed = parse_u64(seed).ok_or(Fail::Reason(USAGE))?;
            mmio(seed)
        }
        _ => Err(Fail::Reason(USAGE)),
    }
}

/// One step of xorshift64 (13, 7, 17).
fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// `hostile mmio SEED`: for every virtio-mmio transport in address order,
/// writes the next pseudo-random value (the low 32 bits of an xorshift64
/// sequence whose state starts at `splitmix64(SEED) | 1`) to every 32-bit
/// register from 0x000 to [`MMIO_END`], then reads every one of them
/// back. Every driver gives its device up.
fn mmio(seed: u64) -> Reply {
    // The agent's connection lives on the vsock device: not from there.
    if vsock::in_poll() {
        return Err(Fail::Reason(vsock::NOT_OVER_VSOCK));
    }
    blk::abandon_all();
    vsock::abandon();
    let mut x = splitmix64(seed) | 1;
    for t in virtio::transports() {
        for offset in (0..MMIO_END).step_by(4) {
            x = xorshift64(x);
            virtio::write32(t.base, offset, x as u32);
        }
        for offset in (0..MMIO_END).step_by(4) {
            let _ = virtio::read32(t.base, offset);
        }
    }
    Ok(())
}
