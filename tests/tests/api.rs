//! The typed public API (`mode.v1.Control`) against real `mode-node` processes, through the
//! generated client: apply/get/list/scale/restart/delete, atomic multi-spec applies,
//! compare-and-set, dry runs, concurrent applies that would close a dependency cycle, event
//! watches that resume, health and reflection on the public listener.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use mode::api::convert::json_to_struct;
use mode_proto::v1 as pb;
use mode_proto::v1::control_client::ControlClient;
use mode_tests::TestCluster;
use tonic::transport::Channel;
use tonic::Code;

const ELECTION: Duration = Duration::from_secs(20);

/// A bound on anything a test waits for: a hung server fails the test, not the suite.
async fn bounded<T>(what: &str, secs: u64, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} took longer than {secs} s"),
    }
}

/// `n` nodes with a leader and every node registered with its kinds.
async fn cluster(n: u64) -> TestCluster {
    let c = TestCluster::start(n, &[]);
    c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    c
}

fn ticker(name: &str, replicas: u32, depends_on: &[&str]) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.into(),
        kind: "ticker".into(),
        config: json_to_struct(&serde_json::json!({"every_ms": 200})),
        replicas: Some(replicas),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

fn apply(specs: Vec<pb::ServiceSpec>) -> pb::ApplyServicesRequest {
    pb::ApplyServicesRequest {
        specs,
        ..Default::default()
    }
}

async fn names(c: &mut ControlClient<Channel>) -> Vec<String> {
    c.list_services(pb::ListServicesRequest {
        stale: false,
        summary: false,
    })
    .await
    .unwrap()
    .into_inner()
    .services
    .into_iter()
    .map(|s| s.spec.unwrap().name)
    .collect()
}

async fn get(c: &mut ControlClient<Channel>, name: &str) -> Result<pb::Service, tonic::Status> {
    c.get_service(pb::GetServiceRequest {
        name: name.into(),
        stale: false,
    })
    .await
    .map(|r| r.into_inner())
}

