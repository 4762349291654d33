//! The node's servers: gRPC (the public `Control` API and the `Peer` API) and the HTTP side
//! port (health, readiness, metrics, the web view), and the combined beacon graph.

mod control;
pub mod convert;
mod http;
mod inspect;
mod logs;
pub(crate) mod metrics;
mod peer;

pub(crate) use control::checked_specs;
pub use control::{public_extras, serve, ControlService, CONTROL_SERVICE, RESTART_WAIT};
pub use http::{serve_agent_http, serve_http};
pub(crate) use inspect::report_from_reply;
pub use inspect::{Inspector, DEFAULT_DEADLINE, MAX_GRAPH_BYTES};
pub(crate) use logs::{kept as kept_logs, sources as log_sources, Ask as LogAsk};
pub use logs::{MAX_INSTANCES as MAX_LOG_INSTANCES, MAX_TAIL as MAX_LOG_TAIL};
pub(crate) use peer::{command_from_json, register_command, reports_command};
pub use peer::{serve_peer, AgentBeacon, PeerService};
