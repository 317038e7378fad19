//! The console commands. Each prints its output lines, then `ok` or
//! `err <reason>` (see the README for the exact contract).

use crate::console::{self, Sink};
use crate::memtest::{self, Error as MemError};
use crate::power::{self, PowerOffError};
use crate::{blk, bootparams, count, disklog, flood, hostile, smp, time, virtio, vsock};

/// Runs one command line (without its line end) on the console.
pub fn run(line: &[u8]) {
    let mut out = console::lock();
    let result = execute(line, &mut out);
    match &result {
        Ok(()) => out.str("ok"),
        Err(fail) => {
            out.str("err ");
            fail.write(&mut out);
        }
    }
    out.nl();
}

/// Runs one command line, writing its output lines (not the final
/// `ok`/`err`) to `out`.
pub fn execute(line: &[u8], out: &mut dyn Sink) -> Reply {
    let (name, rest) = split_word(line);
    match name {
        b"echo" => {
            out.bytes(rest);
            out.nl();
            Ok(())
        }
        b"cpus" => no_args(rest, "usage: cpus").map(|()| {
            out.dec(u64::from(smp::online_cpus()));
            out.nl();
        }),
        b"cmdline" => no_args(rest, "usage: cmdline").map(|()| {
            out.bytes(bootparams::get().cmdline());
            out.nl();
        }),
        b"mem" => no_args(rest, "usage: mem").map(|()| mem(out)),
        b"count" => count_cmd(out, rest),
        b"blk" => blk_cmd(out, rest),
        b"log" => log_cmd(out, rest),
        b"vsock" => vsock_cmd(out, rest),
        b"hostile" => hostile::command(rest),
        b"fill" | b"check" => mem_cmd(name == b"fill", rest),
        b"flood" => flood_cmd(out, rest),
        b"poweroff" => no_args(rest, "usage: poweroff").and_then(|()| poweroff(out)),
        b"reboot" => no_args(rest, "usage: reboot").map(|()| {
            out.str("ok\r\n");
            power::reboot()
        }),
        b"panic" => no_args(rest, "usage: panic").map(|()| {
            out.str("panic: requested by console\r\n");
            power::guest_panic()
        }),
        b"help" => no_args(rest, "usage: help").map(|()| {
            out.str(HELP);
        }),
        _ => Err(Fail::Reason("unknown command")),
    }
}

