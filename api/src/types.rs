//! The JSON bodies of the API, shared by the server, the client and the VMM.
//!
//! Request bodies (`CheckpointConfig` as sent by `PUT`, `CreateCheckpoint`, `ApplyCheckpoint`,
//! `ExportCheckpoint`, `ExecRequest`) reject unknown fields and those with limits are checked with `validate` after
//! parsing, so a request that the server accepts is one the VMM can act on. `openapi.yaml` describes the same shapes and limits.

use serde::{Deserialize, Serialize};

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs are running guest code.
    Running,
    /// vCPUs are parked; devices are quiet; memory and state are kept.
    Paused,
    /// No guest is running: never started, powered off, stopped, or left off by applying a
    /// production checkpoint. `start` cold-boots it.
    Off,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Off => "off",
        })
    }
}

/// `GET /v1/vm`, and the answer of every lifecycle `POST`: the VM as it is after the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The lifecycle state.
    pub state: VmState,
    /// What the VM was started with.
    pub config: VmConfigInfo,
    /// The checkpoint settings.
    pub checkpoint_config: CheckpointConfig,
    /// The id of the checkpoint the VM runs on, if any.
    pub current_checkpoint: Option<String>,
    /// Why the guest last stopped running (`poweroff`, `reset`, `stop`, an error), if it did.
    pub last_exit: Option<String>,
    /// The serial console's output.
    #[serde(default)]
    pub console: ConsoleInfo,
}

/// The serial console of `VmInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    /// Bytes of guest console output that never reached the console since the VMM started:
    /// dropped because its reader did not keep up (guest output never waits for it), or
    /// because writing failed.
    pub dropped_bytes: u64,
}

/// The VM's configuration as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigInfo {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel: a path, or a name such as `test-guest` for the embedded one.
    pub kernel: String,
    /// The kernel command line.
    pub cmdline: String,
    /// The virtio-blk disks in the order the guest sees them.
    pub disks: Vec<DiskInfo>,
    /// The virtio-vsock device, if there is one.
    pub vsock: Option<VsockInfo>,
}

/// One disk of `VmConfigInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The image (a raw file or the top layer of a Strata chain).
    pub path: String,
    /// Whether the guest sees it read-only.
    pub readonly: bool,
}

/// The virtio-vsock device of `VmConfigInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockInfo {
    /// The guest's context id.
    pub cid: u32,
    /// The host-side Unix socket of the device.
    pub socket: String,
}

/// Which checkpoint `POST /v1/checkpoints` takes (Hyper-V's checkpoint types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointType {
    /// No checkpoints can be taken.
    Disabled,
    /// Memory, device and disk state: applying it resumes the VM exactly.
    Standard,
    /// Application-consistent disks through the guest agent; standard when the agent cannot
    /// quiesce.
    #[default]
    Production,
    /// Like `production`, but fails instead of falling back to standard.
    ProductionOnly,
}

impl CheckpointType {
    /// The name used on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointType::Disabled => "disabled",
            CheckpointType::Standard => "standard",
            CheckpointType::Production => "production",
            CheckpointType::ProductionOnly => "production-only",
        }
    }
}

