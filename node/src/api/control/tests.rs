//! The read handlers against an in-process one-node cluster: a caller who may not see secrets
//! gets every spec they return redacted, one who may gets the values.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_stream::StreamExt;

use super::*;
use crate::replication::ClusterConfig;
use crate::security::{Proof, Role};

/// A one-node cluster in a fresh data directory, with a node offering `exec`, serving the
/// public API in process.
async fn one_node() -> (ControlService, Arc<ClusterNode>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mode-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Never dialled: a lone voter elects itself.
    let node = ClusterNode::open(ClusterConfig::new(1, "127.0.0.1:1", &dir))
        .await
        .unwrap();
    node.bootstrap(Duration::from_secs(10)).await.unwrap();
    let register = Command::RegisterNode {
        id: 1,
        address: "127.0.0.1:1".into(),
        labels: BTreeMap::new(),
        capacity: 100,
        kinds: vec!["exec".into()],
        incarnation: 0,
        heartbeat_grace_ms: 0,
        api_address: String::new(),
        role: Default::default(),
    };
    assert!(
        node.write_request(register, true, None, None)
            .await
            .unwrap()
            .result
            .ok
    );
    let service = ControlService::new(Inspector::new(node.clone(), None), KindRegistry::stock());
    (service, node, dir)
}

fn as_client<T>(role: Role, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller::Client {
        name: "alice".into(),
        role,
        proof: Proof::Certificate,
    });
    request
}

fn secret_of(spec: Option<&pb::ServiceSpec>) -> String {
    spec.expect("a spec").secrets["DB_PASSWORD"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_who_may_not_see_secrets_get_every_spec_redacted() {
    let (api, node, dir) = one_node().await;
    for password in ["hunter2", "hunter3"] {
        let text = format!(
            "name: db\nkind: exec\nconfig: {{command: /bin/true}}\nsecrets: {{DB_PASSWORD: {password}}}\n"
        );
        let applied = api
            .apply_services(as_client(
                Role::Operator,
                pb::ApplyServicesRequest {
                    text,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!format!("{applied:?}").contains("hunter"), "{applied:?}");
    }

    for (role, want) in [(Role::Viewer, "(secret)"), (Role::Operator, "hunter3")] {
        let get = pb::GetServiceRequest {
            name: "db".into(),
            stale: false,
        };
        let got = api.get_service(as_client(role, get)).await.unwrap();
        assert_eq!(secret_of(got.get_ref().spec.as_ref()), want, "{role}");

        let listed = api
            .list_services(as_client(
                role,
                pb::ListServicesRequest {
                    stale: false,
                    summary: false,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(secret_of(listed.services[0].spec.as_ref()), want, "{role}");

        let history = api
            .service_history(as_client(
                role,
                pb::ServiceHistoryRequest { name: "db".into() },
            ))
            .await
            .unwrap()
            .into_inner();
        let kept: Vec<String> = history
            .versions
            .iter()
            .map(|v| secret_of(v.spec.as_ref()))
            .collect();
        let want_kept = match role {
            Role::Viewer => vec!["(secret)", "(secret)"],
            _ => vec!["hunter2", "hunter3"],
        };
        assert_eq!(kept, want_kept, "{role}");

        let mut watch = api
            .watch_service(as_client(
                role,
                pb::WatchServiceRequest { name: "db".into() },
            ))
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(secret_of(first.spec.as_ref()), want, "{role}");
    }
    // A request the authentication layer never saw counts as a viewer's.
    let unseen = api
        .get_service(Request::new(pb::GetServiceRequest {
            name: "db".into(),
            stale: false,
        }))
        .await
        .unwrap();
    assert_eq!(secret_of(unseen.get_ref().spec.as_ref()), "(secret)");

    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
