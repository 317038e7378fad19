//! A small blocking client of the API, for `strata ctl` and tests.
//!
//! Each call opens a connection to the socket, sends one HTTP/1.1 request with hyper and reads
//! the answer, inside a current-thread tokio runtime owned by the client. Errors tell a socket
//! nobody answers on (`Connect`, naming the socket) from an error the API answered (`Api`, with
//! its code and message) from an answer that is not the API's (`BadResponse`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::call::LifecycleAction;
use crate::server::DEFAULT_CHECKPOINT_REPLY_TIMEOUT;
use crate::types::{
    ApplyCheckpoint, ChangesInfo, CheckpointConfig, CheckpointInfo, CheckpointList,
    CreateCheckpoint, ErrorBody, ExecRequest, ExecResponse, ExportCheckpoint, ExportInfo,
    GuestInfo, VmInfo,
};

/// The default time a call may take, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What checkpoint create, apply, revert, delete and export wait on top of the client's timeout:
/// as long as the server waits for the VMM by default.
pub const CHECKPOINT_TIMEOUT: Duration = DEFAULT_CHECKPOINT_REPLY_TIMEOUT;

/// The largest answer the client reads (guest exec output can be large).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers on the socket (missing, stale, permission denied).
    #[error("cannot connect to API socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The API answered with an error.
    #[error("{message} ({code})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error code, e.g. `invalid_state`.
        code: String,
        /// The API's message.
        message: String,
    },
    /// The answer is not what the API sends.
    #[error("bad answer from API socket {path}: {reason}")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The HTTP exchange broke off.
    #[error("HTTP exchange on API socket {path} failed")]
    Http {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("no answer on API socket {path} within {} s", .timeout.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The time allowed.
        timeout: Duration,
    },
    /// The client's runtime could not be created.
    #[error("cannot start the API client")]
    Runtime(#[source] std::io::Error),
}

impl ClientError {
    /// The API error code, if the API answered with an error.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An answer as it came: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// A client of one API socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl Client {
    /// A client of the socket at `path`. Nothing is connected yet.
    pub fn new(path: impl Into<PathBuf>) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client {
            path: path.into(),
            runtime,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the time an ordinary call may take (guest exec adds its own timeout, checkpoint
    /// create, apply, revert, delete and export [`CHECKPOINT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Changes the time an ordinary call may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET /v1/vm`.
    pub fn vm(&self) -> Result<VmInfo, ClientError> {
        self.call(Method::GET, "/v1/vm", None, self.timeout)
    }

    /// `POST /v1/vm/{action}`: the VM after the transition.
    pub fn lifecycle(&self, action: LifecycleAction) -> Result<VmInfo, ClientError> {
        let path = format!("/v1/vm/{}", action.as_str());
        self.call(Method::POST, &path, None, self.timeout)
    }

    /// `GET /v1/vm/checkpoint-config`.
    pub fn checkpoint_config(&self) -> Result<CheckpointConfig, ClientError> {
        self.call(Method::GET, "/v1/vm/checkpoint-config", None, self.timeout)
    }

    /// `PUT /v1/vm/checkpoint-config`: the stored settings.
    pub fn set_checkpoint_config(
        &self,
        config: &CheckpointConfig,
    ) -> Result<CheckpointConfig, ClientError> {
        let body = self.encode(config)?;
        self.call(
            Method::PUT,
            "/v1/vm/checkpoint-config",
            Some(body),
            self.timeout,
        )
    }

    /// `POST /v1/checkpoints`: the checkpoint taken. Waits [`CHECKPOINT_TIMEOUT`] on top of
    /// the client's timeout.
    pub fn create_checkpoint(
        &self,
        request: &CreateCheckpoint,
    ) -> Result<CheckpointInfo, ClientError> {
        let body = self.encode(request)?;
        let timeout = self.timeout + CHECKPOINT_TIMEOUT;
        self.call(Method::POST, "/v1/checkpoints", Some(body), timeout)
    }

    /// `GET /v1/checkpoints`.
    pub fn checkpoints(&self) -> Result<CheckpointList, ClientError> {
        self.call(Method::GET, "/v1/checkpoints", None, self.timeout)
    }

    /// `GET /v1/checkpoints/{id}`.
    pub fn checkpoint(&self, id: &str) -> Result<CheckpointInfo, ClientError> {
        let path = format!("/v1/checkpoints/{}", encode_segment(id));
        self.call(Method::GET, &path, None, self.timeout)
    }

    /// `POST /v1/checkpoints/{id}/apply`: the VM after applying. Waits
    /// [`CHECKPOINT_TIMEOUT`] on top of the client's timeout.
    pub fn apply_checkpoint(
        &self,
        id: &str,
        request: &ApplyCheckpoint,
    ) -> Result<VmInfo, ClientError> {
        let body = self.encode(request)?;
        let path = format!("/v1/checkpoints/{}/apply", encode_segment(id));
        let timeout = self.timeout + CHECKPOINT_TIMEOUT;
        self.call(Method::POST, &path, Some(body), timeout)
    }

    /// `POST /v1/checkpoints/revert`: the VM after reverting to its current checkpoint. Waits
    /// [`CHECKPOINT_TIMEOUT`] on top of the client's timeout.
    pub fn revert(&self) -> Result<VmInfo, ClientError> {
        let timeout = self.timeout + CHECKPOINT_TIMEOUT;
        self.call(Method::POST, "/v1/checkpoints/revert", None, timeout)
    }

    /// `DELETE /v1/checkpoints/{id}`: the checkpoints left. The VMM answers once the
    /// checkpoint is gone and merges its layers in the background ([`Client::wait_for_merge`]
    /// waits for that); it may first finish an earlier delete's merge, so this waits
    /// [`CHECKPOINT_TIMEOUT`] on top of the client's timeout.
    pub fn delete_checkpoint(&self, id: &str) -> Result<CheckpointList, ClientError> {
        let path = format!("/v1/checkpoints/{}", encode_segment(id));
        let timeout = self.timeout + CHECKPOINT_TIMEOUT;
        self.call(Method::DELETE, &path, None, timeout)
    }

    /// Waits for the background merge a delete of checkpoint `id` started: polls
    /// `GET /v1/checkpoints` every `every` until its `progress` no longer names a merge of
    /// `id`; returns that last list.
    pub fn wait_for_merge(&self, id: &str, every: Duration) -> Result<CheckpointList, ClientError> {
        loop {
            let list = self.checkpoints()?;
            let merging = list
                .progress
                .as_ref()
                .is_some_and(|p| p.operation == crate::types::PROGRESS_MERGE && p.checkpoint == id);
            if !merging {
                return Ok(list);
            }
            std::thread::sleep(every);
        }
    }

    /// `POST /v1/checkpoints/{id}/export`: what was written. Waits [`CHECKPOINT_TIMEOUT`] on
    /// top of the client's timeout.
    pub fn export_checkpoint(
        &self,
        id: &str,
        request: &ExportCheckpoint,
    ) -> Result<ExportInfo, ClientError> {
        let body = self.encode(request)?;
        let path = format!("/v1/checkpoints/{}/export", encode_segment(id));
        let timeout = self.timeout + CHECKPOINT_TIMEOUT;
        self.call(Method::POST, &path, Some(body), timeout)
    }

    /// `GET /v1/checkpoints/{id}/changes[?since={since}]`: the blocks written after `since`
    /// (after the launch disks when `None`) up to checkpoint `id`.
    pub fn checkpoint_changes(
        &self,
        id: &str,
        since: Option<&str>,
    ) -> Result<ChangesInfo, ClientError> {
        let mut path = format!("/v1/checkpoints/{}/changes", encode_segment(id));
        if let Some(since) = since {
            path.push_str("?since=");
            path.push_str(&encode_segment(since));
        }
        self.call(Method::GET, &path, None, self.timeout)
    }

    /// `GET /v1/guest`.
    pub fn guest(&self) -> Result<GuestInfo, ClientError> {
        self.call(Method::GET, "/v1/guest", None, self.timeout)
    }

    /// `POST /v1/guest/exec`; waits the command's timeout on top of the client's.
    pub fn exec(&self, request: &ExecRequest) -> Result<ExecResponse, ClientError> {
        let body = self.encode(request)?;
        let timeout = self.timeout + Duration::from_secs(request.timeout().into());
        self.call(Method::POST, "/v1/guest/exec", Some(body), timeout)
    }

    /// Sends any request and returns the answer as it came, whatever its status.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        self.runtime
            .block_on(self.exchange(method, path, body, self.timeout))
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(value).map_err(|e| self.bad(format!("cannot encode the request: {e}")))
    }

    fn bad(&self, reason: String) -> ClientError {
        ClientError::BadResponse {
            path: self.path.clone(),
            reason,
        }
    }

    /// One call: 2xx bodies parse as `T`, others as the API's error.
    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let resp = self
            .runtime
            .block_on(self.exchange(method, path, body, timeout))?;
        if (200..300).contains(&resp.status) {
            return serde_json::from_slice(&resp.body)
                .map_err(|e| self.bad(format!("HTTP {}: {e}", resp.status)));
        }
        match serde_json::from_slice::<ErrorBody>(&resp.body) {
            Ok(err) => Err(ClientError::Api {
                status: resp.status,
                code: err.error.code,
                message: err.error.message,
            }),
            Err(_) => Err(self.bad(format!(
                "HTTP {} without an error body: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, ClientError> {
        match tokio::time::timeout(timeout, self.exchange_untimed(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                path: self.path.clone(),
                timeout,
            }),
        }
    }

    async fn exchange_untimed(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let http = |source| ClientError::Http {
            path: self.path.clone(),
            source,
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(conn);
        let has_body = body.is_some();
        let mut req = Request::new(Full::new(Bytes::from(body.unwrap_or_default())));
        *req.method_mut() = method;
        *req.uri_mut() = path
            .parse()
            .map_err(|e| self.bad(format!("bad request path {path:?}: {e}")))?;
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("localhost"));
        if has_body {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| self.bad(format!("cannot read the answer: {e}")))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }
}

/// `segment` percent-encoded for a path or a query value, every byte but `A-Z a-z 0-9 - . _ ~`:
/// an id that cannot be one still reaches the server as one segment (or one value), which
/// answers 404 (or 400) for it.
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_is_a_connect_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let err = Client::new(&path).unwrap().vm().unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }));
        assert!(err.to_string().contains("nobody.sock"));
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("ck-1_A.~"), "ck-1_A.~");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }
}
