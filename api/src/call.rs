//! What the API server hands to the VMM and what the VMM answers.
//!
//! The server turns each valid HTTP request into an [`ApiRequest`], wraps it with a
//! [`Responder`] into an [`ApiCall`], and gives it to the VMM's handler. The VMM answers with an
//! [`ApiResponse`] through the responder, from whatever thread it likes; sending never blocks.

use tokio::sync::oneshot;

use crate::types::{
    ApplyCheckpoint, ChangesInfo, CheckpointConfig, CheckpointInfo, CheckpointList,
    CreateCheckpoint, ExecRequest, ExecResponse, ExportCheckpoint, ExportInfo, GuestInfo, VmInfo,
};

/// A lifecycle transition (`POST /v1/vm/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    /// off → running: cold-boot the guest.
    Start,
    /// running → paused.
    Pause,
    /// paused → running.
    Resume,
    /// running or paused → off: hard power-off.
    Stop,
    /// running or paused → (eventually) off: ask the guest to power off (ACPI power button or
    /// the agent); the answer comes before the guest has finished.
    Shutdown,
}

impl LifecycleAction {
    /// Every action, in route order.
    pub const ALL: [LifecycleAction; 5] = [
        LifecycleAction::Start,
        LifecycleAction::Pause,
        LifecycleAction::Resume,
        LifecycleAction::Stop,
        LifecycleAction::Shutdown,
    ];

    /// The last path segment of the route, `start` for `/v1/vm/start`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleAction::Start => "start",
            LifecycleAction::Pause => "pause",
            LifecycleAction::Resume => "resume",
            LifecycleAction::Stop => "stop",
            LifecycleAction::Shutdown => "shutdown",
        }
    }
}

/// One API call, parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /v1/vm` → [`ApiReply::Vm`].
    GetVm,
    /// `POST /v1/vm/{action}` → [`ApiReply::Vm`] (the VM after the transition), or
    /// `invalid_state` when the VM is not in a state the action starts from.
    Lifecycle(LifecycleAction),
    /// `GET /v1/vm/checkpoint-config` → [`ApiReply::CheckpointConfig`].
    GetCheckpointConfig,
    /// `PUT /v1/vm/checkpoint-config` (already validated) → [`ApiReply::CheckpointConfig`]
    /// (the stored settings).
    PutCheckpointConfig(CheckpointConfig),
    /// `POST /v1/checkpoints` (already validated) → [`ApiReply::Checkpoint`] (the checkpoint
    /// taken, with the type actually taken); `bad_request`, `invalid_state` (wrong state,
    /// checkpoints disabled, no location) or `agent_unreachable` (production-only without an
    /// agent).
    CreateCheckpoint(CreateCheckpoint),
    /// `GET /v1/checkpoints` → [`ApiReply::Checkpoints`].
    ListCheckpoints,
    /// `GET /v1/checkpoints/{id}` (an id that passes [`crate::types::valid_checkpoint_id`]) →
    /// [`ApiReply::Checkpoint`], or `not_found`.
    GetCheckpoint(String),
    /// `POST /v1/checkpoints/{id}/apply` → [`ApiReply::Vm`] (the VM after applying), or
    /// `not_found` or `invalid_state`.
    ApplyCheckpoint {
        /// The checkpoint, an id that passes [`crate::types::valid_checkpoint_id`].
        id: String,
        /// The body (the defaults when there was none).
        request: ApplyCheckpoint,
    },
    /// `POST /v1/checkpoints/revert` → [`ApiReply::Vm`] (the VM after reverting): apply the
    /// VM's current checkpoint (the one most recently taken or applied) again, discarding the
    /// state since; `not_found` when there is no checkpoint to revert to, or `invalid_state`.
    RevertCheckpoint,
    /// `DELETE /v1/checkpoints/{id}` → [`ApiReply::Checkpoints`] (the list after the delete):
    /// the checkpoint goes away and its disk data is merged into the layers that still need it,
    /// with the VM running; `not_found` or `invalid_state`. While the merge runs,
    /// `ListCheckpoints` answers with its [`crate::types::Progress`].
    DeleteCheckpoint(String),
    /// `POST /v1/checkpoints/{id}/export` (already validated) → [`ApiReply::Export`]: a
    /// self-contained copy in `request.destination`; `bad_request` (e.g. the destination
    /// cannot be written), `not_found` or `invalid_state`. While it runs, `ListCheckpoints`
    /// answers with its [`crate::types::Progress`].
    ExportCheckpoint {
        /// The checkpoint, an id that passes [`crate::types::valid_checkpoint_id`].
        id: String,
        /// The body.
        request: ExportCheckpoint,
    },
    /// `GET /v1/checkpoints/{id}/changes[?since={since}]` → [`ApiReply::Changes`]: the blocks
    /// written after `since` up to `id`; `bad_request` (e.g. the two are not on one line of
    /// descent, if the VMM cannot compare them), `not_found` (either id) or `invalid_state`.
    CheckpointChanges {
        /// The checkpoint the changes lead up to, an id that passes
        /// [`crate::types::valid_checkpoint_id`].
        id: String,
        /// The checkpoint they start from (an id that passes
        /// [`crate::types::valid_checkpoint_id`]); `None` for the VM's launch disks, i.e.
        /// everything the chain up to `id` holds.
        since: Option<String>,
    },
    /// `GET /v1/guest` → [`ApiReply::Guest`], or `agent_unreachable`.
    GetGuest,
    /// `POST /v1/guest/exec` (already validated) → [`ApiReply::Exec`], or `agent_unreachable`.
    GuestExec(ExecRequest),
}

