//! The leader's control loop over the replicated state: failure detection, scheduling, drains,
//! rescheduling and service removal. Built on [`crate::replication`] (which it drives through
//! [`crate::replication::ClusterNode`]) and [`crate::model`].

mod reconciler;

pub use reconciler::{reschedule_at, run as run_control_loop, Liveness};
