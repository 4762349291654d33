//! The peer protocol's version, and which mixes of versions may talk during a rolling upgrade.
//!
//! Every call between nodes (Raft, forwarding, agents' registrations, heartbeats and
//! placement watches) carries `mode-protocol/OLDEST-CURRENT` in its `user-agent`: the range of
//! versions the calling build understands. A node accepts a call when that range overlaps its
//! own ([`OLDEST_PEER_PROTOCOL`]`..=`[`PEER_PROTOCOL`]) and refuses it otherwise with
//! `FAILED_PRECONDITION`, naming both ranges and which side to upgrade. A release that changes
//! what nodes say to each other raises [`PEER_PROTOCOL`] and keeps understanding the previous
//! version (its [`OLDEST_PEER_PROTOCOL`] stays one behind) for at least one release: a cluster
//! then upgrades one node at a time from one release to the next, old and new nodes accepting
//! each other both ways; skipping a release is refused at the first call rather than misread
//! later. Calls without the mark (tools such as grpcurl, builds from before it existed) count
//! as protocol 1. The public API is versioned by its package (`mode.v1`): within it, fields and
//! RPCs are only added, never changed or removed.

use tonic::Status;

/// The newest version this build speaks.
pub const PEER_PROTOCOL: u32 = 1;

/// The oldest version this build still understands.
pub const OLDEST_PEER_PROTOCOL: u32 = 1;

const MARK: &str = "mode-protocol/";

/// The `user-agent` this build's peer calls carry.
pub fn user_agent() -> String {
    format!(
        "mode-node/{} {MARK}{OLDEST_PEER_PROTOCOL}-{PEER_PROTOCOL}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The range of versions a call's `user-agent` claims (`N` alone is `N-N`; no mark is 1-1).
pub fn claimed(user_agent: Option<&str>) -> Result<(u32, u32), String> {
    let Some(mark) = user_agent
        .into_iter()
        .flat_map(str::split_ascii_whitespace)
        .find_map(|token| token.strip_prefix(MARK))
    else {
        return Ok((1, 1));
    };
    let bad = || format!("the caller's protocol versions '{mark}' are not N or OLDEST-NEWEST");
    let (low, high) = mark.split_once('-').unwrap_or((mark, mark));
    let (low, high): (u32, u32) = (
        low.parse().map_err(|_| bad())?,
        high.parse().map_err(|_| bad())?,
    );
    if low > high {
        return Err(bad());
    }
    Ok((low, high))
}

/// Whether builds understanding `theirs` and `ours` (OLDEST, NEWEST) can talk, or why not.
fn compatible(theirs: (u32, u32), ours: (u32, u32)) -> Result<(), String> {
    if theirs.0.max(ours.0) <= theirs.1.min(ours.1) {
        return Ok(());
    }
    let what = if theirs.0 > ours.1 {
        "a newer release than this node can talk to: upgrade this node first, or roll the upgrade back"
    } else {
        "a release too old to mix with this one: upgrade one release at a time"
    };
    Err(format!(
        "the calling node speaks peer protocol {}..={}, {what}; this node speaks {}..={}",
        theirs.0, theirs.1, ours.0, ours.1
    ))
}

/// Accept a call from a peer whose `user-agent` is this, or say why not.
pub fn check_peer(user_agent: Option<&str>) -> Result<(), Status> {
    let theirs = claimed(user_agent).map_err(Status::invalid_argument)?;
    compatible(theirs, (OLDEST_PEER_PROTOCOL, PEER_PROTOCOL)).map_err(Status::failed_precondition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_accepts_itself_and_unmarked_callers() {
        assert_eq!(
            claimed(Some(&user_agent())).unwrap(),
            (OLDEST_PEER_PROTOCOL, PEER_PROTOCOL)
        );
        assert!(check_peer(Some(&format!("{} tonic/0.14", user_agent()))).is_ok());
        assert!(
            check_peer(None).is_ok(),
            "unmarked calls count as protocol 1"
        );
        assert!(check_peer(Some("grpcurl/1.9 grpc-go/1.6")).is_ok());
        let junk = check_peer(Some(&format!("{MARK}x"))).unwrap_err();
        assert_eq!(junk.code(), tonic::Code::InvalidArgument);
        assert!(check_peer(Some(&format!("{MARK}3-2"))).is_err());
    }

    #[test]
    fn a_rolling_upgrade_mixes_neighbouring_releases_both_ways_and_refuses_a_skip() {
        // Release R speaks 1..=1, R+1 speaks 1..=2 (it raised the version, kept the old),
        // R+2 speaks 2..=3.
        let (r, r1, r2) = ((1, 1), (1, 2), (2, 3));
        assert!(compatible(r, r1).is_ok() && compatible(r1, r).is_ok());
        assert!(compatible(r1, r2).is_ok() && compatible(r2, r1).is_ok());
        let newer = compatible(r2, r).unwrap_err();
        assert!(newer.contains("newer release"), "{newer}");
        let older = compatible(r, r2).unwrap_err();
        assert!(older.contains("one release at a time"), "{older}");
        // A bare version is a range of one.
        assert_eq!(claimed(Some(&format!("{MARK}7"))).unwrap(), (7, 7));
    }
}
