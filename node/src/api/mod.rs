//! The node's servers: gRPC (the Raft transport and the control API, on one port) and the
//! HTTP side port (health, readiness, metrics, the web view), and the combined beacon graph.

mod control;
mod http;
mod inspect;

pub use control::{serve, ControlService};
pub use http::serve_http;
pub use inspect::{Inspector, DEFAULT_DEADLINE, MAX_GRAPH_BYTES};
