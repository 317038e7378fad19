//! `strata-guest-agent`: the Strata guest agent for Linux guests.
//!
//! Listens on vsock port 52 (or a Unix socket with `--unix`, for tests) and answers the
//! protocol of [`strata_guest_agent::protocol`]: ping, info, freeze/thaw with hooks and an
//! auto-thaw lease, exec with a timeout. A thread per connection (at most
//! [`MAX_CONNECTIONS`] at once); freeze state is shared, so any connection may thaw what
//! another froze. SIGTERM, SIGINT and SIGHUP thaw whatever is frozen before the agent exits.
//! Logs go to stderr. See README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use strata_guest_agent::protocol::{self, AGENT_PORT};

/// Logs one line to stderr without ever blocking the caller (see [`log_line`]). (Defined
/// before the modules, so they see it.)
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(format!("strata-guest-agent: {}", format_args!($($arg)*)))
    };
}

mod exec;
mod freeze;
mod hooks;
mod listen;
mod mounts;
mod server;

/// Connections served at once; more are answered with an error and closed.
const MAX_CONNECTIONS: usize = 64;
/// Log lines waiting for stderr; more are dropped.
const LOG_BACKLOG: usize = 256;

/// The log thread's queue, once it runs.
static LOG: OnceLock<SyncSender<String>> = OnceLock::new();

/// Hands `line` to the log thread. stderr may lead to a file on a filesystem the agent froze
/// (or to a journald that writes to one): a blocking write there while the freeze lock is held
/// would keep the agent from ever thawing. So the log thread alone writes, and lines that do
/// not fit its queue are dropped. Before the thread runs (unit tests), lines go straight to
/// stderr.
fn log_line(line: String) {
    match LOG.get() {
        Some(queue) => {
            let _ = queue.try_send(line);
        }
        None => eprintln!("{line}"),
    }
}

/// Starts the log thread.
fn start_logging() {
    let (tx, rx) = mpsc::sync_channel::<String>(LOG_BACKLOG);
    if LOG.set(tx).is_ok() {
        std::thread::spawn(move || {
            for line in rx {
                eprintln!("{line}");
            }
        });
    }
}

/// The Strata guest agent: freeze/thaw, exec and info over vsock.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen on this Unix socket instead of vsock (for tests on the host).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// The vsock port to listen on.
    #[arg(long, default_value_t = AGENT_PORT)]
    port: u32,
    /// Directory of freeze/thaw hooks.
    #[arg(long, value_name = "DIR", default_value = "/etc/strata/hooks.d")]
    hooks_dir: PathBuf,
    /// Mount table that `freeze` reads.
    #[arg(long, value_name = "FILE", default_value = "/proc/self/mounts")]
    mounts: PathBuf,
    /// Freeze only this mount point (repeatable; default: every writable filesystem).
    #[arg(long, value_name = "MOUNTPOINT")]
    only: Vec<PathBuf>,
    /// How long one hook may run, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    hook_timeout_s: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread starts, so that every thread inherits the mask and the signals reach
    // only the signal thread's sigwait.
    let signals = match block_exit_signals() {
        Ok(set) => set,
        Err(e) => {
            log!("cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match &args.unix {
        Some(path) => listen::Listener::unix(path),
        None => listen::Listener::vsock(args.port),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            match &args.unix {
                Some(path) => log!("cannot listen on {}: {e}", path.display()),
                None => log!("cannot listen on vsock port {}: {e}", args.port),
            }
            return ExitCode::FAILURE;
        }
    };
    // (Startup errors above went straight to stderr, before returning.)
    start_logging();
    let freezer = freeze::Freezer::new(freeze::Config {
        hooks_dir: args.hooks_dir.clone(),
        mounts_file: args.mounts.clone(),
        only: args.only.clone(),
        hook_timeout: Duration::from_secs(args.hook_timeout_s),
    });
    let lease = Arc::clone(&freezer);
    std::thread::spawn(move || lease.run_lease());
    let on_signal = Arc::clone(&freezer);
    let socket = args.unix.clone();
    std::thread::spawn(move || {
        let sig = wait_for_signal(&signals);
        log!("signal {sig}: exiting");
        on_signal.thaw_for_exit();
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        // Nothing is frozen now: give the log thread a moment to write the last lines.
        std::thread::sleep(Duration::from_millis(50));
        std::process::exit(0);
    });
    match &args.unix {
        Some(path) => log!("listening on {}", path.display()),
        None => log!("listening on vsock port {}", args.port),
    }
    let agent = Arc::new(server::Agent { freezer });
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let mut conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = std::io::Write::write_all(
                &mut conn,
                protocol::error_line("too many connections").as_bytes(),
            );
            continue;
        }
        let agent = Arc::clone(&agent);
        let open = Arc::clone(&open);
        std::thread::spawn(move || {
            if let Err(e) = server::serve(conn, &agent) {
                log!("connection: {e}");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread; returns the set.
fn block_exit_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits for one of `set` (blocked in every thread) and returns its number.
fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a writable int, both valid for
        // the call.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return sig;
        }
    }
}
