//! The `log` workload: on each disk it runs on, appends one 512-byte record
//! per sector from sector 0 upward, each write followed by a flush. Several
//! disks can run a log at once (one log per disk); the BSP's idle loop
//! writes one record per turn, taking the running logs in turn (round
//! robin by disk number), between looks at the console and the vsock
//! device. So records are only ever written whole and `stop`/`freeze` take
//! effect at a record boundary. The record format is
//! [`crate::pattern::log_record`].

use crate::pattern::{self, SECTOR_SIZE};
use crate::sync::Global;
use crate::{blk, time};

/// Most logs at once: one per disk the driver knows.
pub const MAX_LOGS: usize = blk::MAX_DISKS;

/// The log of one disk.
#[derive(Clone, Copy)]
struct Log {
    running: bool,
    /// Records written (and flushed) by the current (or last) run.
    seq: u64,
    nonce: u64,
    capacity: u64,
}

const IDLE: Log = Log {
    running: false,
    seq: 0,
    nonce: 0,
    capacity: 0,
};

struct State {
    /// Indexed by disk number.
    logs: [Log; MAX_LOGS],
    /// Stopped by `freeze` (the agent), resumed by `thaw`: every log.
    frozen: bool,
    /// TSC deadline of the automatic thaw (0: none).
    thaw_at: u64,
    /// The disk whose log gets the next turn (if it runs, else the next
    /// running one after it).
    next: usize,
    /// Mixed into each new run's nonce.
    seed: u64,
    record: [u8; SECTOR_SIZE],
}

static STATE: Global<State> = Global::new(State {
    logs: [IDLE; MAX_LOGS],
    frozen: false,
    thaw_at: 0,
    next: 0,
    seed: 0,
    record: [0; SECTOR_SIZE],
});

fn state() -> &'static mut State {
    // SAFETY: BSP only; no caller keeps it across another call.
    unsafe { &mut *STATE.get() }
}

/// Starts a new run on disk `n` from sector 0 (restarting that disk's run
/// if one is going); the logs of other disks go on. A new run while frozen
/// waits for the thaw like the others.
pub fn start(n: u64) -> Result<(), blk::Error> {
    let (capacity, _, _) = blk::info(n)?;
    let s = state();
    let Some(log) = usize::try_from(n).ok().and_then(|i| s.logs.get_mut(i)) else {
        return Err(blk::Error::NoDisk);
    };
    s.seed = pattern::splitmix64(time::rdtsc() ^ s.seed);
    *log = Log {
        running: true,
        seq: 0,
        nonce: s.seed,
        capacity,
    };
    Ok(())
}

/// Stops every run (records are written whole, so this is a boundary).
pub fn stop() {
    for log in state().logs.iter_mut() {
        log.running = false;
    }
}

/// Stops the run on disk `n`, if one goes.
pub fn stop_disk(n: u64) {
    if let Some(log) = usize::try_from(n)
        .ok()
        .and_then(|i| state().logs.get_mut(i))
    {
        log.running = false;
    }
}

/// Whether a step is due (a log runs and they are not frozen).
pub fn wants_step() -> bool {
    let s = state();
    !s.frozen && s.logs.iter().any(|l| l.running)
}

/// Appends one record (write + flush) to the next running log in turn.
/// A log stops when its disk is full or a request fails.
pub fn step() {
    let s = state();
    if s.frozen {
        return;
    }
    let start = s.next;
    for k in 0..MAX_LOGS {
        let i = (start + k) % MAX_LOGS;
        let Some(log) = s.logs.get_mut(i) else {
            continue;
        };
        if !log.running {
            continue;
        }
        s.next = (i + 1) % MAX_LOGS;
        if log.seq >= log.capacity {
            // Full: stop, and give the turn to the next log.
            log.running = false;
            continue;
        }
        let disk = i as u64;
        pattern::log_record(log.nonce, log.seq, &mut s.record);
        let ok = blk::write_sector(disk, log.seq, &s.record).is_ok() && blk::flush(disk).is_ok();
        if ok {
            log.seq += 1;
        } else {
            log.running = false;
        }
        return;
    }
}

/// What `freeze` stopped: the running logs with their record counts, in
/// disk order.
pub struct Frozen {
    logs: [(u64, u64); MAX_LOGS],
    len: usize,
}

impl Frozen {
    /// (disk, records on disk) of each log that was running.
    pub fn logs(&self) -> &[(u64, u64)] {
        self.logs.get(..self.len).unwrap_or_default()
    }

    /// Whether any log was running.
    pub fn any(&self) -> bool {
        self.len > 0
    }

    /// Records on disk over all running logs.
    pub fn total(&self) -> u64 {
        self.logs()
            .iter()
            .fold(0, |sum, &(_, n)| sum.saturating_add(n))
    }
}

/// `freeze`: stops appending on every disk (at a record boundary: steps are
/// atomic here) and flushes each disk with a running log; thaws by itself
/// after `timeout_ms`. Returns the running logs and how many records each
/// has on disk (every one of them written and flushed). With no log
/// running nothing is frozen.
pub fn freeze(timeout_ms: u64) -> Frozen {
    let s = state();
    let mut frozen = Frozen {
        logs: [(0, 0); MAX_LOGS],
        len: 0,
    };
    for (i, log) in s.logs.iter().enumerate() {
        if !log.running {
            continue;
        }
        let disk = i as u64;
        let _ = blk::flush(disk);
        if let Some(slot) = frozen.logs.get_mut(frozen.len) {
            *slot = (disk, log.seq);
            frozen.len += 1;
        }
    }
    if frozen.any() {
        s.frozen = true;
        s.thaw_at = time::deadline_ms(timeout_ms);
    }
    frozen
}

/// `thaw`: resumes appending on every disk.
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
            let fits =
                matches!(parsed, Some((seq, run)) if seq == lba && nonce.is_none_or(|n| n == run));
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
