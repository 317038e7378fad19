//! The `strata` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::linux_kit::LinuxKernel;
use crate::sandbox::{AccessPaths, SandboxConfig, SeccompMode};

use crate::config::{
    parse_memory, ConfigError, ConsoleConfig, Kernel, VmConfig, DEFAULT_CMDLINE,
    DEFAULT_MEMORY_MIB, MAX_VCPUS,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GuestKind {
    /// The freestanding test guest built into strata.
    #[default]
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
    /// Start a VM in this new process from a standard checkpoint.
    ///
    /// DIR is a checkpoint's folder (its `path`) inside a VM's checkpoint location: the VM gets
    /// the checkpoint's configuration, continues on new layers above the checkpoint's disks
    /// in that location, and resumes where the checkpoint was taken. The process of the VM
    /// that took it must have ended (its disks and location are locked while it runs). DIR
    /// may also be an export folder (`strata ctl checkpoint export`): the VM then runs on new
    /// layers above the export's disk files, in --state-dir (default: DIR/vm).
    Restore(RestoreArgs),
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
///
/// Flags whose default is written in their help have type `Option` here, so that a value from
/// `--config FILE` can tell apart from one given on the command line (which wins); the defaults
/// are applied in [`RunArgs::to_config`] and [`RunArgs::resolve`].
#[derive(Debug, Clone, Default, Args)]
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
    /// (built on first use by resources/linux-kit/build.sh and cached) [default: test]
    #[arg(long, value_name = "GUEST")]
    pub guest: Option<GuestKind>,

    /// With --guest linux: which kernel (auto = the test kernel on PVM hosts, Debian's stock
    /// cloud kernel elsewhere) [default: auto]
    #[arg(long, value_name = "KERNEL")]
    pub linux_kernel: Option<LinuxKernel>,

    /// Number of vCPUs (1 to 32) [default: 1]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: Option<u64>,

    /// Guest RAM: MiB, or a size with a unit such as 512M or 1G [default: 512M]
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// Exit (status 0) when the guest resets instead of rebooting it
    #[arg(long)]
    pub no_reboot: bool,

    /// Where the serial console goes: stdio, file=PATH (output only) or none [default: stdio]
    #[arg(long, value_name = "WHERE")]
    pub console: Option<String>,

    /// A virtio-blk disk: path=FILE[,readonly=on][,l2-cache-size=SIZE]; FILE is a raw image or
    /// the top layer of a Strata chain; l2-cache-size (64K to 1G, default 4M) bounds its chain's
    /// metadata cache. Repeat for more disks; the guest sees them in this order
    #[arg(
        long = "disk",
        value_name = "path=FILE[,readonly=on][,l2-cache-size=SIZE]"
    )]
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
    /// agent cannot quiesce) or production-only [default: production]
    #[arg(long, value_name = "TYPE")]
    pub checkpoint_type: Option<api::types::CheckpointType>,

    /// Where this VM's checkpoints are stored
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// System call filters: true (a forbidden call ends strata with a message naming it),
    /// false (none) or log (forbidden calls are allowed and logged by the kernel's audit)
    /// [default: true]
    #[arg(long, value_name = "true|false|log")]
    pub seccomp: Option<SeccompMode>,

    /// A folder strata may read and write besides its VM's own files (Landlock): where
    /// checkpoints are exported, or a checkpoint location set through the API; the disks'
    /// layers may also name parents in it. Repeatable
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,

    /// Read the VM's settings from a JSON file: an object whose keys are the long flags of
    /// `strata run` without their dashes, with the same values ("vcpus": 2, "memory": "1G",
    /// "disk": ["path=a.raw"], "no-reboot": true, ...). A flag given on the command line wins
    /// over the file (--disk replaces the file's whole list); relative paths are relative to
    /// the current directory, as on the command line
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What `strata restore` starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFrom {
    /// Checkpoint `id` of the store at `location`.
    Store {
        /// The checkpoint.
        id: String,
        /// The store.
        location: PathBuf,
    },
    /// The export folder `dir`; the VM's store is at `location`.
    Export {
        /// The export.
        dir: PathBuf,
        /// The store for the VM's layers.
        location: PathBuf,
    },
}

/// `strata restore` flags.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The checkpoint's folder
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,

    /// Serve the HTTP API on this Unix socket (mode 0600)
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The VM's checkpoint location; it must be the folder that holds DIR [default: DIR's
    /// parent folder]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where the serial console goes: stdio, file=PATH (output only) or none [default: stdio]
    #[arg(long, value_name = "WHERE")]
    pub console: Option<String>,

    /// System call filters: true, false or log, as for `strata run` [default: true]
    #[arg(long, value_name = "true|false|log")]
    pub seccomp: Option<SeccompMode>,

    /// A folder strata may read and write besides its VM's own files (Landlock), as for
    /// `strata run`. Repeatable
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
}

