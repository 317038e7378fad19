//! `strata ctl` where no VMM is involved. What ctl prints for each lifecycle, config and guest
//! command is tested against the real `strata` in `tests/tests/api.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use std::path::Path;

use api::ctl::{run_with, CtlArgs};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    Ctl(CtlArgs),
}

struct Run {
    status: i32,
    err: String,
}

fn ctl(sock: &Path, args: &[&str]) -> Run {
    let sock = sock.to_str().unwrap();
    let mut full = vec!["strata", "ctl", "--api-socket", sock];
    full.extend_from_slice(args);
    let Top::Ctl(args) = Cli::try_parse_from(full).unwrap().command;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = run_with(args, &mut out, &mut err);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    Run {
        status,
        err: String::from_utf8(err).unwrap(),
    }
}

#[test]
fn missing_socket_is_one_error_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let r = ctl(&sock, &["vm", "status"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.err.lines().count(), 1);
    assert!(r.err.contains("cannot connect to API socket") && r.err.contains("none.sock"));
}
