//! The web view in a real headless chromium, 1400 px wide, with real `mode-node` processes:
//! the page is served through a recording proxy that adds a probe script, which writes the
//! geometry of what the page drew (getBoundingClientRect) into the DOM for the test to check:
//! every node column present and visible, boxes that do not overlap, dependency lines clear
//! of all text, services that collapse, what a pending instance waits for, full crash reasons;
//! and at 10,000 instances, that one refresh stays under 1 MB.

use std::time::{Duration, Instant};

use mode_tests::browser::{self, Fetched, PageProxy};
use mode_tests::{http_get, TestCluster};
use serde_json::{json, Value};

const ELECTION: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(60);

/// The most one refresh of the page may move (the issue's budget).
const REFRESH_BUDGET: usize = 1 << 20;

/// The probe: waits for the page to draw (and for `PROBE.expand` to be expanded), measures,
/// collapses and re-expands `PROBE.toggle`, opens `PROBE.select` in the side panel, waits
/// `PROBE.rounds` more refreshes, and writes it all as percent-encoded JSON.
const PROBE: &str = r##"
const P = window.PROBE;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(f, ms = 20000) { for (let t = 0; t < ms; t += 50) { if (f()) return true; await sleep(50); } return false; }
const rounds = () => Number(document.body.dataset.rounds || 0);
const rect = (e) => { const r = e.getBoundingClientRect();
  return { left: r.left, right: r.right, top: r.top + scrollY, bottom: r.bottom + scrollY, width: r.width, height: r.height }; };
const loaded = () => ![...document.querySelectorAll(".more")].some((m) => m.textContent === "loading…");
(async () => {
  const out = { errors: [] };
  try {
    await until(() => rounds() >= 1 && document.querySelector("#nodes .node"));
    if (P.expand) document.querySelector(`.svc[data-service="${P.expand}"] .toggle`).click();
    await until(loaded);
    const r0 = rounds();
    await until(() => rounds() > r0 && loaded());
    scrollTo(0, 0);
    const cols = [...document.querySelectorAll("#nodes .node")];
    out.window = { width: innerWidth, height: innerHeight, scrollWidth: document.documentElement.scrollWidth };
    out.nodes = cols.map((e) => ({ id: e.dataset.node, state: e.dataset.state, rect: rect(e),
      scrollWidth: e.scrollWidth, clientWidth: e.clientWidth, head: e.querySelector(".head").textContent }));
    out.instances = [...document.querySelectorAll("#nodes .instance")].map((e) => ({ key: e.dataset.instance,
      node: e.dataset.node, state: e.dataset.state, rect: rect(e), text: e.textContent,
      crashTitle: e.querySelector(".crash")?.getAttribute("title") ?? null }));
    out.services = [...document.querySelectorAll("#services .svc")].map((e) => ({ name: e.dataset.service,
      health: e.dataset.health, expanded: e.querySelector(".toggle").getAttribute("aria-expanded"),
      text: e.textContent, rect: rect(e) }));
    out.edges = [...document.querySelectorAll("#services path.dep")].map((e) => ({ edge: e.dataset.edge, rect: rect(e) }));
    out.texts = [];
    for (const root of [document.getElementById("services"), document.getElementById("nodes")]) {
      const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
      for (let n = walk.nextNode(); n; n = walk.nextNode()) {
        if (!n.textContent.trim() || n.parentElement.closest("svg")) continue;
        const range = document.createRange();
        range.selectNodeContents(n);
        for (const r of range.getClientRects()) {
          if (r.width > 0 && r.height > 0) out.texts.push({ text: n.textContent.slice(0, 60),
            rect: { left: r.left, right: r.right, top: r.top + scrollY, bottom: r.bottom + scrollY } });
        }
      }
    }
    out.waiting = [...document.querySelectorAll("[data-waiting-for]")].map((e) => ({ service: e.dataset.waitingFor, text: e.textContent }));
    out.attention = [...document.querySelectorAll("#attention .instance")].map((e) => ({ key: e.dataset.instance, text: e.textContent }));
    out.markupInReasons = document.querySelectorAll(".crash *, .crash-full *, .wait *, .waiting *").length;
    // Each column can be seen: the point at its header's centre belongs to it.
    cols.forEach((e, k) => {
      const head = e.querySelector(".head");
      head.scrollIntoView({ block: "center" });
      const r = head.getBoundingClientRect();
      const hit = document.elementFromPoint(r.left + Math.min(r.width / 2, 40), r.top + r.height / 2);
      out.nodes[k].topmost = !!hit && hit.closest(".node") === e;
    });
    scrollTo(0, 0);
    if (P.toggle) {
      const count = () => document.querySelectorAll(`#nodes .instance[data-instance^="${P.toggle}#"]`).length;
      const button = () => document.querySelector(`.svc[data-service="${P.toggle}"] .toggle`);
      const before = count();
      button().click();
      const collapsed = count();
      const attr = button().getAttribute("aria-expanded");
      const group = [...document.querySelectorAll(`#nodes .group[data-service="${P.toggle}"]`)].map((g) => g.textContent);
      button().click();
      await until(() => count() === before);
      out.toggle = { before, collapsed, attr, group, after: count() };
    }
    if (P.select) {
      document.querySelector(`#nodes .instance[data-instance="${P.select}"]`)?.click();
      const panel = document.getElementById("panel");
      out.panel = { hidden: panel.hidden, reason: panel.querySelector(".crash-full")?.textContent ?? null };
      out.withPanel = { scrollWidth: document.documentElement.scrollWidth,
        nodes: [...document.querySelectorAll("#nodes .node")].map((e) => rect(e)) };
    }
    if (P.rounds) { const r = rounds(); await until(() => rounds() >= r + P.rounds); }
    out.rounds = rounds();
  } catch (e) { out.errors.push(String((e && e.stack) || e)); }
  const banner = document.getElementById("banner");
  if (!banner.hidden) out.errors.push(`the page says: ${banner.textContent}`);
  document.getElementById("probe-result").textContent = encodeURIComponent(JSON.stringify(out));
})();
"##;

