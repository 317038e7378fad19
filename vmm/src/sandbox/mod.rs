//! The VMM's sandbox: seccomp filters per thread kind, Landlock on the files a VM uses, guest
//! RAM kept out of core dumps (in [`crate::memory`]) and the open-file limit raised.
//!
//! A VMM runs untrusted guests: a guest that finds a bug in a device model, the vCPU loop or
//! the API parser should find a process that can do little more than what that thread already
//! does. So, as in Firecracker and Cloud Hypervisor:
//!
//! 1. [`init`] runs first in `strata run` and `strata restore`, on the main thread before any
//!    other thread exists: it raises `RLIMIT_NOFILE` to its hard limit, sets
//!    `PR_SET_NO_NEW_PRIVS`, compiles one seccomp filter per [`ThreadKind`], installs the
//!    `SIGSYS` handler that reports a violation, applies Landlock (the process may open only
//!    the paths its VM uses, [`AccessPaths`]) and installs the main thread's own filter
//!    ([`ThreadKind::Control`]). Landlock restricts the calling thread and the threads it
//!    creates later, which is why it comes before any spawn.
//! 2. Every thread calls [`enter`] with its kind first thing, before it touches guest memory,
//!    a device queue, a socket or the console: it adds that kind's filter. A seccomp filter is
//!    inherited by threads and processes a filtered thread creates, and filters stack (the
//!    strictest answer wins), so the main thread's filter is the union of what every thread
//!    needs and each thread's own filter narrows it down. The forked checkpoint memory writer
//!    inherits the main thread's filter. The API server thread is spawned inside the `api`
//!    crate: [`start_api_server`] starts it from a thread that entered [`ThreadKind::Api`].
//! 3. On `kvm_pvm` hosts the vCPU threads of a guest with a user space (any kernel but the
//!    embedded test guest) carry no filter ([`vcpus_unfiltered`]: a filter on them hangs a
//!    Linux guest's user space there); they are started by an unfiltered spawner thread made
//!    before the main thread's filter ([`spawn_vcpu`]). Landlock still applies. The test
//!    guest's vCPUs are filtered there too.
//!
//! With `--seccomp true` (the default) a forbidden system call raises `SIGSYS`
//! (`SECCOMP_RET_TRAP`); the handler writes `strata: seccomp: thread 'vcpu0' (vcpu) made a
//! forbidden system call: personality (135)` to stderr with async-signal-safe calls only and
//! ends the process with status [`VIOLATION_EXIT_STATUS`]. `--seccomp log` lets forbidden calls
//! through and has the kernel log them (audit records of type 1326 `SECCOMP`, in `dmesg` or the
//! audit log), to find what a filter lacks; `--seccomp false` installs no filter (Landlock and
//! `PR_SET_NO_NEW_PRIVS` stay).
//!
//! Landlock needs Linux 5.13 or later with Landlock enabled; elsewhere the VMM warns and runs
//! without it. Paths are listed in [`AccessPaths`]; an export destination or a checkpoint
//! location set through the API must lie under one of them (`--allow-path DIR` adds folders).
//!
//! Test-only hooks (read from the environment, used by `tests/tests/sandbox.rs`; a process
//! that can set a VMM's environment already controls it):
//! - `STRATA_TEST_SECCOMP_VIOLATE=KIND` (a [`ThreadKind::name`]): each thread of that kind
//!   makes a forbidden system call (`personality`) right after entering its sandbox.
//! - `STRATA_TEST_LANDLOCK_OPEN=PATH`: once the sandbox is up, the main thread opens PATH
//!   for reading and prints `strata: sandbox test: open PATH: ok` or the error to stderr.

mod paths;
mod seccomp;
mod syscalls;

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::OnceLock;

pub use paths::{AccessPaths, LandlockStatus};
pub use seccomp::VIOLATION_EXIT_STATUS;

/// What `--seccomp` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Filters on; a forbidden system call ends the VMM with a message naming it.
    #[default]
    #[value(name = "true")]
    On,
    /// No filters.
    #[value(name = "false")]
    Off,
    /// Filters that let forbidden calls through and have the kernel log them.
    Log,
}

