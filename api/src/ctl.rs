//! `strata ctl`: every API call from the command line, for people and CI scripts.
//!
//! Output is for people by default (`state: running`, `key: value` lines, a tree of the
//! checkpoints for `checkpoint list`) and the API's JSON with `--json`. Exit status: 0 on
//! success; 1 when the call fails (the error is one line on stderr, `strata: error: ...`); 2 for
//! a missing `--api-socket`; `guest exec` exits with the guest command's status. `guest wait`
//! keeps asking until the agent answers, also while the socket does not exist yet, so a script
//! can start `strata run` in the background and wait.
//!
//! `checkpoint changes --export DIR` writes an incremental backup: just the changed blocks, in
//! sparse raw files beside the map (`changes.json`). The API has no call that reads a
//! checkpoint's disk data, so the VMM exports the checkpoint whole into a hidden folder inside
//! DIR first and the changed extents are copied out of that on this side; DIR must be on a file
//! system both reach (the API socket is local anyway).
//!
//! `checkpoint delete` and `checkpoint export` can take minutes. A delete answers at once and
//! merges in the VMM's background: `ctl` then polls `GET /v1/checkpoints` every 200 ms until
//! the merge of that checkpoint is no longer reported (`--no-wait` returns at once). While an
//! export or that wait runs, and only when stderr is a terminal, a progress bar on stderr
//! shows the `progress` that `GET /v1/checkpoints` reports, asked on a second connection every
//! 200 ms; otherwise nothing extra is printed.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::call::LifecycleAction;
use crate::client::{Client, ClientError};
use crate::types::{
    ApplyCheckpoint, ChangesInfo, CheckpointConfig, CheckpointInfo, CheckpointList, CheckpointType,
    CreateCheckpoint, DiskFormat, ExecRequest, ExecResponse, ExportCheckpoint, ExportInfo,
    GuestInfo, Progress, VmInfo, MAX_EXEC_TIMEOUT_S, PROGRESS_EXPORT, PROGRESS_MERGE,
};

/// `strata ctl` flags and subcommand.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VMM's API socket (required)
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,

    /// Print the API's JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `strata ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// The VM's state and lifecycle
    #[command(subcommand)]
    Vm(VmCommand),
    /// Take, list, show, apply, revert, delete and export checkpoints; their changed blocks
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// VM settings
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The guest agent
    #[command(subcommand)]
    Guest(GuestCommand),
}

/// `strata ctl vm ...`.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum VmCommand {
    /// Show the state, configuration and checkpoint settings
    Status,
    /// Pause a running VM
    Pause,
    /// Resume a paused VM
    Resume,
    /// Cold-boot a VM that is off
    Start,
    /// Power the VM off at once (like pulling the plug)
    Stop,
    /// Ask the guest to power off
    Shutdown,
}

/// `strata ctl checkpoint ...`.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Take a checkpoint; prints it, with the type actually taken
    Create {
        /// The checkpoint's name (1 to 128 characters) [default: the VMM picks one]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Take this type instead of the configured one
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<TakeType>,
    },
    /// List the checkpoints as a tree (children under their parent, oldest first); `*` marks
    /// the current one and `Now`, under it, is where the VM runs
    List,
    /// Show one checkpoint
    Show {
        /// The checkpoint's id
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Apply a checkpoint: a standard one resumes the VM in its state, a production one leaves
    /// the VM off on its disks
    Apply {
        /// The checkpoint's id
        #[arg(value_name = "ID")]
        id: String,
        /// Take a checkpoint of the current state first instead of discarding it
        #[arg(long)]
        save_current: bool,
    },
    /// Revert to the current checkpoint: apply it again, discarding the state since
    Revert,
    /// Delete a checkpoint: it goes at once, and its disk data is merged in the background
    /// into the layers that still need it, with the VM running; waits for the merge (a
    /// progress bar on a terminal) and prints the checkpoints left
    Delete {
        /// The checkpoint's id
        #[arg(value_name = "ID")]
        id: String,
        /// Return once the checkpoint is gone, leaving its merge running in the VMM
        #[arg(long)]
        no_wait: bool,
    },
    /// Export a checkpoint into a folder: a self-contained copy that `strata restore
    /// --checkpoint DIR` starts anywhere
    Export {
        /// The checkpoint's id
        #[arg(value_name = "ID")]
        id: String,
        /// The folder to write (made absolute)
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The format of the disk files
        #[arg(long, value_name = "FORMAT", default_value_t = DiskFormat::Raw)]
        format: DiskFormat,
    },
    /// The blocks of each disk written up to a checkpoint since another (or since the launch
    /// disks); with --export, also a copy of just those blocks (an incremental backup)
    Changes {
        /// The checkpoint the changes lead up to
        #[arg(value_name = "ID")]
        id: String,
        /// The checkpoint they start from [default: the VM's launch disks]
        #[arg(long, value_name = "ID")]
        since: Option<String>,
        /// Also write the changed blocks into this folder (new or empty; made absolute):
        /// `changes.json` (the map, as --json prints it) and `disk0.raw`, `disk1.raw`, ... of
        /// the disks' full size, sparse, holding the data of the changed extents and holes
        /// elsewhere. Copying each extent of `changes.json` from them onto the `--since`
        /// checkpoint's raw export gives this checkpoint's. The VMM first exports the
        /// checkpoint into a hidden folder inside DIR (removed at the end), so DIR must be
        /// where the VMM can write and this command can read
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
}

/// The types `checkpoint create --type` takes: those of [`CheckpointType`] that take a
/// checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TakeType {
    /// Memory, device and disk state
    Standard,
    /// Application-consistent disks through the guest agent, else standard
    Production,
    /// Like production, but fails instead of falling back to standard
    ProductionOnly,
}

impl From<TakeType> for CheckpointType {
    fn from(kind: TakeType) -> CheckpointType {
        match kind {
            TakeType::Standard => CheckpointType::Standard,
            TakeType::Production => CheckpointType::Production,
            TakeType::ProductionOnly => CheckpointType::ProductionOnly,
        }
    }
}

/// `strata ctl config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show the checkpoint type and location, or change them
    Checkpoints {
        /// The checkpoint type to set
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<CheckpointType>,
        /// The folder to store checkpoints in (made absolute)
        #[arg(long, value_name = "DIR")]
        location: Option<PathBuf>,
    },
}

/// `strata ctl guest ...`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Ask the guest agent about itself once
    Ping,
    /// Wait until the guest agent answers; exit 1 if it does not in time
    Wait {
        /// Seconds to wait
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Run a command in the guest; relays its output and exits with its status
    Exec {
        /// Seconds the command may run (1 to 3600) [default: 30]
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_EXEC_TIMEOUT_S)))]
        timeout: Option<u32>,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        argv: Vec<String>,
    },
}

