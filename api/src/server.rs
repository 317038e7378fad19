//! The HTTP/1.1 server on the API's Unix socket.
//!
//! The server runs hyper on a single-threaded tokio runtime on its own thread (`strata-api`);
//! nothing in it ever runs on a vCPU or device thread, and nothing it does blocks one. A call
//! goes like this:
//!
//! 1. A client connects to the socket (mode 0600, see [`crate::socket`]) and sends a request.
//!    Each connection is its own task: a client that sends half a request and hangs holds only
//!    that task, which hyper closes when the headers are not complete within the read timeout
//!    (the body has its own timeout).
//! 2. The server matches the path against [`ROUTES`]: an unknown path is a 404, a known path
//!    with another method a 405 with an `Allow` header. A `{id}` segment of a route matches a
//!    checkpoint id; one that cannot be an id
//!    ([`valid_checkpoint_id`](crate::types::valid_checkpoint_id)) is a 404 at once. A path
//!    without an id wins: `/v1/checkpoints/revert` is the revert call, and `revert` is not an
//!    id.
//! 3. It reads the whole body (at most [`MAX_BODY_BYTES`], else 413) and parses it into an
//!    [`ApiRequest`]: JSON that is malformed, not an object, has unknown fields or wrong types,
//!    or fails the type's `validate`, is a 400 (a `POST` that takes no body, checkpoint apply
//!    and revert also accept none at all; bodies of `GET` and `DELETE` are ignored). The query
//!    string is read by the one endpoint that takes parameters, checkpoint changes (`since`
//!    only: another parameter, or a `since` that cannot be an id, is a 400); the others ignore
//!    theirs. None of this reaches the VMM, so a rejected request changes nothing.
//! 4. It wraps the request with a [`Responder`](crate::call::Responder) into an [`ApiCall`] and
//!    calls the VMM's [`ApiHandler`] with it, on the API thread. The handler must return at once:
//!    the VMM forwards the call into its control loop's channel and signals that loop's eventfd.
//! 5. The VMM handles the call between its other events and answers through the responder;
//!    sending never blocks it, even if the client is gone.
//! 6. The connection's task waits for the answer without blocking the runtime, up to a bound
//!    (30 s; `shutdown` 120 s; checkpoint create, apply, revert, delete and export, which save,
//!    load, merge or copy gigabytes, an hour; guest exec its own timeout plus 30 s). A VMM that does not answer in time, or drops
//!    the call, is a bug: 500 `internal`.
//! 7. The answer is checked against the route (right reply kind, an error code the route
//!    documents in `openapi.yaml`; anything else is a 500) and written as JSON with
//!    `Content-Type: application/json`, status 200 (201 for a checkpoint created or exported).
//!
//! [`ApiServer::shutdown`] (or dropping the server) stops accepting, ends open connections, joins
//! the thread and removes the socket file if it is still ours.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::call::{
    ApiCall, ApiError, ApiHandler, ApiReply, ApiRequest, ApiResponse, ErrorCode, LifecycleAction,
};
use crate::socket::{self, SocketError, SocketFile};
use crate::types::{
    valid_checkpoint_id, ApplyCheckpoint, CheckpointConfig, CreateCheckpoint, ErrorBody,
    ErrorDetail, ExecRequest, ExportCheckpoint, MAX_CHECKPOINT_ID_LEN, RESERVED_CHECKPOINT_ID,
};

/// The largest request body accepted; larger ones get 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The default [`ServerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// The answer to a connection beyond [`ServerOptions::max_connections`], written without
/// reading its request, before the server closes it.
const TOO_MANY_CONNECTIONS: &str = "HTTP/1.1 503 Service Unavailable\r\n\
    Content-Type: application/json\r\n\
    Connection: close\r\n\
    Content-Length: 129\r\n\r\n\
    {\"error\":{\"code\":\"too_many_connections\",\"message\":\"the API serves a bounded \
    number of connections at once; close one and retry\"}}";

/// What an HTTP route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v1/vm`.
    GetVm,
    /// `POST /v1/vm/{action}`.
    Lifecycle(LifecycleAction),
    /// `GET /v1/vm/checkpoint-config`.
    GetCheckpointConfig,
    /// `PUT /v1/vm/checkpoint-config`.
    PutCheckpointConfig,
    /// `POST /v1/checkpoints`.
    CreateCheckpoint,
    /// `GET /v1/checkpoints`.
    ListCheckpoints,
    /// `GET /v1/checkpoints/{id}`.
    GetCheckpoint,
    /// `POST /v1/checkpoints/{id}/apply`.
    ApplyCheckpoint,
    /// `POST /v1/checkpoints/revert`.
    RevertCheckpoint,
    /// `DELETE /v1/checkpoints/{id}`.
    DeleteCheckpoint,
    /// `POST /v1/checkpoints/{id}/export`.
    ExportCheckpoint,
    /// `GET /v1/checkpoints/{id}/changes`.
    CheckpointChanges,
    /// `GET /v1/guest`.
    GetGuest,
    /// `POST /v1/guest/exec`.
    GuestExec,
}

