//! The peer protocol's version, and which mixes of versions may talk during a rolling upgrade.
//!
//! Every call between nodes (Raft, forwarding, agents' registrations, heartbeats and
//! placement watches) carries `mode-protocol/N` in its `user-agent`. A node accepts calls
//! from peers speaking any version in [`OLDEST_PEER_PROTOCOL`]`..=`[`PEER_PROTOCOL`] and refuses
//! the rest with `FAILED_PRECONDITION`, naming both versions. A release that changes what nodes
//! say to each other raises [`PEER_PROTOCOL`] and keeps accepting the previous version for at
//! least one release, so a cluster upgrades one node at a time from one release to the next;
//! skipping a protocol version is refused at the first call rather than misread later.
//! Calls without the mark (tools such as grpcurl, builds from before it existed) count as
//! protocol 1. The public API is versioned by its package (`mode.v1`): within it, fields and
//! RPCs are only added, never changed or removed.

use tonic::Status;

/// The version this build speaks.
pub const PEER_PROTOCOL: u32 = 1;

/// The oldest version this build still accepts from peers.
pub const OLDEST_PEER_PROTOCOL: u32 = 1;

const MARK: &str = "mode-protocol/";

/// The `user-agent` this build's peer calls carry.
pub fn user_agent() -> String {
    format!(
        "mode-node/{} {MARK}{PEER_PROTOCOL}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The protocol version a call's `user-agent` claims (1 when it claims none).
pub fn claimed(user_agent: Option<&str>) -> Result<u32, String> {
    let Some(mark) = user_agent
        .into_iter()
        .flat_map(str::split_ascii_whitespace)
        .find_map(|token| token.strip_prefix(MARK))
    else {
        return Ok(1);
    };
    mark.parse()
        .map_err(|_| format!("the caller's protocol version '{mark}' is not a number"))
}

/// Accept a call from a peer whose `user-agent` is this, or say why not.
pub fn check_peer(user_agent: Option<&str>) -> Result<(), Status> {
    let theirs = claimed(user_agent).map_err(Status::invalid_argument)?;
    if (OLDEST_PEER_PROTOCOL..=PEER_PROTOCOL).contains(&theirs) {
        return Ok(());
    }
    let what = if theirs > PEER_PROTOCOL {
        "a newer release: upgrade this node first, or roll the upgrade back"
    } else {
        "a release too old to mix with this one: upgrade one release at a time"
    };
    Err(Status::failed_precondition(format!(
        "the calling node speaks peer protocol {theirs}, {what}; this node ({}) speaks {PEER_PROTOCOL} and accepts {OLDEST_PEER_PROTOCOL} to {PEER_PROTOCOL}",
        env!("CARGO_PKG_VERSION")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_within_the_window_are_accepted_and_others_told_what_to_do() {
        assert_eq!(claimed(Some(&user_agent())).unwrap(), PEER_PROTOCOL);
        assert!(check_peer(Some(&format!("{} tonic/0.14", user_agent()))).is_ok());
        assert!(
            check_peer(None).is_ok(),
            "unmarked calls count as protocol 1"
        );
        assert!(check_peer(Some("grpcurl/1.9 grpc-go/1.6")).is_ok());

        let newer =
            check_peer(Some(&format!("mode-node/9.0 {MARK}{}", PEER_PROTOCOL + 1))).unwrap_err();
        assert_eq!(newer.code(), tonic::Code::FailedPrecondition);
        assert!(newer.message().contains("newer release"), "{newer}");
        let older = check_peer(Some(&format!("{MARK}0"))).unwrap_err();
        assert!(older.message().contains("one release at a time"), "{older}");
        let junk = check_peer(Some(&format!("{MARK}x"))).unwrap_err();
        assert_eq!(junk.code(), tonic::Code::InvalidArgument);
    }
}
