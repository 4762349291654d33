//! Nobody gets in who does not belong (issue 12), with real processes: a 3-server cluster and
//! an agent-only node under mutual TLS. Clients are refused without credentials, with a
//! certificate of another CA, an expired certificate or a revoked token; roles limit what
//! each client may do, and events name who made a change; a node's certificate speaks only
//! for that node; forged Raft messages from a node that is not a member are refused and
//! change nothing, with TLS and without it.

use std::time::{Duration, SystemTime};

use mode::model::state::{Batch, Command, Proposal};
use mode::replication::TypeConfig;
use mode::security::pki::Validity;
use mode_proto::v1 as pb;
use mode_tests::{free_port, peer_client_on, TestCluster, TlsMaterial, Who};

const ELECTION: Duration = Duration::from_secs(20);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run modectl against node 1 with exactly these credential flags.
fn modectl_with(c: &TestCluster, flags: &[String], args: &[&str]) -> std::process::Output {
    modectl_at(c, 1, flags, args)
}

/// Run modectl against node `via` with exactly these credential flags.
fn modectl_at(c: &TestCluster, via: u64, flags: &[String], args: &[&str]) -> std::process::Output {
    std::process::Command::new(mode_tests::binary("modectl"))
        .env_remove("MODE_TOKEN")
        .env_remove("MODE_CA")
        .args(flags)
        .arg("--endpoint")
        .arg(c.nodes[&via].address())
        .args(args)
        .output()
        .expect("run modectl")
}

/// modectl's flags trusting `tls`'s CA and presenting the certificate at `cert`/`key`.
fn with_cert(tls: &TlsMaterial, cert: &std::path::Path, key: &std::path::Path) -> Vec<String> {
    let mut flags = tls.modectl_flags(None);
    flags.extend([
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]);
    flags
}

fn spec_file(c: &TestCluster, name: &str) -> String {
    let path = c.scratch.0.join(format!("{name}.yaml"));
    std::fs::write(&path, format!("name: {name}\nkind: ticker\nreplicas: 1\n")).unwrap();
    path.display().to_string()
}

