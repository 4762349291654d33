//! The gRPC servers: the node's Raft transport and the control API, on one port.

mod control;

pub use control::{serve, ControlService};
