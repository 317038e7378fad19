//! The JSON bodies of the API, shared by the server, the client and the VMM.
//!
//! Request bodies (`CheckpointConfig` as sent by `PUT`, `ExecRequest`) reject unknown fields and
//! are checked with `validate` after parsing, so a request that the server accepts is one the
//! VMM can act on. `openapi.yaml` describes the same shapes and limits.

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
}