/// Why a command failed.
pub enum Fail {
    /// `err <reason>`.
    Reason(&'static str),
    /// `err mismatch at <hex addr>`.
    MismatchAt(u64),
    /// `err broken log after <n> records`.
    BrokenLog(u64),
}

impl Fail {
    /// Writes the reason (what follows `err `).
    pub fn write(&self, out: &mut dyn Sink) {
        match *self {
            Fail::Reason(reason) => out.str(reason),
            Fail::MismatchAt(addr) => {
                out.str("mismatch at ");
                out.hex(addr);
            }
            Fail::BrokenLog(n) => {
                out.str("broken log after ");
                out.dec(n);
                out.str(" records");
            }
        }
    }
}

const HELP: &str = "echo TEXT | cpus | cmdline | mem | count start|get|stop | fill MIB SEED | \
check MIB SEED | flood KIB | poweroff | reboot | panic | help\r\n\
blk N info|flush | blk N write SECTOR COUNT SEED | blk N read SECTOR COUNT | \
log start N|stop [N]|verify N\r\n\
blk N status|reset | vsock [reset] | hostile blk N avail-idx|desc-loop|huge|oob | \
hostile vsock avail-idx | hostile mmio SEED\r\n";

/// A command's result.
pub type Reply = Result<(), Fail>;

/// Splits off the first space-separated word.
fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    let mut parts = line.splitn(2, |&b| b == b' ');
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// The space-separated words of `args` (empty words skipped).
pub(crate) fn words(args: &[u8]) -> impl Iterator<Item = &[u8]> {
    args.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// `Ok` when `rest` holds no arguments, else `err <usage>`.
fn no_args(rest: &[u8], usage: &'static str) -> Reply {
    match words(rest).next() {
        None => Ok(()),
        Some(_) => Err(Fail::Reason(usage)),
    }
}

/// Parses a decimal u64 (digits only, no overflow).
pub(crate) fn parse_u64(word: &[u8]) -> Option<u64> {
    if word.is_empty() {
        return None;
    }
    word.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn mem(out: &mut dyn Sink) {
    const MIB: u64 = 1 << 20;
    let bytes = bootparams::get()
        .e820()
        .iter()
        .filter(|e| e.kind == bootparams::E820_RAM)
        .fold(0u64, |sum, e| sum.saturating_add(e.size));
    out.dec(bytes.div_ceil(MIB));
    out.nl();
}

const COUNT_USAGE: &str = "usage: count start|get|stop";

fn count_cmd(out: &mut dyn Sink, args: &[u8]) -> Reply {
    let mut words = words(args);
    let (Some(action), None) = (words.next(), words.next()) else {
        return Err(Fail::Reason(COUNT_USAGE));
    };
    match action {
        b"start" => count::start(),
        b"stop" => count::stop(),
        b"get" => {
            let mut sum = 0u64;
            count::for_each(|c| sum = sum.wrapping_add(c));
            out.dec(sum);
            out.nl();
            out.str("per-cpu");
            count::for_each(|c| {
                out.str(" ");
                out.dec(c);
            });
            out.nl();
        }
        _ => return Err(Fail::Reason(COUNT_USAGE)),
    }
    Ok(())
}

fn mem_cmd(fill: bool, args: &[u8]) -> Reply {
    let usage = if fill {
        "usage: fill MIB SEED"
    } else {
        "usage: check MIB SEED"
    };
    let mut words = words(args);
    let (Some(mib), Some(seed), None) = (words.next(), words.next(), words.next()) else {
        return Err(Fail::Reason(usage));
    };
    let (Some(mib), Some(seed)) = (parse_u64(mib), parse_u64(seed)) else {
        return Err(Fail::Reason(usage));
    };
    let result = if fill {
        memtest::fill(mib, seed)
    } else {
        memtest::check(mib, seed)
    };
    result.map_err(|e| match e {
        MemError::ExceedsMemory => Fail::Reason("fill region exceeds memory"),
        MemError::Mismatch(addr) => Fail::MismatchAt(addr),
    })
}

const FLOOD_USAGE: &str = "usage: flood KIB";

fn flood_cmd(out: &mut dyn Sink, args: &[u8]) -> Reply {
    let mut words = words(args);
    let (Some(kib), None) = (words.next().and_then(parse_u64), words.next()) else {
        return Err(Fail::Reason(FLOOD_USAGE));
    };
    if kib > flood::MAX_KIB {
        return Err(Fail::Reason("size too large"));
    }
    flood::flood(out, kib);
    Ok(())
}

/// Prints `ok` and powers off, or returns why it cannot.
fn poweroff(out: &mut dyn Sink) -> Reply {
    match power::prepare_poweroff() {
        Ok(off) => {
            out.str("ok\r\n");
            off.run()
        }
        Err(PowerOffError::NoFadt) => Err(Fail::Reason("no FADT")),
        Err(PowerOffError::NoSleepControl) => Err(Fail::Reason("no sleep control register")),
    }
}

const BLK_USAGE: &str = "usage: blk N info|flush|status|reset | blk N write SECTOR COUNT SEED | \
blk N read SECTOR COUNT";

fn blk_cmd(out: &mut dyn Sink, args: &[u8]) -> Reply {
    let mut words = words(args);
    let (Some(n), Some(action)) = (words.next().and_then(parse_u64), words.next()) else {
        return Err(Fail::Reason(BLK_USAGE));
    };
    let mut nums = [0u64; 3];
    let mut given = 0;
    for w in words {
        let (Some(slot), Some(v)) = (nums.get_mut(given), parse_u64(w)) else {
            return Err(Fail::Reason(BLK_USAGE));
        };
        *slot = v;
        given += 1;
    }
    let [a, b, c] = nums;
    let blk_err = |e: blk::Error| Fail::Reason(e.reason());
    match (action, given) {
        (b"info", 0) => {
            let (capacity, ro, irqs) = blk::info(n).map_err(blk_err)?;
            out.dec(capacity);
            out.str(if ro { " ro" } else { " rw" });
            out.str(" irqs=");
            out.dec(irqs);
            out.nl();
            Ok(())
        }
        (b"flush", 0) => blk::flush(n).map_err(blk_err),
        (b"status", 0) => {
            let status = blk::status(n).map_err(blk_err)?;
            out.hex(u64::from(status));
            if status & virtio::DEVICE_NEEDS_RESET != 0 {
                out.str(" needs-reset");
            }
            out.nl();
            Ok(())
        }
        (b"reset", 0) => blk::reset(n).map_err(blk_err),
        (b"write", 3) => {
            if b > blk::MAX_COUNT {
                return Err(Fail::Reason("count too large"));
            }
            blk::write_pattern(n, a, b, c).map_err(blk_err)
        }
        (b"read", 2) => {
            if b > blk::MAX_COUNT {
                return Err(Fail::Reason("count too large"));
            }
            let hash = blk::read_hash(n, a, b).map_err(blk_err)?;
            out.hex16(hash);
            out.nl();
            Ok(())
        }
        _ => Err(Fail::Reason(BLK_USAGE)),
    }
}

const LOG_USAGE: &str = "usage: log start N|stop [N]|verify N";

fn log_cmd(out: &mut dyn Sink, args: &[u8]) -> Reply {
    let mut words = words(args);
    let action = words.next();
    let n = words.next();
    if words.next().is_some() {
        return Err(Fail::Reason(LOG_USAGE));
    }
    match (action, n.map(parse_u64)) {
        (Some(b"start"), Some(Some(n))) => {
            disklog::start(n).map_err(|e| Fail::Reason(e.reason()))
        }
        (Some(b"stop"), None) => {
            disklog::stop();
            Ok(())
        }
        (Some(b"stop"), Some(Some(n))) => {
            disklog::stop_disk(n);
            Ok(())
        }
        (Some(b"verify"), Some(Some(n))) => match disklog::verify(n) {
            Ok(records) => {
                out.dec(records);
                out.nl();
                Ok(())
            }
            Err(disklog::VerifyError::Disk(e)) => Err(Fail::Reason(e.reason())),
            Err(disklog::VerifyError::Broken(good)) => Err(Fail::BrokenLog(good)),
        },
        _ => Err(Fail::Reason(LOG_USAGE)),
    }
}

fn vsock_cmd(out: &mut dyn Sink, args: &[u8]) -> Reply {
    let mut words = words(args);
    match (words.next(), words.next()) {
        (None, _) => {}
        (Some(b"reset"), None) => return vsock::reset().map_err(Fail::Reason),
        _ => return Err(Fail::Reason("usage: vsock [reset]")),
    }
    let (cid, open, stats) = vsock::status().map_err(Fail::Reason)?;
    out.str("cid=");
    out.dec(cid);
    out.str(" conns=");
    out.dec(open as u64);
    out.str(" irqs=");
    out.dec(vsock::transport().map_or(0, virtio::irq_count));
    out.str(" rx=");
    out.dec(stats.rx_packets);
    out.str(" tx=");
    out.dec(stats.tx_packets);
    out.str(" busy_polls=");
    out.dec(stats.busy_polls);
    out.str(" busy_ms=");
    out.dec(stats.busy_ticks / time::tsc_khz());
    out.nl();
    Ok(())
}
