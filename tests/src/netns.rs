//! A cluster whose nodes each run in their own network namespace, so that a test can cut the
//! links between them: partitions, isolated nodes, flapping links.
//!
//! The layout, per cluster (subnet `10.A.B.0/24`, unique on the machine):
//!
//! ```text
//!  root namespace (the test, modectl)      switch namespace `mode-PID-K-sw`
//!  mdtAABB 10.A.B.1  <---- veth ---->  up0 ─┐
//!                                            br0 (bridge)
//!  namespace `mode-PID-K-1`: eth0 10.A.B.11 <── veth ── n1 ─┤
//!  namespace `mode-PID-K-2`: eth0 10.A.B.12 <── veth ── n2 ─┘ ...
//! ```
//!
//! The bridge lives in a namespace of its own rather than in the root namespace: there,
//! `br_netfilter` sends bridged packets through the root namespace's `FORWARD` chain, which
//! Docker sets to `DROP`. A link is cut with a `blackhole` route inside the sending namespace,
//! in both directions: established connections stall silently (as in a real partition), new
//! connections fail at once (`EINVAL`). No firewall state is touched anywhere.
//!
//! Names carry the test process's pid, so a later run removes what a killed one left behind.
//! Everything (every process in every namespace, the namespaces, the veths) is removed on drop,
//! panics included.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Launcher, TestCluster};

/// The port every node listens on (each has its own address).
pub const NODE_PORT: u16 = 7070;
/// The HTTP side port, when asked for.
pub const HTTP_PORT: u16 = 8080;

/// Run `ip ARGS`; its stdout, or what it said on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, panicking with its message (setup steps that must work).
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("setting up the network namespaces: {e}"))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Fail with a clear message unless this process can create network namespaces.
fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "this test needs network namespaces: run it as root (effective uid is {euid}); \
         CI runs these tests as root, they are not skipped"
    );
    if let Err(e) = ip(&["netns", "list"]) {
        panic!("this test needs `ip netns` (iproute2) to work: {e}");
    }
}

