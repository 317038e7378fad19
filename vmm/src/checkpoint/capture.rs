//! Guest memory at one instant, written while the guest runs on.
//!
//! With the VM paused, [`MemoryCapture::start`] forks the VMM. The child process has a
//! copy-on-write view of the whole address space as it was at the fork — guest memory
//! included — and writes guest memory to the checkpoint's memory file (only non-zero pages,
//! one `pwrite` per run, see `snapshot::memory::write_memory`), sends the file's record back
//! through a pipe and exits. The parent resumes the VM as soon as the fork returns: the pause
//! costs the fork (copying page tables, a few milliseconds per GiB populated), not the
//! writing. Pages the guest writes afterwards are copied by the kernel on the first write, so
//! the child keeps seeing the instant; KVM follows the parent's new pages through its MMU
//! notifiers.
//!
//! The child only runs `write_memory`, serialises its answer and calls `_exit`: no locks of
//! the parent's other threads (the allocator is safe after `fork` in glibc, which takes its
//! locks around it), no logging, no destructors.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapshot::memory::{write_memory, BaseFile, GuestRegion, MemoryRecord, WriteOptions};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemory;

/// Why guest memory could not be captured. The memory file is incomplete and must go.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The pipe to the writer.
    #[error("cannot create the pipe to the memory writer")]
    Pipe(#[source] std::io::Error),
    /// fork(2).
    #[error("cannot fork the memory writer")]
    Fork(#[source] std::io::Error),
    /// Guest memory without a host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    Unmapped(u64),
    /// The writer failed.
    #[error("writing guest memory to {path}: {reason}")]
    Write {
        /// The memory file.
        path: PathBuf,
        /// What the writer said.
        reason: String,
    },
    /// The writer ended without a readable answer.
    #[error("the memory writer for {path} ended without an answer ({status})")]
    Died {
        /// The memory file.
        path: PathBuf,
        /// How it ended.
        status: String,
    },
}

/// What the writer sends back.
#[derive(Serialize, Deserialize)]
enum Answer {
    Done {
        record: MemoryRecord,
        written: u64,
        writes: u64,
    },
    Failed(String),
}

/// What a finished capture wrote.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The memory file's record (layout, checksums, size on disk).
    pub record: MemoryRecord,
    /// Bytes of non-zero pages written.
    pub written: u64,
    /// `pwrite` calls made.
    pub writes: u64,
}

/// A memory file being written by a child process.
#[derive(Debug)]
pub struct MemoryCapture {
    pid: libc::pid_t,
    answer: File,
    path: PathBuf,
    reaped: bool,
}

impl MemoryCapture {
    /// Forks a writer of `memory` to `path`. Call it with every vCPU and device thread paused:
    /// the child sees memory as it is at the fork. Anonymous guest memory: pages the host
    /// never populated are zero and skipped unread. Guest memory a restore mapped from a
    /// checkpoint's memory file: that file's data is copied in the kernel and only the pages
    /// the guest changed since are written.
    pub fn start(memory: &GuestMemory, path: &Path) -> Result<MemoryCapture, CaptureError> {
        let mut regions = Vec::new();
        for region in memory.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| CaptureError::Unmapped(region.start_addr().0))?;
            regions.push(GuestRegion {
                guest_addr: region.start_addr().0,
                // SAFETY: `host..host+len` is the region's mapping, alive as long as `memory`
                // (borrowed for this whole function). The slice is only read, and only in the
                // child, where no other thread exists to write it; the parent never reads it.
                data: unsafe {
                    std::slice::from_raw_parts(host.cast_const(), region.len() as usize)
                },
                dirty: None,
                // Guest memory mapped from a checkpoint's memory file: unchanged pages are
                // copied from that file in the kernel instead of being read.
                base: region.file_offset().map(|f| BaseFile {
                    file: f.file(),
                    offset: f.start(),
                }),
            });
        }
        // Pages of anonymous memory the host never populated are zero: skipped unread.
        let anonymous = regions.iter().all(|r| r.base.is_none());
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass; both are owned below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(CaptureError::Pipe(std::io::Error::last_os_error()));
        }
        // SAFETY: the descriptors were just created by pipe2 and belong to nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let opts = WriteOptions {
            checksum: true,
            sync: true,
            incremental: false,
            skip_unpopulated: anonymous,
        };
        // The descriptors the child keeps: its answer pipe and the files file-backed regions
        // are copied from. Sorted, so the gaps between them can be closed in ranges.
        let mut keep: Vec<i32> = regions
            .iter()
            .filter_map(|r| r.base.map(|b| b.file.as_raw_fd()))
            .chain([write_end.as_raw_fd()])
            .collect();
        keep.sort_unstable();
        keep.dedup();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: fork duplicates the process; the child runs only `child_main`, which never
        // returns (it ends in `_exit`) and touches nothing another thread may have locked.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(CaptureError::Fork(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            child_setup(parent, &keep);
            child_main(&regions, path, opts, write_end.as_raw_fd());
        }
        drop(write_end);
        Ok(MemoryCapture {
            pid,
            answer: File::from(read_end),
            path: path.to_path_buf(),
            reaped: false,
        })
    }

    /// Waits for the writer and returns what it wrote.
    pub fn wait(mut self) -> Result<Captured, CaptureError> {
        let mut bytes = Vec::new();
        let read = self.answer.read_to_end(&mut bytes);
        let status = self.reap();
        let died = |why: String| CaptureError::Died {
            path: self.path.clone(),
            status: why,
        };
        if let Err(e) = read {
            return Err(died(format!("reading its answer: {e}")));
        }
        match serde_json::from_slice::<Answer>(&bytes) {
            Ok(Answer::Done {
                record,
                written,
                writes,
            }) => Ok(Captured {
                record,
                written,
                writes,
            }),
            Ok(Answer::Failed(reason)) => Err(CaptureError::Write {
                path: self.path.clone(),
                reason,
            }),
            Err(_) => Err(died(status)),
        }
    }

    /// Waits for the child to end; returns how it ended.
    fn reap(&mut self) -> String {
        if self.reaped {
            return "already reaped".into();
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child, with a pointer to a local int.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                self.reaped = true;
                return format!("waitpid: {e}");
            }
        }
        self.reaped = true;
        if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("wait status {status:#x}")
        }
    }
}

