//! Elections with a pre-vote: openraft's own election timer is off, and this node campaigns
//! only after a majority of the voters said they would vote for it — because they, too, have
//! not heard from a leader for the leader lease, and its log is at least as complete as
//! theirs. A node that was cut off therefore never raises the term while it is away, and
//! does not depose a healthy leader when it comes back (Raft's pre-vote, thesis §9.6).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::network::Network;
use super::types::{LogId, Raft};
use crate::service::lock;

/// When this node last heard from a leader (an AppendEntries or snapshot it accepted).
#[derive(Clone)]
pub(crate) struct LeaderContact(Arc<Mutex<Instant>>);

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact(Arc::new(Mutex::new(Instant::now())))
    }
}

impl LeaderContact {
    pub(crate) fn heard(&self) {
        *lock(&self.0) = Instant::now();
    }

    pub(crate) fn since(&self) -> Duration {
        lock(&self.0).elapsed()
    }
}

/// "Would you vote for me?"
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PreVoteRequest {
    /// The would-be candidate.
    pub(crate) candidate: u64,
    /// The last entry of its log.
    pub(crate) last_log_id: Option<LogId>,
}

/// The answer, with why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PreVoteResponse {
    pub(crate) granted: bool,
    #[serde(default)]
    pub(crate) reason: String,
}

/// What answering a pre-vote needs.
#[derive(Clone)]
pub(crate) struct PreVoter {
    pub(crate) raft: Raft,
    pub(crate) contact: LeaderContact,
    /// The leader lease: a node that heard from a leader this recently would refuse a vote.
    pub(crate) lease: Duration,
}

impl PreVoter {
    /// Grant when this node, too, has not heard from a leader for the lease (and is not a
    /// leader itself), and the candidate's log is at least as complete as its own.
    pub(crate) fn answer(&self, req: &PreVoteRequest) -> PreVoteResponse {
        let m = self.raft.metrics().borrow().clone();
        let deny = |reason: String| PreVoteResponse {
            granted: false,
            reason,
        };
        if m.state == ServerState::Leader {
            return deny(format!("node {} leads", m.id));
        }
        let since = self.contact.since();
        if m.current_leader.is_some() && since < self.lease {
            return deny(format!(
                "node {} heard from leader {} {} ms ago",
                m.id,
                m.current_leader.unwrap_or(0),
                since.as_millis()
            ));
        }
        let my_last = last_log(&self.raft);
        if req.last_log_id < my_last {
            return deny(format!(
                "node {}'s log ({my_last:?}) is ahead of the candidate's ({:?})",
                m.id, req.last_log_id
            ));
        }
        // Give the candidate a whole election timeout to win before campaigning here too: two
        // nodes that time out together would otherwise each grant the other, both campaign,
        // and the loser's higher term would depose the winner (again and again).
        self.contact.heard();
        PreVoteResponse {
            granted: true,
            reason: String::new(),
        }
    }
}

/// This node's last log id (the data metrics have it with its term).
fn last_log(raft: &Raft) -> Option<LogId> {
    raft.data_metrics().borrow().last_log
}

/// Campaign when no leader was heard from for the lease plus a random election timeout, and a
/// pre-vote round found a majority willing. Runs until Raft stops.
pub(crate) fn drive(
    raft: Raft,
    network: Network,
    contact: LeaderContact,
    election_timeout: (Duration, Duration),
) {
    tokio::spawn(async move {
        let (emin, emax) = election_timeout;
        let mut metrics = raft.metrics();
        loop {
            let spread = (emax.saturating_sub(emin)).as_millis() as u64;
            let timeout =
                emax + emin + Duration::from_millis(super::store::random_u64() % spread.max(1));
            loop {
                tokio::select! {
                    changed = metrics.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                if contact.since() >= timeout {
                    break;
                }
            }
            let m = metrics.borrow().clone();
            let membership = m.membership_config.membership().clone();
            let voters: Vec<u64> = membership.voter_ids().collect();
            if m.state == ServerState::Leader || !voters.contains(&m.id) {
                contact.heard();
                continue;
            }
            let others: Vec<(u64, String)> = voters
                .iter()
                .filter(|v| **v != m.id)
                .filter_map(|v| membership.get_node(v).map(|n| (*v, n.addr.clone())))
                .collect();
            let req = PreVoteRequest {
                candidate: m.id,
                last_log_id: last_log(&raft),
            };
            let mut asks = tokio::task::JoinSet::new();
            for (peer, addr) in &others {
                let caller = network.caller_for(*peer, addr);
                let req = req.clone();
                let peer = *peer;
                asks.spawn(async move { (peer, caller.pre_vote(&req, emin).await) });
            }
            let mut granted = 1; // this node's own
            let mut refusals = Vec::new();
            while let Some(done) = asks.join_next().await {
                match done {
                    Ok((_, Ok(r))) if r.granted => granted += 1,
                    Ok((peer, Ok(r))) => refusals.push(format!("node {peer}: {}", r.reason)),
                    Ok((peer, Err(e))) => refusals.push(format!("node {peer}: {e}")),
                    Err(_) => {}
                }
            }
            // Heard from a leader meanwhile, or granted another candidate's pre-vote: let it be.
            let still_leaderless = contact.since() >= timeout;
            if granted * 2 > voters.len() && still_leaderless {
                tracing::info!(
                    "no leader heard from for {} ms; {granted} of {} voters would vote for this node: campaigning",
                    timeout.as_millis(),
                    voters.len()
                );
                if raft.trigger().elect().await.is_err() {
                    return;
                }
            } else if still_leaderless {
                tracing::debug!(
                    "pre-vote: {granted} of {} voters (not a majority): {}",
                    voters.len(),
                    refusals.join("; ")
                );
            }
            // Wait a whole (new, random) timeout before trying again.
            contact.heard();
        }
    });
}
