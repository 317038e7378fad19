//! `flood KIB`: console output as fast as the guest can make it, so that
//! tests can check that a VMM whose console reader stalls keeps running.
//!
//! The text is `KIB * 16` lines of exactly 64 bytes: line `n` (from 0) is
//! `n` as 8 zero-padded decimal digits, a space, 53 lower-case letters that
//! start at letter `n mod 26` and run through the alphabet cyclically, then
//! `\r\n`. Each line is derived from the previous one by incrementing the
//! digits and shifting every letter by one, so no division runs per line
//! and no integer goes through `core::fmt`.

use crate::console::Sink;

/// Bytes per line, `\r\n` included.
const LINE: usize = 64;
/// Digits of the line counter.
const DIGITS: usize = 8;
/// Letters per line.
const LETTERS: usize = LINE - DIGITS - 3;
/// Lines per KiB.
const LINES_PER_KIB: u64 = (1024 / LINE) as u64;
/// The largest KIB `flood` accepts (1 GiB: 16 Mi lines fit the 8 digits).
pub const MAX_KIB: u64 = 1 << 20;

/// Writes `kib` KiB of text lines to `out` (see the module docs).
pub fn flood(out: &mut dyn Sink, kib: u64) {
    let mut line = first_line();
    for _ in 0..kib.saturating_mul(LINES_PER_KIB) {
        out.bytes(&line);
        next_line(&mut line);
    }
}

/// Line 0: `00000000 abcd...`.
fn first_line() -> [u8; LINE] {
    let mut line = [b'0'; LINE];
    let mut letter = b'a';
    for (i, b) in line.iter_mut().enumerate() {
        *b = match i {
            0..DIGITS => b'0',
            DIGITS => b' ',
            _ if i == LINE - 2 => b'\r',
            _ if i == LINE - 1 => b'\n',
            _ => {
                let l = letter;
                letter = rotate(letter);
                l
            }
        };
    }
    line
}

/// Turns line `n` into line `n + 1`.
fn next_line(line: &mut [u8; LINE]) {
    for d in line.iter_mut().take(DIGITS).rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            break;
        }
    }
    for b in line.iter_mut().skip(DIGITS + 1).take(LETTERS) {
        *b = rotate(*b);
    }
}

/// The next letter of the alphabet, `z` wrapping to `a`.
fn rotate(letter: u8) -> u8 {
    if letter >= b'z' {
        b'a'
    } else {
        letter + 1
    }
}