impl Endpoint {
    /// The error codes the VMM may answer this endpoint with (as documented in
    /// `openapi.yaml`); any other error becomes a 500.
    fn handler_errors(self) -> &'static [ErrorCode] {
        use ErrorCode::*;
        match self {
            Endpoint::GetVm | Endpoint::GetCheckpointConfig => &[],
            Endpoint::Lifecycle(LifecycleAction::Shutdown) => &[InvalidState, AgentUnreachable],
            Endpoint::Lifecycle(_) => &[InvalidState],
            Endpoint::PutCheckpointConfig => &[BadRequest, InvalidState],
            Endpoint::CreateCheckpoint => &[BadRequest, InvalidState, AgentUnreachable],
            // 409: the VM has no checkpoint location, or it cannot be used.
            Endpoint::ListCheckpoints | Endpoint::GetCheckpoint => &[NotFound, InvalidState],
            Endpoint::ApplyCheckpoint | Endpoint::RevertCheckpoint | Endpoint::DeleteCheckpoint => {
                &[NotFound, InvalidState]
            }
            Endpoint::ExportCheckpoint | Endpoint::CheckpointChanges => {
                &[BadRequest, NotFound, InvalidState]
            }
            Endpoint::GetGuest => &[InvalidState, AgentUnreachable],
            Endpoint::GuestExec => &[BadRequest, InvalidState, AgentUnreachable],
        }
    }

    /// Whether the endpoint reads a request body (and so can answer 400 and 413).
    pub fn reads_body(self) -> bool {
        matches!(
            self,
            Endpoint::Lifecycle(_)
                | Endpoint::PutCheckpointConfig
                | Endpoint::CreateCheckpoint
                | Endpoint::ApplyCheckpoint
                | Endpoint::RevertCheckpoint
                | Endpoint::ExportCheckpoint
                | Endpoint::GuestExec
        )
    }

    /// Whether the endpoint reads query parameters (and so can answer 400 for them); the
    /// others ignore their query string.
    pub fn reads_query(self) -> bool {
        matches!(self, Endpoint::CheckpointChanges)
    }

    /// Whether the endpoint's path has a checkpoint id (and so can answer 404 by itself).
    pub fn takes_id(self) -> bool {
        matches!(
            self,
            Endpoint::GetCheckpoint
                | Endpoint::ApplyCheckpoint
                | Endpoint::DeleteCheckpoint
                | Endpoint::ExportCheckpoint
                | Endpoint::CheckpointChanges
        )
    }

    /// The status of a successful answer: 201 for a checkpoint created or exported, else 200.
    pub fn success_status(self) -> u16 {
        match self {
            Endpoint::CreateCheckpoint | Endpoint::ExportCheckpoint => 201,
            _ => 200,
        }
    }

    /// Every HTTP status this endpoint can answer, sorted; `openapi.yaml` lists exactly these.
    pub fn statuses(self) -> Vec<u16> {
        let mut statuses = vec![self.success_status(), 500];
        if self.reads_body() {
            statuses.extend([400, 413]);
        }
        if self.reads_query() {
            statuses.push(400);
        }
        if self.takes_id() {
            statuses.push(404);
        }
        statuses.extend(self.handler_errors().iter().map(|c| c.status()));
        statuses.sort_unstable();
        statuses.dedup();
        statuses
    }
}

/// The segment of a route's path that matches a checkpoint id.
pub const ID_SEGMENT: &str = "{id}";

/// One path and the methods it answers.
#[derive(Debug)]
pub struct Route {
    /// The path, e.g. `/v1/vm`; a segment [`ID_SEGMENT`] matches a checkpoint id.
    pub path: &'static str,
    /// The methods (`GET`, `PUT`, `POST`) and what each does.
    pub methods: &'static [(&'static str, Endpoint)],
}

