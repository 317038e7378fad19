//! Which filesystems `freeze` freezes, and the freeze ioctls.
//!
//! The mount table is `/proc/self/mounts` (fstab format: source, mount point, type, options,
//! with space, tab, newline and backslash in paths escaped as `\ooo`). A filesystem is a
//! candidate when it is mounted read-write and its type is not one of the kernel's virtual or
//! memory filesystems ([`SKIPPED_TYPES`], `fuse.*`). Candidates are frozen in mount order, so a
//! parent before what is mounted on it, and thawed in reverse.
//!
//! `FIFREEZE`/`FITHAW` (linux/fs.h: `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`) act on
//! the superblock of any open file; a filesystem without freeze support answers
//! `EOPNOTSUPP`, which the caller treats as "not freezable" rather than a failure.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `FIFREEZE`: `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `FITHAW`: `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Filesystem types never frozen: virtual, memory-backed, or stacked on others.
pub const SKIPPED_TYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// What is mounted (a device, or a name for virtual filesystems).
    pub source: String,
    /// Where, unescaped.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fs_type: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Mount {
    /// Whether `freeze` should freeze it.
    pub fn is_candidate(&self) -> bool {
        !self.read_only
            && !SKIPPED_TYPES.contains(&self.fs_type.as_str())
            && !self.fs_type.starts_with("fuse")
    }
}

/// Parses a mount table; lines with fewer than four fields are skipped.
pub fn parse(table: &str) -> Vec<Mount> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let source = fields.next()?;
            let mount_point = fields.next()?;
            let fs_type = fields.next()?;
            let options = fields.next()?;
            Some(Mount {
                source: unescape(source),
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_string(),
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The candidates of `table`, restricted to `only` when it is not empty (mount points
/// compared as canonical paths).
pub fn candidates(table: &str, only: &[PathBuf]) -> Vec<Mount> {
    parse(table)
        .into_iter()
        .filter(Mount::is_candidate)
        .filter(|m| only.is_empty() || only.iter().any(|o| same_path(o, &m.mount_point)))
        .collect()
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

/// `FIFREEZE` on the filesystem holding `file`.
pub fn freeze(file: &File) -> io::Result<()> {
    fs_ioctl(file, FIFREEZE)
}

/// `FITHAW` on the filesystem holding `file`.
pub fn thaw(file: &File) -> io::Result<()> {
    fs_ioctl(file, FITHAW)
}

fn fs_ioctl(file: &File, request: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the descriptor is open for the duration of the call (we borrow its File), and
    // FIFREEZE/FITHAW take an int argument by value that the kernel ignores: no memory is
    // passed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, 0 as libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sync(2)`: commit every filesystem's dirty data before freezing.
pub fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev,size=1000k 0 0
/dev/vdb /data xfs rw,noatime 0 0
/dev/vdc /mnt/read\\040only ext4 ro,relatime 0 0
/dev/vdd /mnt/with\\040space ext4 rw 0 0
gvfsd-fuse /run/user/0/gvfs fuse.gvfsd-fuse rw 0 0
broken line
";

    #[test]
    fn writable_real_filesystems_are_candidates_in_mount_order() {
        let points: Vec<PathBuf> = candidates(TABLE, &[])
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/data"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }

    #[test]
    fn read_only_mounts_and_escapes_are_parsed() {
        let all = parse(TABLE);
        assert_eq!(all.len(), 8);
        let ro = &all[5];
        assert_eq!(ro.mount_point, PathBuf::from("/mnt/read only"));
        assert!(ro.read_only && !ro.is_candidate());
        assert_eq!(ro.source, "/dev/vdc");
    }

    #[test]
    fn only_restricts_the_candidates() {
        let points: Vec<Mount> = candidates(TABLE, &[PathBuf::from("/data")]);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].fs_type, "xfs");
        assert!(candidates(TABLE, &[PathBuf::from("/nowhere")]).is_empty());
    }

    #[test]
    fn unescape_leaves_odd_backslashes_alone() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9b\\"), "a\\9b\\");
        assert_eq!(unescape("\\011tab"), "\ttab");
        assert_eq!(unescape("\\777"), "\\777");
    }
}