/// Load the page through a recording proxy with the probe (`settings` is `PROBE`), in a
/// `width`-px window; the probe's result and everything the page fetched.
async fn probe_page(
    c: &TestCluster,
    node: u64,
    width: u32,
    settings: Value,
    virtual_ms: u64,
) -> (Value, Vec<Fetched>) {
    let http = c.nodes[&node].http.unwrap();
    let (code, page) = http_get(http, "/");
    assert_eq!(code, 200);
    let script = format!("window.PROBE = {settings};\n{PROBE}");
    let proxy = PageProxy::start(http, browser::with_probe(&page, &script));
    let scratch = c.scratch.0.join(format!("probe-{width}"));
    let mut args = browser::headless_args(&scratch, width, 1000, virtual_ms);
    args.push("--dump-dom".into());
    let out = browser::run(
        &args,
        &format!("http://127.0.0.1:{}/", proxy.port),
        Duration::from_secs(120),
    )
    .await;
    let dom = String::from_utf8_lossy(&out.stdout);
    let result = browser::probe_result(&dom).unwrap_or_else(|| {
        panic!(
            "the probe wrote nothing:\n{dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let log = proxy.log();
    assert_eq!(
        result["errors"],
        json!([]),
        "the probe failed: {result:#}\nfetched: {log:?}"
    );
    (result, log)
}

#[derive(Debug, Clone, Copy)]
struct Rect {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

fn rect(v: &Value) -> Rect {
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    Rect {
        left: f("left"),
        right: f("right"),
        top: f("top"),
        bottom: f("bottom"),
    }
}

impl Rect {
    /// Whether the two share more than a hair (half a pixel) of area.
    fn overlaps(&self, o: &Rect) -> bool {
        self.left.max(o.left) + 0.5 < self.right.min(o.right)
            && self.top.max(o.top) + 0.5 < self.bottom.min(o.bottom)
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in the probe"))
}

/// No two of `items` (each with a `rect`) overlap.
fn assert_disjoint(items: &[Value], what: &str) {
    for (i, a) in items.iter().enumerate() {
        for b in &items[i + 1..] {
            assert!(
                !rect(&a["rect"]).overlaps(&rect(&b["rect"])),
                "{what} overlap: {a}\n{b}"
            );
        }
    }
}

/// Every node column is there, inside the window, on top, and apart from the others; the
/// page needs no horizontal scrolling.
fn assert_columns_fit(probe: &Value, ids: &[u64]) {
    let width = probe["window"]["width"].as_f64().unwrap();
    assert!(
        probe["window"]["scrollWidth"].as_f64().unwrap() <= width,
        "the page scrolls sideways: {}",
        probe["window"]
    );
    let nodes = list(probe, "nodes");
    let drawn: Vec<u64> = nodes
        .iter()
        .map(|n| n["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(drawn, ids, "node columns");
    for n in nodes {
        let r = rect(&n["rect"]);
        assert!(
            r.left >= 0.0 && r.right <= width && r.right - r.left >= 200.0,
            "node column not within the {width}-px window: {n}"
        );
        assert_eq!(n["topmost"], true, "something covers node column {n}");
        assert!(
            n["scrollWidth"].as_f64() <= n["clientWidth"].as_f64(),
            "node column scrolls sideways: {n}"
        );
    }
    assert_disjoint(nodes, "node columns");
}

async fn wait_summary(
    http: u16,
    what: &str,
    mut ready: impl FnMut(&Value) -> bool,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = http_get(http, "/api/summary");
        if code == 200 {
            let v: Value = serde_json::from_str(&body).expect("the summary is JSON");
            if ready(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "never {what}: {v:#}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The crash reason of `crashy`: long (longer than the exec kind keeps of a line), and with
/// markup that must stay text.
const REASON: &str = "first start failed: <b>not bold</b> & <script>alert(1)</script> \"quoted\" — this reason is long on purpose, far longer than any box is wide, so that only a title or the side panel can show all of it; END-OF-REASON";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_fits_1400_px_and_explains_every_instance_in_a_real_browser() {
    let c = TestCluster::start_with_http(3, &[]);
    c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    let mark = c.scratch.0.join("crashed-once");
    // Crashes once with REASON on stderr, then runs.
    let crashy = json!({
        "name": "crashy", "kind": "exec",
        "config": {"command": "/bin/sh", "args": ["-c", format!(
            "if [ -e '{m}' ]; then exec sleep 1000; fi; touch '{m}'; echo '{REASON}' >&2; sleep 0.2; exit 1",
            m = mark.display())]},
    });
    let specs = format!(
        "name: db\nkind: ticker\nconfig: {{every_ms: 500}}\n---\nname: web\nkind: ticker\nconfig: {{every_ms: 500}}\nreplicas: 3\ndepends_on: [db]\n---\nname: stuck\nkind: ticker\nconstraints: [{{label: zone, equals: mars}}]\n---\nname: needy\nkind: ticker\ndepends_on: [stuck]\n---\n{crashy}\n"
    );
    c.apply(1, &specs).await.expect("apply the specs");
    let http = c.nodes[&1].http.unwrap();
    let summary = wait_summary(
        http,
        "settled",
        |s| {
            let svc = |n: &str| {
                s["services"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["name"] == n))
                    .cloned()
                    .unwrap_or_default()
            };
            svc("web")["running"] == 3
                && svc("db")["running"] == 1
                && svc("crashy")["running"] == 1
                && svc("crashy")["restarts"].as_u64() >= Some(1)
                && svc("needy")["placed"] == 1
                && svc("stuck")["waiting_for"]
                    .as_str()
                    .is_some_and(|w| w.contains("could not be placed"))
        },
        SETTLE,
    )
    .await;
    let (code, crashy) = http_get(http, "/api/service/crashy");
    assert_eq!(code, 200);
    let crashy: Value = serde_json::from_str(&crashy).unwrap();
    let reason = crashy["instances"][0]["last_crash"]
        .as_str()
        .expect("crashy's last crash")
        .to_string();
    // (The exec kind cuts a stderr line at its own limit; the page must show all it keeps.)
    assert!(
        reason.contains("<script>alert(1)</script>") && reason.chars().count() > 200,
        "{reason}"
    );
    assert_eq!(http_get(http, "/api/service/nope").0, 404);
    assert_eq!(http_get(http, "/api/service/crashy?per_node=x").0, 400);
    assert_eq!(http_get(http, "/api/events?tail=x").0, 400);
    let (_, tail) = http_get(http, "/api/events?tail=2");
    assert_eq!(serde_json::from_str::<Vec<Value>>(&tail).unwrap().len(), 2);
    let needy = list(&summary, "attention")
        .iter()
        .find(|i| i["service"] == "needy")
        .unwrap_or_else(|| panic!("needy needs attention: {summary:#}"));
    assert!(
        needy["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("dependencies to run: stuck")),
        "{needy}"
    );

    let settings = json!({"toggle": "web", "select": "crashy#0"});
    let (probe, _) = probe_page(&c, 1, 1400, settings, 30_000).await;
    assert_columns_fit(&probe, &[1, 2, 3]);
    // A small cluster opens with every service expanded: every instance has its box, inside
    // its own column, and no two boxes overlap.
    let instances = list(&probe, "instances");
    let mut keys: Vec<&str> = instances
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["crashy#0", "db#0", "needy#0", "web#0", "web#1", "web#2"]
    );
    assert_disjoint(instances, "instance boxes");
    for i in instances {
        let col = list(&probe, "nodes")
            .iter()
            .find(|n| n["id"] == i["node"])
            .unwrap();
        let (b, c) = (rect(&i["rect"]), rect(&col["rect"]));
        assert!(
            b.left >= c.left && b.right <= c.right,
            "{i} sticks out of {col}"
        );
    }
    // Dependency lines: one per dependency, every one clear of every piece of text.
    let mut edges: Vec<&str> = list(&probe, "edges")
        .iter()
        .map(|e| e["edge"].as_str().unwrap())
        .collect();
    edges.sort();
    assert_eq!(edges, ["needy->stuck", "web->db"]);
    let texts = list(&probe, "texts");
    assert!(texts.len() > 20, "the probe found the text: {texts:?}");
    for e in list(&probe, "edges") {
        for t in texts {
            assert!(
                !rect(&e["rect"]).overlaps(&rect(&t["rect"])),
                "dependency line {e} crosses text {t}"
            );
        }
    }
    // Per-service health.
    let services = list(&probe, "services");
    let row = |name: &str| {
        services
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {services:?}"))
    };
    let web = row("web")["text"].as_str().unwrap();
    assert!(
        web.contains("3/3 running") && web.contains("0 crash-looping"),
        "{web}"
    );
    assert_eq!(row("web")["health"], "ok");
    assert_eq!(row("stuck")["health"], "bad");
    // What the pending instances wait for: the unplaced one (the latest `unplaced` event)
    // and the placed one (its dependency).
    let stuck = list(&probe, "waiting")
        .iter()
        .find(|w| w["service"] == "stuck")
        .expect("stuck says what it waits for");
    let stuck = stuck["text"].as_str().unwrap();
    assert!(
        stuck.starts_with("waiting for: 1 instance on no node")
            && stuck.contains("could not be placed"),
        "{stuck}"
    );
    let needy = instances.iter().find(|i| i["key"] == "needy#0").unwrap();
    assert!(
        needy["text"]
            .as_str()
            .unwrap()
            .contains("waiting for: its dependencies to run: stuck"),
        "{needy}"
    );
    assert!(
        list(&probe, "attention")
            .iter()
            .any(|i| i["key"] == "needy#0"),
        "needy is listed as needing attention"
    );
    // The whole crash reason, as text: on hover (title) and in the side panel.
    let crashy = instances.iter().find(|i| i["key"] == "crashy#0").unwrap();
    assert_eq!(crashy["crashTitle"], reason.as_str(), "{crashy}");
    assert_eq!(probe["panel"]["hidden"], false);
    assert_eq!(probe["panel"]["reason"], reason.as_str());
    assert_eq!(probe["markupInReasons"], 0, "workload text became markup");
    // With the panel open the columns still fit.
    let width = probe["window"]["width"].as_f64().unwrap();
    assert!(probe["withPanel"]["scrollWidth"].as_f64().unwrap() <= width);
    for r in list(&probe["withPanel"], "nodes") {
        assert!(rect(r).right <= width, "{r}");
    }
    // Services collapse (their boxes go, the counts stay) and expand again.
    let toggle = &probe["toggle"];
    assert_eq!(toggle["before"], 3, "{toggle}");
    assert_eq!(toggle["collapsed"], 0, "{toggle}");
    assert_eq!(toggle["attr"], "false");
    assert!(
        list(toggle, "group")
            .iter()
            .all(|g| g.as_str().unwrap().starts_with("▸ web: ")
                && g.as_str().unwrap().contains("running")),
        "{toggle}"
    );
    assert_eq!(toggle["after"], 3, "{toggle}");

    // Narrow (as 4+ nodes are at 1400 px): the columns wrap instead of scrolling sideways.
    let (narrow, _) = probe_page(&c, 2, 640, json!({}), 10_000).await;
    assert_columns_fit(&narrow, &[1, 2, 3]);
    let tops: std::collections::BTreeSet<i64> = list(&narrow, "nodes")
        .iter()
        .map(|n| rect(&n["rect"]).top as i64)
        .collect();
    assert!(tops.len() > 1, "the columns wrapped: {}", narrow["nodes"]);

    // And a picture of it, 1400 px wide.
    let shot = c.scratch.0.join("web-view.png");
    let mut args = browser::headless_args(&c.scratch.0, 1400, 1000, 8000);
    args.push(format!("--screenshot={}", shot.display()));
    let out = browser::run(
        &args,
        &format!("http://127.0.0.1:{http}/"),
        Duration::from_secs(120),
    )
    .await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(browser::png_size(&png), Some((1400, 1000)));
    assert!(
        png.len() > 20_000,
        "a blank screenshot? {} bytes",
        png.len()
    );
    // To look at it: MODE_WEB_SCREENSHOT=/tmp/web-view.png cargo test ...
    if let Some(keep) = std::env::var_os("MODE_WEB_SCREENSHOT") {
        std::fs::copy(&shot, &keep).expect("keep the screenshot");
        println!(
            "screenshot kept as {}",
            std::path::Path::new(&keep).display()
        );
    }
}

/// The bytes of each refresh round in a proxy log: a round starts with `/api/summary`.
fn rounds(log: &[Fetched]) -> Vec<(usize, Vec<String>)> {
    let mut out: Vec<(usize, Vec<String>)> = Vec::new();
    for f in log {
        if f.path == "/api/summary" {
            out.push((0, Vec::new()));
        }
        if let Some(round) = out.last_mut() {
            round.0 += f.bytes;
            round
                .1
                .push(format!("{} {} {} B", f.path, f.status, f.bytes));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_of_10_000_instances_stays_under_1_mb_per_refresh() {
    let c = TestCluster::start_with_http(3, &["--capacity", "10000"]);
    c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    for kind in ["ticker", "counter"] {
        c.apply(
            1,
            &format!(
                "name: load-{kind}\nkind: {kind}\nconfig: {{every_ms: 10000}}\nreplicas: 5000\n"
            ),
        )
        .await
        .expect("apply");
    }
    let http = c.nodes[&1].http.unwrap();
    wait_summary(
        http,
        "10,000 running",
        |s| {
            s["services"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|s| s["running"] == 5000))
        },
        Duration::from_secs(300),
    )
    .await;
    let (_, summary) = http_get(http, "/api/summary");
    let (_, detail) = http_get(http, "/api/service/load-ticker");
    println!(
        "10,000 instances: /api/summary {} B, /api/service/load-ticker {} B",
        summary.len(),
        detail.len()
    );

    // The page: collapsed at this size; expanding a service fetches its instances (200 a
    // node), the refreshes after that included.
    let settings = json!({"expand": "load-ticker", "rounds": 2});
    let (probe, log) = probe_page(&c, 1, 1400, settings, 30_000).await;
    assert_columns_fit(&probe, &[1, 2, 3]);
    let services = list(&probe, "services");
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["load-counter", "load-ticker"]);
    assert!(services
        .iter()
        .all(|s| s["text"].as_str().unwrap().contains("5000/5000 running")));
    assert_eq!(services[0]["expanded"], "false", "collapsed at first");
    assert_eq!(services[1]["expanded"], "true");
    // At most 200 boxes a node, the rest counted.
    let summary: Value = serde_json::from_str(&summary).unwrap();
    let shown: u64 = list(&summary, "nodes")
        .iter()
        .map(|n| {
            n["services"]["load-ticker"]["running"]
                .as_u64()
                .unwrap_or(0)
                .min(200)
        })
        .sum();
    let boxes = list(&probe, "instances");
    assert_eq!(boxes.len() as u64, shown, "200 instance boxes a node");
    assert!(boxes
        .iter()
        .all(|b| b["key"].as_str().unwrap().starts_with("load-ticker#")));
    let nodes = list(&probe, "nodes");
    for n in nodes {
        assert!(n["head"].as_str().unwrap().contains("node"), "{n}");
    }

    let rounds = rounds(&log);
    assert!(rounds.len() >= 3, "a few refreshes: {log:?}");
    for (bytes, what) in &rounds {
        assert!(
            *bytes < REFRESH_BUDGET,
            "one refresh moved {bytes} B: {what:?}"
        );
    }
    let page: usize = log
        .iter()
        .take_while(|f| f.path != "/api/summary")
        .map(|f| f.bytes)
        .sum();
    let first = rounds[0].0;
    assert!(
        page + first < REFRESH_BUDGET,
        "the first load moved {} B",
        page + first
    );
    println!(
        "10,000 instances: page {page} B, refresh rounds {:?} B",
        rounds.iter().map(|r| r.0).collect::<Vec<_>>()
    );
}