/// Why a ctl command failed.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the guest agent did not answer within {secs} s (last: {last})")]
    WaitTimeout { secs: u64, last: String },
    #[error("cannot resolve checkpoint location {path}")]
    Location {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve export folder {path}")]
    Destination {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("export folder {} is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("cannot write the changed blocks to {path}: {reason}")]
    ChangesExport { path: PathBuf, reason: String },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// Runs `strata ctl` and returns the exit status, printing to stdout and stderr; delete and
/// export show a progress bar on stderr when it is a terminal.
pub fn run(args: CtlArgs) -> i32 {
    let progress = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    // stderr is not locked for the whole run: the progress bar writes to it from another
    // thread.
    run_with_progress(
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
        progress,
    )
}

/// [`run`] with the output going to `out` and errors and guest stderr to `err`; no progress
/// bar.
pub fn run_with(args: CtlArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    run_with_progress(args, out, err, ProgressDrawTarget::hidden())
}

/// [`run_with`] with the progress bar of delete and export drawn to `progress`; a hidden target
/// means no bar, and no polling for one.
pub fn run_with_progress(
    args: CtlArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    progress: ProgressDrawTarget,
) -> i32 {
    let Some(socket) = args.api_socket.clone() else {
        let _ = writeln!(
            err,
            "strata: error: --api-socket PATH is required (see 'strata ctl --help')"
        );
        return 2;
    };
    let mut output = Output {
        json: args.json,
        out,
        err,
        progress: Some(progress),
    };
    let result = Client::new(socket)
        .map_err(CtlError::from)
        .and_then(|mut client| dispatch(&mut client, &args.command, &mut output));
    match result {
        Ok(status) => status,
        Err(e) => {
            let _ = writeln!(output.err, "strata: error: {}", chain(&e));
            1
        }
    }
}

fn dispatch(client: &mut Client, command: &CtlCommand, out: &mut Output) -> Result<i32, CtlError> {
    match command {
        CtlCommand::Vm(cmd) => vm(client, *cmd, out).map(|()| 0),
        CtlCommand::Checkpoint(cmd) => checkpoint(client, cmd, out).map(|()| 0),
        CtlCommand::Config(ConfigCommand::Checkpoints { kind, location }) => {
            checkpoints(client, *kind, location.as_deref(), out).map(|()| 0)
        }
        CtlCommand::Guest(GuestCommand::Ping) => {
            let info = client.guest()?;
            out.guest(&info)?;
            Ok(0)
        }
        CtlCommand::Guest(GuestCommand::Wait { timeout }) => {
            let info = wait(client, Duration::from_secs(*timeout))?;
            out.guest(&info)?;
            Ok(0)
        }
        CtlCommand::Guest(GuestCommand::Exec { timeout, argv }) => {
            let request = ExecRequest {
                argv: argv.clone(),
                timeout_s: *timeout,
            };
            let response = client.exec(&request)?;
            out.exec(&response)?;
            Ok(exit_status(response.exit_code))
        }
    }
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    line
}

/// The process exit status for a guest command's exit code: 0 to 255 as they are, a negative
/// code (killed by signal N, reported as -N) as 128+N like a shell, anything else 255.
pub fn exit_status(code: i32) -> i32 {
    match code {
        0..=255 => code,
        -127..=-1 => 128 - code,
        _ => 255,
    }
}

fn vm(client: &Client, cmd: VmCommand, out: &mut Output) -> Result<(), CtlError> {
    let info = match cmd {
        VmCommand::Status => {
            let info = client.vm()?;
            return out.vm_status(&info);
        }
        VmCommand::Pause => client.lifecycle(LifecycleAction::Pause)?,
        VmCommand::Resume => client.lifecycle(LifecycleAction::Resume)?,
        VmCommand::Start => client.lifecycle(LifecycleAction::Start)?,
        VmCommand::Stop => client.lifecycle(LifecycleAction::Stop)?,
        VmCommand::Shutdown => client.lifecycle(LifecycleAction::Shutdown)?,
    };
    if out.json {
        out.print_json(&info)
    } else {
        out.line(&format!("state: {}", info.state))
    }
}

fn checkpoint(client: &Client, cmd: &CheckpointCommand, out: &mut Output) -> Result<(), CtlError> {
    match cmd {
        CheckpointCommand::Create { name, kind } => {
            let request = CreateCheckpoint {
                name: name.clone(),
                kind: kind.map(CheckpointType::from),
            };
            let info = client.create_checkpoint(&request)?;
            out.checkpoint(&info)
        }
        CheckpointCommand::List => {
            let list = client.checkpoints()?;
            out.checkpoint_list(&list)
        }
        CheckpointCommand::Show { id } => {
            let info = client.checkpoint(id)?;
            out.checkpoint(&info)
        }
        CheckpointCommand::Apply { id, save_current } => {
            let request = ApplyCheckpoint {
                save_current: *save_current,
            };
            let info = client.apply_checkpoint(id, &request)?;
            out.vm_after_checkpoint(&info)
        }
        CheckpointCommand::Revert => {
            let info = client.revert()?;
            out.vm_after_checkpoint(&info)
        }
        CheckpointCommand::Delete { id, no_wait } => {
            let target = out.progress.take();
            let list = client.delete_checkpoint(id)?;
            let list = if *no_wait {
                list
            } else {
                with_progress(client, target, PROGRESS_MERGE, id, || {
                    client.wait_for_merge(id, PROGRESS_POLL)
                })?
            };
            if out.json {
                return out.print_json(&list);
            }
            out.line(&format!("deleted {id}"))?;
            out.line(&format_checkpoint_list(&list))
        }
        CheckpointCommand::Export { id, dir, format } => {
            let absolute = std::path::absolute(dir).map_err(|source| CtlError::Destination {
                path: dir.clone(),
                source,
            })?;
            let destination = absolute
                .into_os_string()
                .into_string()
                .map_err(|raw| CtlError::NotUtf8(raw.into()))?;
            let request = ExportCheckpoint {
                destination,
                disk_format: *format,
            };
            let target = out.progress.take();
            let info = with_progress(client, target, PROGRESS_EXPORT, id, || {
                client.export_checkpoint(id, &request)
            })?;
            out.export(&info)
        }
        CheckpointCommand::Changes { id, since, export } => {
            let changes = client.checkpoint_changes(id, since.as_deref())?;
            let Some(dir) = export else {
                return out.changes(&changes);
            };
            let target = out.progress.take();
            let written = export_changes(client, target, id, &changes, dir)?;
            if out.json {
                return out.print_json(&changes);
            }
            out.line(&format_changes(&changes))?;
            out.line(&format_changes_export(&written))
        }
    }
}

/// The hidden folder inside a `checkpoint changes --export` folder that the VMM exports the
/// checkpoint into; removed once the changed blocks are copied out of it.
const CHANGES_FULL_EXPORT: &str = ".checkpoint";
/// The map file of a `checkpoint changes --export` folder.
const CHANGES_MAP_FILE: &str = "changes.json";

/// What `checkpoint changes --export` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChangesExport {
    /// The folder.
    dir: PathBuf,
    /// The map, `changes.json`.
    map: PathBuf,
    /// The disk files, in `--disk` order.
    disks: Vec<PathBuf>,
    /// Bytes of changed data copied.
    bytes: u64,
}

/// `checkpoint changes --export DIR`: the VMM exports checkpoint `id` (raw) into a hidden
/// folder inside `dir`; the changed extents of `changes` are copied out of it into sparse
/// `diskN.raw` files; the map is written as `changes.json`; the hidden folder is removed
/// whatever happened.
fn export_changes(
    client: &Client,
    target: Option<ProgressDrawTarget>,
    id: &str,
    changes: &ChangesInfo,
    dir: &std::path::Path,
) -> Result<ChangesExport, CtlError> {
    let dir = std::path::absolute(dir).map_err(|source| CtlError::Destination {
        path: dir.to_path_buf(),
        source,
    })?;
    let fail = |reason: String| CtlError::ChangesExport {
        path: dir.clone(),
        reason,
    };
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(fail("it exists and is not an empty folder".into()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir).map_err(|e| fail(format!("create it: {e}")))?;
        }
        Err(e) => return Err(fail(format!("read it: {e}"))),
    }
    let full = dir.join(CHANGES_FULL_EXPORT);
    let destination = full
        .clone()
        .into_os_string()
        .into_string()
        .map_err(|raw| CtlError::NotUtf8(raw.into()))?;
    let request = ExportCheckpoint {
        destination,
        disk_format: DiskFormat::Raw,
    };
    let result = with_progress(client, target, PROGRESS_EXPORT, id, || {
        client.export_checkpoint(id, &request)
    })
    .map_err(CtlError::from)
    .and_then(|info| copy_changed_extents(changes, &info, &dir).map_err(fail));
    // Best effort: the copy is in the disk files by now, or it failed and says why.
    let _ = std::fs::remove_dir_all(&full);
    result
}

/// Copies the extents of `changes` out of the raw disks of `export` into new sparse files in
/// `dir`, then writes the map; everything fsynced.
fn copy_changed_extents(
    changes: &ChangesInfo,
    export: &ExportInfo,
    dir: &std::path::Path,
) -> Result<ChangesExport, String> {
    use std::os::unix::fs::FileExt;
    if export.disks.len() != changes.disks.len() {
        return Err(format!(
            "the export of {} has {} disks, the changes {}",
            export.id,
            export.disks.len(),
            changes.disks.len()
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut disks = Vec::new();
    let mut bytes = 0u64;
    for (d, src) in changes.disks.iter().zip(&export.disks) {
        let out = dir.join(format!("disk{}.raw", d.index));
        let from = std::fs::File::open(src).map_err(|e| format!("open {src}: {e}"))?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(|e| format!("create {}: {e}", out.display()))?;
        let write_err = |e: std::io::Error| format!("write {}: {e}", out.display());
        to.set_len(d.virtual_size).map_err(write_err)?;
        for e in &d.extents {
            let end = e.offset.saturating_add(e.length).min(d.virtual_size);
            let mut off = e.offset;
            while off < end {
                let n = usize::try_from(end - off).map_or(buf.len(), |n| n.min(buf.len()));
                let chunk = &mut buf[..n];
                from.read_exact_at(chunk, off)
                    .map_err(|e| format!("read {src} at {off}: {e}"))?;
                to.write_all_at(chunk, off).map_err(write_err)?;
                off += n as u64;
                bytes += n as u64;
            }
        }
        to.sync_all().map_err(write_err)?;
        disks.push(out);
    }
    let map = dir.join(CHANGES_MAP_FILE);
    let text = serde_json::to_vec_pretty(changes).map_err(|e| format!("encode the map: {e}"))?;
    let file = std::fs::File::create(&map).map_err(|e| format!("create {}: {e}", map.display()))?;
    (&file)
        .write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("write {}: {e}", map.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync the folder: {e}"))?;
    Ok(ChangesExport {
        dir: dir.to_path_buf(),
        map,
        disks,
        bytes,
    })
}

/// How often a long call's progress is asked for.
const PROGRESS_POLL: Duration = Duration::from_millis(200);
/// How long one progress poll may take: the call's end waits for the poll under way.
const PROGRESS_POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs `call` (a long checkpoint call: `operation` on checkpoint `id`) while a progress bar
/// drawn to `target` shows the `progress` that `GET /v1/checkpoints` reports for it, asked on a
/// second connection every [`PROGRESS_POLL`]. No target, or a hidden one, just runs `call`.
fn with_progress<T>(
    client: &Client,
    target: Option<ProgressDrawTarget>,
    operation: &str,
    id: &str,
    call: impl FnOnce() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let Some(target) = target.filter(|t| !t.is_hidden()) else {
        return call();
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(style(SPINNER_TEMPLATE));
    bar.set_message(format!("{} {id}", progress_verb(operation)));
    bar.enable_steady_tick(Duration::from_millis(120));
    let (stop, stopped) = mpsc::channel::<()>();
    let socket = client.path().to_path_buf();
    let (bar_ref, socket) = (&bar, &socket);
    let result = std::thread::scope(|scope| {
        let poller = scope.spawn(move || {
            let Ok(poll) = Client::new(socket) else {
                return;
            };
            let poll = poll.with_timeout(PROGRESS_POLL_TIMEOUT);
            // Ends when `stop` is dropped.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(PROGRESS_POLL) {
                if let Ok(list) = poll.checkpoints() {
                    let ours = list
                        .progress
                        .as_ref()
                        .filter(|p| p.operation == operation && p.checkpoint == id);
                    show_progress(bar_ref, ours);
                }
            }
        });
        let result = call();
        drop(stop);
        let _ = poller.join();
        result
    });
    bar.finish_and_clear();
    result
}

/// The progress bar before the VMM reports progress.
const SPINNER_TEMPLATE: &str = "{spinner} {msg} {elapsed}";
/// The progress bar once it does.
const BAR_TEMPLATE: &str =
    "{spinner} {msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} ({percent}%, {eta} left)";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `merging` for [`PROGRESS_MERGE`], `exporting` for [`PROGRESS_EXPORT`].
fn progress_verb(operation: &str) -> String {
    match operation {
        PROGRESS_MERGE => "merging".to_owned(),
        PROGRESS_EXPORT => "exporting".to_owned(),
        other => other.to_owned(),
    }
}

/// Shows `progress` on `bar`: a bar of `done` of `total` bytes once it is known; a spinner
/// until then.
fn show_progress(bar: &ProgressBar, progress: Option<&Progress>) {
    let Some(p) = progress else {
        return;
    };
    if bar.length().is_none() {
        bar.set_style(style(BAR_TEMPLATE));
    }
    bar.set_length(p.total);
    bar.set_position(p.done.min(p.total));
}

fn checkpoints(
    client: &Client,
    kind: Option<CheckpointType>,
    location: Option<&std::path::Path>,
    out: &mut Output,
) -> Result<(), CtlError> {
    let config = if kind.is_none() && location.is_none() {
        client.checkpoint_config()?
    } else {
        // The PUT replaces both fields: keep what is not given.
        let mut config = client.checkpoint_config()?;
        if let Some(kind) = kind {
            config.kind = kind;
        }
        if let Some(location) = location {
            let absolute = std::path::absolute(location).map_err(|source| CtlError::Location {
                path: location.to_path_buf(),
                source,
            })?;
            config.location = Some(absolute.to_string_lossy().into_owned());
        }
        client.set_checkpoint_config(&config)?
    };
    out.checkpoint_config(&config)
}

/// Polls `GET /v1/guest` until it answers, the socket missing and 503 counting as "not yet".
fn wait(client: &mut Client, timeout: Duration) -> Result<GuestInfo, CtlError> {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let per_try = remaining.max(Duration::from_secs(1));
        client.set_timeout(per_try);
        let err = match client.guest() {
            Ok(info) => return Ok(info),
            Err(e @ ClientError::Connect { .. }) => e,
            Err(e) if e.api_code() == Some("agent_unreachable") => e,
            Err(e) => return Err(e.into()),
        };
        if Instant::now() >= deadline {
            return Err(CtlError::WaitTimeout {
                secs: timeout.as_secs(),
                last: chain(&err),
            });
        }
        std::thread::sleep(Duration::from_millis(250).min(remaining));
    }
}

/// Where and how results are printed.
struct Output<'a> {
    json: bool,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    /// Where the progress bar of the one long call goes, until that call takes it.
    progress: Option<ProgressDrawTarget>,
}

impl Output<'_> {
    fn line(&mut self, text: &str) -> Result<(), CtlError> {
        writeln!(self.out, "{text}").map_err(CtlError::Output)
    }

    fn print_json<T: serde::Serialize>(&mut self, value: &T) -> Result<(), CtlError> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CtlError::Output(std::io::Error::other(e)))?;
        self.line(&text)
    }

    fn vm_status(&mut self, info: &VmInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(info);
        }
        self.line(&format_vm(info))
    }

    fn checkpoint_config(&mut self, config: &CheckpointConfig) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(config);
        }
        self.line(&format!(
            "type:     {}\nlocation: {}",
            config.kind,
            config.location.as_deref().unwrap_or("-")
        ))
    }

    fn checkpoint(&mut self, info: &CheckpointInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(info);
        }
        self.line(&format_checkpoint(info))
    }

    fn checkpoint_list(&mut self, list: &CheckpointList) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(list);
        }
        self.line(&format_checkpoint_list(list))
    }

    /// The answer of apply and revert.
    fn vm_after_checkpoint(&mut self, info: &VmInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(info);
        }
        self.line(&key_values(&[
            ("state".to_owned(), info.state.to_string()),
            (
                "current checkpoint".to_owned(),
                info.current_checkpoint.as_deref().unwrap_or("-").to_owned(),
            ),
        ]))
    }

    fn export(&mut self, info: &ExportInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(info);
        }
        self.line(&format_export(info))
    }

    fn changes(&mut self, changes: &ChangesInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(changes);
        }
        self.line(&format_changes(changes))
    }

    fn guest(&mut self, info: &GuestInfo) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(info);
        }
        let mut text = String::from("agent: connected");
        for (key, value) in &info.info {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.push_str(&format!("\n{key}: {value}"));
        }
        self.line(&text)
    }

    /// The guest command's stdout and stderr, byte for byte, to ours.
    fn exec(&mut self, response: &ExecResponse) -> Result<(), CtlError> {
        if self.json {
            return self.print_json(response);
        }
        self.out
            .write_all(response.stdout.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(CtlError::Output)?;
        self.err
            .write_all(response.stderr.as_bytes())
            .and_then(|()| self.err.flush())
            .map_err(CtlError::Output)
    }
}

