//! Batching of client writes on the leader: concurrent writes are committed together as one
//! Raft entry (one fsync per node covers them all), with a few batches in flight at once.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::state::{Batch, CommandResult, Proposal};
use super::types::Raft;

/// Raft entries being committed at once; further writes queue up and form the next batch.
/// Measured on 2 cores: 1-2 in flight commit ~13k writes/s at 128 concurrent clients, 4 about
/// 10k, 16 under 8k (more, smaller entries cost more than they overlap).
const BATCHES_IN_FLIGHT: usize = 2;
/// Upper bound on proposals per entry.
const MAX_BATCH: usize = 1024;

/// Why a proposal was not committed here.
#[derive(Debug, Clone)]
pub(crate) enum Rejected {
    /// This node is not the leader (any more).
    NotLeader,
    /// The proposal was invalid (membership change conflicts).
    Invalid(String),
    /// Raft stopped.
    Fatal(String),
}

pub(crate) type Committed = Result<(CommandResult, u64), Rejected>;

type Waiter = (Proposal, oneshot::Sender<Committed>);

/// Handle to the batching task.
#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl Proposer {
    pub(crate) fn start(raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Commit `proposal` (batched with whatever else is waiting).
    pub(crate) async fn propose(&self, proposal: Proposal) -> Committed {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((proposal, done))
            .map_err(|_| Rejected::Fatal("the proposer has stopped".into()))?;
        wait.await
            .map_err(|_| Rejected::Fatal("the proposer has stopped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot here is what lets the next batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut waiters = vec![first];
        while waiters.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => waiters.push(w),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (proposals, dones): (Vec<Proposal>, Vec<oneshot::Sender<Committed>>) =
                waiters.into_iter().unzip();
            let outcome = raft
                .client_write(Batch {
                    proposals: proposals.into(),
                })
                .await;
            drop(slot);
            match outcome {
                Ok(r) => {
                    let index = r.log_id.index;
                    let mut results = r.data.into_iter();
                    for done in dones {
                        let result = results.next().unwrap_or_default();
                        let _ = done.send(Ok((result, index)));
                    }
                }
                Err(e) => {
                    let rejected = match e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                            Rejected::NotLeader
                        }
                        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                            Rejected::Invalid(e.to_string())
                        }
                        RaftError::Fatal(e) => Rejected::Fatal(e.to_string()),
                    };
                    for done in dones {
                        let _ = done.send(Err(rejected.clone()));
                    }
                }
            }
        });
    }
}