/// Remove the namespaces and veths that a test process which no longer runs left behind
/// (killed before its drop ran).
fn sweep_leftovers() {
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("mode-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            kill_namespace_processes(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "7: mdtc905@if6: <...> ... alias mode-tests pid=123 ..."
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        if !name.starts_with("mdt") {
            continue;
        }
        let owner = line
            .split("alias mode-tests pid=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !pid_alive(pid)) {
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// SIGKILL every process in namespace `ns` until none is left (orphans included).
fn kill_namespace_processes(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<String> = ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        // Some may have exited since they were listed.
        let _ = Command::new("kill")
            .arg("-9")
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The namespaces and links of one cluster; removed on drop.
struct Net {
    /// `mode-PID-K`.
    prefix: String,
    /// `10.A.B`.
    subnet: String,
    /// The root namespace's end of its link to the switch (`mdtAABB`), once created.
    root_link: Option<String>,
    /// Namespaces created so far (the switch first).
    namespaces: Vec<String>,
}

impl Net {
    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn namespace(&self, id: u64) -> String {
        format!("{}-{id}", self.prefix)
    }

    fn node_ip(&self, id: u64) -> String {
        format!("{}.{}", self.subnet, 10 + id)
    }

    fn test_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// A fresh switch namespace and a root link on a subnet nobody else uses.
    fn create(n: u64) -> Net {
        static K: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let k = K.fetch_add(1, Ordering::Relaxed);
        let mut net = Net {
            prefix: format!("mode-{pid}-{k}"),
            subnet: String::new(),
            root_link: None,
            namespaces: Vec::new(),
        };
        assert!(n <= 200, "at most 200 nodes per network");
        let switch = net.switch();
        ip_ok(&["netns", "add", &switch]);
        net.namespaces.push(switch.clone());
        ip_ok(&["-n", &switch, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &switch, "link", "set", "br0", "up"]);
        // Subnets 10.200.0.0 to 10.249.255.0: the root link's name is the subnet, so creating
        // it claims the subnet atomically against other test processes.
        const SUBNETS: u64 = 50 * 256;
        let start = (u64::from(pid) * 256 + k * 7919) % SUBNETS;
        let used = ip(&["-o", "addr", "show"]).unwrap_or_default();
        for t in 0..SUBNETS {
            let s = (start + t) % SUBNETS;
            let (a, b) = (200 + s / 256, s % 256);
            let subnet = format!("10.{a}.{b}");
            if used.contains(&format!(" {subnet}.")) {
                continue;
            }
            let link = format!("mdt{a:02x}{b:02x}");
            let made = ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "up0", "netns", &switch,
            ]);
            if made.is_ok() {
                net.root_link = Some(link);
                net.subnet = subnet;
                break;
            }
        }
        let link = net
            .root_link
            .clone()
            .expect("no free subnet in 10.200.0.0/10.249.255.0");
        let alias = format!("mode-tests pid={pid} ns={}", net.prefix);
        ip_ok(&["link", "set", "dev", &link, "alias", &alias]);
        ip_ok(&["-n", &switch, "link", "set", "up0", "master", "br0", "up"]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{}/24", net.test_ip()),
            "dev",
            &link,
        ]);
        ip_ok(&["link", "set", &link, "up"]);
        for id in 1..=n {
            let ns = net.namespace(id);
            ip_ok(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let port = format!("n{id}");
            ip_ok(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip_ok(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.node_ip(id)),
                "dev",
                "eth0",
            ]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// Every process in every namespace of this network.
    fn kill_all(&self) {
        for ns in &self.namespaces {
            kill_namespace_processes(ns);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.kill_all();
        if let Some(link) = &self.root_link {
            // Deleting it also deletes its peer; done explicitly because namespaces are
            // destroyed asynchronously and the name claims the subnet.
            let _ = ip(&["link", "del", link]);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// How to start a [`NetCluster`].
pub struct NetClusterBuilder {
    n: u64,
    flags: Vec<String>,
    node_flags: BTreeMap<u64, Vec<String>>,
    launcher: Option<Launcher>,
    http: bool,
}

impl NetClusterBuilder {
    /// Flags for every node.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// Flags for node `id` only (after the common ones).
    pub fn node_flags(mut self, id: u64, flags: &[&str]) -> Self {
        self.node_flags
            .entry(id)
            .or_default()
            .extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// Start nodes with another program than the workspace's `mode-node`.
    pub fn launcher(mut self, launcher: Launcher) -> Self {
        self.launcher = Some(launcher);
        self
    }

    /// Serve the HTTP side port ([`HTTP_PORT`]) on every node.
    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    pub fn start(self) -> NetCluster {
        require_root();
        let inner = self.launcher.unwrap_or_else(Launcher::mode_node);
        // Taken before the network exists, so that tests of one binary never overlap.
        let mut cluster = TestCluster::empty(inner.clone(), String::new());
        sweep_leftovers();
        let net = Net::create(self.n);
        let peers = (1..=self.n)
            .map(|id| format!("{id}={}:{}", net.node_ip(id), NODE_PORT + 1))
            .collect::<Vec<_>>()
            .join(",");
        cluster.peers = peers.clone();
        for id in 1..=self.n {
            // `ip netns exec` execs, so the child's pid is the node's.
            let mut prefix = vec![
                "netns".to_string(),
                "exec".to_string(),
                net.namespace(id),
                inner.program.display().to_string(),
            ];
            prefix.extend(inner.prefix.iter().cloned());
            let launcher = Launcher {
                program: "ip".into(),
                prefix,
                env: inner.env.clone(),
            };
            // Namespaces of the test's own: an isolated network, so no TLS (--insecure).
            let mut args = vec![
                "--peers".to_string(),
                peers.clone(),
                "--insecure".to_string(),
            ];
            args.extend(self.flags.iter().cloned());
            args.extend(self.node_flags.get(&id).into_iter().flatten().cloned());
            if self.http {
                args.extend([
                    "--http-listen".to_string(),
                    format!("{}:{HTTP_PORT}", net.node_ip(id)),
                ]);
            }
            let node_ip = net.node_ip(id);
            let node =
                cluster.add_node_at(id, &node_ip, (NODE_PORT, NODE_PORT + 1), launcher, args);
            node.http = self.http.then_some(HTTP_PORT);
        }
        let mut c = NetCluster {
            cluster,
            net,
            cuts: BTreeSet::new(),
            test_cut: BTreeSet::new(),
        };
        for node in c.cluster.nodes.values_mut() {
            node.start();
        }
        c
    }
}

/// `n` `mode-node` processes, each in its own network namespace, with links the test cuts and
/// heals. Derefs to [`TestCluster`] for its gRPC and modectl helpers.
pub struct NetCluster {
    cluster: TestCluster,
    net: Net,
    /// Blackholed directions: (from, to).
    cuts: BTreeSet<(u64, u64)>,
    /// Nodes that cannot reach the test (nor the test them).
    test_cut: BTreeSet<u64>,
}

impl Deref for NetCluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.cluster
    }
}

impl DerefMut for NetCluster {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.cluster
    }
}

impl NetCluster {
    /// `n` nodes bootstrapped with `--peers`, each with `extra` flags.
    pub fn start(n: u64, extra: &[&str]) -> NetCluster {
        NetCluster::builder(n).flags(extra).start()
    }

    pub fn builder(n: u64) -> NetClusterBuilder {
        NetClusterBuilder {
            n,
            flags: Vec::new(),
            node_flags: BTreeMap::new(),
            launcher: None,
            http: false,
        }
    }

    pub fn ids(&self) -> Vec<u64> {
        self.cluster.nodes.keys().copied().collect()
    }

    /// `IP:PORT` of node `id`'s gRPC listener.
    pub fn address(&self, id: u64) -> String {
        self.cluster.nodes[&id].address()
    }

    /// Node `id`'s IP address.
    pub fn ip(&self, id: u64) -> String {
        self.net.node_ip(id)
    }

    /// The name every namespace of this cluster starts with (`mode-PID-K`); the root
    /// namespace's link to it has the alias `mode-tests pid=PID ns=mode-PID-K`.
    pub fn network_name(&self) -> &str {
        &self.net.prefix
    }

    /// The network namespace node `id` runs in (for `ip netns exec`).
    pub fn namespace(&self, id: u64) -> String {
        self.net.namespace(id)
    }

    /// The links cut now, as (from, to) pairs.
    pub fn cuts(&self) -> &BTreeSet<(u64, u64)> {
        &self.cuts
    }

    fn set_route(&self, from: u64, to_ip: &str, cut: bool) {
        let ns = self.net.namespace(from);
        let dst = format!("{to_ip}/32");
        let r = if cut {
            ip(&["-n", &ns, "route", "replace", "blackhole", &dst])
        } else {
            ip(&["-n", &ns, "route", "del", &dst])
        };
        if let Err(e) = r {
            panic!("changing the links of node {from}: {e}");
        }
    }

    /// Make the cut links exactly `want`.
    fn apply_cuts(&mut self, want: BTreeSet<(u64, u64)>) {
        for &(a, b) in want.difference(&self.cuts) {
            self.set_route(a, &self.net.node_ip(b), true);
        }
        for &(a, b) in self.cuts.difference(&want) {
            self.set_route(a, &self.net.node_ip(b), false);
        }
        self.cuts = want;
    }

    /// Split the nodes into `groups` that cannot reach each other (symmetric); nodes in no
    /// group are cut off from everyone. Replaces any earlier partition; the test still
    /// reaches every node (see [`NetCluster::cut_from_test`]).
    pub fn partition(&mut self, groups: &[&[u64]]) {
        let ids = self.ids();
        let group_of = |id: u64| groups.iter().position(|g| g.contains(&id));
        for g in groups {
            for id in *g {
                assert!(ids.contains(id), "node {id} is not in this cluster");
            }
        }
        let mut want = BTreeSet::new();
        for &a in &ids {
            for &b in &ids {
                let together = a == b || (group_of(a).is_some() && group_of(a) == group_of(b));
                if !together {
                    want.insert((a, b));
                }
            }
        }
        self.apply_cuts(want);
    }

    /// Cut node `id` off from every other node (the test still reaches it).
    pub fn isolate(&mut self, id: u64) {
        let rest: Vec<u64> = self.ids().into_iter().filter(|i| *i != id).collect();
        self.partition(&[&[id], &rest]);
    }

    /// Cut (or restore) the link between node `id` and the test itself (and modectl).
    pub fn cut_from_test(&mut self, id: u64, cut: bool) {
        if cut != self.test_cut.contains(&id) {
            self.set_route(id, &self.net.test_ip(), cut);
            if cut {
                self.test_cut.insert(id);
            } else {
                self.test_cut.remove(&id);
            }
        }
    }

    /// Restore every link (between nodes, and to the test).
    pub fn heal(&mut self) {
        self.apply_cuts(BTreeSet::new());
        for id in self.test_cut.clone() {
            self.cut_from_test(id, false);
        }
    }

    /// Whether node `a` can open a TCP connection to node `b`'s listener (checked from
    /// inside `a`'s namespace).
    pub fn can_connect(&self, a: u64, b: u64) -> bool {
        let target = format!("/dev/tcp/{}/{NODE_PORT}", self.net.node_ip(b));
        Command::new("ip")
            .args(["netns", "exec", &self.net.namespace(a), "timeout", "2"])
            .args(["bash", "-c", &format!("exec 3<>{target}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGKILL node `id`'s `mode-node` process (what it started is left to its fate).
    pub fn kill9(&mut self, id: u64) {
        self.cluster.node(id).kill9();
    }

    /// SIGKILL every process in node `id`'s namespace: the node and everything it started
    /// (a machine losing power).
    pub fn power_off(&mut self, id: u64) {
        self.cluster.node(id).kill9();
        kill_namespace_processes(&self.net.namespace(id));
    }

    /// Start node `id` again (killing it first if it still runs), with its data directory.
    pub fn restart(&mut self, id: u64) {
        let node = self.cluster.node(id);
        node.kill9();
        node.start();
    }

    /// Whether node `id`'s process runs (a stopped one counts as running).
    pub fn running(&mut self, id: u64) -> bool {
        let node = self.cluster.node(id);
        node.pid().is_some() && node.exited().is_none()
    }

    /// SIGSTOP node `id` (frozen: no timers, no answers).
    pub fn stop(&mut self, id: u64) {
        self.cluster.node(id).signal("STOP");
    }

    /// SIGCONT node `id`.
    pub fn cont(&mut self, id: u64) {
        self.cluster.node(id).signal("CONT");
    }

    /// Every process in node `id`'s namespace (the node and what it started, orphans
    /// included).
    pub fn pids_in(&self, id: u64) -> Vec<u32> {
        ip(&["netns", "pids", &self.net.namespace(id)])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        // Every process first (nodes, instances, orphans), so that nothing writes into the
        // scratch directory after it is removed; then the fields: the nodes are reaped, the
        // scratch directory removed, and the network deleted.
        self.net.kill_all();
    }
}
