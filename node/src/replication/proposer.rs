//! Batching of client writes on the leader: concurrent writes are committed together as one
//! Raft entry (one fsync per node covers them all), with a few batches in flight at once, each
//! entry at most [`MAX_ENTRY_BYTES`] and each write at most
//! [`MAX_WRITE_BYTES`](crate::model::limits::MAX_WRITE_BYTES).

use std::sync::Arc;

use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::types::Raft;
use crate::model::limits::{check_write_bytes, json_len, MAX_ENTRY_BYTES};
use crate::model::state::{Batch, CommandResult, Proposal};

/// Raft entries being committed at once; further writes queue up and form the next batch.
/// Measured on 2 cores: 1-2 in flight commit ~13k writes/s at 128 concurrent clients, 4 about
/// 10k, 16 under 8k (more, smaller entries cost more than they overlap).
const BATCHES_IN_FLIGHT: usize = 2;
/// Upper bound on proposals per entry (the bytes are bounded by [`MAX_ENTRY_BYTES`]).
const MAX_BATCH: usize = 1024;

/// Why a proposal was not committed here.
#[derive(Debug, Clone)]
pub(crate) enum Rejected {
    /// This node is not the leader (any more).
    NotLeader,
    /// The proposal was invalid (membership change conflicts, over the write limit).
    Invalid(String),
    /// Raft stopped.
    Fatal(String),
}

pub(crate) type Committed = Result<(CommandResult, u64), Rejected>;

struct Waiter {
    proposal: Proposal,
    /// Its size as JSON.
    bytes: usize,
    done: oneshot::Sender<Committed>,
}

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

    /// Commit `proposal` (batched with whatever else is waiting). Proposals queued one after
    /// the other are committed in that order. One over
    /// [`MAX_WRITE_BYTES`](crate::model::limits::MAX_WRITE_BYTES) is refused here,
    /// before it costs anything.
    pub(crate) async fn propose(&self, proposal: Proposal) -> Committed {
        let bytes = json_len(&proposal);
        check_write_bytes(bytes).map_err(|e| {
            Rejected::Invalid(format!(
                "{e}: send less in one write (a spec's config is at most {} KiB)",
                crate::model::limits::MAX_CONFIG_BYTES >> 10
            ))
        })?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Waiter {
                proposal,
                bytes,
                done,
            })
            .map_err(|_| Rejected::Fatal("the proposer has stopped".into()))?;
        wait.await
            .map_err(|_| Rejected::Fatal("the proposer has stopped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // A write that did not fit the previous entry starts the next one.
    let mut carried: Option<Waiter> = None;
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        // Waiting for a slot here is what lets the next batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.bytes;
        let mut waiters = vec![first];
        while waiters.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) if bytes + w.bytes > MAX_ENTRY_BYTES => {
                    carried = Some(w);
                    break;
                }
                Ok(w) => {
                    bytes += w.bytes;
                    waiters.push(w);
                }
                Err(_) => break,
            }
        }
        let (proposals, dones): (Vec<Proposal>, Vec<oneshot::Sender<Committed>>) =
            waiters.into_iter().map(|w| (w.proposal, w.done)).unzip();
        // Submitted from this loop, not from the tasks below, so that entries are appended in
        // the order their writes arrived (a placement before the events that describe it).
        let submitted = raft
            .client_write_ff(Batch {
                proposals: proposals.into(),
            })
            .await;
        let receiver = match submitted {
            Ok(r) => r,
            Err(e) => {
                let rejected = Rejected::Fatal(e.to_string());
                for done in dones {
                    let _ = done.send(Err(rejected.clone()));
                }
                continue;
            }
        };
        tokio::spawn(async move {
            let outcome = receiver.await;
            drop(slot);
            match outcome {
                Ok(Ok(r)) => {
                    let index = r.log_id.index;
                    let mut results = r.data.into_iter();
                    for done in dones {
                        let result = results.next().unwrap_or_default();
                        let _ = done.send(Ok((result, index)));
                    }
                }
                Ok(Err(e)) => {
                    let rejected = match e {
                        ClientWriteError::ForwardToLeader(_) => Rejected::NotLeader,
                        ClientWriteError::ChangeMembershipError(e) => {
                            Rejected::Invalid(e.to_string())
                        }
                    };
                    for done in dones {
                        let _ = done.send(Err(rejected.clone()));
                    }
                }
                Err(_) => {
                    let rejected = Rejected::Fatal("raft stopped before answering".into());
                    for done in dones {
                        let _ = done.send(Err(rejected.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::limits::MAX_WRITE_BYTES;
    use crate::model::state::Command;

    #[tokio::test]
    async fn a_write_over_the_limit_is_refused_before_it_is_queued() {
        // No Raft behind it: the check must answer without one.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let proposer = Proposer { tx };
        let proposal = Proposal {
            at_ms: 0,
            trace: None,
            request_id: None,
            by: None,
            command: Command::RecordEvent {
                kind: "k".into(),
                message: "m".repeat(MAX_WRITE_BYTES),
                service: None,
                node: None,
            },
        };
        let Err(Rejected::Invalid(e)) = proposer.propose(proposal).await else {
            panic!("refused as invalid")
        };
        assert!(
            e.starts_with("write 1048") && e.contains("is over the limit of 1048576 bytes"),
            "{e}"
        );
        assert!(rx.try_recv().is_err(), "nothing queued");
    }
}