impl Drop for MemoryCapture {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: kill and reap our own child; no memory is passed.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.reap();
        }
    }
}

/// The child's first steps: it dies with the VMM (a writer left behind would hold the VMM's
/// files — the store's lock, its sockets, its disks — and block a restart), and it closes
/// every descriptor it inherited but those in `keep` (sorted), so that nothing of the VMM's
/// stays open in it even for the time it runs.
fn child_setup(parent: libc::pid_t, keep: &[i32]) {
    // SAFETY: prctl with an integer argument, getppid and _exit: no memory involved. If the
    // VMM died before the prctl took effect, the parent is no longer `parent`: exit at once.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    let mut from: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: close_range closes descriptors of this (single-threaded) child only.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0) };
        }
        from = fd + 1;
    }
    // SAFETY: as above, every descriptor above the last kept one.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}

/// The child: writes memory, answers, exits. Never returns.
fn child_main(regions: &[GuestRegion<'_>], path: &Path, opts: WriteOptions, fd: i32) -> ! {
    let run = std::panic::catch_unwind(|| match write_memory(path, regions, opts) {
        Ok((record, stats)) => Answer::Done {
            record,
            written: stats.written,
            writes: stats.writes,
        },
        Err(e) => Answer::Failed(e.to_string()),
    })
    .unwrap_or_else(|_| Answer::Failed("the memory writer panicked".into()));
    let bytes = serde_json::to_vec(&run).unwrap_or_default();
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: write from a live buffer to the pipe's write end, which this process owns.
        let n = unsafe { libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n <= 0 {
            break;
        }
        off += n as usize;
    }
    // SAFETY: _exit ends the child at once, without running the parent's atexit handlers or
    // destructors (which belong to the parent's threads and files).
    unsafe {
        libc::_exit(if matches!(run, Answer::Done { .. }) {
            0
        } else {
            1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::memory::MemoryFile;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_file_holds_memory_as_it_was_at_the_fork_even_when_it_changes_after() {
        let dir = tempfile::tempdir().unwrap();
        let memory = crate::memory::create(8 << 20).unwrap();
        memory
            .write_slice(&[0xab; 8192], GuestAddress(4096))
            .unwrap();
        memory
            .write_slice(&[0xcd; 4096], GuestAddress(5 << 20))
            .unwrap();
        let path = dir.path().join("memory");
        let capture = MemoryCapture::start(&memory, &path).unwrap();
        // The guest runs on: what it writes now is not in the checkpoint.
        memory
            .write_slice(&[0xee; 4096], GuestAddress(4096))
            .unwrap();
        memory
            .write_slice(&[0x11; 4096], GuestAddress(1 << 20))
            .unwrap();
        let done = capture.wait().unwrap();
        assert_eq!(done.written, 3 * 4096);
        let file = MemoryFile::open(&path, &done.record).unwrap();
        file.verify().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[4096..12288].iter().all(|&b| b == 0xab));
        assert!(bytes[(1 << 20)..(1 << 20) + 4096].iter().all(|&b| b == 0));
        assert!(bytes[(5 << 20)..(5 << 20) + 4096]
            .iter()
            .all(|&b| b == 0xcd));
    }

    #[test]
    fn the_writer_keeps_none_of_the_vmms_files_open() {
        let dir = tempfile::tempdir().unwrap();
        // A file this process holds open: the writer must not hold it too.
        let held = std::fs::File::create(dir.path().join("held")).unwrap();
        // Enough non-zero memory that the writer runs a while.
        let memory = crate::memory::create(256 << 20).unwrap();
        for i in 0..(256u64 << 8) {
            memory.write_obj(i + 1, GuestAddress(i << 12)).unwrap();
        }
        let capture = MemoryCapture::start(&memory, &dir.path().join("memory")).unwrap();
        // Watch the writer's descriptors until it has set itself up (it closes what it
        // inherited first thing) or ends.
        let mut seen = None;
        for _ in 0..2000 {
            let Ok(d) = std::fs::read_dir(format!("/proc/{}/fd", capture.pid)) else {
                break;
            };
            let fds: Vec<_> = d
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect();
            if fds.iter().any(|p| p.ends_with("memory")) {
                seen = Some(fds);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let fds = seen.expect("the writer was seen writing its file");
        assert!(
            !fds.iter().any(|p| p.ends_with("held")),
            "the writer holds {fds:?}"
        );
        assert!(fds.len() <= 3, "{fds:?}");
        capture.wait().unwrap();
        drop(held);
    }

    #[test]
    fn a_writer_that_cannot_write_says_why_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let memory = crate::memory::create(2 << 20).unwrap();
        let path = dir.path().join("no-such-folder").join("memory");
        let err = MemoryCapture::start(&memory, &path)
            .unwrap()
            .wait()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-folder"), "{err}");
    }
}