/// A successful answer. The server checks that its kind fits the request (a mismatch is a bug
/// and becomes a 500).
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// For `GetVm`, `Lifecycle`, `ApplyCheckpoint` and `RevertCheckpoint`.
    Vm(VmInfo),
    /// For `GetCheckpointConfig` and `PutCheckpointConfig`.
    CheckpointConfig(CheckpointConfig),
    /// For `CreateCheckpoint` and `GetCheckpoint`.
    Checkpoint(CheckpointInfo),
    /// For `ListCheckpoints` and `DeleteCheckpoint`.
    Checkpoints(CheckpointList),
    /// For `ExportCheckpoint`.
    Export(ExportInfo),
    /// For `CheckpointChanges`.
    Changes(ChangesInfo),
    /// For `GetGuest`.
    Guest(GuestInfo),
    /// For `GuestExec`.
    Exec(ExecResponse),
}

/// What the VMM answers.
pub type ApiResponse = Result<ApiReply, ApiError>;

/// The error codes of the API and their HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: malformed JSON, unknown fields, wrong types, values out of range.
    BadRequest,
    /// 404: unknown route or id.
    NotFound,
    /// 405: a known route with the wrong method.
    MethodNotAllowed,
    /// 409: the call is not possible in the VM's current state.
    InvalidState,
    /// 413: a body over [`crate::server::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 500: a bug (including a VMM that does not answer).
    Internal,
    /// 503: the guest agent cannot be reached or did not answer in time.
    AgentUnreachable,
    /// 503: the server holds its bound of connections; sent before the request is read.
    TooManyConnections,
}

impl ErrorCode {
    /// The `code` string of the error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::AgentUnreachable => "agent_unreachable",
            ErrorCode::TooManyConnections => "too_many_connections",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::InvalidState => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::AgentUnreachable | ErrorCode::TooManyConnections => 503,
        }
    }
}

/// A failed call: a code and one line for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The code, which fixes the HTTP status.
    pub code: ErrorCode,
    /// What went wrong, e.g. "cannot pause: the VM is off".
    pub message: String,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 409 `invalid_state`.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidState, message)
    }

    /// 503 `agent_unreachable`.
    pub fn agent_unreachable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AgentUnreachable, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

/// Sends the one answer to an [`ApiCall`]. Never blocks; if the HTTP client has gone away the
/// answer is dropped.
#[derive(Debug)]
pub struct Responder(oneshot::Sender<ApiResponse>);

impl Responder {
    /// Answers the call.
    pub fn send(self, response: ApiResponse) {
        // An error means the server stopped waiting (client gone, timeout): nothing to do.
        let _ = self.0.send(response);
    }
}

/// One call from the API server to the VMM. Dropping it unanswered makes the server reply 500.
#[derive(Debug)]
pub struct ApiCall {
    /// What the client asked for.
    pub request: ApiRequest,
    /// Where the answer goes.
    pub reply: Responder,
}

/// The server's end of an [`ApiCall`]: waits for the VMM's answer.
#[derive(Debug)]
pub struct PendingReply(oneshot::Receiver<ApiResponse>);

impl PendingReply {
    /// Waits for the answer; `None` if the call was dropped unanswered.
    pub async fn recv(self) -> Option<ApiResponse> {
        self.0.await.ok()
    }

    /// Waits for the answer from a plain thread (tests of a VMM's dispatch); `None` if the call
    /// was dropped unanswered. Must not be called from inside an async runtime.
    pub fn blocking_recv(self) -> Option<ApiResponse> {
        self.0.blocking_recv().ok()
    }
}

impl ApiCall {
    /// A call and the receiver its answer arrives at.
    pub fn new(request: ApiRequest) -> (ApiCall, PendingReply) {
        let (tx, rx) = oneshot::channel();
        (
            ApiCall {
                request,
                reply: Responder(tx),
            },
            PendingReply(rx),
        )
    }
}

/// What the VMM gives the server: called on the API thread for every valid request, it must
/// return quickly (forward the call into the VMM's control channel and signal its eventfd).
pub type ApiHandler = std::sync::Arc<dyn Fn(ApiCall) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_call_delivers_the_response() {
        let (call, pending) = ApiCall::new(ApiRequest::GetVm);
        call.reply
            .send(Err(ApiError::invalid_state("cannot pause: the VM is off")));
        let got = pending.blocking_recv().unwrap();
        assert_eq!(got.unwrap_err().code, ErrorCode::InvalidState);
    }

    #[test]
    fn dropped_call_yields_none() {
        let (call, pending) = ApiCall::new(ApiRequest::GetGuest);
        drop(call);
        assert!(pending.blocking_recv().is_none());
    }

    #[test]
    fn every_code_maps_to_its_status() {
        assert_eq!(ErrorCode::BadRequest.status(), 400);
        assert_eq!(ErrorCode::InvalidState.status(), 409);
        assert_eq!(ErrorCode::PayloadTooLarge.status(), 413);
        assert_eq!(ErrorCode::AgentUnreachable.as_str(), "agent_unreachable");
    }
}