/// The kinds of threads a VMM runs, each with its own seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: builds, runs, checkpoints and restores VMs (the control loop), and
    /// forks the checkpoint memory writer.
    Control,
    /// A vCPU thread: `KVM_RUN` and the device register accesses it dispatches.
    Vcpu,
    /// A device's event loop (virtio-blk, virtio-vsock): queues, disk I/O, vsock sockets.
    Device,
    /// The API server thread (HTTP over the Unix socket), started by
    /// [`start_api_server`].
    Api,
    /// The console's input and output threads.
    Console,
    /// A thread that talks to the guest agent through the vsock socket.
    Agent,
    /// The checkpoint export worker: reads a checkpoint, writes the export folder.
    Export,
    /// The background KVM capability probe (a scratch VM built and torn down).
    Probe,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::Agent,
        ThreadKind::Export,
        ThreadKind::Probe,
    ];

    /// The kind's name in messages and in `STRATA_TEST_SECCOMP_VIOLATE`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Console => "console",
            ThreadKind::Agent => "agent",
            ThreadKind::Export => "export",
            ThreadKind::Probe => "probe",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What [`init`] is given.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// `--seccomp`.
    pub seccomp: SeccompMode,
    /// What Landlock lets the process open.
    pub paths: AccessPaths,
    /// Whether the guest may run user space of its own (any kernel but the embedded test
    /// guest, which runs in ring 0 only). On `kvm_pvm` such a guest's vCPU threads cannot be
    /// filtered ([`vcpus_unfiltered`]).
    pub guest_user_space: bool,
}

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] std::io::Error),
    /// A seccomp filter does not compile.
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Filter {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A seccomp filter does not translate to BPF.
    #[error("cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A seccomp filter cannot be installed.
    #[error("cannot install the seccomp filter of the {kind} threads: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The `SIGSYS` handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Signal(#[source] std::io::Error),
    /// The unfiltered vCPU spawner thread cannot be started.
    #[error("cannot start the vCPU spawner thread")]
    Spawner(#[source] std::io::Error),
    /// The sandbox was set up twice.
    #[error("the sandbox is already set up")]
    AlreadySetUp,
    /// A path the VM uses cannot be added to the Landlock rules.
    #[error("Landlock: cannot allow {path}: {source}")]
    LandlockPath {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: landlock::RulesetError,
    },
    /// The Landlock ruleset cannot be built or enforced.
    #[error("Landlock: {0}")]
    Landlock(#[source] landlock::RulesetError),
}

/// The compiled filters and the mode, set once by [`init`].
struct Installed {
    mode: SeccompMode,
    filters: Vec<seccomp::Compiled>,
    /// `STRATA_TEST_SECCOMP_VIOLATE`: the kind whose first thread makes a forbidden call.
    violate: Option<ThreadKind>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// A thread to start, run by the vCPU spawner.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// On PVM hosts, the unfiltered thread that starts the vCPU threads (see [`spawn_vcpu`]).
static VCPU_SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();

/// Whether vCPU threads run without a seccomp filter in this process: on `kvm_pvm` (this
/// project's test machines), a guest's own system calls enter the host through its syscall
/// entry, and a seccomp filter on the vCPU thread — any filter, even one that allows
/// everything — leaves a Linux guest's user space hung at its first system call. So there
/// the vCPUs of a guest that may run user space are unfiltered; the embedded test guest,
/// which has no user space, is filtered, and on hardware KVM every vCPU is.
pub fn vcpus_unfiltered() -> bool {
    VCPU_SPAWNER.get().is_some()
}

/// Starts a vCPU thread named `name` running `f` under the [`ThreadKind::Vcpu`] filter, or,
/// where vCPU threads cannot be filtered ([`vcpus_unfiltered`]), from the unfiltered spawner
/// thread so that it inherits no filter either.
pub fn spawn_vcpu<F, T>(name: String, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name);
    let Some(spawner) = VCPU_SPAWNER.get() else {
        return builder.spawn(move || {
            enter(ThreadKind::Vcpu);
            f()
        });
    };
    // Said once, when a VM's vCPUs start (not before a bad argument's one-line error).
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        log::warn!(
            "kvm_pvm: the vCPU threads run without a seccomp filter (a filter on them hangs the \
             guest's user space on PVM); every other thread is filtered"
        )
    });
    let gone = || std::io::Error::other("the vCPU spawner thread has stopped");
    let (tx, rx) = mpsc::channel();
    let job: SpawnJob = Box::new(move || {
        let _ = tx.send(builder.spawn(f));
    });
    spawner.send(job).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// Starts the vCPU spawner (before the main thread is filtered, so it and the threads it
/// starts carry no filter).
fn start_vcpu_spawner() -> Result<(), SandboxError> {
    let (tx, rx) = mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("vcpu-spawner".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })
        .map_err(SandboxError::Spawner)?;
    let _ = VCPU_SPAWNER.set(tx);
    Ok(())
}

/// The folders Landlock lets the VMM write anywhere beneath, once it is enforced.
static WRITABLE: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Checks that an export to `destination` can be written under Landlock: the export is
/// written beside it and renamed into place, so it must lie beneath the checkpoint location
/// or an `--allow-path` folder. Without Landlock anything passes. The error says what to do.
pub fn check_export_destination(destination: &std::path::Path) -> Result<(), String> {
    let Some(writable) = WRITABLE.get() else {
        return Ok(());
    };
    let parent = destination.parent().unwrap_or(destination);
    let parent = parent
        .canonicalize()
        .unwrap_or_else(|_| parent.to_path_buf());
    if writable.iter().any(|w| parent.starts_with(w)) {
        return Ok(());
    }
    let folders: Vec<String> = writable.iter().map(|w| w.display().to_string()).collect();
    Err(format!(
        "cannot export to {}: this VMM may write only beneath its checkpoint location and its \
         --allow-path folders ({}); start it with --allow-path {} to export there",
        destination.display(),
        if folders.is_empty() {
            "none".to_string()
        } else {
            folders.join(", ")
        },
        parent.display()
    ))
}

