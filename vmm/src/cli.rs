//! The `strata` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::linux_kit::LinuxKernel;

use crate::config::{
    parse_memory, ConfigError, ConsoleConfig, Kernel, VmConfig, DEFAULT_CMDLINE, MAX_VCPUS,
};

/// Strata: a KVM hypervisor with checkpoints.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `strata run` boots when no --kernel is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// The freestanding test guest built into strata.
    Test,
    /// The Linux guest kit.
    Linux,
}

/// `dir` made absolute against the current directory.
fn absolute(dir: &std::path::Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a VM and run it until the guest powers off.
    ///
    /// With no --kernel, boots the test guest built into strata. The serial console is on
    /// stdin/stdout; when stdin is a terminal it is put in raw mode, and Ctrl-A x quits.
    /// Exit status: 0 when the guest powers off (or resets with --no-reboot), 1 when it panics
    /// or stops with an error, 2 for bad arguments.
    Run(RunArgs),
    /// Talk to a running VMM through its API socket.
    ///
    /// Exit status: 0 on success, 1 when the call fails, 2 for bad arguments;
    /// `guest exec` exits with the guest command's status.
    Ctl(api::CtlArgs),
    /// Work with disk images: create, info, check, map, merge, convert, changes.
    #[command(subcommand)]
    Disk(disk::cli::DiskCommand),
}

/// `strata run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an x86_64 ELF vmlinux or a bzImage [default: the embedded test guest]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) for the kernel
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1", or the Linux kit's]
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,

    /// Which guest to boot without --kernel: the embedded test guest, or the Linux guest kit
    /// (built on first use by resources/linux-kit/build.sh and cached)
    #[arg(long, value_name = "GUEST", default_value = "test")]
    pub guest: GuestKind,

    /// With --guest linux: which kernel (auto = the test kernel on PVM hosts, Debian's stock
    /// cloud kernel elsewhere)
    #[arg(long, value_name = "KERNEL", default_value = "auto")]
    pub linux_kernel: LinuxKernel,

    /// Number of vCPUs (1 to 32)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub vcpus: u64,

    /// Guest RAM: MiB, or a size with a unit such as 512M or 1G
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,

    /// Exit (status 0) when the guest resets instead of rebooting it
    #[arg(long)]
    pub no_reboot: bool,

    /// Where the serial console goes: stdio, file=PATH (output only) or none
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    pub console: String,

    /// A virtio-blk disk: path=FILE[,readonly=on]; FILE is a raw image or the top layer of a
    /// Strata chain. Repeat for more disks; the guest sees them in this order
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]")]
    pub disks: Vec<String>,

    /// A virtio-vsock device: cid=N,socket=PATH. Host programs connect to PATH and write
    /// "CONNECT <port>"; guest connections to host port P go to PATH_P
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,

    /// Serve the HTTP API on this Unix socket (mode 0600). With it, a guest power-off leaves
    /// strata running with the VM off, to be started again or checkpointed
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Checkpoint type: disabled, standard, production (falls back to standard when the guest
    /// agent cannot quiesce) or production-only
    #[arg(long, value_name = "TYPE", default_value = "production")]
    pub checkpoint_type: api::types::CheckpointType,

    /// Where this VM's checkpoints are stored
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl RunArgs {
    /// The VM configuration these flags describe.
    /// The VM configuration these flags describe, building the Linux kit if it is asked for.
    pub fn resolve(&self) -> Result<VmConfig, RunArgsError> {
        let mut config = self.to_config()?;
        if self.kernel.is_none() && self.guest == GuestKind::Linux {
            let kit = crate::linux_kit::prepare(self.linux_kernel)?;
            config.kernel = Kernel::File(kit.kernel);
            if config.initrd.is_none() {
                config.initrd = kit.initrd;
            }
            if self.cmdline.is_none() {
                if let Some(c) = kit.cmdline {
                    config.cmdline = c;
                }
            }
        }
        Ok(config)
    }

    /// The VM configuration these flags describe, without building anything.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::VcpusOutOfRange(self.vcpus))?;
        Ok(VmConfig {
            kernel: self.kernel.clone().map_or(Kernel::TestGuest, Kernel::File),
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus,
            memory: parse_memory(&self.memory)?,
            reboot: !self.no_reboot,
            console: self.console.parse::<ConsoleConfig>()?,
            disks: self
                .disks
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_deref().map(str::parse).transpose()?,
            api_socket: self.api_socket.clone(),
            checkpoint: api::types::CheckpointConfig {
                kind: self.checkpoint_type,
                location: self
                    .state_dir
                    .as_ref()
                    .map(|d| absolute(d).display().to_string()),
            },
        })
    }
}

/// Errors turning `strata run` flags into a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunArgsError {
    /// A flag is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Linux kit could not be prepared.
    #[error(transparent)]
    Kit(#[from] crate::linux_kit::KitError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("strata").chain(args.iter().copied()))
    }

    /// The `run` arguments of a command line that must parse as `strata run`.
    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(a) => a,
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn run_defaults_boot_the_test_guest() {
        let args = run_args(&["run"]);
        let c = args.to_config().unwrap();
        assert_eq!(c.kernel, Kernel::TestGuest);
        assert_eq!((c.vcpus, c.memory, c.reboot), (1, 512 << 20, true));
        assert_eq!(c.console, ConsoleConfig::Stdio);
    }

    #[test]
    fn run_flags_map_to_config() {
        let args = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--cmdline",
            "a=b",
            "--vcpus",
            "4",
            "--memory",
            "1G",
            "--no-reboot",
            "--console",
            "none",
        ]);
        let c = args.to_config().unwrap();
        assert_eq!(c.kernel, Kernel::File("/k".into()));
        assert_eq!((c.cmdline.as_str(), c.vcpus, c.memory), ("a=b", 4, 1 << 30));
        assert!(!c.reboot);
        assert_eq!(c.console, ConsoleConfig::None);
    }

    #[test]
    fn out_of_range_vcpus_are_config_errors() {
        for n in ["0", "33", "300"] {
            let args = run_args(&["run", "--vcpus", n]);
            assert!(matches!(
                args.to_config(),
                Err(ConfigError::VcpusOutOfRange(_))
            ));
        }
    }

    #[test]
    fn unknown_flag_is_a_parse_error() {
        assert!(parse(&["run", "--bogus"]).is_err());
    }
}