impl std::fmt::Display for CheckpointType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET` and `PUT /v1/vm/checkpoint-config`.
///
/// As a `PUT` body `type` is required and `location` optional; an absent or null location means
/// "no location set" (the VMM then uses its state directory).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The checkpoint type.
    #[serde(rename = "type")]
    pub kind: CheckpointType,
    /// The folder checkpoints are stored in: an absolute path.
    #[serde(default)]
    pub location: Option<String>,
}

impl CheckpointConfig {
    /// Checks what serde cannot: the location is an absolute path without NUL bytes.
    pub fn validate(&self) -> Result<(), String> {
        match &self.location {
            Some(l) if !l.starts_with('/') => {
                Err(format!("location must be an absolute path, not {l:?}"))
            }
            Some(l) if l.contains('\0') => Err("location must not contain NUL bytes".into()),
            _ => Ok(()),
        }
    }
}

/// The longest checkpoint id, in bytes.
pub const MAX_CHECKPOINT_ID_LEN: usize = 64;
/// The longest checkpoint name, in characters.
pub const MAX_CHECKPOINT_NAME_CHARS: usize = 128;

/// The one word that fits the id grammar but is not a checkpoint id: `/v1/checkpoints/revert`
/// is the revert call, so a checkpoint of that id could never be shown or deleted.
pub const RESERVED_CHECKPOINT_ID: &str = "revert";

/// Whether `id` can be a checkpoint id: 1 to 64 characters of `A-Z`, `a-z`, `0-9`, `_` and
/// `-`, not starting with `-`, and not [`RESERVED_CHECKPOINT_ID`]. The server answers 404 for
/// any other id in a path (400 in a query) without asking the VMM, so the ids the VMM makes
/// must pass this.
pub fn valid_checkpoint_id(id: &str) -> bool {
    (1..=MAX_CHECKPOINT_ID_LEN).contains(&id.len())
        && !id.starts_with('-')
        && id != RESERVED_CHECKPOINT_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `POST /v1/checkpoints`: take a checkpoint. `{}` takes one of the configured type with a name
/// the VMM picks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpoint {
    /// The checkpoint's name: 1 to 128 characters, no control characters [default: the VMM
    /// picks one].
    #[serde(default)]
    pub name: Option<String>,
    /// The type to take instead of the configured one; not `disabled` [default: the
    /// configured type].
    #[serde(default, rename = "type")]
    pub kind: Option<CheckpointType>,
}

impl CreateCheckpoint {
    /// Checks what serde cannot: the name's length and characters, and that the type is one
    /// that takes a checkpoint.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.name {
            let chars = name.chars().count();
            if !(1..=MAX_CHECKPOINT_NAME_CHARS).contains(&chars) {
                return Err(format!(
                    "name must be 1 to {MAX_CHECKPOINT_NAME_CHARS} characters, not {chars}"
                ));
            }
            if let Some(c) = name.chars().find(|c| c.is_control()) {
                return Err(format!(
                    "name must not contain control characters, found {c:?}"
                ));
            }
        }
        if self.kind == Some(CheckpointType::Disabled) {
            return Err(
                "type must be standard, production or production-only: a request cannot take a \
                 disabled checkpoint"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `POST /v1/checkpoints/{id}/apply`; no body at all means the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyCheckpoint {
    /// Take a checkpoint of the current state before applying, so it is not lost
    /// [default: false, the current state is discarded].
    #[serde(default)]
    pub save_current: bool,
}

/// The format of the disk files of an export (`ExportCheckpoint::disk_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// Flat raw images (`disk0.raw`, ...) that any other tool reads.
    #[default]
    Raw,
    /// One self-contained Strata disk each (`disk0.strata`, ...): sparse, the chain flattened.
    Strata,
}

impl DiskFormat {
    /// The name used on the wire and on the command line, also the exported files' extension.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Strata => "strata",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/checkpoints/{id}/export`: write a self-contained copy of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCheckpoint {
    /// The folder to write: an absolute path. It gets `manifest.json`, `disk0.raw` (or
    /// `.strata`), `disk1.raw`, ... in `--disk` order, and a standard checkpoint's state and
    /// memory files.
    pub destination: String,
    /// The format of the disk files [default: raw].
    #[serde(default)]
    pub disk_format: DiskFormat,
}

impl ExportCheckpoint {
    /// Checks what serde cannot: the destination is an absolute path without NUL bytes.
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.destination;
        if !d.starts_with('/') {
            return Err(format!("destination must be an absolute path, not {d:?}"));
        }
        if d.contains('\0') {
            return Err("destination must not contain NUL bytes".into());
        }
        Ok(())
    }
}

/// The answer of `POST /v1/checkpoints/{id}/export`: what was written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The checkpoint exported.
    pub id: String,
    /// The export's folder (`ExportCheckpoint::destination`).
    pub destination: String,
    /// The disk files written, in `--disk` order.
    pub disks: Vec<String>,
    /// The state file written (a standard checkpoint), else null.
    #[serde(default)]
    pub state: Option<String>,
    /// The memory file written (a standard checkpoint), else null.
    #[serde(default)]
    pub memory: Option<String>,
    /// The bytes written in all.
    pub bytes: u64,
}