/// `vm status` for people: aligned `key: value` rows.
fn format_vm(info: &VmInfo) -> String {
    let c = &info.config;
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let mut rows = vec![
        ("state".to_owned(), info.state.to_string()),
        ("vcpus".to_owned(), c.vcpus.to_string()),
        ("memory".to_owned(), format!("{} MiB", c.memory_mib)),
        ("kernel".to_owned(), c.kernel.clone()),
        ("cmdline".to_owned(), c.cmdline.clone()),
    ];
    for (i, d) in c.disks.iter().enumerate() {
        let mode = if d.readonly { "ro" } else { "rw" };
        rows.push((format!("disk {i}"), format!("{} ({mode})", d.path)));
    }
    let vsock = c
        .vsock
        .as_ref()
        .map(|v| format!("cid {}, socket {}", v.cid, v.socket));
    rows.extend([
        ("vsock".to_owned(), or_dash(vsock.as_deref())),
        (
            "checkpoint type".to_owned(),
            info.checkpoint_config.kind.to_string(),
        ),
        (
            "checkpoint folder".to_owned(),
            or_dash(info.checkpoint_config.location.as_deref()),
        ),
        (
            "current checkpoint".to_owned(),
            or_dash(info.current_checkpoint.as_deref()),
        ),
        ("last exit".to_owned(), or_dash(info.last_exit.as_deref())),
        (
            "console dropped".to_owned(),
            format!("{} bytes", info.console.dropped_bytes),
        ),
    ]);
    key_values(&rows)
}

