//! Guardrails: what would strand instances or cannot be placed asks for `--force` and says
//! what would happen; a node that shuts down cleanly is not reported as a failure.

use std::time::{Duration, Instant};

use mode_tests::TestCluster;
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The node table as `modectl node ls -o json` prints it, by id.
fn node_status(c: &TestCluster, via: u64, id: u64) -> String {
    let out = c.modectl(via, &["-o", "json", "node", "ls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("node ls json");
    v.as_array()
        .or_else(|| v["nodes"].as_array())
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
        .map(|n| n["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_past_capacity_and_removing_a_live_node_or_a_singletons_only_home_need_force() {
    let mut c = TestCluster::start_each(3, &["--capacity", "4"], |id| {
        vec!["--label".to_string(), format!("n={id}")]
    });
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    let home = (1..=3).find(|id| *id != leader).unwrap();
    let via = (1..=3).find(|id| *id != leader && *id != home).unwrap();

    // 3 nodes × 4 units: 12 instances fit, 50 do not (38 of the 48 new ones).
    c.apply(via, "name: web\nkind: ticker\nreplicas: 2\n")
        .await
        .expect("apply web");
    let out = c.modectl(via, &["svc", "scale", "web", "50"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("'web' was not scaled to 50: 38 of the 48 new instances could not be placed")
            && err.contains("modectl svc scale web 50 --force"),
        "{err}"
    );
    let out = c.modectl(via, &["-o", "json", "svc", "get", "web"]);
    let web: Value = serde_json::from_slice(&out.stdout).expect("svc get json");
    assert_eq!(web["spec"]["replicas"], 2, "{web}");
    // Within capacity it needs nothing; past it, --force does it.
    let out = c.modectl(via, &["svc", "scale", "web", "10"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(via, &["svc", "scale", "web", "50", "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(via, &["svc", "scale", "web", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A singleton that can only run on `home`.
    c.apply(
        via,
        &format!(
            "name: pinned\nkind: ticker\nsingleton: true\nconstraints: [{{label: n, equals: \"{home}\"}}]\n"
        ),
    )
    .await
    .expect("apply pinned");
    c.wait_instances(via, "pinned", Duration::from_secs(20), |i| {
        i.get(&0)
            .is_some_and(|p| p["state"] == "running" && p["node"] == home)
    })
    .await;
    let h = home.to_string();
    let out = c.modectl(via, &["node", "rm", &h]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("node {home} was not removed: node {home} is up"))
            && err.contains("pinned#0")
            && err.contains("could run on no other node")
            && err.contains(&format!("modectl node rm {home} --force")),
        "{err}"
    );
    // Down, it still strands the singleton: still refused, no longer for being up.
    c.node(home).kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_status(&c, via, home) != "down" {
        assert!(Instant::now() < deadline, "node {home} never marked down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = c.modectl(via, &["node", "rm", &h]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pinned#0") && !err.contains("is up"), "{err}");
    let out = c.modectl(via, &["node", "rm", &h, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        node_status(&c, via, home).is_empty(),
        "node {home} still listed"
    );
}