impl RestoreArgs {
    /// The sandbox of the restored VM `config`, which starts from the checkpoint folder `dir`.
    pub fn sandbox(&self, config: &VmConfig, dir: &std::path::Path) -> SandboxConfig {
        sandbox_config(self.seccomp, &self.allow_paths, config, Some(dir))
    }

    /// What to restore and where the VM's store is: a store's checkpoint (its id, and the
    /// store, checked against `--state-dir`), or an export folder (the store is `--state-dir`,
    /// by default the folder `vm` inside the export).
    pub fn locate(&self) -> Result<RestoreFrom, ConfigError> {
        let dir = absolute(&self.checkpoint);
        if crate::checkpoint::is_export(&dir) {
            let location = self
                .state_dir
                .as_deref()
                .map_or_else(|| dir.join("vm"), absolute);
            return Ok(RestoreFrom::Export { dir, location });
        }
        self.locate_in_store(&dir)
            .map(|(id, location)| RestoreFrom::Store { id, location })
    }

    fn locate_in_store(&self, dir: &std::path::Path) -> Result<(String, PathBuf), ConfigError> {
        let dir = dir.to_path_buf();
        let bad = |why: String| ConfigError::BadRestore(why);
        let (Some(parent), Some(id)) = (dir.parent(), dir.file_name()) else {
            return Err(bad(format!("{} is not a checkpoint folder", dir.display())));
        };
        let id = id.to_string_lossy().into_owned();
        let location = parent.to_path_buf();
        if let Some(s) = &self.state_dir {
            let given = absolute(s);
            let same = match (given.canonicalize(), location.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => given == location,
            };
            if !same {
                return Err(bad(format!(
                    "--state-dir {} is not the folder that holds checkpoint {} ({}); a \
                     checkpoint continues in its own location",
                    given.display(),
                    dir.display(),
                    location.display()
                )));
            }
        }
        Ok((id, location))
    }

    /// The host-side settings of the restored VM (the rest comes from the checkpoint).
    pub fn host_config(&self, location: &std::path::Path) -> Result<VmConfig, ConfigError> {
        Ok(VmConfig {
            kernel: Kernel::TestGuest,
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory: DEFAULT_MEMORY_MIB << 20,
            reboot: true,
            console: self
                .console
                .as_deref()
                .unwrap_or("stdio")
                .parse::<ConsoleConfig>()?,
            disks: Vec::new(),
            vsock: None,
            api_socket: self.api_socket.clone(),
            checkpoint: api::types::CheckpointConfig {
                kind: Default::default(),
                location: Some(location.display().to_string()),
            },
        })
    }
}

/// The JSON of `--config FILE`: the flags of `strata run`, spelled without their dashes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    guest: Option<String>,
    linux_kernel: Option<String>,
    vcpus: Option<u64>,
    memory: Option<MemoryValue>,
    no_reboot: Option<bool>,
    console: Option<String>,
    disk: Option<Vec<String>>,
    vsock: Option<String>,
    api_socket: Option<PathBuf>,
    checkpoint_type: Option<String>,
    state_dir: Option<PathBuf>,
    seccomp: Option<String>,
    allow_path: Option<Vec<PathBuf>>,
}

/// `"memory"`: a number of MiB or a size with a unit, as for --memory.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum MemoryValue {
    Mib(u64),
    Text(String),
}

/// Parses `value` (from the key `key` of a config file) as one of a flag's choices.
fn choice<T: clap::ValueEnum>(key: &str, value: &str) -> Result<T, String> {
    T::from_str(value, false).map_err(|_| {
        let choices: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        format!(
            "\"{key}\": invalid value '{value}' (possible values: {})",
            choices.join(", ")
        )
    })
}

impl RunArgs {
    /// The VM configuration these flags describe, reading `--config FILE` and building the
    /// Linux kit if they ask for it.
    pub fn resolve(&self) -> Result<VmConfig, RunArgsError> {
        let args = self.with_config_file()?;
        let mut config = args.to_config()?;
        if args.kernel.is_none() && args.guest.unwrap_or_default() == GuestKind::Linux {
            let kit = crate::linux_kit::prepare(args.linux_kernel.unwrap_or(LinuxKernel::Auto))?;
            config.kernel = Kernel::File(kit.kernel);
            if config.initrd.is_none() {
                config.initrd = kit.initrd;
            }
            if args.cmdline.is_none() {
                if let Some(c) = kit.cmdline {
                    config.cmdline = c;
                }
            }
        }
        Ok(config)
    }

