//! Strata's HTTP/JSON API on a Unix socket: the request and response types ([`types`]), what the
//! server hands the VMM ([`call`]), the server ([`server`]), the client ([`client`]) and
//! `strata ctl` ([`ctl`]). `openapi.yaml` in this crate describes the same API; a test keeps the
//! two in step.
//!
//! The VMM starts an [`ApiServer`] with a handler that forwards each [`ApiCall`] into its control
//! loop and answers it there; see [`server`] for the protocol step by step.

pub mod call;
pub mod client;
pub mod ctl;
pub mod server;
pub mod socket;
pub mod types;

pub use call::{
    ApiCall, ApiError, ApiHandler, ApiReply, ApiRequest, ApiResponse, ErrorCode, LifecycleAction,
    PendingReply, Responder,
};
pub use client::{Client, ClientError};
pub use ctl::CtlArgs;
pub use server::{ApiServer, ServerError, ServerOptions};
