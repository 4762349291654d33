//! The replicated control plane: openraft over gRPC, durable in the node's data directory.
//!
//! openraft's types stay inside this folder; the rest of the crate uses [`ClusterNode`] and
//! the domain types of [`state`].

mod election;
mod forward;
pub mod limits;
mod metrics;
mod network;
mod node;
mod proposer;
mod raft_server;
mod reconciler;
pub mod spec;
pub mod state;
mod store;
mod types;

pub use forward::status_from_proto;
pub(crate) use forward::{status_to_proto, to_status};
pub(crate) use network::describe_status;
pub use network::{PeerHealth, Peers};
pub use node::{
    check_address, ClusterConfig, ClusterError, ClusterNode, ClusterStatus, MemberStatus,
    WriteOutcome, FORWARDED, REQUEST_ID, WRITE_TIMEOUT,
};
pub use reconciler::{run as run_control_loop, Liveness};
pub use store::DataDirError;
pub(crate) use store::PROCESS_LEDGER_FILE;
pub use types::TypeConfig;
