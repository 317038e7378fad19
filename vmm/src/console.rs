//! The host side of the serial console: where guest output goes, where input comes from, and
//! the terminal's raw mode while a VM owns it.
//!
//! With `--console stdio` and a terminal on stdin, the terminal is put in raw mode so that
//! every key reaches the guest (Ctrl-C included) and is restored when Strata exits. As in
//! QEMU, `Ctrl-A x` quits Strata, and `Ctrl-A Ctrl-A` sends one Ctrl-A to the guest.
//!
//! Guest output never waits for the console's reader. The UART hands each byte to a
//! [`ConsoleOutput`], which only appends it to a bounded buffer (no system call, at most a
//! wake-up of the writer thread when that sleeps); a `console-out` thread owns the real writer
//! (stdout, the file, or nothing) and writes what accumulated in large chunks. When the reader
//! stalls (a pipe nobody reads, a suspended terminal) the buffer fills and further output is
//! dropped (the newest bytes, as a full UART FIFO would) and counted: `GET /v1/vm` reports the
//! count as `console.dropped_bytes`, the writer thread logs the first loss it sees and Strata
//! logs the total when it exits. So a guest cannot stall its vCPUs, and with them `pause` and
//! `stop`, by writing to a console nobody reads. When Strata exits, what is buffered is
//! written out with a bounded wait ([`ConsoleOutput::drain`]): a reader that takes nothing for
//! a second cannot hold the exit up.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// Standard output cannot be duplicated for the output thread.
    #[error("cannot duplicate standard output for the console")]
    Stdout(#[source] io::Error),
    /// The output thread cannot start.
    #[error("cannot start the console output thread")]
    OutputThread(#[source] io::Error),
}

/// How much guest output may wait for the console's reader before more is dropped (the
/// writer thread holds up to as much again in the chunk it is writing).
pub const OUTPUT_BUFFER_BYTES: usize = 256 << 10;

/// Where guest console output goes: a [`ConsoleOutput`] whose thread writes to stdout, the
/// file or nowhere.
pub fn output(config: &ConsoleConfig) -> Result<ConsoleOutput, ConsoleError> {
    let writer: Box<dyn Write + Send> = match config {
        // A descriptor of our own rather than `io::stdout()`: no line buffering, and a writer
        // blocked on a stalled reader holds no lock that the rest of Strata might need.
        ConsoleConfig::Stdio => Box::new(File::from(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(ConsoleError::Stdout)?,
        )),
        ConsoleConfig::None => Box::new(io::sink()),
        ConsoleConfig::File(path) => {
            Box::new(File::create(path).map_err(|source| ConsoleError::File {
                path: path.clone(),
                source,
            })?)
        }
    };
    ConsoleOutput::start(writer, OUTPUT_BUFFER_BYTES).map_err(ConsoleError::OutputThread)
}

/// The part of [`OutputShared`] behind its mutex.
struct OutputState {
    /// Output waiting for the writer thread, at most `capacity` bytes.
    pending: Vec<u8>,
    /// The writer thread is writing a chunk.
    writing: bool,
    /// The writer thread sleeps on `more` and must be woken for new output.
    writer_asleep: bool,
    /// Threads waiting in [`ConsoleOutput::drain`].
    drainers: usize,
    /// No more output is accepted; the writer thread ends once `pending` is written.
    closed: bool,
}

/// What the appenders, the writer thread and the drainers share.
struct OutputShared {
    state: Mutex<OutputState>,
    /// Signalled when output arrives or the buffer is closed (the writer waits on it).
    more: Condvar,
    /// Signalled when everything accepted has been written (drainers wait on it).
    drained: Condvar,
    capacity: usize,
    /// Bytes given to the console that never reached its writer (buffer full, closed, or a
    /// write error).
    dropped: AtomicU64,
    /// Bytes the writer has written so far.
    written: AtomicU64,
}

impl OutputShared {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `n` lost bytes.
    fn drop_bytes(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Guest console output on its way to the console's writer: a bounded buffer that the UART
/// appends to through [`Write`] without ever blocking, and a `console-out` thread that writes
/// it out in chunks. Clones share the buffer.
#[derive(Clone)]
pub struct ConsoleOutput {
    shared: Arc<OutputShared>,
}

impl ConsoleOutput {
    /// Starts the writer thread for `writer`, with room for `capacity` bytes waiting.
    pub fn start(writer: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(OutputShared {
            state: Mutex::new(OutputState {
                pending: Vec::with_capacity(capacity),
                writing: false,
                writer_asleep: false,
                drainers: 0,
                closed: false,
            }),
            more: Condvar::new(),
            drained: Condvar::new(),
            capacity,
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::Console);
                write_loop(&thread_shared, writer)
            })?;
        Ok(Self { shared })
    }

    /// Bytes of guest output lost so far: not buffered because the buffer was full (the
    /// reader did not keep up), or not written because the writer failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Bytes written to the console's writer so far.
    pub fn written_bytes(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Appends `bytes` to the buffer, dropping (and counting) what does not fit. Never blocks
    /// for longer than the writer thread takes to swap buffers.
    pub fn append(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut state = self.shared.lock();
        let room = if state.closed {
            0
        } else {
            self.shared.capacity.saturating_sub(state.pending.len())
        };
        let (fits, lost) = bytes.split_at(room.min(bytes.len()));
        state.pending.extend_from_slice(fits);
        let wake = !fits.is_empty() && state.writer_asleep;
        if wake {
            state.writer_asleep = false;
        }
        drop(state);
        if !lost.is_empty() {
            self.shared.drop_bytes(lost.len());
        }
        if wake {
            self.shared.more.notify_one();
        }
    }

    /// Waits until everything accepted so far has been written, or gives up when the writer
    /// has made no progress for `stall` or `limit` has passed. Returns whether all of it was
    /// written.
    pub fn drain(&self, stall: Duration, limit: Duration) -> bool {
        let start = Instant::now();
        let mut progress = (self.written_bytes(), start);
        let mut state = self.shared.lock();
        state.drainers += 1;
        let done = loop {
            if state.pending.is_empty() && !state.writing {
                break true;
            }
            let now = Instant::now();
            let written = self.written_bytes();
            if written != progress.0 {
                progress = (written, now);
            }
            let give_up = (progress.1 + stall).min(start + limit);
            if now >= give_up {
                break false;
            }
            state = self
                .shared
                .drained
                .wait_timeout(state, give_up - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        state.drainers -= 1;
        done
    }

    /// Accepts no more output (later appends are dropped and counted); the writer thread
    /// writes what is buffered and ends.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.more.notify_one();
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    /// Output is written by the writer thread as soon as it can; nothing to wait for here.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `console-out` thread: writes what accumulates until the buffer is closed and empty.
fn write_loop(shared: &OutputShared, mut writer: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(shared.capacity);
    let mut warned = false;
    loop {
        {
            let mut state = shared.lock();
            state.writing = false;
            while state.pending.is_empty() {
                if state.drainers > 0 {
                    shared.drained.notify_all();
                }
                if state.closed {
                    return;
                }
                state.writer_asleep = true;
                state = shared.more.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.writer_asleep = false;
            state.writing = true;
            std::mem::swap(&mut state.pending, &mut chunk);
        }
        if let Err(e) = write_chunk(shared, writer.as_mut(), &chunk) {
            // Whatever was not written is lost; the guest goes on.
            shared.drop_bytes(chunk.len().saturating_sub(e.written));
            log::debug!("console output: {}", e.error);
        }
        chunk.clear();
        if !warned && shared.dropped.load(Ordering::Relaxed) > 0 {
            warned = true;
            log::warn!(
                "console output is being dropped: its reader does not keep up or failed \
                 (GET /v1/vm counts the bytes in console.dropped_bytes)"
            );
        }
    }
}

/// A write that failed after `written` bytes of the chunk.
struct ChunkError {
    written: usize,
    error: io::Error,
}

/// Writes `chunk`, counting progress as it goes; retries interrupted and would-block writes.
fn write_chunk(
    shared: &OutputShared,
    writer: &mut dyn Write,
    chunk: &[u8],
) -> Result<(), ChunkError> {
    let mut done = 0;
    while let Some(rest) = chunk.get(done..).filter(|r| !r.is_empty()) {
        match writer.write(rest) {
            Ok(0) => {
                return Err(ChunkError {
                    written: done,
                    error: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => {
                done += n;
                shared.written.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A non-blocking descriptor shared with someone else: wait for room.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => {
                return Err(ChunkError {
                    written: done,
                    error,
                })
            }
        }
    }
    writer.flush().map_err(|error| ChunkError {
        written: chunk.len(),
        error,
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
            crate::sandbox::enter(crate::sandbox::ThreadKind::Console);
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
    use std::sync::mpsc;

    /// A writer the test can look into, and hold up: while `stuck`, every write waits.
    #[derive(Clone, Default)]
    struct Reader {
        data: Arc<Mutex<Vec<u8>>>,
        stuck: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Reader {
        fn stuck() -> Self {
            let r = Self::default();
            *r.stuck.0.lock().unwrap() = true;
            r
        }
        fn release(&self) {
            *self.stuck.0.lock().unwrap() = false;
            self.stuck.1.notify_all();
        }
        fn got(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    impl Write for Reader {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cond) = &*self.stuck;
            let mut stuck = lock.lock().unwrap();
            while *stuck {
                stuck = cond.wait(stuck).unwrap();
            }
            // Take a little at a time, as a pipe would.
            let n = buf.len().min(1000);
            self.data.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Waits until the writer thread has taken everything pending into its chunk.
    fn wait_writer_busy(out: &ConsoleOutput) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = out.shared.lock();
            if state.pending.is_empty() && state.writing {
                return;
            }
            drop(state);
            assert!(Instant::now() < deadline, "the writer never took its chunk");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn stuck_reader_fills_the_buffer_then_output_is_dropped_and_counted() {
        let reader = Reader::stuck();
        let mut out = ConsoleOutput::start(Box::new(reader.clone()), 100).unwrap();
        out.write_all(&[b'a'; 40]).unwrap();
        wait_writer_busy(&out); // the writer holds 40 bytes, stuck in write()

        // The appender never waits: 100 bytes fit in the buffer, the rest is counted.
        let appender = {
            let mut out = out.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    out.write_all(&[b'b'; 1000]).unwrap();
                    out.flush().unwrap();
                }
            })
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(appender.join()).unwrap());
        rx.recv_timeout(Duration::from_secs(30))
            .expect("appending blocked on a stuck reader")
            .unwrap();
        assert_eq!(out.dropped_bytes(), 1_000_000 - 100);

        // Flushing gives up on a reader that takes nothing, by the stall bound: the overall
        // limit is an hour, so only the stall can end it before the hang guard does.
        let (tx, rx) = mpsc::channel();
        let stalled = out.clone();
        std::thread::spawn(move || {
            let _ = tx.send(stalled.drain(Duration::from_millis(100), Duration::from_secs(3600)));
        });
        let gave_up = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("drain hung on a stalled reader instead of giving up after the stall bound");
        assert!(!gave_up);
        assert!(!out.drain(Duration::from_secs(30), Duration::from_millis(100)));

        // Once the reader takes again, everything that was buffered arrives.
        reader.release();
        assert!(out.drain(Duration::from_secs(30), Duration::from_secs(30)));
        let mut expected = vec![b'a'; 40];
        expected.extend_from_slice(&[b'b'; 100]);
        assert_eq!(reader.got(), expected);
        assert_eq!(out.written_bytes(), 140);
        assert_eq!(out.dropped_bytes(), 1_000_000 - 100);
    }

    #[test]
    fn a_reader_that_keeps_up_gets_everything_in_order() {
        let reader = Reader::default();
        let mut out = ConsoleOutput::start(Box::new(reader.clone()), 64 << 10).unwrap();
        let mut sent = Vec::new();
        for i in 0..20_000u32 {
            let piece = i.to_string();
            sent.extend_from_slice(piece.as_bytes());
            out.write_all(piece.as_bytes()).unwrap();
            if i % 100 == 0 {
                // Let the writer catch up now and then, so that nothing is dropped.
                assert!(out.drain(Duration::from_secs(30), Duration::from_secs(30)));
            }
        }
        assert!(out.drain(Duration::from_secs(30), Duration::from_secs(30)));
        assert_eq!(reader.got(), sent);
        assert_eq!(out.dropped_bytes(), 0);
    }

    #[test]
    fn close_writes_what_is_buffered_and_drops_what_comes_later() {
        let reader = Reader::stuck();
        let out = ConsoleOutput::start(Box::new(reader.clone()), 100).unwrap();
        out.append(b"before");
        out.close();
        out.append(b"after");
        reader.release();
        assert!(out.drain(Duration::from_secs(30), Duration::from_secs(30)));
        assert_eq!(reader.got(), b"before");
        assert_eq!(out.dropped_bytes(), 5);
    }

    #[test]
    fn write_errors_count_as_dropped() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = ConsoleOutput::start(Box::new(Broken), 100).unwrap();
        out.append(b"lost");
        assert!(out.drain(Duration::from_secs(30), Duration::from_secs(30)));
        assert_eq!(out.dropped_bytes(), 4);
    }

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