/// Every route of the server; `openapi.yaml` lists exactly these (a test checks).
pub const ROUTES: &[Route] = &[
    Route {
        path: "/v1/vm",
        methods: &[("GET", Endpoint::GetVm)],
    },
    Route {
        path: "/v1/vm/start",
        methods: &[("POST", Endpoint::Lifecycle(LifecycleAction::Start))],
    },
    Route {
        path: "/v1/vm/pause",
        methods: &[("POST", Endpoint::Lifecycle(LifecycleAction::Pause))],
    },
    Route {
        path: "/v1/vm/resume",
        methods: &[("POST", Endpoint::Lifecycle(LifecycleAction::Resume))],
    },
    Route {
        path: "/v1/vm/stop",
        methods: &[("POST", Endpoint::Lifecycle(LifecycleAction::Stop))],
    },
    Route {
        path: "/v1/vm/shutdown",
        methods: &[("POST", Endpoint::Lifecycle(LifecycleAction::Shutdown))],
    },
    Route {
        path: "/v1/vm/checkpoint-config",
        methods: &[
            ("GET", Endpoint::GetCheckpointConfig),
            ("PUT", Endpoint::PutCheckpointConfig),
        ],
    },
    Route {
        path: "/v1/checkpoints",
        methods: &[
            ("GET", Endpoint::ListCheckpoints),
            ("POST", Endpoint::CreateCheckpoint),
        ],
    },
    Route {
        path: "/v1/checkpoints/revert",
        methods: &[("POST", Endpoint::RevertCheckpoint)],
    },
    Route {
        path: "/v1/checkpoints/{id}",
        methods: &[
            ("GET", Endpoint::GetCheckpoint),
            ("DELETE", Endpoint::DeleteCheckpoint),
        ],
    },
    Route {
        path: "/v1/checkpoints/{id}/apply",
        methods: &[("POST", Endpoint::ApplyCheckpoint)],
    },
    Route {
        path: "/v1/checkpoints/{id}/export",
        methods: &[("POST", Endpoint::ExportCheckpoint)],
    },
    Route {
        path: "/v1/checkpoints/{id}/changes",
        methods: &[("GET", Endpoint::CheckpointChanges)],
    },
    Route {
        path: "/v1/guest",
        methods: &[("GET", Endpoint::GetGuest)],
    },
    Route {
        path: "/v1/guest/exec",
        methods: &[("POST", Endpoint::GuestExec)],
    },
];

/// The default [`ServerOptions::checkpoint_reply_timeout`]: an hour.
pub const DEFAULT_CHECKPOINT_REPLY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Timeouts and bounds of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// How long a client may take to send a request's headers (also how long an idle
    /// keep-alive connection stays open), and separately its body.
    pub read_timeout: Duration,
    /// How long the server waits for the VMM's answer to an ordinary call.
    pub reply_timeout: Duration,
    /// How long it waits for `shutdown`; guest exec waits its own timeout plus `reply_timeout`.
    pub long_reply_timeout: Duration,
    /// How long it waits for checkpoint create, apply, revert, delete and export, which write,
    /// read, merge or copy the guest's memory and disks and may wait for the guest agent.
    pub checkpoint_reply_timeout: Duration,
    /// Most connections served at once (each holds a file descriptor and a task); one more is
    /// answered 503 `too_many_connections` and closed at once.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            read_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            long_reply_timeout: Duration::from_secs(120),
            checkpoint_reply_timeout: DEFAULT_CHECKPOINT_REPLY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The runtime or its thread could not be set up.
    #[error("cannot start the API server thread")]
    Thread(#[source] std::io::Error),
}

/// A running API server. Dropping it stops it and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    file: SocketFile,
}

struct Shared {
    handler: ApiHandler,
    options: ServerOptions,
}

impl ApiServer {
    /// Creates the socket at `path` and serves the API on it with default timeouts.
    pub fn start(path: &Path, handler: ApiHandler) -> Result<ApiServer, ServerError> {
        Self::start_with(path, handler, ServerOptions::default())
    }

    /// Like [`ApiServer::start`] with explicit timeouts.
    pub fn start_with(
        path: &Path,
        handler: ApiHandler,
        options: ServerOptions,
    ) -> Result<ApiServer, ServerError> {
        let (listener, file) = socket::bind(path)?;
        let fail = |e| {
            file.remove_file();
            ServerError::Thread(e)
        };
        listener.set_nonblocking(true).map_err(fail)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(fail)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = Arc::new(Shared { handler, options });
        let thread = std::thread::Builder::new()
            .name("strata-api".into())
            .spawn(move || runtime.block_on(accept_loop(listener, shared, stop_rx)))
            .map_err(fail)?;
        log::info!("API listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
            file,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server, waits for its thread and removes the socket.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the API server thread panicked");
            }
            self.file.remove_file();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("API server cannot use its socket: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(shared.options.max_connections));
    // Whether the refusal of the current stretch at the bound was logged.
    let mut refusal_logged = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        refusal_logged = false;
                        tokio::spawn(serve_connection(stream, shared.clone(), slot));
                    }
                    Err(_) => {
                        if !refusal_logged {
                            refusal_logged = true;
                            log::warn!(
                                "API: {} connections open, the most served at once; refusing \
                                 more until one closes",
                                shared.options.max_connections
                            );
                        }
                        refuse(stream);
                    }
                },
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    log::warn!("API server cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Returning drops the runtime with it, which cancels every connection task.
}

/// Answers a connection beyond the bound with a 503 and closes it, without waiting for it:
/// what the client already sent is read and dropped (closing a Unix socket with unread data
/// resets the connection, and the client would lose the answer), the answer is written if the
/// socket takes it, and the socket is closed.
fn refuse(stream: tokio::net::UnixStream) {
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = stream.try_write(TOO_MANY_CONNECTIONS.as_bytes());
    // Dropping the stream closes it.
}

/// Serves one connection; `_slot` is its place among [`ServerOptions::max_connections`], given
/// back when the connection ends.
async fn serve_connection(
    stream: tokio::net::UnixStream,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
) {
    let read_timeout = shared.options.read_timeout;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(respond(req, &shared).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        log::debug!("API connection ended: {e}");
    }
}

/// Answers one request; never fails (every failure is an error body).
async fn respond(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let (endpoint, id) = match endpoint_of(&method, &path) {
        Ok(found) => found,
        Err(e) => {
            let mut resp = error_response(&e.error);
            if let Some(v) = e.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
                resp.headers_mut().insert(ALLOW, v);
            }
            return resp;
        }
    };
    log::debug!("API {method} {path}");
    let body = if endpoint.reads_body() {
        read_body(req, shared.options.read_timeout).await
    } else {
        // Bodies of GETs and DELETEs are ignored.
        Ok(Bytes::new())
    };
    let result = match body.and_then(|body| parse_request(endpoint, id, query.as_deref(), &body)) {
        Ok(request) => dispatch(endpoint, request, shared).await,
        Err(e) => Err(e),
    };
    match result.and_then(|reply| serialize(&reply)) {
        Ok(body) => json_response(success_status(endpoint), body),
        Err(e) => error_response(&e),
    }
}

