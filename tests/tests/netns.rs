//! The network-namespace harness itself: links it cuts are cut, links it heals work again,
//! and nothing it created outlives it.

use std::time::Duration;

use mode_tests::netns::NetCluster;

fn namespaces() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_reaches_nobody_until_healed_and_drop_removes_everything() {
    let mut c = NetCluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    assert!(
        c.can_connect(1, 2) && c.can_connect(3, 1),
        "nodes reach each other"
    );
    let prefix = c.network_name().to_string();

    c.partition(&[&[1, 2], &[3]]);
    assert!(!c.can_connect(3, 1), "node 3 still reaches node 1");
    assert!(!c.can_connect(2, 3), "node 2 still reaches node 3");
    assert!(c.can_connect(1, 2), "nodes 1 and 2 are on the same side");
    // The test still reaches the cut-off node, and the majority keeps (or elects) a leader.
    let s = c.status(3, true).await.expect("the test reaches node 3");
    assert_eq!(s.answered_by, 3);
    let majority_leader = c.leader_seen_by(1, Duration::from_secs(10)).await;
    assert!(
        matches!(majority_leader, Some(1 | 2)),
        "the majority {{1, 2}} has leader {majority_leader:?} (before: {leader})\n{}",
        c.logs()
    );

    c.cut_from_test(3, true);
    assert!(c.status(3, true).await.is_err(), "the test reaches node 3");

    c.heal();
    assert!(
        c.can_connect(3, 1) && c.can_connect(2, 3),
        "healed links work"
    );
    c.status(3, true)
        .await
        .expect("the test reaches node 3 again");
    c.wait_leader(Duration::from_secs(20)).await;

    let pids = c.pids_in(3);
    assert!(!pids.is_empty(), "node 3 runs in its namespace");
    drop(c);
    let left: Vec<String> = namespaces()
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&format!("ns={prefix}")),
        "the root link is left behind:\n{links}"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} of node 3 outlived the cluster"
        );
    }
}
