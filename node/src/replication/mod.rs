//! Replication: openraft over gRPC, durable in the node's data directory, with forwarding to
//! the leader, check-quorum, pre-vote and leases. What it replicates is the domain of
//! [`crate::model`] (the log carries its commands); the control loop ([`crate::control`]) and
//! the API servers sit above it.
//!
//! openraft's types stay inside this folder; the rest of the crate uses [`ClusterNode`].

mod election;
mod forward;
pub(crate) mod fuzz;
mod heartbeats;
pub(crate) mod metrics;
mod network;
mod node;
mod proposer;
mod raft_server;
mod store;
mod types;
mod views;

pub use forward::status_from_proto;
pub(crate) use forward::{status_to_proto, to_status};
pub(crate) use heartbeats::Heartbeats;
pub(crate) use network::describe_status;
pub use network::{PeerHealth, Peers};
pub use node::now_ms;
pub use node::{
    check_address, ClusterConfig, ClusterError, ClusterNode, ClusterStatus, LeaseGrant,
    MemberStatus, WriteOutcome, FORWARDED, REQUEST_ID, WRITE_TIMEOUT,
};
pub use raft_server::RaftService;
pub use store::DataDirError;
pub(crate) use store::PROCESS_LEDGER_FILE;
pub(crate) use store::{off_worker, random_u64};
pub use types::TypeConfig;
pub use views::{NodeView, ViewService};
