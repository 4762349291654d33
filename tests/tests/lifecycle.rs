//! What running `mode-node` under a service manager or a StatefulSet relies on, with real
//! processes: systemd's readiness protocol (`READY=1` once serving, `STOPPING=1` on the way
//! down, for servers and agents), the peer protocol's version check, and a pod that takes its
//! id from its ordinal and joins through the listed peers when it is not one of them.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::{free_port, peer_client_on, Launcher, Scratch, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

/// Every datagram `socket` receives within `within`, until one contains `want`.
fn hear(socket: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut heard = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = m.contains(want);
                heard.push(m);
                if done {
                    return heard;
                }
            }
            Err(_) => break,
        }
    }
    panic!("never heard '{want}' within {within:?}; heard {heard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_and_agents_tell_systemd_when_they_are_ready_and_when_they_stop() {
    let scratch = Scratch::new("notify");
    let server_sock = scratch.0.join("server.sock");
    let agent_sock = scratch.0.join("agent.sock");
    let server_ears = UnixDatagram::bind(&server_sock).unwrap();
    let agent_ears = UnixDatagram::bind(&agent_sock).unwrap();
    let mut launcher = Launcher::mode_node();
    launcher
        .env
        .push(("NOTIFY_SOCKET".into(), server_sock.display().to_string()));
    let mut c = TestCluster::start_with(launcher, 1, &[]);
    let heard = hear(&server_ears, "READY=1", ELECTION);
    // Ready means serving: the public API answers at once.
    let status = c
        .status(1, true)
        .await
        .expect("a ready node serves its API");
    assert!(status.has_leader, "ready before it had a leader: {heard:?}");
    assert!(
        heard.last().unwrap().contains("STATUS=server 1 serving"),
        "{heard:?}"
    );

    let agent = c.add_agent(2, vec![]);
    agent.set_env("NOTIFY_SOCKET", &agent_sock.display().to_string());
    agent.start();
    let heard = hear(&agent_ears, "READY=1", ELECTION);
    assert!(heard.last().unwrap().contains("agent 2"), "{heard:?}");
    c.wait_registered(2).await;

    c.node(2).signal("TERM");
    hear(&agent_ears, "STOPPING=1", Duration::from_secs(10));
    c.node(1).signal("TERM");
    hear(&server_ears, "STOPPING=1", Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_another_protocol_version_is_refused_and_told_what_to_do() {
    let c = TestCluster::start(1, &[]);
    c.wait_leader(ELECTION).await;
    let address = c.nodes[&1].peer_address();
    let call = |agent: &'static str| {
        let address = address.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .user_agent(agent)
                .unwrap()
                .connect()
                .await
                .unwrap();
            peer_client_on(channel)
                .query(pb::QueryRequest {
                    query: "nodes".into(),
                    stale: true,
                })
                .await
        }
    };
    let refused = call("mode-node/9.0.0 mode-protocol/99").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("peer protocol 99")
            && refused.message().contains("newer release"),
        "{}",
        refused.message()
    );
    let old = call("mode-node/0.0.1 mode-protocol/0").await.unwrap_err();
    assert!(
        old.message().contains("one release at a time"),
        "{}",
        old.message()
    );
    // This build's own mark is accepted.
    call("mode-node/0.1.0 mode-protocol/1")
        .await
        .expect("the current protocol is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_past_the_first_replicas_takes_its_id_from_its_ordinal_and_joins() {
    let mut c = TestCluster::start(3, &[]);
    c.wait_leader(ELECTION).await;
    let peers = c.peers().to_string();
    // Like pod mode-3 of a StatefulSet whose manifest lists the first three pods.
    let node = c.add_node(4, free_port(), vec!["--peers".into(), peers.clone()]);
    node.set_env("HOSTNAME", "mode-3");
    let peer = format!("127.0.0.1:{}", node.peer_port);
    let args = node.args_mut();
    let at = args.iter().position(|a| a == "--id").unwrap();
    args.drain(at..at + 2);
    args.extend(["--id-from-ordinal".into(), "1".into()]);
    args.push("--join-if-new".into());
    args.extend(["--advertise-peer".into(), peer]);
    node.start();
    let deadline = Instant::now() + ELECTION;
    loop {
        let members = c
            .status(1, true)
            .await
            .map(|s| s.members.len())
            .unwrap_or(0);
        if members == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never joined\n{}",
            c.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.node(4).logs().contains("joined the cluster through"));

    // Without --join-if-new the next pod is refused: a mistyped id must not join silently.
    let peers = c.peers().to_string();
    let other = c.add_node(5, free_port(), vec!["--peers".into(), peers]);
    other.set_env("HOSTNAME", "mode-4");
    let args = other.args_mut();
    let at = args.iter().position(|a| a == "--id").unwrap();
    args.drain(at..at + 2);
    args.extend(["--id-from-ordinal".into(), "1".into()]);
    other.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while other.exited().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(other.exited(), Some(Some(2)), "{}", other.logs());
    assert!(
        other
            .logs()
            .contains("--peers has no entry for this node (--id 5)"),
        "{}",
        other.logs()
    );
}