/// One changed range of a disk, in bytes (`DiskChanges::extents`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Extent {
    /// Where it starts, from the start of the disk.
    pub offset: u64,
    /// How long it is.
    pub length: u64,
}

/// The changed ranges of one disk (`ChangesInfo::disks`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskChanges {
    /// The disk's place in `--disk` order, from 0.
    pub index: u32,
    /// The disk's size as the guest sees it, in bytes.
    pub virtual_size: u64,
    /// The unit the map is kept in, in bytes: every extent starts and ends on a multiple of it
    /// (or at the end of the disk), so a changed byte marks its whole unit changed.
    pub granularity: u64,
    /// The changed ranges, by offset, not overlapping.
    pub extents: Vec<Extent>,
}

impl DiskChanges {
    /// The bytes the extents cover.
    pub fn changed_bytes(&self) -> u64 {
        self.extents
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.length))
    }
}

/// `GET /v1/checkpoints/{id}/changes?since={since}`: the blocks of each disk written after
/// `since` (or after the VM's launch disks) and up to checkpoint `id`, like Hyper-V's resilient
/// change tracking; what an incremental backup copies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangesInfo {
    /// The checkpoint the changes lead up to.
    pub id: String,
    /// The checkpoint they start from; null for the VM's launch disks (everything the chain
    /// holds).
    pub since: Option<String>,
    /// One entry per disk, in `--disk` order.
    pub disks: Vec<DiskChanges>,
}

impl ChangesInfo {
    /// The bytes changed on all disks together.
    pub fn changed_bytes(&self) -> u64 {
        self.disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.changed_bytes()))
    }
}

/// The type a checkpoint was actually taken as (`CheckpointInfo::kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TakenType {
    /// Memory, device and disk state: applying it resumes the VM where it was.
    Standard,
    /// Disks only: applying it leaves the VM off on those disks.
    Production,
}

impl TakenType {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TakenType::Standard => "standard",
            TakenType::Production => "production",
        }
    }
}

impl std::fmt::Display for TakenType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How consistent a checkpoint's disks are (`CheckpointInfo::consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// A standard checkpoint: disks, memory and devices from the same instant.
    Standard,
    /// The guest agent froze the file systems while the disks were frozen.
    ApplicationConsistent,
    /// Disks only, without the agent: as after a power loss.
    CrashConsistent,
}

impl Consistency {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Standard => "standard",
            Consistency::ApplicationConsistent => "application-consistent",
            Consistency::CrashConsistent => "crash-consistent",
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sizes of a checkpoint on disk, in bytes (`CheckpointInfo::sizes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CheckpointSizes {
    /// Device and vCPU state (0 for a production checkpoint).
    pub state: u64,
    /// Guest memory (0 for a production checkpoint).
    pub memory: u64,
    /// The disk layers the checkpoint froze.
    pub disk_layers: u64,
}

/// One checkpoint: the answer of `POST /v1/checkpoints` and `GET /v1/checkpoints/{id}`, and an
/// entry of `CheckpointList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The id, as used in paths.
    pub id: String,
    /// The name given (or picked by the VMM).
    pub name: String,
    /// The type actually taken.
    #[serde(rename = "type")]
    pub kind: TakenType,
    /// The id of the checkpoint this one was taken on top of, if any.
    pub parent: Option<String>,
    /// When it was taken.
    pub created: String,
    /// How consistent its disks are.
    pub consistency: Consistency,
    /// Its folder.
    pub path: String,
    /// Its sizes on disk.
    pub sizes: CheckpointSizes,
    /// Whether it is the VM's current checkpoint (`CheckpointList::current`).
    pub current: bool,
    /// Why a production checkpoint fell back to standard, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// For each disk, in `--disk` order, the layer the checkpoint froze.
    pub disks: Vec<String>,
    /// How long the guest was paused while it was taken, in microseconds (a standard
    /// checkpoint of a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_us: Option<u64>,
    /// A production checkpoint: how long the guest's filesystems were frozen, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_us: Option<u64>,
    /// A production checkpoint: the guest agent's answer to `freeze` (`frozen`, the mount points
    /// it froze, and what else the agent reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_freeze: Option<serde_json::Map<String, serde_json::Value>>,
    /// The ids of the checkpoints taken on top of this one, oldest first (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
}

/// A long operation the VMM is running now (`CheckpointList::progress`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// What runs: `merge` (a delete) or `export`.
    pub operation: String,
    /// The checkpoint it works on.
    pub checkpoint: String,
    /// Bytes done so far.
    pub done: u64,
    /// Bytes to do in all (may grow while it runs; `done` never passes it).
    pub total: u64,
}