/// What [`init`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    /// The open-file limit now in force.
    pub nofile: u64,
    /// Whether Landlock is enforced.
    pub landlock: LandlockStatus,
}

/// Sets the process up as the module docs say; call it once, on the main thread, before any
/// other thread is started. Returns what was set up; Landlock missing from the kernel is a
/// warning there, not an error.
pub fn init(config: &SandboxConfig) -> Result<SandboxStatus, SandboxError> {
    let nofile = raise_nofile_limit();
    set_no_new_privs()?;
    // glibc reads /sys/devices/system/cpu/online from whichever thread first needs a new
    // malloc arena; fixing the arena limit (at glibc's own default, 8 per CPU) up front keeps
    // that open() out of the filtered threads.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only changes a malloc tunable; no other thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };

    let violate = std::env::var("STRATA_TEST_SECCOMP_VIOLATE")
        .ok()
        .and_then(|v| ThreadKind::ALL.into_iter().find(|k| k.name() == v));
    let filters = match config.seccomp {
        SeccompMode::Off => Vec::new(),
        mode => ThreadKind::ALL
            .iter()
            .map(|&kind| seccomp::compile(kind, mode))
            .collect::<Result<_, _>>()?,
    };
    if config.seccomp == SeccompMode::On {
        seccomp::install_sigsys_handler()?;
    }
    devices::virtio::EventLoop::set_thread_start_hook(enter_device_thread);
    INSTALLED
        .set(Installed {
            mode: config.seccomp,
            filters,
            violate,
        })
        .map_err(|_| SandboxError::AlreadySetUp)?;

    let landlock = paths::restrict(&config.paths)?;
    if config.seccomp != SeccompMode::Off && config.guest_user_space && crate::linux_kit::is_pvm() {
        start_vcpu_spawner()?;
    }
    if landlock != LandlockStatus::Unsupported {
        let writable = config
            .paths
            .full
            .iter()
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        let _ = WRITABLE.set(writable);
    }
    if let Some(path) = std::env::var_os("STRATA_TEST_LANDLOCK_OPEN") {
        let result = match std::fs::File::open(&path) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!(
            "strata: sandbox test: open {}: {result}",
            PathBuf::from(path).display()
        );
    }
    try_enter(ThreadKind::Control)?;
    Ok(SandboxStatus { nofile, landlock })
}

/// Installs `kind`'s seccomp filter on the calling thread (nothing when [`init`] did not run,
/// as in unit tests, or with `--seccomp false`). A thread that cannot be filtered must not
/// go on: the process ends with a message.
pub fn enter(kind: ThreadKind) {
    if let Err(e) = try_enter(kind) {
        eprintln!("strata: error: {}", crate::error_line(&e));
        std::process::exit(1);
    }
}

fn try_enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(installed) = INSTALLED.get() else {
        return Ok(());
    };
    seccomp::remember_thread(kind);
    if let Some(filter) = installed.filters.get(kind.index()) {
        filter.apply(kind)?;
    }
    if installed.violate == Some(kind) && installed.mode != SeccompMode::Off {
        seccomp::forbidden_call();
    }
    Ok(())
}

/// The function the devices crate calls first thing on every device thread.
fn enter_device_thread() {
    enter(ThreadKind::Device);
}

/// Starts the API server (`api::ApiServer::start`) from a short-lived thread under the
/// [`ThreadKind::Api`] filter, so that the server thread it spawns inherits that filter rather
/// than the main thread's.
pub fn start_api_server(
    path: &std::path::Path,
    handler: api::ApiHandler,
) -> Result<api::ApiServer, api::ServerError> {
    std::thread::scope(|scope| {
        let starter = std::thread::Builder::new()
            .name("api-start".into())
            .spawn_scoped(scope, move || {
                enter(ThreadKind::Api);
                api::ApiServer::start(path, handler)
            })
            .map_err(api::ServerError::Thread)?;
        match starter.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (vsock connections, disk layers and API
/// clients each hold descriptors); returns the soft limit in force.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
        log::warn!(
            "cannot raise the open-file limit from {} to {}: {}",
            limit.rlim_cur,
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    limit.rlim_cur
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_name_and_index() {
        let mut names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len());
        for (i, k) in ThreadKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn enter_without_init_does_nothing() {
        // A unit test process never calls init: threads of any kind run unfiltered.
        std::thread::spawn(|| {
            enter(ThreadKind::Vcpu);
            // A call no filter allows still works.
            // SAFETY: personality(0xffffffff) only queries the persona.
            let r = unsafe { libc::personality(0xffff_ffff) };
            assert!(r >= 0);
        })
        .join()
        .unwrap();
    }
}
