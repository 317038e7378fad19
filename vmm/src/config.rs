//! What a VM is made of, checked before anything is built.

use std::path::PathBuf;

use crate::arch::layout::CMDLINE_MAX_SIZE;

/// The command line given to a kernel when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default guest RAM.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The most vCPUs a VM may have (APIC ids must fit the MADT's 8-bit field, and the test guest
/// and CPUID topology are sized for it).
pub const MAX_VCPUS: u8 = 32;
/// The least guest RAM that holds the boot structures, a kernel and some room.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Errors in a VM's configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `strata restore` arguments that do not name a usable checkpoint.
    #[error("{0}")]
    BadRestore(String),
    /// A memory size that does not parse.
    #[error("invalid memory size '{0}': expected a number of MiB or a size such as 512M or 1G")]
    BadMemorySize(String),
    /// A memory size of zero.
    #[error("--memory must be more than 0")]
    ZeroMemory,
    /// Too little memory to boot.
    #[error("--memory {0} MiB is too small: at least {MIN_MEMORY_MIB} MiB is needed")]
    MemoryTooSmall(u64),
    /// A size that is not a whole number of MiB.
    #[error("--memory must be a whole number of MiB")]
    MemoryNotMibAligned,
    /// More memory than the host has.
    #[error("--memory {requested} MiB is more than the host's {host} MiB")]
    MemoryExceedsHost {
        /// What was asked for, in MiB.
        requested: u64,
        /// What the host has, in MiB.
        host: u64,
    },
    /// A vCPU count outside 1..=MAX_VCPUS.
    #[error("--vcpus {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    VcpusOutOfRange(u64),
    /// A command line that does not fit the zero page's limit.
    #[error("the kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// A command line with a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// A `--disk` value that does not parse.
    #[error("invalid --disk '{value}': {why}")]
    BadDisk {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// More disks than there are device slots.
    #[error("{0} disks given; a VM has at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// A `--vsock` value that does not parse.
    #[error("invalid --vsock '{value}': {why}")]
    BadVsock {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `--console` value that does not parse.
    #[error("invalid --console '{0}': expected stdio, file=PATH or none")]
    BadConsole(String),
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// stdin and stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Output to a file, no input.
    File(PathBuf),
    /// Discarded.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::BadConsole(s.to_string())),
            },
        }
    }
}

/// The most virtio-blk disks a VM may have (one MMIO slot and one interrupt line each).
pub const MAX_DISKS: usize = 16;

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// A raw image or the top layer of a Strata chain.
    pub path: PathBuf,
    /// Whether the guest may write it.
    pub read_only: bool,
    /// Bytes of L2 tables the chain keeps cached (`l2-cache-size=`); `None`: the disk crate's
    /// default (4 MiB, which covers 16 GiB of disk with 64 KiB clusters).
    pub l2_cache_size: Option<u64>,
}

/// The smallest and largest `l2-cache-size` (one 64 KiB table; 1 GiB covers 4 TiB).
pub const L2_CACHE_SIZE_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;
    /// Parses `path=FILE[,readonly=on|off][,l2-cache-size=SIZE]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BadDisk {
            value: s.to_string(),
            why: why.to_string(),
        };
        let mut path = None;
        let mut read_only = false;
        let mut l2_cache_size = None;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match key {
                "path" if value.is_empty() => return Err(bad("empty path")),
                "path" => path = Some(PathBuf::from(value)),
                "readonly" => {
                    read_only = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(bad("readonly takes on or off")),
                    }
                }
                "l2-cache-size" => {
                    let n = disk::cli::parse_binary_size(value, 0)
                        .filter(|n| L2_CACHE_SIZE_RANGE.contains(n))
                        .ok_or_else(|| {
                            bad("l2-cache-size takes a size from 64K to 1G (bytes, or with K, M, G)")
                        })?;
                    l2_cache_size = Some(n);
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(Self {
            path: path.ok_or_else(|| bad("path= is required"))?,
            read_only,
            l2_cache_size,
        })
    }
}

/// The virtio-vsock device and its host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host socket: clients connect here; guest connections to port P go to `PATH_P`.
    pub socket: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;
    /// Parses `cid=N,socket=PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BadVsock {
            value: s.to_string(),
            why: why.to_string(),
        };
        let (mut cid, mut socket) = (None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match key {
                "cid" => {
                    let n: u32 = value.parse().map_err(|_| bad("cid must be a number"))?;
                    if n < 3 || n == u32::MAX {
                        return Err(bad("cid must be 3 or more (0-2 are reserved)"));
                    }
                    cid = Some(n);
                }
                "socket" if value.is_empty() => return Err(bad("empty socket path")),
                "socket" => socket = Some(PathBuf::from(value)),
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(Self {
            cid: cid.ok_or_else(|| bad("cid= is required"))?,
            socket: socket.ok_or_else(|| bad("socket= is required"))?,
        })
    }
}

