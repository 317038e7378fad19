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
        Command::Disk(cmd) => disk::cli::main(cmd),
        Command::Ctl(args) => ExitCode::from(u8::try_from(api::ctl::run(args)).unwrap_or(1)),
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
