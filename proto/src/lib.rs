//! mode's gRPC API, package `mode.v1`: the Raft transport between nodes and the control API
//! used by `modectl` and by nodes forwarding to the leader.

#![allow(missing_docs, clippy::all)]

/// The protocol version nodes exchange on every Raft call; a node refuses a peer speaking
/// another one with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod v1 {
    tonic::include_proto!("mode.v1");
}