/// Aligned `key: value` rows.
fn key_values(rows: &[(String, String)]) -> String {
    rows.iter()
        .map(|(k, v)| format!("{:<20}{v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A size for people: bytes below 1 KiB, else one decimal in the largest binary unit below it.
fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A size for people with the exact count when it is rounded.
fn format_size_exact(bytes: u64) -> String {
    if bytes < 1024 {
        format_size(bytes)
    } else {
        format!("{} ({bytes} bytes)", format_size(bytes))
    }
}

/// `checkpoint show` and `create` for people: aligned `key: value` rows.
fn format_checkpoint(info: &CheckpointInfo) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let mut rows = vec![
        ("id".to_owned(), info.id.clone()),
        ("name".to_owned(), info.name.clone()),
        ("type".to_owned(), info.kind.to_string()),
        ("consistency".to_owned(), info.consistency.to_string()),
        (
            "parent".to_owned(),
            info.parent.as_deref().unwrap_or("-").to_owned(),
        ),
        ("created".to_owned(), info.created.clone()),
        ("current".to_owned(), yes_no(info.current)),
        ("path".to_owned(), info.path.clone()),
        ("state size".to_owned(), format_size_exact(info.sizes.state)),
        (
            "memory size".to_owned(),
            format_size_exact(info.sizes.memory),
        ),
        (
            "disk layers size".to_owned(),
            format_size_exact(info.sizes.disk_layers),
        ),
    ];
    if let Some(reason) = &info.fallback_reason {
        rows.push(("fallback reason".to_owned(), reason.clone()));
    }
    if let Some(us) = info.frozen_us {
        rows.push((
            "guest frozen".to_owned(),
            format!("{:.1} ms", us as f64 / 1000.0),
        ));
    }
    if let Some(reply) = &info.agent_freeze {
        rows.push((
            "agent froze".to_owned(),
            serde_json::Value::Object(reply.clone()).to_string(),
        ));
    }
    if let Some(us) = info.paused_us {
        rows.push((
            "guest paused".to_owned(),
            format!("{:.1} ms", us as f64 / 1000.0),
        ));
    }
    for (i, disk) in info.disks.iter().enumerate() {
        rows.push((format!("disk {i}"), disk.clone()));
    }
    key_values(&rows)
}

/// `checkpoint list` for people: a table whose ID column is the checkpoint tree. Roots are at
/// the left and every checkpoint's children are indented under it, each level in the order
/// they were taken; `*` marks the current checkpoint, and a `Now` row under it (after its
/// children) is where the VM runs, as in Hyper-V. A running merge or export is a line below.
fn format_checkpoint_list(list: &CheckpointList) -> String {
    let mut text = if list.checkpoints.is_empty() {
        "no checkpoints".to_owned()
    } else {
        format_checkpoint_tree(list)
    };
    if let Some(p) = &list.progress {
        text.push('\n');
        text.push_str(&format_progress(p));
    }
    text
}

/// `merge of ck-1 running: 1.0 GiB of 2.0 GiB (50%)`.
fn format_progress(p: &Progress) -> String {
    let percent = if p.total == 0 {
        0
    } else {
        u128::from(p.done.min(p.total)) * 100 / u128::from(p.total)
    };
    format!(
        "{} of {} running: {} of {} ({percent}%)",
        p.operation,
        p.checkpoint,
        format_size(p.done),
        format_size(p.total)
    )
}

/// A row of the checkpoint tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeNode {
    /// The checkpoint at this index of the list.
    Checkpoint(usize),
    /// Where the VM runs.
    Now,
}

/// The rows of the checkpoint tree in print order, each with the text that goes before its
/// id: the guides of its ancestors and its own branch.
fn tree_rows(list: &CheckpointList) -> Vec<(String, TreeNode)> {
    let checkpoints = &list.checkpoints;
    let index: std::collections::HashMap<&str, usize> = checkpoints
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let current = list
        .current
        .as_deref()
        .or_else(|| {
            checkpoints
                .iter()
                .find(|c| c.current)
                .map(|c| c.id.as_str())
        })
        .and_then(|id| index.get(id).copied());
    // A parent that is not in the list (or the checkpoint itself) makes a root.
    let mut roots = Vec::new();
    let mut children = vec![Vec::new(); checkpoints.len()];
    for (i, c) in checkpoints.iter().enumerate() {
        match c.parent.as_deref().and_then(|p| index.get(p).copied()) {
            Some(p) if p != i => children[p].push(TreeNode::Checkpoint(i)),
            _ => roots.push(TreeNode::Checkpoint(i)),
        }
    }
    match current {
        Some(c) => children[c].push(TreeNode::Now),
        None => roots.push(TreeNode::Now),
    }
    let mut rows = Vec::new();
    let mut seen = vec![false; checkpoints.len()];
    // (node, guides of its ancestors, its branch): depth first, with an explicit stack.
    let mut stack: Vec<(TreeNode, String, &str)> = Vec::new();
    let push_level = |stack: &mut Vec<_>, nodes: &[TreeNode], guides: &str, root: bool| {
        for (k, node) in nodes.iter().enumerate().rev() {
            let last = k + 1 == nodes.len();
            let branch = match (root, last) {
                (true, _) => "",
                (false, true) => "└─ ",
                (false, false) => "├─ ",
            };
            stack.push((*node, guides.to_owned(), branch));
        }
    };
    // Checkpoints whose parent links form a loop are reached from no root: they start trees
    // of their own, after the others.
    let mut starts = vec![roots];
    starts.extend((0..checkpoints.len()).map(|i| vec![TreeNode::Checkpoint(i)]));
    for start in starts {
        let start: Vec<TreeNode> = start
            .into_iter()
            .filter(|n| !matches!(n, TreeNode::Checkpoint(i) if seen[*i]))
            .collect();
        push_level(&mut stack, &start, "", true);
        while let Some((node, guides, branch)) = stack.pop() {
            if let TreeNode::Checkpoint(i) = node {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
            }
            rows.push((format!("{guides}{branch}"), node));
            let TreeNode::Checkpoint(i) = node else {
                continue;
            };
            let below = match branch {
                "" => guides.clone(),
                "└─ " => format!("{guides}   "),
                _ => format!("{guides}│  "),
            };
            push_level(&mut stack, &children[i], &below, false);
        }
    }
    rows
}

/// The checkpoints as a table with the tree in its ID column.
fn format_checkpoint_tree(list: &CheckpointList) -> String {
    let header = [
        "ID",
        "NAME",
        "TYPE",
        "CONSISTENCY",
        "CREATED",
        "STATE",
        "MEMORY",
        "DISKS",
    ]
    .map(str::to_owned);
    let current_id = list.current.as_deref();
    let mut table = vec![("  ", header.to_vec())];
    for (indent, node) in tree_rows(list) {
        let TreeNode::Checkpoint(i) = node else {
            table.push(("  ", vec![format!("{indent}Now")]));
            continue;
        };
        let c = &list.checkpoints[i];
        let current = c.current || current_id == Some(c.id.as_str());
        table.push((
            if current { "* " } else { "  " },
            vec![
                format!("{indent}{}", c.id),
                c.name.clone(),
                c.kind.to_string(),
                c.consistency.to_string(),
                c.created.clone(),
                format_size(c.sizes.state),
                format_size(c.sizes.memory),
                format_size(c.sizes.disk_layers),
            ],
        ));
    }
    let mut widths = vec![0; header.len()];
    for (_, cells) in &table {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    table
        .iter()
        .map(|(marker, cells)| {
            let mut line = (*marker).to_owned();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i + 1 == cells.len() {
                    line.push_str(cell);
                } else {
                    let pad = w - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            line.trim_end().to_owned()
        })
        .chain(list.shared_layers.iter().map(|l| {
            format!(
                "shared layer of disk {} ({} branches run through it; it folds into the last \
                 one left): {}",
                l.disk, l.branches, l.path
            )
        }))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `checkpoint export` for people: what was written, as aligned `key: value` rows.
fn format_export(info: &ExportInfo) -> String {
    let mut rows = vec![
        ("exported".to_owned(), info.id.clone()),
        ("destination".to_owned(), info.destination.clone()),
    ];
    for (i, disk) in info.disks.iter().enumerate() {
        rows.push((format!("disk {i}"), disk.clone()));
    }
    if let Some(state) = &info.state {
        rows.push(("state".to_owned(), state.clone()));
    }
    if let Some(memory) = &info.memory {
        rows.push(("memory".to_owned(), memory.clone()));
    }
    rows.push(("written".to_owned(), format_size_exact(info.bytes)));
    key_values(&rows)
}

/// `checkpoint changes --export` for people: what was written, after the changes.
fn format_changes_export(written: &ChangesExport) -> String {
    let mut rows = vec![
        ("exported to".to_owned(), written.dir.display().to_string()),
        ("map".to_owned(), written.map.display().to_string()),
    ];
    for (i, disk) in written.disks.iter().enumerate() {
        rows.push((format!("disk {i}"), disk.display().to_string()));
    }
    rows.push(("written".to_owned(), format_size_exact(written.bytes)));
    key_values(&rows)
}

/// `checkpoint changes` for people: per disk, a summary line and its extents as a table of
/// byte offsets and lengths; the total at the end.
fn format_changes(changes: &ChangesInfo) -> String {
    let mut lines = vec![key_values(&[
        ("checkpoint".to_owned(), changes.id.clone()),
        (
            "since".to_owned(),
            changes
                .since
                .clone()
                .unwrap_or_else(|| "the launch disks".to_owned()),
        ),
    ])];
    for d in &changes.disks {
        let extents = match d.extents.len() {
            1 => "1 extent".to_owned(),
            n => format!("{n} extents"),
        };
        lines.push(format!(
            "disk {}: {} changed in {extents} (size {}, granularity {})",
            d.index,
            format_size_exact(d.changed_bytes()),
            format_size(d.virtual_size),
            format_size(d.granularity),
        ));
        if d.extents.is_empty() {
            continue;
        }
        let width = d
            .extents
            .iter()
            .map(|e| e.offset.to_string().len())
            .max()
            .unwrap_or(0)
            .max("OFFSET".len());
        lines.push(format!("  {:<width$}  LENGTH", "OFFSET"));
        for e in &d.extents {
            lines.push(format!("  {:<width$}  {}", e.offset, e.length));
        }
    }
    lines.push(format!(
        "total: {} changed",
        format_size_exact(changes.changed_bytes())
    ));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{
        CheckpointSizes, Consistency, ConsoleInfo, DiskInfo, TakenType, VmConfigInfo, VmState,
    };
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        Ctl(CtlArgs),
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        let mut full = vec!["strata", "ctl"];
        full.extend_from_slice(args);
        TestCli::try_parse_from(full).map(|c| match c.command {
            Top::Ctl(a) => a,
        })
    }

    #[test]
    fn api_socket_may_come_after_the_subcommand() {
        let a = parse(&["vm", "status", "--api-socket", "/s", "--json"]).unwrap();
        assert_eq!(a.api_socket, Some(PathBuf::from("/s")));
        assert!(a.json);
        assert!(matches!(a.command, CtlCommand::Vm(VmCommand::Status)));
    }

    #[test]
    fn exec_takes_the_command_after_double_dash() {
        let a = parse(&[
            "--api-socket",
            "/s",
            "guest",
            "exec",
            "--timeout",
            "5",
            "--",
            "ls",
            "-l",
        ])
        .unwrap();
        match a.command {
            CtlCommand::Guest(GuestCommand::Exec { timeout, argv }) => {
                assert_eq!(timeout, Some(5));
                assert_eq!(argv, ["ls", "-l"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_without_a_command_is_a_usage_error() {
        assert!(parse(&["--api-socket", "/s", "guest", "exec"]).is_err());
    }

    #[test]
    fn checkpoint_type_parses_kebab_case() {
        let a = parse(&[
            "--api-socket",
            "/s",
            "config",
            "checkpoints",
            "--type",
            "production-only",
        ])
        .unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Config(ConfigCommand::Checkpoints {
                kind: Some(CheckpointType::ProductionOnly),
                location: None
            })
        ));
    }

    #[test]
    fn missing_api_socket_exits_2() {
        let a = parse(&["vm", "status"]).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run_with(a, &mut out, &mut err), 2);
        assert!(String::from_utf8(err)
            .unwrap()
            .contains("--api-socket PATH is required"));
    }

    #[test]
    fn guest_exit_codes_map_like_a_shell() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(3), 3);
        assert_eq!(exit_status(-9), 137);
        assert_eq!(exit_status(70000), 255);
    }

    #[test]
    fn status_text_shows_state_and_disks() {
        let info = VmInfo {
            state: VmState::Paused,
            config: VmConfigInfo {
                vcpus: 2,
                memory_mib: 64,
                kernel: "test-guest".into(),
                cmdline: "console=ttyS0".into(),
                disks: vec![DiskInfo {
                    path: "/d.img".into(),
                    readonly: true,
                }],
                vsock: None,
            },
            checkpoint_config: CheckpointConfig::default(),
            current_checkpoint: None,
            last_exit: None,
            console: ConsoleInfo { dropped_bytes: 7 },
        };
        let text = format_vm(&info);
        assert!(text.starts_with("state:              paused\n"));
        assert!(text.contains("disk 0:             /d.img (ro)"));
        assert!(text.contains("checkpoint type:    production"));
        assert!(text.ends_with("console dropped:    7 bytes"));
    }

    #[test]
    fn checkpoint_create_takes_name_and_type_but_not_disabled() {
        let a = parse(&[
            "--api-socket",
            "/s",
            "checkpoint",
            "create",
            "--name",
            "before",
            "--type",
            "production-only",
        ])
        .unwrap();
        match a.command {
            CtlCommand::Checkpoint(CheckpointCommand::Create { name, kind }) => {
                assert_eq!(name.as_deref(), Some("before"));
                assert_eq!(
                    kind.map(CheckpointType::from),
                    Some(CheckpointType::ProductionOnly)
                );
            }
            other => panic!("{other:?}"),
        }
        let a = parse(&["--api-socket", "/s", "checkpoint", "create"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Create {
                name: None,
                kind: None
            })
        ));
        assert!(parse(&["checkpoint", "create", "--type", "disabled"]).is_err());
    }

    #[test]
    fn checkpoint_show_and_apply_take_an_id() {
        let a = parse(&["checkpoint", "apply", "ck-1", "--save-current"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Apply { ref id, save_current: true }) if id == "ck-1"
        ));
        let a = parse(&["checkpoint", "apply", "ck-1"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Apply {
                save_current: false,
                ..
            })
        ));
        assert!(parse(&["checkpoint", "show"]).is_err());
        assert!(parse(&["checkpoint", "list"]).is_ok());
    }

    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(64 << 20), "64.0 MiB");
        assert_eq!(format_size(3 << 30), "3.0 GiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
        assert_eq!(format_size_exact(2048), "2.0 KiB (2048 bytes)");
        assert_eq!(format_size_exact(5), "5 B");
    }

    fn info(id: &str, current: bool) -> CheckpointInfo {
        CheckpointInfo {
            id: id.into(),
            name: format!("name of {id}"),
            kind: TakenType::Standard,
            parent: None,
            created: "2024-05-01T10:00:00Z".into(),
            consistency: Consistency::Standard,
            path: format!("/ck/{id}"),
            sizes: CheckpointSizes {
                state: 4096,
                memory: 64 << 20,
                disk_layers: 512,
            },
            current,
            fallback_reason: None,
            disks: vec![format!("/ck/{id}/disk0.strata")],
            paused_us: None,
            frozen_us: None,
            agent_freeze: None,
            children: Vec::new(),
        }
    }

    #[test]
    fn checkpoint_text_is_aligned_rows() {
        let mut c = info("ck-1", true);
        c.fallback_reason = Some("the agent did not answer".into());
        let text = format_checkpoint(&c);
        assert!(text.starts_with("id:                 ck-1\n"), "{text}");
        assert!(text.contains("\nparent:             -\n"), "{text}");
        assert!(text.contains("\ncurrent:            yes\n"), "{text}");
        assert!(text.contains("\nmemory size:        64.0 MiB (67108864 bytes)\n"));
        assert!(text.contains("\nfallback reason:    the agent did not answer\n"));
        assert!(
            text.ends_with("\ndisk 0:             /ck/ck-1/disk0.strata"),
            "{text}"
        );
    }

    #[test]
    fn checkpoint_list_is_a_table_marking_the_current_one() {
        let list = CheckpointList {
            checkpoints: vec![info("a", false), info("ck-22", true)],
            current: Some("ck-22".into()),
            progress: None,
            shared_layers: Vec::new(),
        };
        let text = format_checkpoint_list(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("  ID      NAME"), "{text}");
        assert!(lines[1].starts_with("  a       name of a "), "{text}");
        assert!(lines[2].starts_with("* ck-22   name of ck-22"), "{text}");
        assert!(lines[2].ends_with("4.0 KiB  64.0 MiB  512 B"), "{text}");
        assert_eq!(lines[3], "  └─ Now", "{text}");
        assert_eq!(
            format_checkpoint_list(&CheckpointList::default()),
            "no checkpoints"
        );
    }

    fn child(id: &str, parent: &str) -> CheckpointInfo {
        CheckpointInfo {
            parent: Some(parent.into()),
            ..info(id, false)
        }
    }

    /// The ID column of the table (the tree) and the marker before it.
    fn tree(list: &CheckpointList) -> Vec<String> {
        format_checkpoint_list(list)
            .lines()
            .skip(1)
            .map(|l| {
                let (marker, rest) = l.split_at(2);
                let id = rest.split(" name of ").next().unwrap_or_default();
                format!("{marker}{id}").trim_end().to_owned()
            })
            .collect()
    }

    #[test]
    fn checkpoint_list_is_a_tree_with_now_under_the_current_checkpoint() {
        // a ─ b ─ d
        //   │   └ e (current)
        //   └ c
        // f (another root: its parent is gone)
        let mut e = child("e", "b");
        e.current = true;
        let list = CheckpointList {
            checkpoints: vec![
                info("a", false),
                child("b", "a"),
                child("c", "a"),
                child("d", "b"),
                e,
                child("f", "gone"),
            ],
            current: Some("e".into()),
            progress: None,
            shared_layers: Vec::new(),
        };
        assert_eq!(
            tree(&list),
            [
                "  a",
                "  ├─ b",
                "  │  ├─ d",
                "* │  └─ e",
                "  │     └─ Now",
                "  └─ c",
                "  f",
            ],
            "{}",
            format_checkpoint_list(&list)
        );
        // Now comes after the current checkpoint's children.
        let list = CheckpointList {
            checkpoints: vec![info("a", true), child("b", "a")],
            current: Some("a".into()),
            progress: None,
            shared_layers: Vec::new(),
        };
        assert_eq!(tree(&list), ["* a", "  ├─ b", "  └─ Now"]);
        // Without a current checkpoint, Now is a root of its own, last.
        let list = CheckpointList {
            checkpoints: vec![info("a", false), child("b", "a")],
            current: None,
            progress: None,
            shared_layers: Vec::new(),
        };
        assert_eq!(tree(&list), ["  a", "  └─ b", "  Now"]);
    }

    #[test]
    fn checkpoint_tree_survives_parent_loops() {
        let list = CheckpointList {
            checkpoints: vec![child("a", "b"), child("b", "a"), child("s", "s")],
            current: Some("a".into()),
            progress: None,
            shared_layers: Vec::new(),
        };
        assert_eq!(tree(&list), ["  s", "* a", "  ├─ b", "  └─ Now"]);
    }

    #[test]
    fn checkpoint_list_shows_a_running_operation() {
        let list = CheckpointList {
            checkpoints: vec![info("a", true)],
            current: Some("a".into()),
            progress: Some(Progress {
                operation: "merge".into(),
                checkpoint: "a".into(),
                done: 1 << 30,
                total: 3 << 30,
            }),
            shared_layers: Vec::new(),
        };
        let text = format_checkpoint_list(&list);
        assert!(
            text.ends_with("\nmerge of a running: 1.0 GiB of 3.0 GiB (33%)"),
            "{text}"
        );
        let idle = Progress {
            total: 0,
            ..Progress::default()
        };
        assert!(format_progress(&idle).ends_with("(0%)"));
    }

    #[test]
    fn progress_turns_the_spinner_into_a_bar_of_bytes() {
        let bar = ProgressBar::hidden();
        show_progress(&bar, None);
        assert_eq!(bar.length(), None);
        let p = Progress {
            operation: PROGRESS_MERGE.into(),
            checkpoint: "a".into(),
            done: 50,
            total: 200,
        };
        show_progress(&bar, Some(&p));
        assert_eq!((bar.position(), bar.length()), (50, Some(200)));
        // A done past the total does not overflow the bar.
        show_progress(&bar, Some(&Progress { done: 300, ..p }));
        assert_eq!((bar.position(), bar.length()), (200, Some(200)));
        assert_eq!(progress_verb(PROGRESS_EXPORT), "exporting");
        assert_eq!(progress_verb(PROGRESS_MERGE), "merging");
        // The templates are valid.
        for t in [SPINNER_TEMPLATE, BAR_TEMPLATE] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn new_checkpoint_commands_parse() {
        let a = parse(&["checkpoint", "revert"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Revert)
        ));
        let a = parse(&["checkpoint", "delete", "ck-1"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Delete { ref id, .. }) if id == "ck-1"
        ));
        assert!(parse(&["checkpoint", "delete"]).is_err());
        let a = parse(&["checkpoint", "export", "ck-1", "out"]).unwrap();
        assert!(matches!(
            a.command,
            CtlCommand::Checkpoint(CheckpointCommand::Export {
                format: DiskFormat::Raw,
                ..
            })
        ));
        let a = parse(&["checkpoint", "export", "ck-1", "/o", "--format", "strata"]).unwrap();
        match a.command {
            CtlCommand::Checkpoint(CheckpointCommand::Export { id, dir, format }) => {
                assert_eq!(
                    (id.as_str(), dir, format),
                    ("ck-1", "/o".into(), DiskFormat::Strata)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["checkpoint", "export", "ck-1"]).is_err());
        assert!(parse(&["checkpoint", "export", "ck-1", "/o", "--format", "qcow2"]).is_err());
        let a = parse(&["checkpoint", "changes", "b", "--since", "a"]).unwrap();
        match a.command {
            CtlCommand::Checkpoint(CheckpointCommand::Changes { id, since, export }) => {
                assert_eq!(
                    (id.as_str(), since.as_deref(), export),
                    ("b", Some("a"), None)
                );
            }
            other => panic!("{other:?}"),
        }
        let a = parse(&["checkpoint", "changes", "b", "--export", "/inc"]).unwrap();
        match a.command {
            CtlCommand::Checkpoint(CheckpointCommand::Changes { id, since, export }) => {
                assert_eq!(
                    (id.as_str(), since.as_deref(), export),
                    ("b", None, Some("/inc".into()))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_text_lists_extents_per_disk_and_the_total() {
        use crate::types::{DiskChanges, Extent};
        let changes = ChangesInfo {
            id: "b".into(),
            since: None,
            disks: vec![
                DiskChanges {
                    index: 0,
                    virtual_size: 64 << 20,
                    granularity: 65536,
                    extents: vec![
                        Extent {
                            offset: 0,
                            length: 65536,
                        },
                        Extent {
                            offset: 10 << 20,
                            length: 131072,
                        },
                    ],
                },
                DiskChanges {
                    index: 1,
                    virtual_size: 1 << 30,
                    granularity: 4096,
                    extents: vec![],
                },
            ],
        };
        assert_eq!(
            format_changes(&changes),
            "checkpoint:         b\n\
             since:              the launch disks\n\
             disk 0: 192.0 KiB (196608 bytes) changed in 2 extents (size 64.0 MiB, granularity 64.0 KiB)\n\
             \x20 OFFSET    LENGTH\n\
             \x20 0         65536\n\
             \x20 10485760  131072\n\
             disk 1: 0 B changed in 0 extents (size 1.0 GiB, granularity 4.0 KiB)\n\
             total: 192.0 KiB (196608 bytes) changed"
        );
    }

    #[test]
    fn changes_export_copies_just_the_changed_extents_sparse_and_writes_the_map() {
        use crate::types::{DiskChanges, Extent};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // A "full export" of two disks: every byte non-zero and position-dependent.
        let size: u64 = 4 << 20;
        let full: Vec<Vec<u8>> = (0..2u8)
            .map(|d| {
                (0..size)
                    .map(|i| (i % 251) as u8 ^ d.wrapping_mul(77) | 1)
                    .collect()
            })
            .collect();
        let src: Vec<String> = full
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let p = dir.path().join(format!("full{i}.raw"));
                std::fs::write(&p, bytes).unwrap();
                p.display().to_string()
            })
            .collect();
        let extent = |offset, length| Extent { offset, length };
        let changes = ChangesInfo {
            id: "b".into(),
            since: Some("a".into()),
            disks: vec![
                DiskChanges {
                    index: 0,
                    virtual_size: size,
                    granularity: 4096,
                    // One over a 1 MiB copy boundary, one at the very end.
                    extents: vec![
                        extent(4096, 8192),
                        extent(1040384, 2 << 20),
                        extent(size - 4096, 4096),
                    ],
                },
                DiskChanges {
                    index: 1,
                    virtual_size: size,
                    granularity: 4096,
                    extents: vec![],
                },
            ],
        };
        let export = ExportInfo {
            id: "b".into(),
            destination: dir.path().display().to_string(),
            disks: src,
            state: None,
            memory: None,
            bytes: 0,
        };
        let out = dir.path().join("inc");
        std::fs::create_dir(&out).unwrap();
        let written = copy_changed_extents(&changes, &export, &out).unwrap();
        assert_eq!(written.bytes, changes.changed_bytes());
        assert_eq!(
            written.disks,
            [out.join("disk0.raw"), out.join("disk1.raw")]
        );
        let map: ChangesInfo =
            serde_json::from_slice(&std::fs::read(out.join(CHANGES_MAP_FILE)).unwrap()).unwrap();
        assert_eq!(map, changes);
        for (d, full) in changes.disks.iter().zip(&full) {
            let path = out.join(format!("disk{}.raw", d.index));
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len() as u64, size);
            let mut want = vec![0u8; size as usize];
            for e in &d.extents {
                let r = e.offset as usize..(e.offset + e.length) as usize;
                want[r.clone()].copy_from_slice(&full[r]);
            }
            assert!(got == want, "disk {}", d.index);
            // Sparse: only the extents take space (give or take a block per extent).
            let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(
                allocated <= d.changed_bytes() + 4096 * d.extents.len() as u64,
                "disk {}: {allocated} bytes allocated for {} changed",
                d.index,
                d.changed_bytes()
            );
        }
        // A disk count that does not match is refused.
        let one = ExportInfo {
            disks: export.disks[..1].to_vec(),
            ..export
        };
        let again = dir.path().join("again");
        std::fs::create_dir(&again).unwrap();
        assert!(copy_changed_extents(&changes, &one, &again).is_err());
    }

    #[test]
    fn export_text_names_every_file_written() {
        let info = ExportInfo {
            id: "a".into(),
            destination: "/x".into(),
            disks: vec!["/x/disk0.raw".into(), "/x/disk1.raw".into()],
            state: None,
            memory: Some("/x/memory".into()),
            bytes: 3 << 20,
        };
        assert_eq!(
            format_export(&info),
            "exported:           a\n\
             destination:        /x\n\
             disk 0:             /x/disk0.raw\n\
             disk 1:             /x/disk1.raw\n\
             memory:             /x/memory\n\
             written:            3.0 MiB (3145728 bytes)"
        );
    }
}
