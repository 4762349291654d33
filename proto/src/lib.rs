//! mode's gRPC API, package `mode.v1`: the public `Control` API (`modectl`, scripts,
//! `grpcurl`) and the `Peer` API between nodes (Raft, forwarding, agents, beacons).

#![allow(missing_docs, clippy::all)]

/// The protocol version nodes exchange on every Raft call; a node refuses a peer speaking
/// another one with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

pub use prost_types;

pub mod v1 {
    tonic::include_proto!("mode.v1");
}

/// The encoded `FileDescriptorSet` of `mode.v1` (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mode_descriptor.bin"));
