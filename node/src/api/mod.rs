//! The node's servers: gRPC (the public `Control` API and the `Peer` API) and the HTTP side
//! port (health, readiness, metrics, the web view), and the combined beacon graph.

mod control;
mod http;
mod inspect;
mod peer;

pub use control::{serve, ControlService};
pub use http::serve_http;
pub use inspect::{Inspector, DEFAULT_DEADLINE, MAX_GRAPH_BYTES};
pub use peer::{serve_peer, AgentBeacon, PeerService};