/// The kernel a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The test guest embedded in the `strata` binary.
    TestGuest,
    /// An ELF vmlinux or a bzImage on the host.
    File(PathBuf),
}

/// A VM's configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub kernel: Kernel,
    /// An initial ramdisk for the kernel.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Whether a guest reset reboots it (true) or ends the VMM (false).
    pub reboot: bool,
    /// Where the serial console goes.
    pub console: ConsoleConfig,
    /// virtio-blk disks, in guest order.
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Where the API is served, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Checkpoint type and location.
    pub checkpoint: api::types::CheckpointConfig,
}

/// Parses `512M`, `1G`, `2048` (MiB), `1GiB`, `524288K` into bytes.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let bytes = disk::cli::parse_binary_size(s, 20)
        .ok_or_else(|| ConfigError::BadMemorySize(s.to_string()))?;
    if bytes == 0 {
        return Err(ConfigError::ZeroMemory);
    }
    if bytes % (1 << 20) != 0 {
        return Err(ConfigError::MemoryNotMibAligned);
    }
    Ok(bytes)
}

/// The host's RAM in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl VmConfig {
    /// Checks every field against the limits of the VMM and of this host.
    pub fn validate(&self, host_mib: Option<u64>) -> Result<(), ConfigError> {
        let mib = self.memory >> 20;
        if self.memory == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(mib));
        }
        if let Some(host) = host_mib {
            if mib > host {
                return Err(ConfigError::MemoryExceedsHost {
                    requested: mib,
                    host,
                });
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpusOutOfRange(u64::from(self.vcpus)));
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineHasNul);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: Kernel::TestGuest,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            memory: 512 << 20,
            reboot: true,
            console: ConsoleConfig::Stdio,
            disks: Vec::new(),
            vsock: None,
            api_socket: None,
            checkpoint: Default::default(),
        }
    }

    #[test]
    fn vsock_values_parse() {
        assert_eq!(
            "cid=3,socket=/tmp/v.sock".parse(),
            Ok(VsockConfig {
                cid: 3,
                socket: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "",
            "cid=3",
            "socket=/x",
            "cid=2,socket=/x",
            "cid=x,socket=/x",
            "cid=3,socket=",
            "cid=3,socket=/x,mtu=1",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_values_parse() {
        assert_eq!(
            "path=/a.img".parse(),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: false,
                l2_cache_size: None,
            })
        );
        assert_eq!(
            "path=/b,readonly=on".parse(),
            Ok(DiskConfig {
                path: "/b".into(),
                read_only: true,
                l2_cache_size: None,
            })
        );
        assert_eq!(
            "path=/c,l2-cache-size=32M".parse(),
            Ok(DiskConfig {
                path: "/c".into(),
                read_only: false,
                l2_cache_size: Some(32 << 20),
            })
        );
        for bad in [
            "",
            "/a.img",
            "path=",
            "readonly=on",
            "path=/a,readonly=maybe",
            "path=/a,cache=none",
            "path=/a,l2-cache-size=",
            "path=/a,l2-cache-size=4K",
            "path=/a,l2-cache-size=2G",
            "path=/a,l2-cache-size=lots",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_sizes_parse_with_and_without_units() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("512"), Ok(512 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert_eq!(parse_memory("65536K"), Ok(64 << 20));
    }

    #[test]
    fn bad_memory_sizes_are_refused() {
        assert_eq!(parse_memory("0"), Err(ConfigError::ZeroMemory));
        assert_eq!(parse_memory("0G"), Err(ConfigError::ZeroMemory));
        assert_eq!(parse_memory("1000K"), Err(ConfigError::MemoryNotMibAligned));
        for s in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G"] {
            assert!(
                matches!(parse_memory(s), Err(ConfigError::BadMemorySize(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn validate_checks_limits() {
        assert_eq!(config().validate(Some(1024)), Ok(()));
        let c = VmConfig {
            memory: 2 << 30,
            ..config()
        };
        assert_eq!(
            c.validate(Some(1024)),
            Err(ConfigError::MemoryExceedsHost {
                requested: 2048,
                host: 1024
            })
        );
        let c = VmConfig {
            memory: 8 << 20,
            ..config()
        };
        assert_eq!(c.validate(None), Err(ConfigError::MemoryTooSmall(8)));
        for vcpus in [0, MAX_VCPUS + 1] {
            let c = VmConfig { vcpus, ..config() };
            assert_eq!(
                c.validate(None),
                Err(ConfigError::VcpusOutOfRange(vcpus.into()))
            );
        }
        let c = VmConfig {
            cmdline: "x".repeat(CMDLINE_MAX_SIZE),
            ..config()
        };
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn console_values_parse() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("none".parse(), Ok(ConsoleConfig::None));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!("file=".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }
}
