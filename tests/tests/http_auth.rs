//! The HTTP side port of a node with TLS, against a real `mode-node` through `curl`: HTTPS,
//! `/healthz`, `/readyz` and `/metrics` open to anyone and free of secrets, the web view and
//! `/api/*` only for clients (a client certificate, or a token as Bearer or as the Basic
//! password); and without TLS, everything open as before.

use std::process::Command;
use std::time::{Duration, Instant};

use mode_tests::{http_get, TestCluster, Who};

const ELECTION: Duration = Duration::from_secs(20);
const NO_CREDENTIALS: [&str; 0] = [];

/// `curl` over HTTPS to node 1's side port with `args`: (status, response head and body).
fn https(c: &TestCluster, path: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> (u16, String) {
    https_on(c, c.nodes[&1].http.expect("an HTTP side port"), path, args)
}

/// `curl` over HTTPS to side port `port` of a node of `c`.
fn https_on(
    c: &TestCluster,
    port: u16,
    path: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
) -> (u16, String) {
    let ca = c.tls.as_ref().expect("a TLS cluster").ca_path();
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// curl's `--cert`/`--key` flags for `who` (its certificate made if missing).
fn cert_flags(c: &TestCluster, who: &Who) -> Vec<String> {
    let (cert, key) = c.tls.as_ref().expect("a TLS cluster").cert(who);
    vec![
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]
}

/// Whether a response asks a browser for a user name and password.
fn asks_for_basic(response: &str) -> bool {
    response
        .to_ascii_lowercase()
        .contains("www-authenticate: basic realm=\"mode\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_side_port_is_https_and_the_web_view_needs_a_client() {
    let c = TestCluster::start_tls(1, &[]);
    c.wait_leader(ELECTION).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while https(&c, "/readyz", &NO_CREDENTIALS).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready over HTTPS: {:?}\n{}",
            https(&c, "/readyz", &NO_CREDENTIALS),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The harness's modectl calls as an admin client.
    let modectl = |args: &[&str]| c.modectl(1, args);
    // A spec whose config holds something secret-looking, to look for it where it must not be.
    let spec = c.scratch.0.join("spec.yaml");
    std::fs::write(
        &spec,
        "name: web\nkind: ticker\nconfig:\n  message: hunter2-password\n",
    )
    .unwrap();
    let out = modectl(&["svc", "apply", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = modectl(&[
        "-o", "json", "token", "create", "--name", "v", "--role", "viewer",
    ]);
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let token_id = created["id"].as_str().unwrap().to_string();

    // Probes and scrapes need nothing, and carry no secret.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (code, response) = https(&c, path, &NO_CREDENTIALS);
        assert_eq!(code, 200, "{path}: {response}");
        assert!(!response.contains("hunter2"), "{path}: {response}");
        assert!(!response.contains(&token), "{path}: {response}");
        assert!(!response.contains(&token_id), "{path}: {response}");
    }
    assert!(https(&c, "/metrics", &NO_CREDENTIALS)
        .1
        .contains("mode_raft_is_leader{node=\"1\"} 1"));

    // The web view and its API need a client, and a browser is asked for the token.
    for path in [
        "/",
        "/api/graph",
        "/api/graph.svg",
        "/api/events",
        "/api/summary",
        "/api/service/web",
    ] {
        let (code, response) = https(&c, path, &NO_CREDENTIALS);
        assert_eq!(code, 401, "{path}: {response}");
        assert!(asks_for_basic(&response), "{path}: {response}");
        assert!(response.contains("credentials needed"), "{response}");
    }
    let bearer = format!("Authorization: Bearer {token}");
    let basic = format!("anyone:{token}");
    for credential in [["-H", bearer.as_str()], ["-u", basic.as_str()]] {
        for path in ["/", "/api/graph", "/api/events", "/api/summary"] {
            let (code, response) = https(&c, path, &credential);
            assert_eq!(code, 200, "{path} with {credential:?}: {response}");
        }
    }
    let viewer = cert_flags(&c, &Who::Client("eve".into(), "viewer".into()));
    let (code, response) = https(&c, "/api/graph", &viewer);
    assert_eq!(code, 200, "{response}");
    assert!(response.contains("\"answered_by\":1"), "{response}");

    // A node's certificate is for the peer API.
    let (code, response) = https(&c, "/api/graph", &cert_flags(&c, &Who::Node(1)));
    assert_eq!(code, 403, "{response}");
    assert!(response.contains("node 1"), "{response}");

    // A token that is not one, and a revoked one, are refused saying so.
    let (code, response) = https(&c, "/api/graph", &["-u", "me:guess"]);
    assert_eq!(code, 401, "{response}");
    assert!(response.contains("not a mode token"), "{response}");
    let out = modectl(&["token", "revoke", &token_id]);
    assert!(out.status.success(), "{out:?}");
    for credential in [["-H", bearer.as_str()], ["-u", basic.as_str()]] {
        let (code, response) = https(&c, "/api/graph", &credential);
        assert_eq!(code, 401, "{response}");
        assert!(response.contains("revoked"), "{response}");
        assert!(asks_for_basic(&response), "{response}");
    }

    // Plaintext on the HTTPS port is told what to do.
    let (code, body) = http_get(c.nodes[&1].http.unwrap(), "/healthz");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("speaks HTTPS"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_side_port_is_https_and_ready_once_registered() {
    let mut c = TestCluster::start_tls(1, &[]);
    c.wait_leader(ELECTION).await;
    let port = mode_tests::free_port();
    let mut args = c.tls.as_ref().unwrap().node_flags(2);
    args.extend(["--http-listen".into(), format!("127.0.0.1:{port}")]);
    c.add_agent(2, args).start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = https_on(&c, port, "/readyz", &NO_CREDENTIALS);
        if code == 200 {
            assert!(body.ends_with("ready\n"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never said ready: {code} {body}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(https_on(&c, port, "/healthz", &NO_CREDENTIALS).0, 200);
    // It keeps no cluster state: no web view, no API (and anything else needs credentials).
    let (code, body) = https_on(&c, port, "/api/graph", &NO_CREDENTIALS);
    assert!(code == 401 || code == 404, "{body}");
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(code, 400, "plaintext on the agent's HTTPS port: {body}");
    assert!(body.contains("speaks HTTPS"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_the_side_port_stays_open() {
    let c = TestCluster::start_with_http(1, &[]);
    c.wait_leader(ELECTION).await;
    let http = c.nodes[&1].http.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The side port starts after the public API: connect first (http_get panics when refused).
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || http_get(http, "/readyz").0 != 200
    {
        assert!(Instant::now() < deadline, "never ready\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(http, "/healthz"), (200, "ok\n".to_string()));
    for path in ["/", "/api/graph", "/api/events"] {
        let (code, body) = http_get(http, path);
        assert_eq!(code, 200, "{path}: {body}");
    }
}