/// Follow `name` with WatchService until `done` holds for an update; returns it.
async fn watch_until(
    c: &mut ControlClient<Channel>,
    name: &str,
    mut done: impl FnMut(&pb::Service) -> bool,
) -> pb::Service {
    let mut stream = c
        .watch_service(pb::WatchServiceRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    bounded("watching the service", 30, async {
        loop {
            let s = stream
                .message()
                .await
                .unwrap()
                .expect("the watch ended early");
            if done(&s) {
                return s;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_apply_get_list_scale_restart_and_delete() {
    let c = cluster(3).await;
    let (mut c1, mut c2, mut c3) = (c.client(1).await, c.client(2).await, c.client(3).await);
    let reply = c2
        .apply_services(apply(vec![ticker("web", 2, &[])]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.changes.len(), 1);
    assert_eq!(reply.changes[0].action, "created");
    assert_eq!(reply.changes[0].generation, 1);
    assert!(reply.log_index > 0 && !reply.dry_run);

    // Linearizable: another server sees it at once, config intact.
    let web = get(&mut c3, "web").await.unwrap();
    let spec = web.spec.unwrap();
    assert_eq!(spec.generation, 1);
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        mode::api::convert::struct_to_json(&spec.config.unwrap()),
        serde_json::json!({"every_ms": 200})
    );
    assert_eq!(names(&mut c1).await, ["web"]);
    assert_eq!(
        get(&mut c1, "nope").await.unwrap_err().code(),
        Code::NotFound
    );

    let running = watch_until(&mut c1, "web", |s| s.running == 2).await;
    assert_eq!(running.instances.len(), 2);

    // Scale with compare-and-set: the right generation wins, a stale one is refused.
    let scaled = c1
        .scale_service(pb::ScaleServiceRequest {
            name: "web".into(),
            replicas: 3,
            expected_generation: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scaled.generation, 2);
    let stale = c2
        .scale_service(pb::ScaleServiceRequest {
            name: "web".into(),
            replicas: 1,
            expected_generation: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let web = watch_until(&mut c3, "web", |s| s.running == 3).await;
    assert_eq!(web.spec.unwrap().replicas, Some(3));

    // Nodes, kinds, status.
    let nodes = c2
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n.role == "server" && n.status == "up"));
    assert_eq!(nodes.iter().map(|n| n.instances).sum::<u32>(), 3);
    let kinds = c3
        .list_kinds(pb::ListKindsRequest {})
        .await
        .unwrap()
        .into_inner()
        .kinds;
    let ticker_kind = kinds.iter().find(|k| k.name == "ticker").unwrap();
    assert_eq!(ticker_kind.nodes, [1, 2, 3]);
    let status = c1
        .cluster_status(pb::ClusterStatusRequest { local: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.members.len(), status.agents), (3, 0));

    // The merged graph: every node answers, each instance with its service tree.
    let graph = c3
        .graph(pb::GraphRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(graph.nodes.len(), 3);
    assert!(graph.nodes.iter().all(|n| n.reachable), "{graph:?}");
    let trees: Vec<&pb::BeaconNode> = graph
        .nodes
        .iter()
        .flat_map(|n| &n.instances)
        .filter_map(|i| i.tree.as_ref())
        .collect();
    assert_eq!(trees.len(), 3, "{graph:?}");
    assert!(trees
        .iter()
        .all(|t| t.label.starts_with("web#") && !t.kind.is_empty()));
    assert_eq!(graph.services[0].running, 3);
    let e = c3
        .graph(pb::GraphRequest {
            service: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let compacted = c1
        .compact(pb::CompactRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(compacted.snapshot_index > 0, "{compacted:?}");

    // A rolling restart restarts every instance, and they all run again.
    let before: Vec<u64> = web.instances.iter().map(|i| i.epoch).collect();
    let restarted = bounded(
        "the rolling restart",
        200,
        c2.restart_service(pb::RestartServiceRequest {
            name: "web".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(restarted.slots, [0, 1, 2]);
    let web = get(&mut c1, "web").await.unwrap();
    assert_eq!(web.running, 3, "{web:?}");
    for (i, before) in web.instances.iter().zip(before) {
        assert!(i.epoch > before, "{i:?} was not restarted");
    }

    // Events about it; an unknown service is NOT_FOUND.
    let events = c3
        .list_events(pb::ListEventsRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.kind == "spec-applied"),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e.service == "web"));
    let nope = c3
        .list_events(pb::ListEventsRequest {
            service: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(nope.code(), Code::NotFound);

    // Delete: the watch ends once the service is purged.
    let mut stream = c1
        .watch_service(pb::WatchServiceRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    let deleted = c2
        .delete_service(pb::DeleteServiceRequest {
            name: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.message.contains("being removed"), "{deleted:?}");
    bounded("the watch to end after the delete", 30, async {
        while let Some(s) = stream.message().await.unwrap() {
            assert_eq!(s.spec.unwrap().name, "web");
        }
    })
    .await;
    assert!(names(&mut c3).await.is_empty());
    let again = c2
        .delete_service(pb::DeleteServiceRequest {
            name: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_are_atomic_compare_and_set_and_dry_runs_store_nothing() {
    let c = cluster(3).await;
    let mut c1 = c.client(1).await;

    // One invalid spec: nothing is stored, the error names it and its field.
    let mut bad = ticker("bad", 1, &[]);
    bad.kind = "no-such-kind".into();
    let e = c1
        .apply_services(apply(vec![ticker("good", 1, &[]), bad]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("spec 'bad'") && e.message().contains("field 'kind'"),
        "{e:?}"
    );
    let e = c1
        .apply_services(apply(vec![
            ticker("good", 1, &[]),
            ticker("dependent", 1, &["missing"]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("depends_on[0]"), "{e:?}");
    // A config the kind refuses (checked by the server that takes the request).
    let mut odd = ticker("odd", 1, &[]);
    odd.config = json_to_struct(&serde_json::json!({"bogus": 1}));
    let e = c1.apply_services(apply(vec![odd])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("spec 'odd'") && e.message().contains("field 'config'"),
        "{e:?}"
    );
    assert!(names(&mut c1).await.is_empty(), "nothing stored");
    let e = c1
        .scale_service(pb::ScaleServiceRequest {
            name: "ghost".into(),
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c1
        .watch_service(pb::WatchServiceRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A dry run says what would change and stores nothing.
    let dry = c1
        .apply_services(pb::ApplyServicesRequest {
            specs: vec![ticker("a", 1, &[]), ticker("b", 1, &["a"])],
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    assert_eq!(dry.log_index, 0);
    let actions: Vec<(&str, &str)> = dry
        .changes
        .iter()
        .map(|c| (c.name.as_str(), c.action.as_str()))
        .collect();
    assert_eq!(actions, [("a", "created"), ("b", "created")]);
    assert!(names(&mut c1).await.is_empty(), "a dry run stores nothing");

    // Both at once, from a file's text; then the same again is unchanged.
    let text = "name: a\nkind: ticker\nconfig: {every_ms: 200}\nreplicas: 1\n---\nname: b\nkind: ticker\nconfig: {every_ms: 200}\nreplicas: 1\ndepends_on: [a]\n";
    let from_text = |text: &str| pb::ApplyServicesRequest {
        text: text.into(),
        file: "ab.yaml".into(),
        ..Default::default()
    };
    let r = c1
        .apply_services(from_text(text))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.changes.len(), 2);
    let r = c
        .client(2)
        .await
        .apply_services(from_text(text))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.changes
            .iter()
            .all(|c| c.action == "unchanged" && c.generation == 1),
        "{r:?}"
    );

    // Compare-and-set: "must not exist" and a stale generation both refuse the whole apply.
    let mut c3 = c.client(3).await;
    for expected in [0, 7] {
        let e = c3
            .apply_services(pb::ApplyServicesRequest {
                specs: vec![ticker("a", 3, &[]), ticker("new", 1, &[])],
                expected_generations: [("a".to_string(), expected)].into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
    }
    let a = get(&mut c3, "a").await.unwrap().spec.unwrap();
    assert_eq!((a.replicas, a.generation), (Some(1), 1), "unchanged");
    assert_eq!(names(&mut c3).await, ["a", "b"], "'new' was not stored");
    let r = c3
        .apply_services(pb::ApplyServicesRequest {
            specs: vec![ticker("a", 3, &[])],
            expected_generations: [("a".to_string(), 1)].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.changes[0].action, "updated");
    assert_eq!(r.changes[0].changed_fields, ["replicas"]);
    assert_eq!(r.changes[0].generation, 2);

    // A retry with the same request id applies once and answers the first outcome.
    let once = || pb::ApplyServicesRequest {
        specs: vec![ticker("c", 1, &[])],
        request_id: "test-retry-1".into(),
        ..Default::default()
    };
    let first = c1.apply_services(once()).await.unwrap().into_inner();
    let retry = c3.apply_services(once()).await.unwrap().into_inner();
    assert_eq!(first.changes, retry.changes);
    assert_eq!(retry.changes[0].action, "created");
    assert_eq!(get(&mut c1, "c").await.unwrap().spec.unwrap().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_cannot_commit_a_dependency_cycle() {
    let c = cluster(3).await;
    let (mut c1, mut c2) = (c.client(1).await, c.client(2).await);
    for round in 0..12 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        c1.apply_services(apply(vec![ticker(&a, 0, &[]), ticker(&b, 0, &[])]))
            .await
            .unwrap();
        // Each is valid against the state it was sent on; together they form a cycle.
        let (x, y) = tokio::join!(
            c1.apply_services(apply(vec![ticker(&a, 0, &[&b])])),
            c2.apply_services(apply(vec![ticker(&b, 0, &[&a])])),
        );
        let outcomes = [x.map(|_| ()), y.map(|_| ())];
        let refused: Vec<&tonic::Status> =
            outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
        assert_eq!(refused.len(), 1, "round {round}: {outcomes:?}");
        assert_eq!(refused[0].code(), Code::InvalidArgument);
        assert!(
            refused[0].message().contains("dependency cycle"),
            "{:?}",
            refused[0]
        );
        let (sa, sb) = (
            get(&mut c1, &a).await.unwrap(),
            get(&mut c2, &b).await.unwrap(),
        );
        let deps = sa.spec.unwrap().depends_on.len() + sb.spec.unwrap().depends_on.len();
        assert_eq!(deps, 1, "round {round}: exactly one dependency stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_resumes_after_the_last_sequence_number_seen() {
    let c = cluster(3).await;
    let mut c1 = c.client(1).await;
    let mut c2 = c.client(2).await;
    c1.apply_services(apply(vec![ticker("first", 0, &[])]))
        .await
        .unwrap();

    // Everything kept, in order, then new events as they are committed.
    let mut stream = c2
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<pb::Event> = Vec::new();
    c1.apply_services(apply(vec![ticker("second", 0, &[])]))
        .await
        .unwrap();
    bounded("the first events", 30, async {
        while !seen.iter().any(|e| e.service == "second") {
            seen.push(stream.message().await.unwrap().expect("stream ended"));
        }
    })
    .await;
    assert!(seen.iter().any(|e| e.service == "first"));
    assert!(!seen[0].gap, "nothing was dropped");
    drop(stream);
    let last = seen.last().unwrap().seq;

    // Meanwhile, more happens.
    for name in ["third", "fourth"] {
        c1.apply_services(apply(vec![ticker(name, 0, &[])]))
            .await
            .unwrap();
    }
    let mut stream = c
        .client(3)
        .await
        .watch_events(pb::WatchEventsRequest {
            after_seq: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut resumed: Vec<pb::Event> = Vec::new();
    bounded("the resumed events", 30, async {
        while !resumed.iter().any(|e| e.service == "fourth") {
            resumed.push(stream.message().await.unwrap().expect("stream ended"));
        }
    })
    .await;
    assert_eq!(resumed[0].seq, last + 1, "nothing missed, nothing twice");
    let seqs: Vec<u64> = seen.iter().chain(&resumed).map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous: {seqs:?}"
    );
    assert!(resumed.iter().any(|e| e.service == "third"));

    // The same as the kept log says.
    let listed = c1
        .list_events(pb::ListEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    for e in seen.iter().chain(&resumed) {
        assert!(listed.contains(e), "{e:?} is not in the log");
    }

    // A service filter, from the newest event on.
    let mut only = c2
        .watch_events(pb::WatchEventsRequest {
            service: "fifth".into(),
            only_new: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c1.apply_services(apply(vec![
        ticker("other", 0, &[]),
        ticker("fifth", 0, &[]),
    ]))
    .await
    .unwrap();
    let e = bounded("the filtered event", 30, only.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.service.as_str(), e.kind.as_str()),
        ("fifth", "spec-applied")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_serves_health_and_reflection_of_the_public_api_only() {
    use mode_proto::prost_types::FileDescriptorProto;
    use prost::Message as _;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let c = cluster(3).await;
    let address = c.nodes[&2].address();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Health: SERVING once ready (the cluster has a leader and every node registered).
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "mode.v1.Control"] {
        let status = bounded("health to say SERVING", 20, async {
            loop {
                let s = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status;
                if s == ServingStatus::Serving as i32 {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(status, ServingStatus::Serving as i32);
    }

    // Reflection lists exactly the public services: nothing that commits raw commands.
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = |request: MessageRequest| {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    let want: BTreeSet<String> = [
        "mode.v1.Control",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .map(String::from)
    .into();
    assert_eq!(listed, want);

    // The descriptors describe Control, and what it imports (google.protobuf.Struct) is
    // there too, so a client such as grpcurl can encode requests from them alone.
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "mode.v1.Control".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptors");
    };
    let files: Vec<FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    // Its imports resolve by name, as grpcurl asks for them.
    let imports: Vec<String> = files.iter().flat_map(|f| f.dependency.clone()).collect();
    assert!(
        imports.iter().any(|d| d == "google/protobuf/struct.proto"),
        "{imports:?}"
    );
    for import in imports {
        let mut answers = reflection
            .server_reflection_info(ask(MessageRequest::FileByFilename(import.clone())))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::FileDescriptorResponse(found)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("{import} does not resolve");
        };
        let file = FileDescriptorProto::decode(found.file_descriptor_proto[0].as_slice()).unwrap();
        assert_eq!(file.name(), import);
    }
    let control = files
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "Control")
        .expect("the Control service");
    let method = control
        .method
        .iter()
        .find(|m| m.name() == "ClusterStatus")
        .expect("ClusterStatus");
    assert_eq!(method.output_type(), ".mode.v1.ClusterStatusReply");

    // And the method it describes answers.
    let status = ControlClient::new(channel)
        .cluster_status(pb::ClusterStatusRequest { local: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.answered_by, 2);
    assert!(status.has_leader);
}

/// Health status `service` on `channel` says.
async fn health_of(channel: &Channel, service: &str) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    });
    req.set_timeout(Duration::from_secs(2));
    match health.check(req).await {
        Ok(r) => r.into_inner().status,
        Err(_) => -1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness() {
    use tonic_health::pb::health_check_response::ServingStatus;
    // Two nodes; only node 2 runs at first: it is no member of a cluster yet (node 1
    // bootstraps it), so not ready.
    let mut c = TestCluster::start(0, &[]);
    for id in [1, 2] {
        c.add_node(id, mode_tests::free_port(), vec![]);
    }
    let peers = format!(
        "1={},2={}",
        c.nodes[&1].peer_address(),
        c.nodes[&2].peer_address()
    );
    for id in [1, 2] {
        c.node(id).push_args(&["--peers", &peers]);
    }
    c.node(2).start();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.nodes[&2].address()))
            .unwrap()
            .connect_lazy();
    let until = |want: ServingStatus, what: &'static str| {
        let channel = channel.clone();
        bounded(what, 40, async move {
            while health_of(&channel, "mode.v1.Control").await != want as i32
                || health_of(&channel, "").await != want as i32
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    until(
        ServingStatus::NotServing,
        "NOT_SERVING before the cluster forms",
    )
    .await;
    c.node(1).start();
    until(
        ServingStatus::Serving,
        "SERVING once it is a member with a leader",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_undrain_and_remove_nodes() {
    let c = cluster(3).await;
    let mut c1 = c.client(1).await;
    c1.apply_services(apply(vec![ticker("web", 2, &[])]))
        .await
        .unwrap();
    let web = watch_until(&mut c1, "web", |s| s.running == 2).await;
    let busy = web.instances[0].node;
    let drained = c
        .client(2)
        .await
        .drain_node(pb::DrainNodeRequest {
            id: busy,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.stranded.is_empty(), "{drained:?}");
    assert!(drained.message.contains("draining"), "{drained:?}");
    // Its instances move elsewhere.
    watch_until(&mut c1, "web", |s| {
        s.running == 2
            && s.instances
                .iter()
                .all(|i| i.node != busy && i.moving_from == 0)
    })
    .await;
    let nodes = c1
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let node = nodes.iter().find(|n| n.id == busy).unwrap();
    assert!(node.draining && node.status == "draining", "{node:?}");
    assert_eq!(node.instances, 0);
    c1.undrain_node(pb::UndrainNodeRequest {
        id: busy,
        ..Default::default()
    })
    .await
    .unwrap();
    let nodes = c1
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.iter().find(|n| n.id == busy).unwrap().status, "up");

    for id in [9, 0] {
        let e = c1
            .drain_node(pb::DrainNodeRequest {
                id,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = c1
            .remove_node(pb::RemoveNodeRequest { id, force: true })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains(&format!("no node {id}")), "{e:?}");
    }
    // A live node is removed only when asked with force, and the refusal says what would
    // happen.
    let e = c1
        .remove_node(pb::RemoveNodeRequest {
            id: 3,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("node 3 is up") && e.message().contains("with force"),
        "{e:?}"
    );
    // A Raft member leaves the voters and the node table.
    let removed = c1
        .remove_node(pb::RemoveNodeRequest { id: 3, force: true })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.message.contains("node 3 removed"), "{removed:?}");
    let status = c1
        .cluster_status(pb::ClusterStatusRequest { local: false })
        .await
        .unwrap()
        .into_inner();
    assert!(status.members.iter().all(|m| m.id != 3), "{status:?}");
    let nodes = c1
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(nodes.iter().all(|n| n.id != 3), "{nodes:?}");
}

/// Commit about `rounds` x 1,000 events: 1,000 stopped specs, updated `rounds` times (one
/// event each per apply, while the state stays the same size).
async fn churn(c: &mut ControlClient<Channel>, rounds: u64) {
    for round in 0..=rounds {
        let specs = (0..1000)
            .map(|i| {
                let mut s = ticker(&format!("filler-{i}"), 0, &[]);
                s.config = json_to_struct(&serde_json::json!({"every_ms": 100 + round}));
                s
            })
            .collect();
        let request = pb::ApplyServicesRequest {
            request_id: format!("churn-{round}"),
            ..apply(specs)
        };
        // Two cores under a burst of large writes: the leader may lose its quorum for a
        // moment. A retry with the same request id applies once.
        bounded("a churn write", 60, async {
            loop {
                match c.apply_services(request.clone()).await {
                    Ok(_) => return,
                    Err(e) if e.code() == Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_told_about_events_the_bounded_log_dropped() {
    let c = cluster(3).await;
    let mut c1 = c.client(1).await;
    c1.apply_services(apply(vec![ticker("early", 0, &[])]))
        .await
        .unwrap();
    let early = c1
        .list_events(pb::ListEventsRequest {
            service: "early".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events[0]
        .seq;

    // A watcher that stops reading, while more events than the log keeps are committed.
    // (A small HTTP/2 window, so that the transport does not buffer megabytes for it.)
    let small_window =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.nodes[&2].address()))
            .unwrap()
            .initial_stream_window_size(Some(16 << 10))
            .connect_lazy();
    let mut slow = ControlClient::new(small_window)
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    slow.message().await.unwrap().unwrap();
    // More than the log keeps plus what the transport buffers for the stream.
    churn(&mut c1, 30).await;

    // Its stream ends, saying where to go on.
    let ended = bounded("the slow watcher to be cut off", 60, async {
        loop {
            match slow.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without saying why"),
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("after_seq"), "{ended:?}");

    // A watch from before the oldest kept event starts with `gap`.
    let mut late = c
        .client(3)
        .await
        .watch_events(pb::WatchEventsRequest {
            after_seq: early,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = bounded("the first event", 30, late.message())
        .await
        .unwrap()
        .unwrap();
    assert!(first.gap, "{first:?}");
    assert!(first.seq > early + 1);
    let second = late.message().await.unwrap().unwrap();
    assert!(!second.gap && second.seq == first.seq + 1, "{second:?}");
}
