//! Helpers for end-to-end tests: real `mode-node` processes on loopback with free ports and
//! temporary data directories, always cleaned up; [`netns`] runs them in network namespaces
//! whose links the test can cut.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod browser;

use mode_proto::v1 as pb;
use mode_proto::v1::control_client::ControlClient;
use mode_proto::v1::peer_client::PeerClient;
use tonic::transport::Channel;

pub mod chaos;
pub mod netns;
pub mod probe;
pub mod prom;
pub mod proxy;

/// A workspace binary built next to the test executables (`cargo test --workspace` builds
/// `mode-node` and `modectl` because their packages have integration tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so that it is built",
        path.display()
    );
    path
}

/// A port that was free a moment ago, and not handed out before by this process: the kernel
/// may offer a port again once its probe listener is closed, and two nodes of one cluster were
/// then given the same port (one failed with "address already in use").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
        std::sync::Mutex::new(None);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
}

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "mode-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to start a node: a program and the arguments before the node's own flags.
#[derive(Clone)]
pub struct Launcher {
    pub program: PathBuf,
    pub prefix: Vec<String>,
    /// Environment variables for every node.
    pub env: Vec<(String, String)>,
}

impl Launcher {
    /// The workspace's `mode-node` binary.
    pub fn mode_node() -> Launcher {
        Launcher {
            program: binary("mode-node"),
            prefix: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// One `mode-node` process (restartable).
pub struct NodeProc {
    pub id: u64,
    /// The IP address it listens on (127.0.0.1, or its network namespace's address).
    pub host: String,
    /// Its public API port (`--listen`).
    pub port: u16,
    /// Its peer API port (`--peer-listen`).
    pub peer_port: u16,
    /// Its HTTP side port, if it serves one.
    pub http: Option<u16>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    launcher: Launcher,
    args: Vec<String>,
    child: Option<Child>,
}

impl NodeProc {
    /// Its public API address (`mode.v1.Control`, what modectl calls).
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Its peer API address (`mode.v1.Peer`: raw Propose/Query, Raft, agents; what
    /// `--peers`, `--join` and `--servers` name).
    pub fn peer_address(&self) -> String {
        format!("{}:{}", self.host, self.peer_port)
    }

    /// Whether it runs as an agent-only node (`--role agent`).
    pub fn is_agent(&self) -> bool {
        self.args
            .windows(2)
            .any(|w| w[0] == "--role" && w[1] == "agent")
    }

    /// Start (or restart) the process with its arguments; output goes to its log file.
    pub fn start(&mut self) {
        if self.exited().is_some() {
            self.child = None;
        }
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.launcher.program)
            .args(&self.launcher.prefix)
            .args(&self.args)
            .envs(self.launcher.env.iter().map(|(k, v)| (k, v)))
            .env_remove("MODE_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mode-node");
        self.child = Some(child);
    }

    /// Add flags for its next start.
    pub fn push_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| a.to_string()));
    }

