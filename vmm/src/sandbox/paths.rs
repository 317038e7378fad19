//! Landlock: the files and folders a VMM may open, from its VM's configuration.
//!
//! Rules (a folder's rule covers everything beneath it):
//! - read and write: each disk file given to `--disk` (read only with `readonly=on`); read:
//!   the folder it is in (the lower layers of its chain), the kernel and the initrd (the Linux
//!   kit's files when `--guest linux`), the `strata` binary;
//! - everything: the checkpoint location (`--state-dir`, or the store a restore continues in)
//!   and every `--allow-path DIR`; a checkpoint location set through the API and an export
//!   destination must be under one of them;
//! - make, rename and remove sockets and their private bind folders: the folders of the API
//!   and vsock sockets;
//! - read and write: the `--console file=PATH` file (created empty first if missing);
//! - read, write and ioctl: `/dev/kvm`; read: `/proc` (host memory, CPU counts, and the page
//!   map of the forked checkpoint memory writer, whose `/proc/<pid>` does not exist when the
//!   rules are made, so no narrower rule can name it), `/sys/devices/system/cpu` and
//!   `/sys/fs/cgroup` (CPU counts);
//! - no TCP, no abstract Unix sockets outside the VMM, no signals to other processes.
//!
//! Landlock's access rights up to its ABI 6 are handled (so connecting to a guest's
//! `<socket>_<port>` stays allowed: restricting Unix socket connections came later).

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::SandboxError;
use crate::config::{ConsoleConfig, Kernel, VmConfig};

/// The Landlock ABI whose rights are handled.
const LANDLOCK_ABI: ABI = ABI::V6;

/// What a VMM may open, by kind of access. Paths that do not exist are left out (opening
/// them then fails with "not found", as without Landlock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPaths {
    /// Read (files, or folders and everything beneath).
    pub read: Vec<PathBuf>,
    /// Read and write in place (disk files, the console file, /dev/kvm).
    pub read_write: Vec<PathBuf>,
    /// Anything beneath (checkpoint locations, `--allow-path`).
    pub full: Vec<PathBuf>,
    /// Folders where Unix sockets are bound, renamed into place and removed.
    pub sockets: Vec<PathBuf>,
}

/// Whether Landlock is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every handled right is enforced.
    Enforced,
    /// The kernel enforces only part of the rights (an older Landlock ABI).
    Partial,
    /// The kernel has no Landlock.
    Unsupported,
}

impl AccessPaths {
    /// The paths of the VM `config` describes, plus `allow` (`--allow-path`), plus
    /// `checkpoint` (the folder `strata restore` reads, if any).
    pub fn for_vm(config: &VmConfig, allow: &[PathBuf], checkpoint: Option<&Path>) -> Self {
        let mut p = AccessPaths::default();
        if let Kernel::File(k) = &config.kernel {
            p.read.push(k.clone());
        }
        p.read.extend(config.initrd.iter().cloned());
        for d in &config.disks {
            if d.read_only {
                p.read.push(d.path.clone());
            } else {
                p.read_write.push(d.path.clone());
            }
            if let Some(dir) = parent(&d.path) {
                p.read.push(dir);
            }
        }
        if let ConsoleConfig::File(f) = &config.console {
            p.read_write.push(f.clone());
        }
        for socket in config
            .api_socket
            .iter()
            .chain(config.vsock.as_ref().map(|v| &v.socket))
        {
            if let Some(dir) = parent(socket) {
                p.sockets.push(dir);
            }
        }
        if let Some(location) = &config.checkpoint.location {
            p.full.push(PathBuf::from(location));
        }
        p.full.extend(allow.iter().cloned());
        p.read.extend(checkpoint.map(Path::to_path_buf));
        p.read_write.push(PathBuf::from("/dev/kvm"));
        p.read
            .extend(["/proc", "/sys/devices/system/cpu", "/sys/fs/cgroup"].map(PathBuf::from));
        p.read.extend(std::env::current_exe().ok());
        p
    }
}

/// The folder holding `path` (the current folder for a bare name).
fn parent(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    absolute.parent().map(Path::to_path_buf)
}

/// Restricts the process (this thread and the threads it creates from now on) to `paths`.
pub(super) fn restrict(paths: &AccessPaths) -> Result<LandlockStatus, SandboxError> {
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let read = AccessFs::from_read(LANDLOCK_ABI);
    let read_write = read | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let sockets = AccessFs::ReadDir
        | AccessFs::MakeSock
        | AccessFs::MakeDir
        | AccessFs::RemoveDir
        | AccessFs::RemoveFile
        | AccessFs::Refer;
    let ruleset = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .map_err(SandboxError::Landlock)?;
    let groups: [(&[PathBuf], BitFlags<AccessFs>); 4] = [
        (&paths.read, read),
        (&paths.read_write, read_write),
        (&paths.full, all),
        (&paths.sockets, sockets),
    ];
    let mut ruleset = ruleset;
    for (list, access) in groups {
        for path in list {
            let Ok(meta) = std::fs::metadata(path) else {
                log::debug!("Landlock: {} does not exist; no rule", path.display());
                continue;
            };
            let access = if meta.is_dir() {
                access
            } else {
                access & AccessFs::from_file(LANDLOCK_ABI)
            };
            let fd = match PathFd::new(path) {
                Ok(fd) => fd,
                Err(e) => {
                    log::debug!("Landlock: {}: {e}; no rule", path.display());
                    continue;
                }
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|source| SandboxError::LandlockPath {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
    let status = ruleset.restrict_self().map_err(SandboxError::Landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::Enforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::Partial,
        _ => LandlockStatus::Unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, VsockConfig};

    #[test]
    fn a_vm_gets_its_disks_sockets_state_and_kvm() {
        let config = VmConfig {
            kernel: Kernel::File("/k/vmlinux".into()),
            initrd: Some("/k/initrd".into()),
            cmdline: String::new(),
            vcpus: 1,
            memory: 64 << 20,
            reboot: true,
            console: ConsoleConfig::File("/c/console.log".into()),
            disks: vec![
                DiskConfig {
                    path: "/d/a.raw".into(),
                    read_only: false,
                    l2_cache_size: None,
                },
                DiskConfig {
                    path: "/e/b.raw".into(),
                    read_only: true,
                    l2_cache_size: None,
                },
            ],
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/v/vsock.sock".into(),
            }),
            api_socket: Some("/a/api.sock".into()),
            checkpoint: api::types::CheckpointConfig {
                kind: Default::default(),
                location: Some("/s".into()),
            },
        };
        let p = AccessPaths::for_vm(&config, &["/backups".into()], None);
        for r in ["/k/vmlinux", "/k/initrd", "/e/b.raw", "/d", "/e", "/proc"] {
            assert!(p.read.contains(&r.into()), "{r} not readable: {p:?}");
        }
        assert!(!p.read_write.contains(&"/e/b.raw".into()));
        for rw in ["/d/a.raw", "/c/console.log", "/dev/kvm"] {
            assert!(p.read_write.contains(&rw.into()), "{rw}: {p:?}");
        }
        assert_eq!(p.full, vec![PathBuf::from("/s"), "/backups".into()]);
        assert_eq!(p.sockets, vec![PathBuf::from("/a"), "/v".into()]);
    }
}
