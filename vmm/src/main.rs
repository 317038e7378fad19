//! The `strata` binary.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::runner::{self, Outcome};

/// Prints an error and its causes on one line.
fn report(err: &dyn std::error::Error) {
    let mut line = format!("strata: error: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{line}");
}

/// `strata disk` and `strata ctl` print and exit like any Unix tool, so a reader that goes away
/// (`strata disk map x | head`) ends them quietly by SIGPIPE. Rust starts programs with SIGPIPE
/// ignored, which turns that into a panic in `println!`. `strata run` keeps it ignored: its
/// console writer handles EPIPE itself and the VM must not die with its console's reader.
fn default_sigpipe() {
    // SAFETY: sets a signal disposition; no pointers, no handler code runs in this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Sets up the sandbox (`vmm::sandbox`) of a VMM about to run `vm`, on the main thread before
/// any other thread starts. The checkpoint location and the console file are created first:
/// Landlock rules name existing paths, and the VMM creates both at start anyway.
fn enter_sandbox(vm: &vmm::config::VmConfig, sandbox: &vmm::sandbox::SandboxConfig) -> bool {
    if let Some(location) = &vm.checkpoint.location {
        let _ = std::fs::create_dir_all(location);
    }
    if let vmm::config::ConsoleConfig::File(path) = &vm.console {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path);
    }
    match vmm::sandbox::init(sandbox) {
        Ok(status) => {
            log::debug!("sandbox: {status:?}");
            if status.landlock == vmm::sandbox::LandlockStatus::Unsupported {
                log::warn!(
                    "this kernel has no Landlock: strata runs without file access restrictions"
                );
            }
            true
        }
        Err(e) => {
            report(&e);
            false
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the problem; the rest is usage advice.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "strata: error: {} (see 'strata --help')",
                first.trim_start_matches("error: ").trim()
            );
            return ExitCode::from(2);
        }
    };

    match cli.command {
        Command::Disk(cmd) => {
            default_sigpipe();
            disk::cli::main(cmd)
        }
        Command::Ctl(args) => {
            default_sigpipe();
            ExitCode::from(u8::try_from(api::ctl::run(args)).unwrap_or(1))
        }
        Command::Restore(args) => {
            let from = match args.locate() {
                Ok(f) => f,
                Err(e) => {
                    report(&e);
                    return ExitCode::from(2);
                }
            };
            let (dir, location) = match &from {
                vmm::cli::RestoreFrom::Store { id, location } => (location.join(id), location),
                vmm::cli::RestoreFrom::Export { dir, location } => (dir.clone(), location),
            };
            let host = match args.host_config(location) {
                Ok(h) => h,
                Err(e) => {
                    report(&e);
                    return ExitCode::from(2);
                }
            };
            let config = match vmm::checkpoint::read_checkpoint_folder(&dir) {
                Ok((_, machine)) => machine.to_config(&host),
                Err(e) => {
                    report(&e);
                    return ExitCode::FAILURE;
                }
            };
            if !enter_sandbox(&config, &args.sandbox(&config, &dir)) {
                return ExitCode::FAILURE;
            }
            match runner::restore(&config, &from) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let config = match args.resolve() {
                Ok(c) => c,
                Err(
                    e @ (vmm::cli::RunArgsError::Config(_)
                    | vmm::cli::RunArgsError::ConfigFile { .. }),
                ) => {
                    report(&e);
                    return ExitCode::from(2);
                }
                Err(e) => {
                    report(&e);
                    return ExitCode::FAILURE;
                }
            };
            let sandbox = match args.sandbox(&config) {
                Ok(s) => s,
                Err(e) => {
                    report(&e);
                    return ExitCode::from(2);
                }
            };
            if !enter_sandbox(&config, &sandbox) {
                return ExitCode::FAILURE;
            }
            match runner::run(&config) {
                Ok(Outcome::PowerOff) | Ok(Outcome::Reset) | Ok(Outcome::Quit) => ExitCode::SUCCESS,
                Err(e @ runner::RunError::Config(_)) => {
                    report(&e);
                    ExitCode::from(2)
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
    }
}
