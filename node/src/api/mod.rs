//! The node's servers: gRPC (the Raft transport and the control API, on one port) and the
//! HTTP side port (health, readiness, metrics).

mod control;
mod http;

pub use control::{serve, ControlService};
pub use http::serve_http;
