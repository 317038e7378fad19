//! The seccomp filters of each thread kind, and the `SIGSYS` handler that reports a violation.
//!
//! The lists come from what each thread was seen to call (`strace -f` over the end-to-end
//! tests) plus what its code can reach on paths the tests take rarely (errors, resets). Every
//! thread gets the [`COMMON`] calls a Rust thread needs to run and end (memory, futexes,
//! signals it may receive, its stderr log lines). Threads that have no file to open get an
//! extra filter that fails `open`/`openat` with `EACCES` instead of trapping, because glibc
//! opens `/proc/sys/vm/overcommit_memory` from whichever thread first shrinks a malloc heap
//! and copes with the failure.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SandboxError, SeccompMode, ThreadKind};

/// The exit status of a VMM stopped by a seccomp violation (128 + SIGSYS, as a shell reports
/// a process killed by the signal).
pub const VIOLATION_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The ioctl type of KVM's requests (`KVMIO`), in bits 8..16 of the request number.
const KVMIO: u64 = 0xAE;

/// Calls every thread may make.
const COMMON: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
];

/// What a vCPU thread adds: `KVM_RUN` and the vCPU state ioctls (restricted to KVM's ioctl
/// type), and the eventfds and channels of the devices whose registers it writes.
const VCPU: &[c_long] = &[libc::SYS_read];

/// What a device event loop adds: epoll, disk I/O on open files, vsock sockets (`socket` is
/// limited to `AF_UNIX` below).
const DEVICE: &[c_long] = &[
    libc::SYS_socket,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// What the API server thread adds: its tokio reactor and the clients' connections, and what
/// starting it takes (binding the socket in a private folder and renaming it into place,
/// building the reactor, spawning the thread).
const API: &[c_long] = &[
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_umask,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// What the console threads add: reading stdin, writing the console.
const CONSOLE: &[c_long] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// What a guest agent thread adds: a Unix stream to the vsock socket (`socket` is limited to
/// `AF_UNIX`).
const AGENT: &[c_long] = &[
    libc::SYS_connect,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Files: what the export worker and the main thread (checkpoints, disks, stores) do.
const FILES: &[c_long] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_fadvise64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    libc::SYS_flock,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_umask,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// What only the main thread does (besides everything its children do, which it allows too:
/// see [`rules`]): build VMs, fork the memory writer, wait for it, terminal modes.
const CONTROL: &[c_long] = &[
    libc::SYS_set_tid_address,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_rt_sigaction,
    libc::SYS_getppid,
    libc::SYS_close_range,
    libc::SYS_pipe2,
    libc::SYS_socketpair,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_memfd_create,
    libc::SYS_ioctl,
    libc::SYS_seccomp,
];

/// The calls `kind` may make, each with the conditions (any one of which allows it) or none
/// (always allowed).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[c_long]| {
        for &c in calls {
            map.insert(c, Vec::new());
        }
    };
    allow(COMMON);
    match kind {
        ThreadKind::Control => {
            // The main thread spawns every other kind: their filters stack on this one, so
            // it allows the union.
            allow(VCPU);
            allow(DEVICE);
            allow(API);
            allow(CONSOLE);
            allow(AGENT);
            allow(FILES);
            allow(CONTROL);
        }
        ThreadKind::Vcpu => allow(VCPU),
        ThreadKind::Device => allow(DEVICE),
        ThreadKind::Api => allow(API),
        ThreadKind::Console => allow(CONSOLE),
        ThreadKind::Agent => allow(AGENT),
        ThreadKind::Export => allow(FILES),
        ThreadKind::Probe => allow(&[libc::SYS_openat]),
    }
    // A thread may signal its own process only (abort raises SIGABRT with tgkill; the main
    // thread kicks vCPUs out of KVM_RUN with it).
    map.insert(libc::SYS_tgkill, any_of(0, [std::process::id().into()])?);
    // Threads name themselves; the main thread also sets PR_SET_NO_NEW_PRIVS before each
    // thread's filter and the death signal of the forked memory writer.
    let mut prctl_ops = vec![libc::PR_SET_NAME, libc::PR_GET_NAME];
    if kind == ThreadKind::Control {
        prctl_ops.extend([libc::PR_SET_NO_NEW_PRIVS, libc::PR_SET_PDEATHSIG]);
    }
    map.insert(
        libc::SYS_prctl,
        any_of(0, prctl_ops.into_iter().map(|op| op as u64))?,
    );
    // ioctl: KVM's for the vCPU and the probe; FIONBIO for sockets of the device (vsock)
    // and API threads. The main thread may make any (terminal modes, KVM, files).
    let kvm = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?;
    let fionbio = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::FIONBIO,
    )?])?;
    match kind {
        ThreadKind::Vcpu | ThreadKind::Probe => {
            map.insert(libc::SYS_ioctl, vec![kvm]);
        }
        ThreadKind::Device | ThreadKind::Api | ThreadKind::Agent => {
            map.insert(libc::SYS_ioctl, vec![fionbio]);
        }
        ThreadKind::Control | ThreadKind::Console | ThreadKind::Export => {}
    }
    // Agent and API threads open Unix sockets only, and so does the vsock device (a guest's
    // connection to host port P connects to `<socket>_P`).
    if matches!(
        kind,
        ThreadKind::Agent | ThreadKind::Api | ThreadKind::Device
    ) {
        map.insert(libc::SYS_socket, any_of(0, [libc::AF_UNIX as u64])?);
    }
    Ok(map)
}

