//! `strata disk`: the image tool's subcommands (clap structs) and their implementations.
//! Human output by default, `--json` where the output is data; progress bars on stderr for
//! merge and convert when stderr is a terminal.

use std::path::PathBuf;

use clap::Subcommand;
use thiserror::Error;

use crate::chain::{create_empty, create_layer_with, CreateOptions};
use crate::error::DiskError;
use crate::merge::MergeDirection;
use crate::ops::{self, ConvertFormat, MapKind};
use crate::parent::ParentPolicy;
use crate::progress::Progress;

/// The `strata disk` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create a new empty disk (--size) or a new layer over a parent (--parent).
    Create {
        /// The new file (a Strata layer; use the .strata extension).
        path: PathBuf,
        /// Size of a new empty disk: bytes, or with a unit K, M, G, T (binary).
        #[arg(
            long,
            value_name = "SIZE",
            required_unless_present = "parent",
            conflicts_with = "parent"
        )]
        size: Option<String>,
        /// The parent: a raw image or a Strata layer (the new layer's content starts as its).
        #[arg(long, value_name = "PARENT")]
        parent: Option<PathBuf>,
        /// Cluster size of a new empty disk (4K to 2M, a power of two) [default: 64K].
        #[arg(long, value_name = "SIZE", conflicts_with = "parent")]
        cluster_size: Option<String>,
        /// Let the new layer (and the layers of PARENT's chain) name parents outside their own
        /// directory: the new layer then records PARENT's absolute path (only for files you
        /// trust).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Show the chain: its files, sizes and allocation.
    Info {
        /// The top of the chain.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Check a chain for corruption and leaked clusters (exit status 1 on corruption).
    Check {
        /// The top of the chain.
        path: PathBuf,
        /// Give leaked clusters of the top file back (corruption is only reported).
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Show which layer holds each range of the disk.
    Map {
        /// The top of the chain.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Fold a layer into its parent (default) or into its child, and delete it.
    Merge {
        /// The layer to merge away.
        path: PathBuf,
        /// Fold the layer into its child instead of its parent (needs --top).
        #[arg(long)]
        into_child: bool,
        /// The top of the chain the layer belongs to [default: the layer itself]; its files
        /// are re-pointed as needed.
        #[arg(long, value_name = "TOP")]
        top: Option<PathBuf>,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Flatten a chain into a new sparse raw image or a single-layer Strata image.
    Convert {
        /// The top of the chain.
        path: PathBuf,
        /// The new file (must not exist).
        out: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "raw")]
        format: ConvertFormat,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
    /// Show the clusters changed between an older layer and a newer one of its chain.
    Changes {
        /// The older layer.
        older: PathBuf,
        /// The newer layer (the top of a chain that contains OLDER).
        newer: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Let layers name parents outside their own directory (only for files you trust: a
        /// crafted layer could otherwise name any file on this host as its parent).
        #[arg(long)]
        allow_parent_outside: bool,
    },
}

/// Why a `strata disk` command failed.
#[derive(Debug, Error)]
pub enum CliError {
    /// The disk library failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A size argument does not parse.
    #[error("invalid size {0:?} (use bytes or a number with K, M, G or T)")]
    BadSize(String),
    /// `check` found corruption.
    #[error("{}: check found corruption", .0.display())]
    Corrupt(PathBuf),
    /// JSON output failed.
    #[error("cannot write JSON")]
    Json(#[from] serde_json::Error),
}

/// Parses `123`, `64K`, `10G`, `1.5`-free binary sizes.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    parse_binary_size(s, 0).ok_or_else(|| CliError::BadSize(s.to_string()))
}

/// Parses a number with an optional binary unit (`K`, `M`, `G`, `T`, optionally followed by
/// `iB` or `B`, any case) into bytes; a bare number is in units of `1 << default_shift`
/// bytes. `None` for anything else or on overflow. `strata run --memory` uses it too.
pub fn parse_binary_size(s: &str, default_shift: u32) -> Option<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let unit = unit.trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => default_shift,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64.checked_shl(shift)?)
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The parent policy `--allow-parent-outside` asks for.
fn policy(allow_parent_outside: bool) -> ParentPolicy {
    if allow_parent_outside {
        ParentPolicy::anywhere()
    } else {
        ParentPolicy::confined()
    }
}

/// Runs one `strata disk` command, printing its output.
pub fn run(cmd: DiskCommand) -> Result<(), CliError> {
    match cmd {
        DiskCommand::Create {
            path,
            size,
            parent,
            cluster_size,
            allow_parent_outside,
        } => {
            if let Some(parent) = parent {
                create_layer_with(&parent, &path, &policy(allow_parent_outside))?;
                println!("created {} over {}", path.display(), parent.display());
            } else {
                let size = parse_size(size.as_deref().unwrap_or_default())?;
                let cluster_bits = match cluster_size {
                    Some(c) => {
                        let c = parse_size(&c)?;
                        if !c.is_power_of_two() {
                            return Err(CliError::BadSize(c.to_string()));
                        }
                        Some(c.trailing_zeros())
                    }
                    None => None,
                };
                create_empty(&path, size, CreateOptions { cluster_bits })?;
                println!("created {} ({})", path.display(), human(size));
            }
        }
        DiskCommand::Info {
            path,
            json,
            allow_parent_outside,
        } => {
            let info = ops::info_with(&path, &policy(allow_parent_outside))?;
            if json {
                return print_json(&info);
            }
            println!(
                "virtual size: {} ({} bytes), cluster size: {}",
                human(info.virtual_size),
                info.virtual_size,
                human(info.cluster_size)
            );
            println!(
                "{:>3}  {:<6}  {:>10}  {:>10}  {:>10}  file",
                "#", "format", "data", "zero", "on disk"
            );
            for (i, l) in info.layers.iter().enumerate().rev() {
                let fmt = match l.format {
                    crate::Format::Raw => "raw",
                    crate::Format::Strata => "strata",
                };
                let (data, zero) = if l.format == crate::Format::Raw {
                    ("-".to_string(), "-".to_string())
                } else {
                    (human(l.data_bytes), human(l.zero_bytes))
                };
                let fold = if l.folding {
                    "  (interrupted merge)"
                } else {
                    ""
                };
                println!(
                    "{i:>3}  {fmt:<6}  {data:>10}  {zero:>10}  {:>10}  {}{fold}",
                    human(l.disk_usage),
                    l.path.display()
                );
            }
        }
        DiskCommand::Check {
            path,
            repair,
            json,
            allow_parent_outside,
        } => {
            let r = ops::check_with(&path, repair, &policy(allow_parent_outside))?;
            if json {
                print_json(&r)?;
            } else {
                for f in &r.files {
                    for e in &f.errors {
                        println!("error: {e}");
                    }
                    for w in &f.warnings {
                        println!("warning: {}: {w}", f.path.display());
                    }
                    if f.leaked_clusters > 0 {
                        println!(
                            "{}: {} leaked cluster(s){}",
                            f.path.display(),
                            f.leaked_clusters,
                            if f.repaired_clusters > 0 {
                                ", given back"
                            } else {
                                " (check --repair gives them back)"
                            }
                        );
                    }
                }
                if r.is_clean() {
                    println!(
                        "{}: no corruption found in {} file(s)",
                        path.display(),
                        r.files.len()
                    );
                }
            }
            if !r.is_clean() {
                return Err(CliError::Corrupt(path));
            }
        }
        DiskCommand::Map {
            path,
            json,
            allow_parent_outside,
        } => {
            let m = ops::map_with(&path, &policy(allow_parent_outside))?;
            if json {
                return print_json(&m);
            }
            println!(
                "{:>16}  {:>16}  {:>5}  {:<11}  file",
                "offset", "length", "layer", "kind"
            );
            for r in m {
                let kind = match r.kind {
                    MapKind::Data => "data",
                    MapKind::Zero => "zero",
                    MapKind::Unallocated => "unallocated",
                };
                let layer = r.layer.map_or("-".into(), |l| l.to_string());
                let file = r
                    .file
                    .as_deref()
                    .map_or(String::new(), |f| f.display().to_string());
                println!(
                    "{:>#16x}  {:>#16x}  {layer:>5}  {kind:<11}  {file}",
                    r.offset, r.length
                );
            }
        }
        DiskCommand::Merge {
            path,
            into_child,
            top,
            allow_parent_outside,
        } => {
            let dir = if into_child {
                MergeDirection::IntoChild
            } else {
                MergeDirection::IntoParent
            };
            if into_child && top.is_none() {
                return Err(CliError::Disk(DiskError::Invalid(
                    "--into-child needs --top TOP, the top of the chain that holds the child"
                        .into(),
                )));
            }
            let mut p = Progress::new("merging");
            let res = ops::merge_with(
                &path,
                top.as_deref(),
                dir,
                &policy(allow_parent_outside),
                &mut |d, t| p.update(d, t),
            );
            p.finish();
            res?;
            println!(
                "merged {} into its {}",
                path.display(),
                if into_child { "child" } else { "parent" }
            );
        }
        DiskCommand::Convert {
            path,
            out,
            format,
            allow_parent_outside,
        } => {
            let mut p = Progress::new("converting");
            let res = ops::convert_with(
                &path,
                &out,
                format,
                &policy(allow_parent_outside),
                &mut |d, t| p.update(d, t),
            );
            p.finish();
            res?;
            println!("wrote {}", out.display());
        }
        DiskCommand::Changes {
            older,
            newer,
            json,
            allow_parent_outside,
        } => {
            let m = ops::changed_clusters_with(&older, &newer, &policy(allow_parent_outside))?;
            if json {
                return print_json(&m);
            }
            println!(
                "{} changed in {} range(s) ({} cluster size)",
                human(m.changed_bytes),
                m.ranges.len(),
                human(m.cluster_size)
            );
            for r in &m.ranges {
                println!("{:>#16x}  {:>#16x}", r.offset, r.length);
            }
        }
    }
    Ok(())
}

/// Runs a command and turns the outcome into an exit status, printing errors as
/// `strata: error: ...` (0 success, 1 failure or corruption found).
pub fn main(cmd: DiskCommand) -> std::process::ExitCode {
    match run(cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: error: {}", crate::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        cmd: DiskCommand,
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert!(parse_size("1.5G").is_err());
    }

    #[test]
    fn create_needs_size_or_parent_but_not_both() {
        assert!(T::try_parse_from(["t", "create", "a"]).is_err());
        assert!(T::try_parse_from(["t", "create", "a", "--size", "1G", "--parent", "b"]).is_err());
        assert!(T::try_parse_from(["t", "create", "a", "--parent", "b"]).is_ok());
    }

    #[test]
    fn commands_run_end_to_end_and_check_fails_on_corruption() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.strata");
        let b = d.path().join("b.strata");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let go = |args: &[&str]| {
            run(
                T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
                    .unwrap()
                    .cmd,
            )
        };
        go(&["create", &s(&a), "--size", "1M"]).unwrap();
        go(&["create", &s(&b), "--parent", &s(&a)]).unwrap();
        go(&["info", &s(&b), "--json"]).unwrap();
        go(&["map", &s(&b)]).unwrap();
        go(&["changes", &s(&a), &s(&b), "--json"]).unwrap();
        go(&["check", &s(&b)]).unwrap();
        go(&["convert", &s(&b), &s(&d.path().join("o.raw"))]).unwrap();
        go(&["merge", &s(&b)]).unwrap();
        assert!(!b.exists());
        let mut bytes = std::fs::read(&a).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&a, bytes).unwrap();
        assert!(matches!(go(&["check", &s(&a)]), Err(CliError::Corrupt(_))));
    }
}