/// [`Progress::operation`] of a delete, which merges the checkpoint's disk data away.
pub const PROGRESS_MERGE: &str = "merge";
/// [`Progress::operation`] of an export.
pub const PROGRESS_EXPORT: &str = "export";

/// `GET /v1/checkpoints`: every checkpoint, in the order they were taken.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CheckpointList {
    /// The checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// The id of the checkpoint the VM runs on, if any.
    pub current: Option<String>,
    /// The long operation (a delete's merge, an export) running now, if any: the list is
    /// answered while one runs, so a client can poll it for progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Disk layers that no checkpoint stands on any more but two or more branches of the tree
    /// still share (left by a delete): each folds into its last branch once the others are
    /// deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_layers: Vec<SharedLayer>,
}

/// A hidden disk layer kept for the branches that share it ([`CheckpointList::shared_layers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedLayer {
    /// The disk (its `--disk` position).
    pub disk: u32,
    /// The layer file.
    pub path: String,
    /// How many branches run through it.
    pub branches: u32,
}

/// Whether the guest agent answered (`GuestInfo::agent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// The agent answered `info`.
    Connected,
}

/// `GET /v1/guest`: the agent answered; `info` is its `info` reply (agent version, kernel,
/// hostname, ...) without the protocol's `ok` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Always `connected`: an agent that does not answer is a 503 `agent_unreachable`.
    pub agent: AgentStatus,
    /// What the agent said about itself: a JSON object.
    pub info: serde_json::Map<String, serde_json::Value>,
}

/// The default `ExecRequest::timeout_s`.
pub const DEFAULT_EXEC_TIMEOUT_S: u32 = 30;
/// The largest `ExecRequest::timeout_s`.
pub const MAX_EXEC_TIMEOUT_S: u32 = 3600;

/// `POST /v1/guest/exec`: run a command in the guest through the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; not empty.
    pub argv: Vec<String>,
    /// Seconds the agent lets the command run, 1 to 3600 [default: 30].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
}

impl ExecRequest {
    /// Checks what serde cannot: a non-empty argv and a timeout in range.
    pub fn validate(&self) -> Result<(), String> {
        if self.argv.is_empty() {
            return Err("argv must name a program".into());
        }
        match self.timeout_s {
            Some(t) if !(1..=MAX_EXEC_TIMEOUT_S).contains(&t) => Err(format!(
                "timeout_s must be 1 to {MAX_EXEC_TIMEOUT_S}, not {t}"
            )),
            _ => Ok(()),
        }
    }

    /// The timeout the agent is given.
    pub fn timeout(&self) -> u32 {
        self.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S)
    }
}

/// The answer to `POST /v1/guest/exec`: the command ran (whatever its exit code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// The command's exit code.
    pub exit_code: i32,
    /// What it wrote to stdout.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
}

