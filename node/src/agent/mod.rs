//! The agent: one per node. Runs the instances the control plane placed on this node under a
//! per-node supervisor, reports their states, heartbeats; and the service kinds it can run.
//! On a server it talks to the local replica; on an agent-only node to the servers' peer API.

mod health;
mod instances;
pub mod kinds;
mod link;
pub(crate) mod output;
mod wire;

pub(crate) use instances::run;
pub use instances::AgentTimings;
pub use kinds::{InstanceSpec, KillSwitch, Kind, KindRegistry, LeaseDeadline};
pub use link::{agent_incarnation, run_remote, EmbeddedAgent, RemoteAgentConfig, Servers};
pub(crate) use link::{leave_cleanly, register_request, Link, RemoteAgent};
pub(crate) use wire::{report_from_proto, view_from_proto, view_to_proto};