/// A rule list allowing the call when argument `arg` is any of `values`.
fn any_of(
    arg: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .into_iter()
        .map(|v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// Whether `kind` never opens a file (its `open`/`openat` fail with `EACCES`).
fn opens_no_files(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::Vcpu
            | ThreadKind::Device
            | ThreadKind::Api
            | ThreadKind::Console
            | ThreadKind::Agent
    )
}

/// One kind's filters, ready to install (the allow list, then an `open` refusal for kinds
/// that open nothing).
pub(super) struct Compiled {
    programs: Vec<BpfProgram>,
}

impl Compiled {
    /// Installs the filters on the calling thread.
    pub(super) fn apply(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|source| SandboxError::Install {
                kind: kind.name(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Builds `kind`'s filters for `mode` (not [`SeccompMode::Off`]).
pub(super) fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Compiled, SandboxError> {
    let filter_err = |source| SandboxError::Filter {
        kind: kind.name(),
        source,
    };
    let compile_err = |source| SandboxError::Compile {
        kind: kind.name(),
        source,
    };
    let mut rules = rules(kind).map_err(filter_err)?;
    let refuse_opens = mode == SeccompMode::On && opens_no_files(kind);
    if refuse_opens {
        rules.insert(libc::SYS_openat, Vec::new());
        rules.insert(libc::SYS_open, Vec::new());
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(filter_err)?;
    let allow = BpfProgram::try_from(allow).map_err(compile_err)?;
    // The refusal goes in first: installing a filter takes prctl and seccomp, which the allow
    // list does not have.
    let mut programs = Vec::new();
    if refuse_opens {
        let opens = [libc::SYS_openat, libc::SYS_open]
            .into_iter()
            .map(|c| (c, Vec::new()))
            .collect();
        let refuse = SeccompFilter::new(
            opens,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            TargetArch::x86_64,
        )
        .map_err(filter_err)?;
        programs.push(BpfProgram::try_from(refuse).map_err(compile_err)?);
    }
    programs.push(allow);
    Ok(Compiled { programs })
}

/// The kind of a thread that did not enter a sandbox itself (it runs under the filters of the
/// thread that created it).
const INHERITED: u8 = u8::MAX;

thread_local! {
    /// The calling thread's kind, for the SIGSYS handler (plain TLS: no allocation or lock
    /// when read).
    static KIND: std::cell::Cell<u8> = const { std::cell::Cell::new(INHERITED) };
}

/// Records the calling thread's kind for the SIGSYS handler.
pub(super) fn remember_thread(kind: ThreadKind) {
    KIND.with(|k| k.set(kind as u8));
}

/// The test hook's forbidden call: `personality` (a query, harmless where it is allowed).
pub(super) fn forbidden_call() {
    // SAFETY: personality(0xffffffff) only reads the persona.
    unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
}

/// The part of `siginfo_t` a `SIGSYS` from seccomp fills (x86_64 layout: three ints, padding,
/// then the `_sigsys` member of the union at offset 16).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// A fixed buffer to format the message in without allocating.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The violation message for system call `nr` made by thread `name` of kind `kind`.
fn violation_message(name: &[u8], kind: u8, nr: i64) -> Message {
    let mut m = Message {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"strata: seccomp: thread '");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    m.push(&name[..end]);
    m.push(b"' (");
    let kind_name = match ThreadKind::ALL.get(usize::from(kind)) {
        Some(k) => k.name(),
        None if kind == INHERITED => "under the filters of the thread that started it",
        None => "?",
    };
    m.push(kind_name.as_bytes());
    m.push(b") made a forbidden system call: ");
    match super::syscalls::name(nr) {
        Some(name) => m.push(name.as_bytes()),
        None => m.push(b"unknown"),
    }
    m.push(b" (");
    m.push_number(nr.unsigned_abs());
    m.push(b"); the VMM stops (see --seccomp in the README)\n");
    m
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here, and only calls every filter allows (write, exit_group):
    // a second violation inside the handler would kill the process without a word.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; SigsysInfo
    // mirrors its x86_64 layout for SIGSYS.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let kind = KIND.with(|k| k.get());
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME (allowed by every filter) writes at most 16 bytes, NUL included.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let m = violation_message(&name, kind, i64::from(nr));
    let mut written = 0;
    while written < m.len {
        // SAFETY: writes bytes of a live buffer to stderr.
        let n = unsafe {
            libc::write(
                libc::STDERR_FILENO,
                m.buf[written..m.len].as_ptr().cast(),
                m.len - written,
            )
        };
        if n <= 0 {
            break;
        }
        written += n as usize;
    }
    // SAFETY: ends the process at once, without running anything else.
    unsafe { libc::_exit(VIOLATION_EXIT_STATUS) };
}

/// Installs [`on_sigsys`] for the process.
pub(super) fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we fill the handler, flags and an
    // empty mask before passing it to sigaction, which copies it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let c = compile(kind, mode).unwrap();
                let want = if mode == SeccompMode::On && opens_no_files(kind) {
                    2
                } else {
                    1
                };
                assert_eq!(c.programs.len(), want, "{kind:?} {mode:?}");
            }
        }
    }

    #[test]
    fn the_main_thread_allows_what_every_other_thread_allows() {
        let control = rules(ThreadKind::Control).unwrap();
        for kind in ThreadKind::ALL {
            for nr in rules(kind).unwrap().keys() {
                assert!(
                    control.contains_key(nr),
                    "{} allows {:?}, the main thread does not",
                    kind.name(),
                    super::super::syscalls::name(*nr)
                );
            }
        }
    }

    #[test]
    fn the_violation_message_names_thread_kind_and_call() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let m = violation_message(&name, ThreadKind::Vcpu as u8, libc::SYS_personality);
        let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
        assert_eq!(
            text,
            "strata: seccomp: thread 'vcpu0' (vcpu) made a forbidden system call: personality \
             (135); the VMM stops (see --seccomp in the README)\n"
        );
        let m = violation_message(&name, 200, 9999);
        let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
        assert!(
            text.contains("(?) made a forbidden system call: unknown (9999)"),
            "{text}"
        );
        let m = violation_message(&name, INHERITED, libc::SYS_ptrace);
        let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
        assert!(
            text.contains("(under the filters of the thread that started it) made a"),
            "{text}"
        );
    }

    #[test]
    fn a_device_thread_may_connect_to_a_unix_socket_and_open_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s_1234");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c = compile(ThreadKind::Device, SeccompMode::On).unwrap();
        std::thread::spawn(move || {
            c.apply(ThreadKind::Device).unwrap();
            // What the vsock device does for a guest's connection to host port 1234.
            std::os::unix::net::UnixStream::connect(&path).unwrap();
            let err = std::fs::File::open(&path).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        })
        .join()
        .unwrap();
        drop(listener);
    }

    #[test]
    fn a_filtered_thread_gets_eacces_from_open_and_its_allowed_calls_work() {
        let c = compile(ThreadKind::Console, SeccompMode::On).unwrap();
        std::thread::spawn(move || {
            c.apply(ThreadKind::Console).unwrap();
            let err = std::fs::File::open("/proc/self/status").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EACCES));
            // write is allowed.
            // SAFETY: writes nothing to stderr.
            assert_eq!(unsafe { libc::write(2, [].as_ptr(), 0) }, 0);
        })
        .join()
        .unwrap();
    }
}