fn success_status(endpoint: Endpoint) -> StatusCode {
    match endpoint.success_status() {
        201 => StatusCode::CREATED,
        _ => StatusCode::OK,
    }
}

/// A request that matches no endpoint: the error, and for a known path with another method
/// the methods it allows (the `Allow` header of the 405).
#[derive(Debug)]
pub struct NoEndpoint {
    /// 404 or 405.
    pub error: ApiError,
    /// The `Allow` header, for a 405.
    pub allow: Option<String>,
}

/// The endpoint `method` on `path` calls, and the checkpoint id in the path if its route has one.
pub fn endpoint_of(method: &str, path: &str) -> Result<(Endpoint, Option<String>), NoEndpoint> {
    let (route, id) = find_route(path).map_err(|error| NoEndpoint { error, allow: None })?;
    match route.methods.iter().find(|(m, _)| *m == method) {
        Some(&(_, endpoint)) => Ok((endpoint, id)),
        None => {
            let allow: Vec<&str> = route.methods.iter().map(|(m, _)| *m).collect();
            let allow = allow.join(", ");
            Err(NoEndpoint {
                error: ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    format!("{method} is not allowed on {path}; use {allow}"),
                ),
                allow: Some(allow),
            })
        }
    }
}

/// Parses a whole request as the server does once the body is read: the endpoint, then the
/// query and body for it. `body` is what the client sent (over [`MAX_BODY_BYTES`] is a 413).
/// This is everything between the HTTP framing (hyper's) and the VMM; the fuzz targets drive it.
pub fn parse_call(
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<(Endpoint, ApiRequest), ApiError> {
    let (endpoint, id) = endpoint_of(method, path).map_err(|e| e.error)?;
    if endpoint.reads_body() && body.len() > MAX_BODY_BYTES {
        return Err(too_large());
    }
    let body = if endpoint.reads_body() { body } else { &[] };
    parse_request(endpoint, id, query, body).map(|request| (endpoint, request))
}

/// The route of `path` and the checkpoint id in it, if its route has one. Routes without an id
/// win over routes with one. A path that fits a route with an id, but whose id cannot be one, is
/// a 404 naming it.
fn find_route(path: &str) -> Result<(&'static Route, Option<String>), ApiError> {
    if let Some(route) = ROUTES
        .iter()
        .find(|r| r.path == path && !r.path.contains(ID_SEGMENT))
    {
        return Ok((route, None));
    }
    let segments: Vec<&str> = path.split('/').collect();
    for route in ROUTES.iter().filter(|r| r.path.contains(ID_SEGMENT)) {
        let pattern: Vec<&str> = route.path.split('/').collect();
        if pattern.len() != segments.len() {
            continue;
        }
        let mut id = None;
        let fits = pattern.iter().zip(&segments).all(|(p, s)| {
            if *p == ID_SEGMENT {
                id = Some(*s);
                true
            } else {
                p == s
            }
        });
        let Some(id) = id.filter(|_| fits) else {
            continue;
        };
        if !valid_checkpoint_id(id) {
            return Err(ApiError::not_found(format!(
                "no checkpoint {id:?}: {}",
                id_grammar(id)
            )));
        }
        return Ok((route, Some(id.to_owned())));
    }
    Err(ApiError::not_found(format!("no route {path}")))
}

/// Why `id` cannot be a checkpoint id, for an error message.
fn id_grammar(id: &str) -> String {
    if id == RESERVED_CHECKPOINT_ID {
        format!("{RESERVED_CHECKPOINT_ID:?} is reserved (POST /v1/checkpoints/revert)")
    } else {
        format!(
            "an id is 1 to {MAX_CHECKPOINT_ID_LEN} characters of A-Z, a-z, 0-9, _ and -, not \
             starting with -"
        )
    }
}

/// Validates the request for `endpoint`; `query` is the URI's query string and `body` the
/// request's body (empty for endpoints that read none).
fn parse_request(
    endpoint: Endpoint,
    id: Option<String>,
    query: Option<&str>,
    body: &[u8],
) -> Result<ApiRequest, ApiError> {
    let id = || id.ok_or_else(|| ApiError::internal(format!("bug: {endpoint:?} without an id")));
    Ok(match endpoint {
        // Bodies of GETs are ignored.
        Endpoint::GetVm => ApiRequest::GetVm,
        Endpoint::GetCheckpointConfig => ApiRequest::GetCheckpointConfig,
        Endpoint::GetGuest => ApiRequest::GetGuest,
        Endpoint::ListCheckpoints => ApiRequest::ListCheckpoints,
        Endpoint::GetCheckpoint => ApiRequest::GetCheckpoint(id()?),
        // Bodies of DELETEs too.
        Endpoint::DeleteCheckpoint => ApiRequest::DeleteCheckpoint(id()?),
        Endpoint::CheckpointChanges => {
            let since = parse_changes_query(query)?;
            ApiRequest::CheckpointChanges { id: id()?, since }
        }
        Endpoint::Lifecycle(action) => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                parse_json::<EmptyBody>(body)?;
            }
            ApiRequest::Lifecycle(action)
        }
        Endpoint::PutCheckpointConfig => {
            let config: CheckpointConfig = parse_json(body)?;
            config.validate().map_err(ApiError::bad_request)?;
            ApiRequest::PutCheckpointConfig(config)
        }
        Endpoint::CreateCheckpoint => {
            let create: CreateCheckpoint = parse_json(body)?;
            create.validate().map_err(ApiError::bad_request)?;
            ApiRequest::CreateCheckpoint(create)
        }
        Endpoint::ApplyCheckpoint => {
            let id = id()?;
            let request = if body.iter().all(u8::is_ascii_whitespace) {
                ApplyCheckpoint::default()
            } else {
                parse_json(body)?
            };
            ApiRequest::ApplyCheckpoint { id, request }
        }
        Endpoint::RevertCheckpoint => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                parse_json::<EmptyBody>(body)?;
            }
            ApiRequest::RevertCheckpoint
        }
        Endpoint::ExportCheckpoint => {
            let id = id()?;
            let request: ExportCheckpoint = parse_json(body)?;
            request.validate().map_err(ApiError::bad_request)?;
            ApiRequest::ExportCheckpoint { id, request }
        }
        Endpoint::GuestExec => {
            let exec: ExecRequest = parse_json(body)?;
            exec.validate().map_err(ApiError::bad_request)?;
            ApiRequest::GuestExec(exec)
        }
    })
}