/// The error body of every failed call: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of `ErrorBody`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `invalid_state`.
    pub code: String,
    /// One human-readable line.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_config_without_location_parses_as_none() {
        let c: CheckpointConfig = serde_json::from_str(r#"{"type":"production-only"}"#).unwrap();
        assert_eq!(c.kind, CheckpointType::ProductionOnly);
        assert_eq!(c.location, None);
    }

    #[test]
    fn checkpoint_config_serializes_null_location() {
        let s = serde_json::to_string(&CheckpointConfig::default()).unwrap();
        assert_eq!(s, r#"{"type":"production","location":null}"#);
    }

    #[test]
    fn checkpoint_config_with_relative_location_is_invalid() {
        let c = CheckpointConfig {
            kind: CheckpointType::Standard,
            location: Some("ckpt".into()),
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn exec_request_with_unknown_field_is_rejected() {
        let r = serde_json::from_str::<ExecRequest>(r#"{"argv":["ls"],"cwd":"/"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn exec_request_limits_are_checked() {
        let mut r = ExecRequest {
            argv: vec![],
            timeout_s: None,
        };
        assert!(r.validate().is_err());
        r.argv.push("true".into());
        assert!(r.validate().is_ok());
        assert_eq!(r.timeout(), DEFAULT_EXEC_TIMEOUT_S);
        r.timeout_s = Some(0);
        assert!(r.validate().is_err());
        r.timeout_s = Some(MAX_EXEC_TIMEOUT_S + 1);
        assert!(r.validate().is_err());
    }

    #[test]
    fn empty_create_checkpoint_body_is_valid() {
        let c: CreateCheckpoint = serde_json::from_str("{}").unwrap();
        assert_eq!(c, CreateCheckpoint::default());
        assert!(c.validate().is_ok());
        let c: CreateCheckpoint =
            serde_json::from_str(r#"{"name":"before upgrade","type":"production-only"}"#).unwrap();
        assert_eq!(c.name.as_deref(), Some("before upgrade"));
        assert_eq!(c.kind, Some(CheckpointType::ProductionOnly));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn create_checkpoint_limits_are_checked() {
        let named = |name: &str| CreateCheckpoint {
            name: Some(name.into()),
            kind: None,
        };
        assert!(named("").validate().is_err());
        assert!(named(&"é".repeat(MAX_CHECKPOINT_NAME_CHARS))
            .validate()
            .is_ok());
        assert!(named(&"a".repeat(MAX_CHECKPOINT_NAME_CHARS + 1))
            .validate()
            .is_err());
        assert!(named("a\nb").validate().is_err());
        assert!(named("a\u{7f}").validate().is_err());
        let disabled = CreateCheckpoint {
            name: None,
            kind: Some(CheckpointType::Disabled),
        };
        assert!(disabled.validate().unwrap_err().contains("disabled"));
        assert!(serde_json::from_str::<CreateCheckpoint>(r#"{"nmae":"x"}"#).is_err());
    }

    #[test]
    fn apply_checkpoint_defaults_and_rejects_unknown_fields() {
        let a: ApplyCheckpoint = serde_json::from_str("{}").unwrap();
        assert!(!a.save_current);
        let a: ApplyCheckpoint = serde_json::from_str(r#"{"save_current":true}"#).unwrap();
        assert!(a.save_current);
        assert!(serde_json::from_str::<ApplyCheckpoint>(r#"{"save":true}"#).is_err());
    }

    #[test]
    fn checkpoint_ids_follow_the_grammar() {
        for id in [
            "a",
            "ck-1",
            "_x",
            "A_b-9",
            &"a".repeat(MAX_CHECKPOINT_ID_LEN),
        ] {
            assert!(valid_checkpoint_id(id), "{id:?}");
        }
        let long = "a".repeat(MAX_CHECKPOINT_ID_LEN + 1);
        for id in ["", "-a", "a.b", "a b", "a/b", "é", "a%20", &long, "revert"] {
            assert!(!valid_checkpoint_id(id), "{id:?}");
        }
    }

    #[test]
    fn checkpoint_info_wire_format() {
        let info = CheckpointInfo {
            id: "ck-1".into(),
            name: "n".into(),
            kind: TakenType::Production,
            parent: None,
            created: "2024-01-01T00:00:00Z".into(),
            consistency: Consistency::ApplicationConsistent,
            path: "/ck/ck-1".into(),
            sizes: CheckpointSizes {
                state: 1,
                memory: 2,
                disk_layers: 3,
            },
            current: true,
            fallback_reason: None,
            disks: vec!["/ck/ck-1/disk0.strata".into()],
            paused_us: None,
            frozen_us: None,
            agent_freeze: None,
            children: vec![],
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["type"], "production");
        assert_eq!(v["consistency"], "application-consistent");
        assert_eq!(v["parent"], serde_json::Value::Null);
        assert_eq!(v["sizes"]["disk_layers"], 3);
        assert!(v.get("fallback_reason").is_none());
        let back: CheckpointInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, info);
        assert_eq!(Consistency::CrashConsistent.to_string(), "crash-consistent");
        assert_eq!(TakenType::Standard.to_string(), "standard");
    }

    #[test]
    fn export_body_defaults_to_raw_and_checks_the_destination() {
        let e: ExportCheckpoint = serde_json::from_str(r#"{"destination":"/backup/a"}"#).unwrap();
        assert_eq!(e.disk_format, DiskFormat::Raw);
        assert!(e.validate().is_ok());
        let e: ExportCheckpoint =
            serde_json::from_str(r#"{"destination":"/b","disk_format":"strata"}"#).unwrap();
        assert_eq!(e.disk_format, DiskFormat::Strata);
        for bad in [
            r#"{}"#,
            r#"{"destination":"/b","disk_format":"qcow2"}"#,
            r#"{"destination":"/b","disk_format":"Raw"}"#,
            r#"{"destination":"/b","format":"raw"}"#,
            r#"{"destination":7}"#,
        ] {
            assert!(
                serde_json::from_str::<ExportCheckpoint>(bad).is_err(),
                "{bad}"
            );
        }
        for destination in ["backup", "", "./b", "/a\0b"] {
            let e = ExportCheckpoint {
                destination: destination.into(),
                disk_format: DiskFormat::Raw,
            };
            assert!(e.validate().is_err(), "{destination:?}");
        }
        assert_eq!(DiskFormat::Strata.to_string(), "strata");
        assert_eq!(DiskFormat::default().as_str(), "raw");
    }

    #[test]
    fn children_and_progress_are_absent_when_empty() {
        let list = CheckpointList::default();
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v, serde_json::json!({"checkpoints": [], "current": null}));
        let list = CheckpointList {
            checkpoints: vec![],
            current: None,
            progress: Some(Progress {
                operation: PROGRESS_MERGE.into(),
                checkpoint: "a".into(),
                done: 1,
                total: 2,
            }),
            shared_layers: Vec::new(),
        };
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v["progress"]["operation"], "merge");
        assert_eq!(serde_json::from_value::<CheckpointList>(v).unwrap(), list);
        let info: CheckpointInfo = serde_json::from_value(serde_json::json!({
            "id": "a", "name": "n", "type": "standard", "parent": null,
            "created": "t", "consistency": "standard", "path": "/a",
            "sizes": {"state": 0, "memory": 0, "disk_layers": 0},
            "current": false, "disks": [], "children": ["b", "c"],
        }))
        .unwrap();
        assert_eq!(info.children, ["b", "c"]);
        let v = serde_json::to_value(CheckpointInfo {
            children: vec![],
            ..info
        })
        .unwrap();
        assert!(v.get("children").is_none());
    }

    #[test]
    fn changed_bytes_add_up_without_overflow() {
        let disk = |lengths: &[u64]| DiskChanges {
            extents: lengths
                .iter()
                .map(|&length| Extent { offset: 0, length })
                .collect(),
            ..DiskChanges::default()
        };
        let changes = ChangesInfo {
            id: "b".into(),
            since: Some("a".into()),
            disks: vec![disk(&[1, 2]), disk(&[]), disk(&[4])],
        };
        assert_eq!(changes.disks[0].changed_bytes(), 3);
        assert_eq!(changes.changed_bytes(), 7);
        let huge = disk(&[u64::MAX, 1]);
        assert_eq!(huge.changed_bytes(), u64::MAX);
        let v = serde_json::to_value(&changes).unwrap();
        assert_eq!(v["disks"][0]["extents"][1]["length"], 2);
        assert_eq!(v["since"], "a");
        let export = ExportInfo::default();
        let v = serde_json::to_value(&export).unwrap();
        assert_eq!(v["state"], serde_json::Value::Null);
        assert_eq!(v["memory"], serde_json::Value::Null);
    }
}
