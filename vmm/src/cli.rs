//! The `strata` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
}

/// `strata run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an x86_64 ELF vmlinux or a bzImage [default: the embedded test guest]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Kernel command line
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

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
}

impl RunArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::VcpusOutOfRange(self.vcpus))?;
        Ok(VmConfig {
            kernel: self.kernel.clone().map_or(Kernel::TestGuest, Kernel::File),
            cmdline: self.cmdline.clone(),
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("strata").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_boot_the_test_guest() {
        let Command::Run(args) = parse(&["run"]).unwrap().command;
        let c = args.to_config().unwrap();
        assert_eq!(c.kernel, Kernel::TestGuest);
        assert_eq!((c.vcpus, c.memory, c.reboot), (1, 512 << 20, true));
        assert_eq!(c.console, ConsoleConfig::Stdio);
    }

    #[test]
    fn run_flags_map_to_config() {
        let Command::Run(args) = parse(&[
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
        ])
        .unwrap()
        .command;
        let c = args.to_config().unwrap();
        assert_eq!(c.kernel, Kernel::File("/k".into()));
        assert_eq!((c.cmdline.as_str(), c.vcpus, c.memory), ("a=b", 4, 1 << 30));
        assert!(!c.reboot);
        assert_eq!(c.console, ConsoleConfig::None);
    }

    #[test]
    fn out_of_range_vcpus_are_config_errors() {
        for n in ["0", "33", "300"] {
            let Command::Run(args) = parse(&["run", "--vcpus", n]).unwrap().command;
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
