//! OpenTelemetry: a real OTLP/gRPC trace receiver collects the spans of `modectl` and a 3-node
//! cluster; one `modectl svc apply` must be one trace across the CLI, the node it called, the
//! leader and the node that starts the instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mode_tests::{free_port, Launcher, TestCluster};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

/// One received span, with the resource it came from.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    node: Option<String>,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(kv: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        node: resource.get("mode.node.id").cloned(),
                        name: s.name.clone(),
                        trace: s.trace_id.clone(),
                        id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attributes: text(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (Receiver, u16) {
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let receiver = Receiver::default();
    let server = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    (receiver, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_svc_apply_is_one_trace_across_cli_leader_and_agent() {
    let (receiver, port) = start_receiver().await;
    let mut launcher = Launcher::mode_node();
    launcher.env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let c = TestCluster::start_with(launcher, 3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    c.wait_registered(3).await;
    let via = if leader == 1 { 2 } else { 1 };
    let spec = c.scratch.0.join("traced.yaml");
    std::fs::write(
        &spec,
        "name: traced\nkind: ticker\nconfig: {every_ms: 500}\n",
    )
    .unwrap();
    let out = c.modectl(
        via,
        &["svc", "apply", "-f", spec.to_str().unwrap(), "--wait"],
    );
    assert!(
        out.status.success(),
        "svc apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = c
        .wait_instances(via, "traced", Duration::from_secs(20), |i| {
            i.len() == 1 && i.values().all(|p| p["state"] == "running")
        })
        .await[&0]["node"]
        .as_u64()
        .unwrap()
        .to_string();

    // The CLI's root span, then everything in its trace.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (root, trace) = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let root = spans
            .iter()
            .find(|s| s.service == "modectl" && s.name == "modectl svc apply")
            .cloned();
        if let Some(root) = root {
            let trace: Vec<Got> = spans
                .iter()
                .filter(|s| s.trace == root.trace)
                .cloned()
                .collect();
            // Complete: the agent's span arrived, every parent is there, all replicas applied.
            let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.id.as_slice()).collect();
            let connected = trace
                .iter()
                .all(|s| s.id == root.id || ids.contains(s.parent.as_slice()));
            let has_agent = trace
                .iter()
                .any(|s| s.name == "agent.start_instance" && s.node.as_deref() == Some(&target));
            let applies = trace
                .iter()
                .filter(|s| s.name == "raft.apply")
                .filter_map(|s| s.node.as_deref())
                .collect::<BTreeSet<_>>()
                .len();
            if has_agent && connected && applies == 3 {
                break (root, trace);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete trace arrived; got {} spans: {:#?}\n{}",
            spans.len(),
            spans
                .iter()
                .map(|s| format!("{} {:?} {}", s.service, s.node, s.name))
                .collect::<BTreeSet<_>>(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(root.parent.is_empty(), "the CLI's span is the root");
    let by_id: BTreeMap<&[u8], &Got> = trace.iter().map(|s| (s.id.as_slice(), s)).collect();
    // Every span but the root has its parent in the same trace: one connected tree.
    for s in &trace {
        if s.id != root.id {
            assert!(
                by_id.contains_key(s.parent.as_slice()),
                "{} on {:?} has a parent outside the trace",
                s.name,
                s.node
            );
        }
    }
    let parent_of = |s: &Got| by_id[s.parent.as_slice()];
    let via_s = via.to_string();
    let leader_s = leader.to_string();
    // The node the CLI called: its server span is a child of the CLI's span.
    let called = trace
        .iter()
        .find(|s| s.name == "/mode.v1.Control/ApplyServices" && s.node.as_deref() == Some(&via_s))
        .expect("the called node's server span");
    assert_eq!(called.parent, root.id);
    assert_eq!(
        called.attributes.get("rpc.system").map(String::as_str),
        Some("grpc")
    );
    // The leader: the forwarded write, a child of the called node's proposal.
    let forwarded = trace
        .iter()
        .find(|s| s.name == "/mode.v1.Peer/Propose" && s.node.as_deref() == Some(&leader_s))
        .expect("the leader's server span for the forwarded write");
    let proposer = parent_of(forwarded);
    assert_eq!(
        (proposer.name.as_str(), proposer.node.as_deref()),
        ("raft.propose", Some(via_s.as_str()))
    );
    // The leader's placement decision continues the trace of the spec it places.
    let placed = trace
        .iter()
        .find(|s| s.name == "placement.decide" && s.node.as_deref() == Some(&leader_s))
        .expect("the leader's placement decision");
    assert!(placed.attributes["assign"].starts_with("traced#0@"));
    // The agent on the target node starts the instance as a child of the leader's proposal of
    // that placement, and the instance's service lifecycle nests inside.
    let agent = trace
        .iter()
        .find(|s| s.name == "agent.start_instance" && s.node.as_deref() == Some(&target))
        .unwrap();
    let place = parent_of(agent);
    assert_eq!(
        (place.name.as_str(), place.node.as_deref()),
        ("raft.propose", Some(leader_s.as_str()))
    );
    assert_eq!(parent_of(place).id, placed.id);
    assert!(
        trace
            .iter()
            .any(|s| s.name == "service.start" && s.parent == agent.id),
        "the instance's start is traced under the agent's span"
    );
    // Replicas apply the traced proposals.
    let applied_on: BTreeSet<&str> = trace
        .iter()
        .filter(|s| s.name == "raft.apply")
        .filter_map(|s| s.node.as_deref())
        .collect();
    assert_eq!(applied_on.len(), 3, "every replica applies: {applied_on:?}");
    // Background writes (agents' reports, heartbeats, events) start no traces: every proposal
    // span belongs to a request or a placement decision.
    let all = receiver.spans.lock().unwrap().clone();
    for s in all
        .iter()
        .filter(|s| s.name == "raft.propose" || s.name == "raft.apply")
    {
        assert!(
            !s.parent.is_empty(),
            "a {} on {:?} ({:?}) started a trace of its own",
            s.name,
            s.node,
            s.attributes.get("op")
        );
    }
    let processes: BTreeSet<(&str, Option<&str>)> = trace
        .iter()
        .map(|s| (s.service.as_str(), s.node.as_deref()))
        .collect();
    assert!(processes.len() >= 3, "{processes:?}");
}
