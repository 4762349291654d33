//! # mode
//!
//! Programs built from services that start, stop, restart and are supervised, on tokio — a
//! Rust rebuild of Python's `mode` — and (in later layers) a cluster orchestrator for them.
//!
//! * [`service`]: the framework (services, tasks, timers, supervisors, signals, beacon).
//! * [`worker`]: run a root service as a program (logging, OS signals, exit codes).
//! * [`model`]: the control plane's domain: specs, the replicated state, its commands and limits.
//! * [`replication`]: Raft (openraft over gRPC, redb on disk), forwarding, leases.
//! * [`control`]: the leader's control loop (failure detection, scheduling, drains).
//! * [`api`]: the gRPC servers (Raft transport and control API) and the HTTP side port.
//! * [`graph`]: the combined beacon graph of a cluster and its renderings.
//! * [`telemetry`]: OpenTelemetry traces (OTLP) and trace-context propagation.

#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod control;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod model;
pub mod protocol;
pub mod replication;
pub mod schedule;
pub mod security;
pub mod service;
pub mod telemetry;
pub mod worker;

pub use daemon::Node;
pub use service::{Context, Service, ServiceHandle, ServiceState};
pub use worker::Worker;

/// The README's code compiles (checked by `cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