async fn spec_names(c: &TestCluster, via: u64) -> Vec<String> {
    let mut client = c.client(via).await;
    let r = client
        .list_services(pb::ListServicesRequest {
            stale: true,
            summary: false,
        })
        .await
        .expect("list services")
        .into_inner();
    r.services
        .into_iter()
        .filter_map(|s| s.spec.map(|s| s.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_need_credentials_and_a_role_that_allows_the_call() {
    let mut c = TestCluster::start_tls(3, &[]);
    c.wait_leader(ELECTION).await;
    // An agent-only node, also with its node certificate.
    let servers: Vec<String> = (1..=3).map(|i| c.nodes[&i].peer_address()).collect();
    let mut agent_args = vec![
        "--role".to_string(),
        "agent".to_string(),
        "--servers".to_string(),
        servers.join(","),
    ];
    agent_args.extend(c.tls.as_ref().unwrap().node_flags(4));
    c.add_node(4, free_port(), agent_args).start();
    c.wait_registered(4).await;
    let tls = c.tls.as_ref().unwrap();

    // Plaintext to a TLS listener: refused, saying what to do.
    let o = modectl_with(&c, &[], &["node", "ls"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("accepts only TLS"), "{}", stderr(&o));

    // TLS without a client certificate or token.
    let o = modectl_with(&c, &tls.modectl_flags(None), &["node", "ls"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("no credentials"), "{}", stderr(&o));

    // A client certificate from another CA: the handshake fails, nothing is answered.
    let other = TlsMaterial::new(&c.scratch.0.join("other-ca"));
    let (cert, key) = other.cert(&Who::admin());
    let flags = with_cert(tls, &cert, &key);
    let o = modectl_with(
        &c,
        &flags,
        &["svc", "apply", "-f", &spec_file(&c, "wrong-ca")],
    );
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    // And a client that trusts another CA does not accept the node's certificate.
    let o = modectl_with(
        &c,
        &other.modectl_flags(Some(&Who::admin())),
        &["node", "ls"],
    );
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stderr(&o).contains("CA"), "{}", stderr(&o));

    // An expired client certificate (of the right CA).
    let (cert, key) = (tls.dir.join("expired.pem"), tls.dir.join("expired-key.pem"));
    let now = SystemTime::now();
    tls.write(
        &Who::Client("late".into(), "admin".into()),
        Validity {
            not_before: now - Duration::from_secs(2 * 86_400),
            not_after: now - Duration::from_secs(86_400),
        },
        &cert,
        &key,
    );
    let flags = with_cert(tls, &cert, &key);
    let o = modectl_with(
        &c,
        &flags,
        &["svc", "apply", "-f", &spec_file(&c, "expired")],
    );
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));

    // A viewer reads but cannot write.
    let viewer = tls.modectl_flags(Some(&Who::Client("vera".into(), "viewer".into())));
    let o = modectl_with(&c, &viewer, &["node", "ls"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = modectl_with(
        &c,
        &viewer,
        &["svc", "apply", "-f", &spec_file(&c, "by-viewer")],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("needs role operator"), "{}", stderr(&o));

    // An operator changes services but not membership.
    let operator = tls.modectl_flags(Some(&Who::Client("olga".into(), "operator".into())));
    let o = modectl_with(
        &c,
        &operator,
        &["svc", "apply", "-f", &spec_file(&c, "by-operator")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = modectl_with(&c, &operator, &["node", "rm", "3"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("needs role admin"), "{}", stderr(&o));
    let o = modectl_with(
        &c,
        &operator,
        &["token", "create", "--name", "x", "--role", "admin"],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));

    // Tokens: made by an admin, shown once, refused once revoked.
    let admin = tls.modectl_flags(Some(&Who::admin()));
    let o = modectl_with(
        &c,
        &admin,
        &["token", "create", "--name", "ci", "--role", "operator"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let token = stdout(&o).trim().to_string();
    assert!(token.starts_with("mode-"), "{token}");
    let mut with_token = tls.modectl_flags(None);
    with_token.extend(["--token".to_string(), token.clone()]);
    let o = modectl_with(
        &c,
        &with_token,
        &["svc", "apply", "-f", &spec_file(&c, "by-token")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = modectl_with(&c, &admin, &["token", "ls", "-o", "json"]);
    let listed = stdout(&o);
    assert!(
        listed.contains("\"ci\"") && !listed.contains(&token),
        "{listed}"
    );
    let id = token.split('-').nth(1).unwrap().to_string();
    let o = modectl_with(&c, &admin, &["token", "revoke", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Revoked on every server once applied there: ask each.
    for via in 1..=3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let o = modectl_at(&c, via, &with_token, &["whoami"]);
            if o.status.code() == Some(8) {
                assert!(stderr(&o).contains("unknown or revoked"), "{}", stderr(&o));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "token still works on node {via}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Secret values: read back by operators and admins, hidden from viewers.
    let path = c.scratch.0.join("db.yaml");
    std::fs::write(
        &path,
        "name: db\nkind: ticker\nreplicas: 1\nsecrets: {DB_PASSWORD: hunter2}\n",
    )
    .unwrap();
    let o = modectl_with(
        &c,
        &operator,
        &["svc", "apply", "-f", &path.display().to_string()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = modectl_with(&c, &operator, &["svc", "get", "db", "-o", "json"]);
    assert!(stdout(&o).contains("hunter2"), "{}", stdout(&o));
    let o = modectl_with(&c, &viewer, &["svc", "get", "db", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        !stdout(&o).contains("hunter2") && stdout(&o).contains("DB_PASSWORD"),
        "{}",
        stdout(&o)
    );
    let o = modectl_with(&c, &viewer, &["events", "-o", "json"]);
    assert!(!stdout(&o).contains("hunter2"), "{}", stdout(&o));

    // Nothing the refused calls asked for was stored; events name who made each change.
    let names = spec_names(&c, 1).await;
    assert!(
        names.contains(&"by-operator".to_string()) && names.contains(&"by-token".to_string()),
        "{names:?}"
    );
    for refused in ["wrong-ca", "expired", "by-viewer"] {
        assert!(
            !names.contains(&refused.to_string()),
            "{refused} was stored: {names:?}"
        );
    }
    let o = modectl_with(&c, &viewer, &["events", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&o.stdout).expect("events JSON");
    let by_of = |service: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "spec-applied" && e["service"] == service)
            .map(|e| e["by"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(
        by_of("by-operator").as_deref(),
        Some("olga (operator, certificate)")
    );
    assert_eq!(
        by_of("by-token").as_deref(),
        Some(format!("ci (operator, token {id})").as_str())
    );
}

/// An AppendEntries carrying a spec, as node `from` leading in term 100,000.
fn forged_append(from: u64, to: u64) -> pb::RaftRequest {
    let leader = openraft::CommittedLeaderId::new(100_000, from);
    let proposal = Proposal {
        at_ms: 1,
        command: Command::RecordEvent {
            kind: "forged".into(),
            message: "forged".into(),
            service: None,
            node: None,
        },
        trace: None,
        request_id: None,
        by: None,
    };
    let entry = openraft::Entry::<TypeConfig> {
        log_id: openraft::LogId::new(leader, 1_000_000),
        payload: openraft::EntryPayload::Normal(Batch {
            proposals: vec![proposal].into(),
        }),
    };
    let request = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: openraft::Vote::new_committed(100_000, from),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: Some(openraft::LogId::new(leader, 1_000_000)),
    };
    raft_request(from, to, serde_json::to_vec(&request).unwrap())
}

fn forged_vote(from: u64, to: u64) -> pb::RaftRequest {
    let request = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(100_000, from), None);
    raft_request(from, to, serde_json::to_vec(&request).unwrap())
}

fn raft_request(from: u64, to: u64, payload: Vec<u8>) -> pb::RaftRequest {
    pb::RaftRequest {
        protocol: mode_proto::PROTOCOL_VERSION,
        from,
        payload,
        incarnation: 0,
        to,
        to_incarnation: 0,
    }
}

/// No node's term jumped and no node applied the forged event.
async fn untouched(c: &TestCluster) {
    for via in 1..=3 {
        let s = c.status(via, true).await.expect("status");
        assert!(s.term < 1000, "node {via} moved to term {}", s.term);
        let mut client = c.client(via).await;
        let events = client
            .list_events(pb::ListEventsRequest {
                stale: true,
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner();
        assert!(
            events.events.iter().all(|e| e.kind != "forged"),
            "node {via} applied a forged entry"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_certificate_speaks_only_for_its_node_and_strangers_cannot_write_raft_logs() {
    let c = TestCluster::start_tls(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    let tls = c.tls.as_ref().unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let address = c.nodes[&follower].peer_address();

    // Node 99: a certificate signed by the cluster's CA, but not a member.
    let mut stranger = peer_client_on(tls.channel(&address, Some(Who::Node(99))));
    let e = stranger
        .append_entries(forged_append(99, follower))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = stranger.vote(forged_vote(99, follower)).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok, "{e}");
    // Claiming to be the leader with node 99's certificate.
    let e = stranger
        .append_entries(forged_append(leader, follower))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("speaks only for itself"), "{e}");
    // Heartbeats, reports and watches for another node.
    for leaving in [false, true] {
        let e = stranger
            .heartbeat(pb::HeartbeatRequest {
                node: follower,
                incarnation: 0,
                leaving,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    }
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let mut member = peer_client_on(tls.channel(&address, Some(Who::Node(other))));
    let e = member
        .heartbeat(pb::HeartbeatRequest {
            node: leader,
            incarnation: 0,
            leaving: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = member
        .report_instances(pb::ReportInstancesRequest {
            node: leader,
            incarnation: 0,
            reports: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // A raw command from a node that is not a member.
    let e = stranger
        .propose(pb::ProposeRequest {
            command_json: r#"{"op":"record_event","kind":"forged","message":"forged"}"#.into(),
            request_id: String::new(),
            by: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // A client certificate (even an admin's) on the peer API, and no certificate at all.
    let mut client = peer_client_on(tls.channel(&address, Some(Who::admin())));
    let e = client
        .append_entries(forged_append(leader, follower))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let mut anonymous = peer_client_on(tls.channel(&address, None));
    assert!(anonymous
        .append_entries(forged_append(leader, follower))
        .await
        .is_err());
    // Plaintext on the peer port.
    let mut plain = mode_tests::peer_client(&address);
    let e = plain
        .append_entries(forged_append(leader, follower))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");

    untouched(&c).await;
    // The cluster works on.
    let o = c.modectl(1, &["svc", "apply", "-f", &spec_file(&c, "after")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tls_a_non_member_still_cannot_write_raft_logs() {
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let mut peer = c.peer_client(follower);
    let e = peer
        .append_entries(forged_append(99, follower))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = peer.vote(forged_vote(99, follower)).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok, "{e}");
    // A message whose vote names another node than its sender.
    let mut spoofed = forged_append(99, follower);
    spoofed.from = leader;
    let e = peer.append_entries(spoofed).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    untouched(&c).await;
}