    /// Its flags, to change before its next start.
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    /// Set an environment variable for its next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.launcher.env.retain(|(k, _)| k != key);
        self.launcher.env.push((key.to_string(), value.to_string()));
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send a signal (`STOP`, `CONT`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([format!("-{name}"), pid.to_string()])
                .status();
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running; its exit code if it ended.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            _ => None,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Cluster tests share two cores: run them one at a time so elections are not starved.
static SERIAL: Mutex<()> = Mutex::new(());

/// Wait for the other cluster tests of this test binary to finish.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Several `mode-node` processes forming (or joining) one cluster.
pub struct TestCluster {
    pub nodes: BTreeMap<u64, NodeProc>,
    pub scratch: Scratch,
    /// The cluster's certificates when it runs with mutual TLS ([`TestCluster::start_tls`]):
    /// [`TestCluster::client`] and [`TestCluster::modectl`] then call as an admin client.
    pub tls: Option<TlsMaterial>,
    pub(crate) peers: String,
    pub(crate) launcher: Launcher,
    _serial: MutexGuard<'static, ()>,
}

impl TestCluster {
    /// Start `n` nodes bootstrapped with `--peers`, each with `extra` flags.
    pub fn start(n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::start_with(Launcher::mode_node(), n, extra)
    }

    /// [`TestCluster::start`] with an HTTP side port on every node ([`NodeProc::http`]).
    pub fn start_with_http(n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::launch(Launcher::mode_node(), n, extra, true)
    }

    /// [`TestCluster::start_with_http`] with another way of starting nodes.
    pub fn start_with_http_as(launcher: Launcher, n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::launch(launcher, n, extra, true)
    }

    /// [`TestCluster::start`] with another way of starting nodes.
    pub fn start_with(launcher: Launcher, n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::launch(launcher, n, extra, false)
    }

    /// No nodes yet (the caller adds them), holding the lock that runs cluster tests one at
    /// a time.
    pub(crate) fn empty(launcher: Launcher, peers: String) -> TestCluster {
        TestCluster {
            nodes: BTreeMap::new(),
            scratch: Scratch::new("cluster"),
            tls: None,
            peers,
            launcher,
            _serial: serial(),
        }
    }

    /// [`TestCluster::start_with_http`] with mutual TLS: a CA and node certificates made in
    /// the scratch directory, every node started with `--tls-ca/--tls-cert/--tls-key`.
    pub fn start_tls(n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::start_tls_with(Launcher::mode_node(), n, extra, true)
    }

    /// [`TestCluster::start_tls`] with another way of starting nodes, and an HTTP side port
    /// on every node only when `http` (the benchmark's `mode-bench __node` runs without one,
    /// like its plaintext clusters).
    pub fn start_tls_with(launcher: Launcher, n: u64, extra: &[&str], http: bool) -> TestCluster {
        let scratch = Scratch::new("cluster");
        let tls = TlsMaterial::new(&scratch.0.join("tls"));
        let mut c = TestCluster::build(launcher, n, extra, http, |id| tls.node_flags(id), scratch);
        c.tls = Some(tls);
        for node in c.nodes.values_mut() {
            node.start();
        }
        c
    }

    fn launch(launcher: Launcher, n: u64, extra: &[&str], http: bool) -> TestCluster {
        let mut c = TestCluster::build(
            launcher,
            n,
            extra,
            http,
            |_| Vec::new(),
            Scratch::new("cluster"),
        );
        for node in c.nodes.values_mut() {
            node.start();
        }
        c
    }

    /// [`TestCluster::start`] with flags of each node's own (`per_node(id)`) after `extra`.
    pub fn start_each(
        n: u64,
        extra: &[&str],
        per_node: impl Fn(u64) -> Vec<String>,
    ) -> TestCluster {
        let mut c = TestCluster::build(
            Launcher::mode_node(),
            n,
            extra,
            false,
            per_node,
            Scratch::new("cluster"),
        );
        for node in c.nodes.values_mut() {
            node.start();
        }
        c
    }

    /// `n` nodes registered (not started), with `per_node(id)` flags after `extra`.
    fn build(
        launcher: Launcher,
        n: u64,
        extra: &[&str],
        http: bool,
        per_node: impl Fn(u64) -> Vec<String>,
        scratch: Scratch,
    ) -> TestCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let peers = (1..=n)
            .zip(&ports)
            .map(|(id, (_, p))| format!("{id}=127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = TestCluster::empty(launcher, peers.clone());
        c.scratch = scratch;
        for (id, (port, peer_port)) in (1..=n).zip(ports) {
            let mut args = vec!["--peers".to_string(), peers.clone()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args.extend(per_node(id));
            let http_port = http.then(free_port);
            if let Some(h) = http_port {
                args.extend(["--http-listen".to_string(), format!("127.0.0.1:{h}")]);
            }
            let launcher = c.launcher.clone();
            c.add_node_at(id, "127.0.0.1", (port, peer_port), launcher, args)
                .http = http_port;
        }
        c
    }

    /// Register a node process (not started) with `args` after the common ones, its public
    /// API on `port` and its peer API on a free port.
    pub fn add_node(&mut self, id: u64, port: u16, args: Vec<String>) -> &mut NodeProc {
        let launcher = self.launcher.clone();
        self.add_node_at(id, "127.0.0.1", (port, free_port()), launcher, args)
    }

    /// Register an agent-only node (not started): `--role agent --servers` the peer addresses
    /// of this cluster's servers (the nodes registered so far), with `args` after those.
    pub fn add_agent(&mut self, id: u64, args: Vec<String>) -> &mut NodeProc {
        let servers = self
            .nodes
            .values()
            .filter(|n| !n.is_agent())
            .map(NodeProc::peer_address)
            .collect::<Vec<_>>()
            .join(",");
        let mut all = vec![
            "--role".to_string(),
            "agent".to_string(),
            "--servers".to_string(),
            servers,
        ];
        all.extend(args);
        self.add_node(id, free_port(), all)
    }

    /// [`TestCluster::add_node`] listening on `host`, ports `(public, peer)`, started by
    /// `launcher`.
    pub(crate) fn add_node_at(
        &mut self,
        id: u64,
        host: &str,
        (port, peer_port): (u16, u16),
        launcher: Launcher,
        args: Vec<String>,
    ) -> &mut NodeProc {
        let data_dir = self.scratch.0.join(format!("node-{id}"));
        let mut all = vec![
            "--id".to_string(),
            id.to_string(),
            "--listen".to_string(),
            format!("{host}:{port}"),
            "--peer-listen".to_string(),
            format!("{host}:{peer_port}"),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        if !args.iter().any(|a| a == "--log-level") {
            all.extend(["--log-level".to_string(), "info".to_string()]);
        }
        all.extend(args);
        let log = self.scratch.0.join(format!("node-{id}.log"));
        self.nodes.insert(
            id,
            NodeProc {
                id,
                host: host.to_string(),
                port,
                peer_port,
                http: None,
                data_dir,
                log,
                launcher,
                args: all,
                child: None,
            },
        );
        self.nodes.get_mut(&id).expect("just inserted")
    }

    pub fn peers(&self) -> &str {
        &self.peers
    }

    pub fn node(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.get_mut(&id).expect("a node of this cluster")
    }

    /// All node logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .values()
            .map(|n| format!("---- node {} ----\n{}", n.id, n.logs()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last `lines` lines of every node's log, for failure messages of long tests.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .values()
            .map(|n| {
                let log = n.logs();
                let all: Vec<&str> = log.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!("---- node {} (last {lines} log lines) ----\n{tail}", n.id)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until `n` nodes are registered with their kinds (specs are checked against them).
    pub async fn wait_registered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let kinds = self
                .client(1)
                .await
                .list_kinds(pb::ListKindsRequest {})
                .await;
            if let Ok(k) = kinds {
                let k = k.into_inner();
                if k.kinds
                    .iter()
                    .any(|k| k.name == "ticker" && k.nodes.len() == n)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes never registered their kinds\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A typed public API client for node `id` (an admin client when the cluster has TLS).
    pub async fn client(&self, id: u64) -> ControlClient<Channel> {
        match &self.tls {
            Some(tls) => {
                ControlClient::new(tls.channel(&self.nodes[&id].address(), Some(Who::admin())))
                    .max_decoding_message_size(256 << 20)
            }
            None => client(&self.nodes[&id].address()),
        }
    }

    /// A peer API client for node `id` (raw state-machine commands and queries); with TLS,
    /// it presents node `id`'s own certificate.
    pub fn peer_client(&self, id: u64) -> PeerClient<Channel> {
        match &self.tls {
            Some(tls) => {
                peer_client_on(tls.channel(&self.nodes[&id].peer_address(), Some(Who::Node(id))))
            }
            None => peer_client(&self.nodes[&id].peer_address()),
        }
    }

    /// Wait until `id` reports a leader (its own view); returns it.
    pub async fn leader_seen_by(&self, id: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(s) = self.status(id, true).await {
                if s.has_leader {
                    return Some(s.leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Wait until every running node agrees on one leader.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.nodes.keys() {
                if let Ok(s) = self.status(*id, true).await {
                    seen.push(s.has_leader.then_some(s.leader));
                }
            }
            if let Some(Some(first)) = seen.first() {
                if seen.iter().all(|l| *l == Some(*first)) {
                    return *first;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {timeout:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(
        &self,
        id: u64,
        local: bool,
    ) -> Result<pb::ClusterStatusReply, tonic::Status> {
        let mut c = self.client(id).await;
        let mut req = tonic::Request::new(pb::ClusterStatusRequest { local });
        req.set_timeout(Duration::from_secs(2));
        c.cluster_status(req).await.map(|r| r.into_inner())
    }

    /// Store a spec named `name` through node `via` (the typed ApplyServices), retrying for
    /// up to 10 s while the cluster is unavailable (an election under load).
    pub async fn put_spec(
        &self,
        via: u64,
        name: &str,
    ) -> Result<pb::ApplyServicesReply, tonic::Status> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match put_spec(&mut self.client(via).await, name).await {
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Commit a raw state-machine command (JSON) through node `via`'s peer API (`Propose`,
    /// what servers forward to the leader); its result.
    pub async fn write_command(
        &self,
        via: u64,
        command: &str,
    ) -> Result<serde_json::Value, tonic::Status> {
        self.propose(via, command, "", Duration::from_secs(10))
            .await
            .map(|(result, _)| result)
    }

    /// [`TestCluster::write_command`] with a request id ("" for none) and a timeout: the
    /// command's result and the whole reply.
    pub async fn propose(
        &self,
        via: u64,
        command: &str,
        request_id: &str,
        timeout: Duration,
    ) -> Result<(serde_json::Value, pb::ProposeReply), tonic::Status> {
        propose(
            &mut self.peer_client(via),
            command,
            request_id,
            Some(timeout),
        )
        .await
    }

    /// Read `query` (nodes, specs, spec:NAME, placements, kinds, events, drain:ID, all) as raw
    /// JSON through node `via`'s peer API (`Query`), retrying for up to 10 s while the
    /// cluster is unavailable (an election under load).
    pub async fn read(
        &self,
        via: u64,
        query: &str,
        stale: bool,
    ) -> Result<serde_json::Value, tonic::Status> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = self.peer_client(via);
            let request = pb::QueryRequest {
                query: query.to_string(),
                stale,
            };
            match c.query(request).await {
                Ok(r) => {
                    return Ok(serde_json::from_str(&r.into_inner().result_json).expect("json"))
                }
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait until node `id`'s own state has `n` specs (ListServices from its replica).
    pub async fn wait_specs(&self, id: u64, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let listed = self
                .client(id)
                .await
                .list_services(pb::ListServicesRequest {
                    stale: true,
                    summary: false,
                })
                .await;
            if let Ok(r) = listed {
                if r.into_inner().services.len() == n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not reach {n} specs within {timeout:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Apply a spec file's text through node `via` (ApplyServices with `text`: the server
    /// parses it).
    pub async fn apply(
        &self,
        via: u64,
        text: &str,
    ) -> Result<pb::ApplyServicesReply, tonic::Status> {
        let mut c = self.client(via).await;
        c.apply_services(pb::ApplyServicesRequest {
            text: text.to_string(),
            file: "test.yaml".to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
    }

    /// The instances of `service` as node `via`'s replica has them (GetService): slot → the
    /// instance as JSON (`node`, `state`, `restart_count`, `last_crash`, `moving_from` (null
    /// when not moving), `reschedules`, `epoch`). Empty when the service does not exist.
    pub async fn instances(&self, via: u64, service: &str) -> BTreeMap<u64, serde_json::Value> {
        let got = self
            .client(via)
            .await
            .get_service(pb::GetServiceRequest {
                name: service.to_string(),
                stale: true,
            })
            .await;
        match got {
            Ok(s) => s
                .into_inner()
                .instances
                .iter()
                .map(|i| (u64::from(i.slot), instance_json(i)))
                .collect(),
            Err(_) => BTreeMap::new(),
        }
    }

    /// Poll (every 50 ms, up to `timeout`) until `ready` holds for `service`'s instances as
    /// node `via` sees them; returns them.
    pub async fn wait_instances(
        &self,
        via: u64,
        service: &str,
        timeout: Duration,
        mut ready: impl FnMut(&BTreeMap<u64, serde_json::Value>) -> bool,
    ) -> BTreeMap<u64, serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let inst = self.instances(via, service).await;
            if ready(&inst) {
                return inst;
            }
            if Instant::now() >= deadline {
                let mut summary: BTreeMap<String, usize> = BTreeMap::new();
                for p in inst.values() {
                    *summary
                        .entry(format!("node {} {}", p["node"], p["state"]))
                        .or_default() += 1;
                }
                panic!(
                    "{service} never reached the expected state within {timeout:?}: {} instances {summary:?}\n{}",
                    inst.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Events as node `via`'s replica has them (ListEvents), as JSON objects: `seq`,
    /// `time_ms`, `kind`, `message`, and `service` / `node` when the event has them.
    pub async fn events(&self, via: u64) -> Vec<serde_json::Value> {
        let listed = self
            .client(via)
            .await
            .list_events(pb::ListEventsRequest {
                stale: true,
                ..Default::default()
            })
            .await;
        match listed {
            Ok(r) => r.into_inner().events.iter().map(event_json).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Run modectl against node `via`.
    pub fn modectl(&self, via: u64, args: &[&str]) -> Output {
        self.modectl_in(via, args, None)
    }

    /// Run modectl against node `via` in directory `dir` (as an admin client when the
    /// cluster has TLS).
    pub fn modectl_in(&self, via: u64, args: &[&str], dir: Option<&Path>) -> Output {
        let mut cmd = Command::new(binary("modectl"));
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        if let Some(tls) = &self.tls {
            cmd.args(tls.modectl_flags(Some(&Who::admin())));
        }
        cmd.arg("--endpoint")
            .arg(self.nodes[&via].address())
            .args(args)
            .envs(self.launcher.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run modectl")
    }
}

fn lazy_channel(address: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// A typed public API client for `address` (lazy connection).
pub fn client(address: &str) -> ControlClient<Channel> {
    ControlClient::new(lazy_channel(address)).max_decoding_message_size(256 << 20)
}

/// A peer API client for `address`, a node's [`NodeProc::peer_address`] (lazy connection).
pub fn peer_client(address: &str) -> PeerClient<Channel> {
    peer_client_on(lazy_channel(address))
}

/// A peer API client on `channel`.
pub fn peer_client_on(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

/// Whom a test's certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// A node certificate.
    Node(u64),
    /// A client certificate with a role (`viewer`, `operator`, `admin`).
    Client(String, String),
}

impl Who {
    /// The admin client the harness calls as.
    pub fn admin() -> Who {
        Who::Client("test-admin".into(), "admin".into())
    }

    fn stem(&self) -> String {
        match self {
            Who::Node(id) => format!("node-{id}"),
            Who::Client(name, _) => name.clone(),
        }
    }
}

/// A test cluster's CA, and certificates made on demand in its directory (`ca.pem`,
/// `node-ID.pem`, `NAME.pem`, each with `-key.pem`), as `modectl tls` lays them out.
pub struct TlsMaterial {
    pub dir: PathBuf,
    ca: mode::security::pki::Pem,
}

impl TlsMaterial {
    /// A new CA in `dir`.
    pub fn new(dir: &Path) -> TlsMaterial {
        std::fs::create_dir_all(dir).expect("TLS directory");
        let ca = mode::security::pki::create_ca("test CA", mode::security::pki::Validity::days(2))
            .expect("a CA");
        std::fs::write(dir.join("ca.pem"), &ca.cert).expect("write ca.pem");
        std::fs::write(dir.join("ca-key.pem"), &ca.key).expect("write ca-key.pem");
        TlsMaterial {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    /// The CA certificate's path.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The (certificate, key) paths of `who`, made (valid for a day) if missing.
    pub fn cert(&self, who: &Who) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.dir.join(format!("{}.pem", who.stem())),
            self.dir.join(format!("{}-key.pem", who.stem())),
        );
        if !cert.exists() {
            let validity = mode::security::pki::Validity::days(1);
            self.write(who, validity, &cert, &key);
        }
        (cert, key)
    }

    /// Make a certificate for `who` valid as `validity` says, at `cert` and `key`.
    pub fn write(
        &self,
        who: &Who,
        validity: mode::security::pki::Validity,
        cert: &Path,
        key: &Path,
    ) {
        use mode::security::pki::Subject;
        let subject = match who {
            Who::Node(id) => Subject::Node(*id),
            Who::Client(name, role) => Subject::Client {
                name: name.clone(),
                role: mode::security::Role::parse(role).expect("a role"),
            },
        };
        let pem =
            mode::security::pki::issue(&self.ca, &subject, &[], validity).expect("a certificate");
        std::fs::write(cert, pem.cert).expect("write certificate");
        std::fs::write(key, pem.key).expect("write key");
    }

    /// `--tls-ca/--tls-cert/--tls-key` for node `id`.
    pub fn node_flags(&self, id: u64) -> Vec<String> {
        let (cert, key) = self.cert(&Who::Node(id));
        vec![
            "--tls-ca".into(),
            self.ca_path().display().to_string(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    }

    /// modectl's `--ca`, and `--cert/--key` of `who` when given.
    pub fn modectl_flags(&self, who: Option<&Who>) -> Vec<String> {
        let mut flags = vec!["--ca".to_string(), self.ca_path().display().to_string()];
        if let Some(who) = who {
            let (cert, key) = self.cert(who);
            flags.extend([
                "--cert".to_string(),
                cert.display().to_string(),
                "--key".to_string(),
                key.display().to_string(),
            ]);
        }
        flags
    }

    /// A lazy TLS channel to `address`, presenting `who`'s certificate when given.
    pub fn channel(&self, address: &str, who: Option<Who>) -> Channel {
        let paths = who.map(|w| self.cert(&w));
        let config = mode::security::tls::client_config(
            &self.ca_path(),
            paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .expect("a TLS client configuration");
        mode::security::tls::channel(
            address,
            Some(mode::security::tls::ClientTls::Fixed(std::sync::Arc::new(
                config,
            ))),
            |e| e.connect_timeout(Duration::from_secs(1)),
        )
        .expect("a channel")
    }
}

/// Commit a raw state-machine command through a peer (`Propose`, what servers forward to the
/// leader), with a request id ("" for none) carried in the request and its metadata: the
/// command's result (decoded) and the reply.
pub async fn propose(
    client: &mut PeerClient<Channel>,
    command: &str,
    request_id: &str,
    timeout: Option<Duration>,
) -> Result<(serde_json::Value, pb::ProposeReply), tonic::Status> {
    let mut req = tonic::Request::new(pb::ProposeRequest {
        command_json: command.to_string(),
        request_id: request_id.to_string(),
        by: String::new(),
    });
    if !request_id.is_empty() {
        if let Ok(v) = request_id.parse() {
            req.metadata_mut().insert("x-mode-request-id", v);
        }
    }
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let reply = client.propose(req).await?.into_inner();
    let result = serde_json::from_str(&reply.response_json)
        .map_err(|e| tonic::Status::internal(format!("undecodable result: {e}")))?;
    Ok((result, reply))
}

/// A small spec named `name` (kind ticker, one replica, its config padded to about 256 bytes
/// with the ticker's `message`, like the etcd bench), typed.
pub fn small_spec(name: &str) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        kind: "ticker".to_string(),
        replicas: Some(1),
        config: mode::api::convert::json_to_struct(
            &serde_json::json!({"message": "x".repeat(200)}),
        ),
        ..Default::default()
    }
}

/// Store [`small_spec`] `name` through the typed ApplyServices.
pub async fn put_spec(
    client: &mut ControlClient<Channel>,
    name: &str,
) -> Result<pb::ApplyServicesReply, tonic::Status> {
    client
        .apply_services(pb::ApplyServicesRequest {
            specs: vec![small_spec(name)],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The raw `put_spec` command of [`small_spec`] `name` (for [`propose`]: raw replication).
pub fn put_spec_command(name: &str) -> String {
    serde_json::json!({
        "op": "put_spec",
        "spec": {"name": name, "kind": "ticker", "replicas": 1, "config": {"message": "x".repeat(200)}}
    })
    .to_string()
}

/// An instance as JSON, named as the raw placements name them (`moving_from` null when 0).
pub fn instance_json(i: &pb::Instance) -> serde_json::Value {
    serde_json::json!({
        "service": i.service,
        "slot": i.slot,
        "node": i.node,
        "state": i.state,
        "restart_count": i.restart_count,
        "last_crash": (!i.last_crash.is_empty()).then_some(&i.last_crash),
        "moving_from": (i.moving_from != 0).then_some(i.moving_from),
        "reschedules": i.reschedules,
        "epoch": i.epoch,
    })
}

/// An event as JSON, named as the raw event log names them (no `service` / `node` when the
/// event has none).
pub fn event_json(e: &pb::Event) -> serde_json::Value {
    let mut v = serde_json::json!({
        "seq": e.seq,
        "time_ms": e.time_ms,
        "kind": e.kind,
        "message": e.message,
    });
    if !e.service.is_empty() {
        v["service"] = e.service.clone().into();
    }
    if e.node != 0 {
        v["node"] = e.node.into();
    }
    v
}

/// `GET path` on `127.0.0.1:port`: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Whether every instance in `inst` (from [`TestCluster::instances`]) runs, and there are `n`.
pub fn all_running(inst: &BTreeMap<u64, serde_json::Value>, n: usize) -> bool {
    inst.len() == n && inst.values().all(|p| p["state"] == "running")
}

/// An `exec` spec running `sh` that writes its pid to `pid_file` (appending with `append`);
/// `extra` is more YAML (e.g. `"singleton: true\n"`).
pub fn pid_spec(name: &str, pid_file: &Path, append: bool, extra: &str) -> String {
    let op = if append { ">>" } else { ">" };
    format!(
        "name: {name}\nkind: exec\n{extra}config:\n  command: /bin/sh\n  args: [\"-c\", \"echo $$ {op} {}; exec sleep 1000\"]\n",
        pid_file.display()
    )
}

/// The last pid written to `pid_file`, waiting up to 10 s for one.
pub async fn wait_pid(pid_file: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().rev().find_map(|l| l.trim().parse::<u32>().ok()));
        if let Some(p) = last {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no pid in {}",
            pid_file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every pid written to `pid_file` so far.
pub fn pids_in(pid_file: &Path) -> Vec<u32> {
    std::fs::read_to_string(pid_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
