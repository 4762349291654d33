//! The agent: one per node. Runs the instances the control plane placed on this node under a
//! per-node supervisor, reports their states, heartbeats; and the service kinds it can run.

mod instances;
pub mod kinds;

pub use instances::{run, AgentTimings};
pub use kinds::{InstanceSpec, KillSwitch, Kind, KindRegistry, LeaseDeadline};
