//! The `log` workload: appends one 512-byte record per sector from sector 0
//! upward to a disk, each write followed by a flush, in the BSP's idle loop
//! (one record per turn, between looks at the console and the vsock
//! device), so records are only ever written whole and `stop`/`freeze`
//! take effect at a record boundary. The record format is
//! [`crate::pattern::log_record`].

use crate::pattern::{self, SECTOR_SIZE};
use crate::sync::Global;
use crate::{blk, time};

struct State {
    running: bool,
    /// Stopped by `freeze` (the agent), resumed by `thaw`.
    frozen: bool,
    /// TSC deadline of the automatic thaw (0: none).
    thaw_at: u64,
    disk: u64,
    seq: u64,
    nonce: u64,
    capacity: u64,
    record: [u8; SECTOR_SIZE],
}

static STATE: Global<State> = Global::new(State {
    running: false,
    frozen: false,
    thaw_at: 0,
    disk: 0,
    seq: 0,
    nonce: 0,
    capacity: 0,
    record: [0; SECTOR_SIZE],
});

fn state() -> &'static mut State {
    // SAFETY: BSP only; no caller keeps it across another call.
    unsafe { &mut *STATE.get() }
}

/// Starts a new run on disk `n` (stopping a running one).
pub fn start(n: u64) -> Result<(), blk::Error> {
    let (capacity, _, _) = blk::info(n)?;
    let s = state();
    s.running = true;
    s.disk = n;
    s.seq = 0;
    s.capacity = capacity;
    s.nonce = pattern::splitmix64(time::rdtsc() ^ s.nonce);
    Ok(())
}

/// Stops the run (records are written whole, so this is a boundary).
pub fn stop() {
    let s = state();
    s.running = false;
}

/// Whether a step is due (running and not frozen).
pub fn wants_step() -> bool {
    let s = state();
    s.running && !s.frozen
}

/// Appends one record (write + flush). Stops the run when the disk is full
/// or a request fails.
pub fn step() {
    let s = state();
    if !s.running || s.frozen {
        return;
    }
    if s.seq >= s.capacity {
        s.running = false;
        return;
    }
    pattern::log_record(s.nonce, s.seq, &mut s.record);
    let ok = blk::write_sector(s.disk, s.seq, &s.record).is_ok() && blk::flush(s.disk).is_ok();
    if ok {
        s.seq += 1;
    } else {
        s.running = false;
    }
}

/// Records written by the current (or last) run.
pub fn written() -> u64 {
    state().seq
}

/// `freeze`: stops appending (at a record boundary: steps are atomic here)
/// and flushes; thaws by itself after `timeout_ms`. True when a log was
/// running.
pub fn freeze(timeout_ms: u64) -> bool {
    let s = state();
    if !s.running {
        return false;
    }
    s.frozen = true;
    s.thaw_at = time::deadline_ms(timeout_ms);
    let _ = blk::flush(s.disk);
    true
}

/// `thaw`: resumes appending.
pub fn thaw() {
    let s = state();
    s.frozen = false;
    s.thaw_at = 0;
}

/// The pending automatic-thaw deadline, if frozen.
pub fn thaw_deadline() -> Option<u64> {
    let s = state();
    (s.frozen && s.thaw_at != 0).then_some(s.thaw_at)
}

/// Thaws when the freeze timed out.
pub fn check_thaw() {
    if let Some(at) = thaw_deadline() {
        if time::passed(at) {
            thaw();
        }
    }
}

/// Why `verify` failed.
pub enum VerifyError {
    /// A request failed.
    Disk(blk::Error),
    /// After `n` good records a bad one is followed by a good one.
    Broken(u64),
}

/// Counts the unbroken prefix of records of one run from sector 0 and
/// checks that no record of that run follows a gap.
pub fn verify(n: u64) -> Result<u64, VerifyError> {
    let (capacity, _, _) = blk::info(n).map_err(VerifyError::Disk)?;
    let count = capacity.min(blk::MAX_COUNT * 16);
    let mut good = 0u64;
    let mut nonce: Option<u64> = None;
    let mut broken = false;
    let mut late = false;
    blk::read(n, 0, count, |first, bytes| {
        for (i, sector) in bytes.chunks_exact(SECTOR_SIZE).enumerate() {
            let Ok(sector_bytes) = <&[u8; SECTOR_SIZE]>::try_from(sector) else {
                continue;
            };
            let lba = first + i as u64;
            // Cheap magic test first: checksumming every sector is slow.
            let parsed = if sector_bytes.starts_with(&pattern::LOG_MAGIC) {
                pattern::log_record_parse(sector_bytes)
            } else {
                None
            };
            let fits = matches!(parsed, Some((seq, run)) if seq == lba && nonce.is_none_or(|n| n == run));
            if !broken {
                if fits {
                    good += 1;
                    nonce = parsed.map(|(_, run)| run);
                } else {
                    broken = true;
                }
            } else if fits {
                late = true;
            }
        }
    })
    .map_err(VerifyError::Disk)?;
    if late {
        return Err(VerifyError::Broken(good));
    }
    Ok(good)
}
