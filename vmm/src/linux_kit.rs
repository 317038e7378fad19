//! `strata run --guest linux`: builds (or finds in its cache) the Linux guest kit with
//! `resources/linux-kit/build.sh` and boots it.
//!
//! The kit has two kernels: the **test kernel** (built from Debian's `linux-source-6.1` with a
//! minimal config and three small patches that are off unless switched on from the command
//! line; it boots to init on PVM hosts) and Debian's **stock** cloud kernel (what users run on
//! hardware KVM). `auto` picks the test kernel on a PVM host and the stock kernel elsewhere.
//! The script lives in the source tree, so `--guest linux` works from a checkout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which kernel `--guest linux` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinuxKernel {
    /// The test kernel on a PVM host, the stock kernel elsewhere.
    Auto,
    /// The Linux test kernel.
    Test,
    /// Debian's stock cloud kernel.
    Stock,
}

/// Errors preparing the kit.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The script could not run or failed.
    #[error("building the Linux guest kit with {script} failed: {why}")]
    Build {
        /// The script.
        script: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The kit lacks a file.
    #[error("the Linux guest kit in {dir} has no {file}")]
    Missing {
        /// The kit folder.
        dir: PathBuf,
        /// The file.
        file: &'static str,
    },
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    /// The kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs, if the kit has one.
    pub initrd: Option<PathBuf>,
    /// The kit's command line, if it has one.
    pub cmdline: Option<String>,
}

/// Whether /dev/kvm is PVM (software virtualisation).
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux-kit/build.sh")
}

/// Builds or finds the kit for `kernel` and returns what to boot.
pub fn prepare(kernel: LinuxKernel) -> Result<Kit, KitError> {
    let mode = match kernel {
        LinuxKernel::Test => "test",
        LinuxKernel::Stock => "stock",
        LinuxKernel::Auto if is_pvm() => "test",
        LinuxKernel::Auto => "stock",
    };
    let script = script();
    let build_err = |why: String| KitError::Build {
        script: script.clone(),
        why,
    };
    let out = Command::new("bash")
        .arg(&script)
        .arg(mode)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| build_err(e.to_string()))?;
    if !out.status.success() {
        return Err(build_err(format!("it exited with {}", out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| build_err("it printed no kit folder".into()))?;
    let kernel = dir.join("vmlinux");
    if !kernel.exists() {
        return Err(KitError::Missing {
            dir,
            file: "vmlinux",
        });
    }
    let initrd = ["initramfs.cpio.gz", "initramfs.cpio"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists());
    let cmdline = std::fs::read_to_string(dir.join("cmdline.txt"))
        .ok()
        .map(|c| c.trim().to_string());
    Ok(Kit {
        kernel,
        initrd,
        cmdline,
    })
}
