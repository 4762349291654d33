//! The control plane's domain: service specs, the replicated state and the commands that change
//! it, and the limits that keep both bounded. Pure and deterministic: nothing here knows about
//! Raft, gRPC or the clock.

pub mod limits;
pub mod rollout;
pub mod secret;
pub mod spec;
pub mod state;
