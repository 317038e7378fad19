//! The console commands. Each prints its output lines, then `ok` or
//! `err <reason>` (see the README for the exact contract).

use crate::console::{self, Console};
use crate::memtest::{self, Error as MemError};
use crate::power::{self, PowerOffError};
use crate::{bootparams, count, smp};

/// Runs one command line (without its line end).
pub fn run(line: &[u8]) {
    let (name, rest) = split_word(line);
    let mut out = console::lock();
    let result = match name {
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
        b"mem" => no_args(rest, "usage: mem").map(|()| mem(&mut out)),
        b"count" => count_cmd(&mut out, rest),
        b"fill" | b"check" => mem_cmd(name == b"fill", rest),
        b"poweroff" => no_args(rest, "usage: poweroff").and_then(|()| poweroff(&mut out)),
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
    };
    match result {
        Ok(()) => out.str("ok"),
        Err(Fail::Reason(reason)) => {
            out.str("err ");
            out.str(reason);
        }
        Err(Fail::MismatchAt(addr)) => {
            out.str("err mismatch at ");
            out.hex(addr);
        }
    }
    out.nl();
}

/// Why a command failed.
enum Fail {
    /// `err <reason>`.
    Reason(&'static str),
    /// `err mismatch at <hex addr>`.
    MismatchAt(u64),
}

const HELP: &str = "echo TEXT | cpus | cmdline | mem | count start|get|stop\r\n\
fill MIB SEED | check MIB SEED | poweroff | reboot | panic | help\r\n";

type Reply = Result<(), Fail>;

/// Splits off the first space-separated word.
fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    let mut parts = line.splitn(2, |&b| b == b' ');
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// The space-separated words of `args` (empty words skipped).
fn words(args: &[u8]) -> impl Iterator<Item = &[u8]> {
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
fn parse_u64(word: &[u8]) -> Option<u64> {
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

fn mem(out: &mut Console) {
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

fn count_cmd(out: &mut Console, args: &[u8]) -> Reply {
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

/// Prints `ok` and powers off, or returns why it cannot.
fn poweroff(out: &mut Console) -> Reply {
    match power::prepare_poweroff() {
        Ok(off) => {
            out.str("ok\r\n");
            off.run()
        }
        Err(PowerOffError::NoFadt) => Err(Fail::Reason("no FADT")),
        Err(PowerOffError::NoSleepControl) => Err(Fail::Reason("no sleep control register")),
    }
}
