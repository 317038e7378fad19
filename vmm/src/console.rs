//! The host side of the serial console: where guest output goes, where input comes from, and
//! the terminal's raw mode while a VM owns it.
//!
//! With `--console stdio` and a terminal on stdin, the terminal is put in raw mode so that
//! every key reaches the guest (Ctrl-C included) and is restored when Strata exits. As in
//! QEMU, `Ctrl-A x` quits Strata, and `Ctrl-A Ctrl-A` sends one Ctrl-A to the guest.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use devices::legacy::SerialInput;

use crate::config::ConsoleConfig;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The console file cannot be created.
    #[error("cannot create console file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The input thread cannot start.
    #[error("cannot start the console input thread")]
    Thread(#[source] io::Error),
}

/// Where guest console output goes.
pub fn output(config: &ConsoleConfig) -> Result<Box<dyn Write + Send>, ConsoleError> {
    Ok(match config {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::None => Box::new(io::sink()),
        ConsoleConfig::File(path) => {
            Box::new(File::create(path).map_err(|source| ConsoleError::File {
                path: path.clone(),
                source,
            })?)
        }
    })
}

/// Puts a terminal in raw mode for as long as it lives.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; `None` otherwise.
    pub fn stdin() -> Option<Self> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios for tcgetattr to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so guest "\n" still returns the carriage on the host terminal.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `stdin()` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

const CTRL_A: u8 = 0x01;

/// Filters the `Ctrl-A` escapes out of terminal input.
#[derive(Default)]
struct Escapes {
    pending: bool,
}

impl Escapes {
    /// Returns the bytes for the guest and whether the user asked to quit.
    fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    CTRL_A => out.push(CTRL_A),
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Starts the thread that copies stdin into the guest's UART. `quit` is called when the user
/// types the quit escape on a terminal.
pub fn spawn_stdin(
    input: SerialInput,
    terminal: bool,
    quit: Box<dyn Fn() + Send>,
) -> Result<(), ConsoleError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 256];
            let mut escapes = Escapes::default();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return, // EOF: the guest just gets no more input.
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console input: {e}");
                        return;
                    }
                };
                if terminal {
                    let (bytes, wants_quit) = escapes.filter(&buf[..n]);
                    input.feed(&bytes);
                    if wants_quit {
                        quit();
                        return;
                    }
                } else {
                    input.feed(&buf[..n]);
                }
            }
        })
        .map(|_| ())
        .map_err(ConsoleError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut e = Escapes::default();
        assert_eq!(e.filter(b"ab\x01\x01c"), (b"ab\x01c".to_vec(), false));
        assert_eq!(e.filter(b"d\x01"), (b"d".to_vec(), false));
        assert_eq!(e.filter(b"xyz"), (Vec::new(), true));
        let mut e = Escapes::default();
        assert_eq!(e.filter(b"\x01q"), (b"\x01q".to_vec(), false));
    }
}