    /// These flags with the settings of `--config FILE` filled in where the command line gives
    /// none (without `--config`, the flags as they are).
    pub fn with_config_file(&self) -> Result<RunArgs, RunArgsError> {
        let Some(path) = &self.config else {
            return Ok(self.clone());
        };
        let bad = |why: String| RunArgsError::ConfigFile {
            path: path.clone(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: ConfigFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut args = self.clone();
        args.config = None;
        args.kernel = args.kernel.or(file.kernel);
        args.initrd = args.initrd.or(file.initrd);
        args.cmdline = args.cmdline.or(file.cmdline);
        if args.guest.is_none() {
            args.guest = file
                .guest
                .map(|g| choice("guest", &g))
                .transpose()
                .map_err(bad)?;
        }
        if args.linux_kernel.is_none() {
            args.linux_kernel = file
                .linux_kernel
                .map(|k| choice("linux-kernel", &k))
                .transpose()
                .map_err(bad)?;
        }
        args.vcpus = args.vcpus.or(file.vcpus);
        args.memory = args.memory.or(file.memory.map(|m| match m {
            MemoryValue::Mib(n) => n.to_string(),
            MemoryValue::Text(t) => t,
        }));
        args.no_reboot = args.no_reboot || file.no_reboot.unwrap_or(false);
        args.console = args.console.or(file.console);
        if args.disks.is_empty() {
            args.disks = file.disk.unwrap_or_default();
        }
        args.vsock = args.vsock.or(file.vsock);
        args.api_socket = args.api_socket.or(file.api_socket);
        if args.checkpoint_type.is_none() {
            args.checkpoint_type = file
                .checkpoint_type
                .map(|t| choice("checkpoint-type", &t))
                .transpose()
                .map_err(bad)?;
        }
        args.state_dir = args.state_dir.or(file.state_dir);
        if args.seccomp.is_none() {
            args.seccomp = file
                .seccomp
                .map(|m| choice("seccomp", &m))
                .transpose()
                .map_err(bad)?;
        }
        if args.allow_paths.is_empty() {
            args.allow_paths = file.allow_path.unwrap_or_default();
        }
        Ok(args)
    }

    /// The VM configuration these flags describe, without building anything and without
    /// reading `--config` (see [`RunArgs::with_config_file`]).
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let requested_vcpus = self.vcpus.unwrap_or(1);
        let vcpus = u8::try_from(requested_vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::VcpusOutOfRange(requested_vcpus))?;
        Ok(VmConfig {
            kernel: self.kernel.clone().map_or(Kernel::TestGuest, Kernel::File),
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus,
            memory: match &self.memory {
                Some(m) => parse_memory(m)?,
                None => DEFAULT_MEMORY_MIB << 20,
            },
            reboot: !self.no_reboot,
            console: self
                .console
                .as_deref()
                .unwrap_or("stdio")
                .parse::<ConsoleConfig>()?,
            disks: self
                .disks
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_deref().map(str::parse).transpose()?,
            api_socket: self.api_socket.clone(),
            checkpoint: api::types::CheckpointConfig {
                kind: self.checkpoint_type.unwrap_or_default(),
                location: self
                    .state_dir
                    .as_ref()
                    .map(|d| absolute(d).display().to_string()),
            },
        })
    }
}

impl RunArgs {
    /// The sandbox of the VM `config` (these flags resolved with [`RunArgs::resolve`]; the
    /// sandbox flags of `--config FILE` are read again here).
    pub fn sandbox(&self, config: &VmConfig) -> Result<SandboxConfig, RunArgsError> {
        let args = self.with_config_file()?;
        Ok(sandbox_config(
            args.seccomp,
            &args.allow_paths,
            config,
            None,
        ))
    }
}

/// The sandbox for `config`: `--seccomp`, and Landlock on the VM's paths, `--allow-path`
/// folders (made absolute) and the checkpoint folder a restore starts from.
fn sandbox_config(
    seccomp: Option<SeccompMode>,
    allow: &[PathBuf],
    config: &VmConfig,
    checkpoint: Option<&std::path::Path>,
) -> SandboxConfig {
    let allow: Vec<PathBuf> = allow.iter().map(|p| absolute(p)).collect();
    // The user trusts these folders: a disk chain may leave its layers' folders into them.
    crate::device_manager::trust_parent_dirs(allow.iter().cloned());
    SandboxConfig {
        seccomp: seccomp.unwrap_or_default(),
        paths: AccessPaths::for_vm(config, &allow, checkpoint),
        guest_user_space: config.kernel != crate::config::Kernel::TestGuest,
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
    /// The `--config` file cannot be read or is not a valid settings object.
    #[error("invalid --config file {path}: {why}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
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
    fn seccomp_is_on_by_default_and_takes_true_false_log() {
        let config = run_args(&["run"]).to_config().unwrap();
        let sandbox = run_args(&["run"]).sandbox(&config).unwrap();
        assert_eq!(sandbox.seccomp, SeccompMode::On);
        for (value, mode) in [
            ("true", SeccompMode::On),
            ("false", SeccompMode::Off),
            ("log", SeccompMode::Log),
        ] {
            let args = run_args(&["run", "--seccomp", value, "--allow-path", "/x"]);
            let sandbox = args.sandbox(&config).unwrap();
            assert_eq!(sandbox.seccomp, mode);
            assert!(sandbox.paths.full.contains(&PathBuf::from("/x")));
        }
        assert!(parse(&["run", "--seccomp", "maybe"]).is_err());
        match parse(&["restore", "--checkpoint", "/c", "--seccomp", "false"])
            .unwrap()
            .command
        {
            Command::Restore(r) => assert_eq!(r.seccomp, Some(SeccompMode::Off)),
            other => panic!("not a restore command: {other:?}"),
        }
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

    /// `strata run ARGS --config FILE` where FILE holds `json`.
    fn with_file(json: &str, args: &[&str]) -> Result<RunArgs, RunArgsError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.json");
        std::fs::write(&file, json).unwrap();
        let mut full = vec!["run", "--config", file.to_str().unwrap()];
        full.extend_from_slice(args);
        run_args(&full).with_config_file()
    }

    #[test]
    fn config_file_sets_every_flag() {
        let args = with_file(
            r#"{"kernel": "/k", "initrd": "/i", "cmdline": "a=b", "guest": "linux",
                "linux-kernel": "test", "vcpus": 3, "memory": 96, "no-reboot": true,
                "console": "none", "disk": ["path=/d0", "path=/d1,readonly=on"],
                "vsock": "cid=3,socket=/v", "api-socket": "/api",
                "checkpoint-type": "production-only", "state-dir": "/state",
                "seccomp": "log", "allow-path": ["/backups"]}"#,
            &[],
        )
        .unwrap();
        assert_eq!(args.guest, Some(GuestKind::Linux));
        assert_eq!(args.linux_kernel, Some(LinuxKernel::Test));
        assert_eq!(args.config, None);
        assert_eq!(args.seccomp, Some(SeccompMode::Log));
        assert_eq!(args.allow_paths, vec![PathBuf::from("/backups")]);
        let c = args.to_config().unwrap();
        assert_eq!(c.kernel, Kernel::File("/k".into()));
        assert_eq!(c.initrd, Some("/i".into()));
        assert_eq!(
            (c.cmdline.as_str(), c.vcpus, c.memory),
            ("a=b", 3, 96 << 20)
        );
        assert!(!c.reboot);
        assert_eq!(c.console, ConsoleConfig::None);
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].read_only);
        assert_eq!(c.vsock.unwrap().cid, 3);
        assert_eq!(c.api_socket, Some("/api".into()));
        assert_eq!(
            c.checkpoint.kind,
            api::types::CheckpointType::ProductionOnly
        );
        assert_eq!(c.checkpoint.location.as_deref(), Some("/state"));
    }

    #[test]
    fn command_line_flags_win_over_the_config_file() {
        let args = with_file(
            r#"{"vcpus": 3, "memory": "1G", "disk": ["path=/a", "path=/b"], "cmdline": "x"}"#,
            &["--vcpus", "2", "--disk", "path=/c"],
        )
        .unwrap();
        let c = args.to_config().unwrap();
        assert_eq!((c.vcpus, c.memory, c.cmdline.as_str()), (2, 1 << 30, "x"));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.disks[0].path, std::path::PathBuf::from("/c"));
    }

    #[test]
    fn empty_config_file_gives_the_defaults() {
        let c = with_file("{}", &[]).unwrap().to_config().unwrap();
        assert_eq!(c.kernel, Kernel::TestGuest);
        assert_eq!((c.vcpus, c.memory, c.reboot), (1, 512 << 20, true));
        assert_eq!(c.console, ConsoleConfig::Stdio);
        assert_eq!(c.checkpoint.kind, api::types::CheckpointType::Production);
    }

    #[test]
    fn bad_config_files_are_errors_naming_the_file_and_the_problem() {
        for (json, needle) in [
            (r#"{"vcpu": 2}"#, "unknown field `vcpu`"),
            (r#"{"guest": "windows"}"#, "possible values: test, linux"),
            (
                r#"{"checkpoint-type": "often"}"#,
                "\"checkpoint-type\": invalid value 'often'",
            ),
            (r#"{"vcpus": "two"}"#, "invalid type"),
            ("not json", "expected"),
        ] {
            let err = with_file(json, &[]).unwrap_err().to_string();
            assert!(err.contains("vm.json"), "{json}: {err}");
            assert!(err.contains(needle), "{json}: {err}");
        }
        let err = run_args(&["run", "--config", "/nonexistent/vm.json"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/vm.json"), "{err}");
    }
}