/// The query of checkpoint changes: `since={id}` or nothing. Pairs are `key=value` separated
/// by `&`, percent-encoded (`+` is a space); empty pairs are skipped. Another key, `since`
/// twice, or a `since` that cannot be a checkpoint id is a 400 naming it.
fn parse_changes_query(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let mut since = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        let value = percent_decode(value)?;
        if key != "since" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {key:?}: changes takes only since"
            )));
        }
        if since.is_some() {
            return Err(ApiError::bad_request(
                "query parameter since is given more than once",
            ));
        }
        if !valid_checkpoint_id(&value) {
            return Err(ApiError::bad_request(format!(
                "since {value:?} cannot be a checkpoint id: {}",
                id_grammar(&value)
            )));
        }
        since = Some(value);
    }
    Ok(since)
}

/// Decodes one `application/x-www-form-urlencoded` component: `%XX` escapes and `+` for a
/// space; the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("malformed query component {text:?}"));
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.bytes();
    while let Some(b) = rest.next() {
        match b {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = [rest.next().ok_or_else(bad)?, rest.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The body of a `POST` that takes none: `{}` (or nothing at all).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// 413 `payload_too_large`.
fn too_large() -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Reads the whole body, at most [`MAX_BODY_BYTES`].
async fn read_body(req: Request<Incoming>, timeout: Duration) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(ApiError::bad_request(format!(
            "request body not received within {} s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses a JSON object into `T`. Checking for an object first matters: serde would otherwise
/// accept a struct written as an array.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body required: a JSON object",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// How long to wait for the VMM's answer to `request`.
fn reply_timeout(request: &ApiRequest, options: &ServerOptions) -> Duration {
    match request {
        ApiRequest::Lifecycle(LifecycleAction::Shutdown) => options.long_reply_timeout,
        ApiRequest::CreateCheckpoint(_)
        | ApiRequest::ApplyCheckpoint { .. }
        | ApiRequest::RevertCheckpoint
        | ApiRequest::DeleteCheckpoint(_)
        | ApiRequest::ExportCheckpoint { .. } => options.checkpoint_reply_timeout,
        ApiRequest::GuestExec(exec) => {
            Duration::from_secs(exec.timeout().into()) + options.reply_timeout
        }
        _ => options.reply_timeout,
    }
}

/// Hands the request to the VMM and waits for its answer, checking it fits the endpoint.
async fn dispatch(endpoint: Endpoint, request: ApiRequest, shared: &Shared) -> ApiResponse {
    let wait = reply_timeout(&request, &shared.options);
    let (call, pending) = ApiCall::new(request);
    (shared.handler)(call);
    let response = match tokio::time::timeout(wait, pending.recv()).await {
        Err(_) => {
            return Err(ApiError::internal(format!(
                "the VMM did not answer within {} s",
                wait.as_secs()
            )))
        }
        Ok(None) => return Err(ApiError::internal("the VMM dropped the request unanswered")),
        Ok(Some(r)) => r,
    };
    match response {
        Ok(reply) if reply_fits(endpoint, &reply) => Ok(reply),
        Ok(reply) => Err(ApiError::internal(format!(
            "bug: the VMM answered {endpoint:?} with {}",
            reply_kind(&reply)
        ))),
        Err(e) if endpoint.handler_errors().contains(&e.code) => Err(e),
        Err(e) => Err(ApiError::internal(format!(
            "bug: the VMM answered {endpoint:?} with an undocumented error: {e}"
        ))),
    }
}

fn reply_fits(endpoint: Endpoint, reply: &ApiReply) -> bool {
    matches!(
        (endpoint, reply),
        (
            Endpoint::GetVm
                | Endpoint::Lifecycle(_)
                | Endpoint::ApplyCheckpoint
                | Endpoint::RevertCheckpoint,
            ApiReply::Vm(_)
        ) | (
            Endpoint::CreateCheckpoint | Endpoint::GetCheckpoint,
            ApiReply::Checkpoint(_)
        ) | (
            Endpoint::ListCheckpoints | Endpoint::DeleteCheckpoint,
            ApiReply::Checkpoints(_)
        ) | (Endpoint::ExportCheckpoint, ApiReply::Export(_))
            | (Endpoint::CheckpointChanges, ApiReply::Changes(_))
            | (
                Endpoint::GetCheckpointConfig | Endpoint::PutCheckpointConfig,
                ApiReply::CheckpointConfig(_)
            )
            | (Endpoint::GetGuest, ApiReply::Guest(_))
            | (Endpoint::GuestExec, ApiReply::Exec(_))
    )
}

fn reply_kind(reply: &ApiReply) -> &'static str {
    match reply {
        ApiReply::Vm(_) => "a VM",
        ApiReply::CheckpointConfig(_) => "a checkpoint config",
        ApiReply::Checkpoint(_) => "a checkpoint",
        ApiReply::Checkpoints(_) => "a checkpoint list",
        ApiReply::Export(_) => "an export",
        ApiReply::Changes(_) => "a change map",
        ApiReply::Guest(_) => "guest info",
        ApiReply::Exec(_) => "an exec result",
    }
}

fn serialize(reply: &ApiReply) -> Result<Vec<u8>, ApiError> {
    match reply {
        ApiReply::Vm(v) => serde_json::to_vec(v),
        ApiReply::CheckpointConfig(c) => serde_json::to_vec(c),
        ApiReply::Checkpoint(c) => serde_json::to_vec(c),
        ApiReply::Checkpoints(l) => serde_json::to_vec(l),
        ApiReply::Export(e) => serde_json::to_vec(e),
        ApiReply::Changes(c) => serde_json::to_vec(c),
        ApiReply::Guest(g) => serde_json::to_vec(g),
        ApiReply::Exec(e) => serde_json::to_vec(e),
    }
    .map_err(|e| ApiError::internal(format!("cannot serialize the answer: {e}")))
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::InvalidState => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::AgentUnreachable | ErrorCode::TooManyConnections => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    if e.code == ErrorCode::Internal {
        log::error!("API: {}", e.message);
    }
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
        },
    };
    // Two strings cannot fail to serialize; fall back to a fixed body all the same.
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| {
        br#"{"error":{"code":"internal","message":"cannot serialize the error"}}"#.to_vec()
    });
    json_response(status_of(e.code), bytes)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_well_formed_http_response() {
        let (head, body) = TOO_MANY_CONNECTIONS.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v["error"]["code"],
            ErrorCode::TooManyConnections.as_str(),
            "the prebuilt refusal names the error code the spec lists"
        );
    }

    /// Sends `GET /v1/vm/checkpoint-config` on `s` and returns the whole answer, or the
    /// error that ended the exchange (a refused connection may be closed before the request).
    fn get_config(s: &mut std::os::unix::net::UnixStream) -> String {
        use std::io::{Read, Write};
        let mut answer = String::new();
        let exchanged = s
            .write_all(
                b"GET /v1/vm/checkpoint-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .and_then(|()| s.read_to_string(&mut answer));
        match exchanged {
            Ok(_) => answer,
            Err(e) => format!("{answer}[{e}]"),
        }
    }

    #[test]
    fn connections_beyond_the_bound_get_503_and_a_freed_slot_serves_again() {
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let handler: ApiHandler = Arc::new(|call: ApiCall| {
            call.reply
                .send(Ok(ApiReply::CheckpointConfig(CheckpointConfig::default())))
        });
        let options = ServerOptions {
            max_connections: 2,
            ..ServerOptions::default()
        };
        let server = ApiServer::start_with(&path, handler, options).unwrap();
        let timeout = Some(Duration::from_secs(10));
        // Two idle clients hold both slots.
        let idle: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // A third is refused, however often it tries; the idle ones are still served.
        for _ in 0..3 {
            let mut extra = UnixStream::connect(&path).unwrap();
            extra.set_read_timeout(timeout).unwrap();
            let answer = get_config(&mut extra);
            // The 503, or (when the server closed it before the request was sent) an error.
            let refused =
                answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections");
            assert!(refused || answer.starts_with('['), "{answer}");
        }
        let mut first = idle.into_iter().next().unwrap();
        first.set_read_timeout(timeout).unwrap();
        let answer = get_config(&mut first);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(first);
        // The slot comes back once the server has seen the connection end.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut next = UnixStream::connect(&path).unwrap();
            next.set_read_timeout(timeout).unwrap();
            let answer = get_config(&mut next);
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the freed slot never served: {answer}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server.shutdown();
    }

    #[test]
    fn routes_are_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(
                ROUTES[i + 1..].iter().all(|b| b.path != a.path),
                "{}",
                a.path
            );
        }
    }

    #[test]
    fn array_for_a_struct_is_rejected() {
        let err = parse_json::<CheckpointConfig>(br#"["production", null]"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn empty_body_for_a_put_is_rejected() {
        assert!(parse_json::<CheckpointConfig>(b"  ").is_err());
    }

    #[test]
    fn exec_waits_its_own_timeout_plus_the_reply_timeout() {
        let opts = ServerOptions::default();
        let req = ApiRequest::GuestExec(ExecRequest {
            argv: vec!["true".into()],
            timeout_s: Some(100),
        });
        assert_eq!(reply_timeout(&req, &opts), Duration::from_secs(130));
    }

    #[test]
    fn mismatched_reply_kind_does_not_fit() {
        let reply = ApiReply::CheckpointConfig(CheckpointConfig::default());
        assert!(!reply_fits(Endpoint::GetVm, &reply));
        assert!(reply_fits(Endpoint::PutCheckpointConfig, &reply));
    }

    #[test]
    fn checkpoint_create_and_apply_wait_the_checkpoint_timeout() {
        let opts = ServerOptions {
            checkpoint_reply_timeout: Duration::from_secs(7),
            ..ServerOptions::default()
        };
        let create = ApiRequest::CreateCheckpoint(CreateCheckpoint::default());
        let apply = ApiRequest::ApplyCheckpoint {
            id: "a".into(),
            request: ApplyCheckpoint::default(),
        };
        assert_eq!(reply_timeout(&create, &opts), Duration::from_secs(7));
        assert_eq!(reply_timeout(&apply, &opts), Duration::from_secs(7));
        assert_eq!(
            reply_timeout(&ApiRequest::ListCheckpoints, &opts),
            opts.reply_timeout
        );
        assert_eq!(
            ServerOptions::default().checkpoint_reply_timeout,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn id_routes_capture_the_id_and_reject_ids_that_cannot_be() {
        let (route, id) = find_route("/v1/checkpoints/ck-1/apply").unwrap();
        assert_eq!(route.path, "/v1/checkpoints/{id}/apply");
        assert_eq!(id.as_deref(), Some("ck-1"));
        let (route, id) = find_route("/v1/checkpoints").unwrap();
        assert_eq!((route.path, id), ("/v1/checkpoints", None));
        for path in [
            "/v1/checkpoints/-x",
            "/v1/checkpoints/",
            "/v1/checkpoints//apply",
            "/v1/checkpoints/a.b/apply",
            "/v1/checkpoints/a%20b",
            "/v1/checkpoints/{id}",
        ] {
            let e = find_route(path).unwrap_err();
            assert_eq!(e.code, ErrorCode::NotFound, "{path}");
            assert!(e.message.starts_with("no checkpoint"), "{path}: {e}");
        }
        let e = find_route("/v1/checkpoints/a/b").unwrap_err();
        assert_eq!(e.message, "no route /v1/checkpoints/a/b");
    }

    #[test]
    fn create_answers_201_and_id_routes_can_answer_404() {
        assert_eq!(
            Endpoint::CreateCheckpoint.statuses(),
            [201, 400, 409, 413, 500, 503]
        );
        assert_eq!(Endpoint::GetCheckpoint.statuses(), [200, 404, 409, 500]);
        assert_eq!(
            Endpoint::ApplyCheckpoint.statuses(),
            [200, 400, 404, 409, 413, 500]
        );
    }

    #[test]
    fn revert_delete_and_export_wait_the_checkpoint_timeout_changes_does_not() {
        let opts = ServerOptions {
            checkpoint_reply_timeout: Duration::from_secs(7),
            ..ServerOptions::default()
        };
        let export = ApiRequest::ExportCheckpoint {
            id: "a".into(),
            request: ExportCheckpoint {
                destination: "/x".into(),
                disk_format: Default::default(),
            },
        };
        for req in [
            ApiRequest::RevertCheckpoint,
            ApiRequest::DeleteCheckpoint("a".into()),
            export,
        ] {
            assert_eq!(
                reply_timeout(&req, &opts),
                Duration::from_secs(7),
                "{req:?}"
            );
        }
        let changes = ApiRequest::CheckpointChanges {
            id: "b".into(),
            since: None,
        };
        assert_eq!(reply_timeout(&changes, &opts), opts.reply_timeout);
    }

    #[test]
    fn revert_is_its_own_route_and_not_an_id() {
        let (route, id) = find_route("/v1/checkpoints/revert").unwrap();
        assert_eq!((route.path, id), ("/v1/checkpoints/revert", None));
        let e = find_route("/v1/checkpoints/revert/export").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("reserved"), "{e}");
        let (route, id) = find_route("/v1/checkpoints/ck-1/changes").unwrap();
        assert_eq!(route.path, "/v1/checkpoints/{id}/changes");
        assert_eq!(id.as_deref(), Some("ck-1"));
    }

    #[test]
    fn changes_query_takes_since_only() {
        assert_eq!(parse_changes_query(None).unwrap(), None);
        assert_eq!(parse_changes_query(Some("")).unwrap(), None);
        assert_eq!(parse_changes_query(Some("&&")).unwrap(), None);
        for (query, since) in [
            ("since=ck-1", "ck-1"),
            ("since=ck%2D1", "ck-1"),
            ("&since=a_B&", "a_B"),
            ("%73ince=a", "a"),
        ] {
            assert_eq!(
                parse_changes_query(Some(query)).unwrap().as_deref(),
                Some(since),
                "{query}"
            );
        }
        for (query, says) in [
            ("sinse=a", "unknown query parameter \"sinse\""),
            ("since=a&limit=3", "unknown query parameter \"limit\""),
            ("Since=a", "unknown query parameter \"Since\""),
            ("since=a&since=b", "more than once"),
            ("since", "since \"\" cannot be a checkpoint id"),
            ("since=", "since \"\" cannot be a checkpoint id"),
            ("since=a.b", "since \"a.b\" cannot be a checkpoint id"),
            ("since=-a", "cannot be a checkpoint id"),
            ("since=a+b", "since \"a b\" cannot be a checkpoint id"),
            ("since=a%2Fb", "since \"a/b\" cannot be a checkpoint id"),
            ("since=revert", "reserved"),
            ("since=a%2", "malformed query component"),
            ("since=a%zz", "malformed query component"),
            ("since=%ff", "malformed query component"),
            ("since=%C3%A9", "since \"é\" cannot be a checkpoint id"),
        ] {
            let e = parse_changes_query(Some(query)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{query}");
            assert!(e.message.contains(says), "{query}: {}", e.message);
        }
        let long = format!("since={}", "a".repeat(MAX_CHECKPOINT_ID_LEN + 1));
        assert!(parse_changes_query(Some(&long)).is_err());
    }

    #[test]
    fn new_checkpoint_endpoints_answer_their_statuses() {
        assert_eq!(
            Endpoint::RevertCheckpoint.statuses(),
            [200, 400, 404, 409, 413, 500]
        );
        assert_eq!(Endpoint::DeleteCheckpoint.statuses(), [200, 404, 409, 500]);
        assert_eq!(
            Endpoint::ExportCheckpoint.statuses(),
            [201, 400, 404, 409, 413, 500]
        );
        assert_eq!(
            Endpoint::CheckpointChanges.statuses(),
            [200, 400, 404, 409, 500]
        );
    }
}
