//! `web`: the web view of 3 nodes running 10,000 instances. What the page fetches for its
//! first render (the page, `/api/summary`, `/api/events?tail=100`) and per refresh, timed
//! and weighed, next to the whole-graph SVG the page used to fetch every 2 s; and the wall
//! clock of headless chromium loading and drawing the page (against its start-up alone).

use std::time::{Duration, Instant};

use mode_tests::browser;
use mode_tests::http_get;
use serde_json::{json, Value};

use super::cluster::{bench_cluster_http, median};
use super::graph::load;

/// The targets: the page drawn within 2 s, under 1 MB a refresh.
const TARGET_LOAD_MS: f64 = 2000.0;
const TARGET_REFRESH_BYTES: usize = 1 << 20;

/// `GET path` timed: (ms, body bytes).
fn timed_get(port: u16, path: &str) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let (code, body) = http_get(port, path);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(code == 200, "GET {path}: {code} {body}");
    Ok((ms, body.len()))
}

/// One headless chromium run of `url` (one refresh round's worth of virtual time): wall
/// clock ms and the DOM it dumped.
async fn chromium_run(scratch: &std::path::Path, url: &str) -> (f64, String) {
    let mut args = browser::headless_args(scratch, 1400, 1000, 1000);
    args.push("--dump-dom".into());
    let t = Instant::now();
    let out = browser::run(&args, url, Duration::from_secs(120)).await;
    (
        t.elapsed().as_secs_f64() * 1000.0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn web_suite(instances: u32, samples: usize) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let capacity = instances.to_string();
    let cluster = bench_cluster_http(&["--capacity", &capacity])?;
    rt.block_on(load(&cluster, instances))?;
    let http = cluster.nodes[&1].http.expect("an HTTP port");
    let samples = samples.max(1);

    // What the page fetches to draw itself first, one after the other (it fetches the
    // summary and the events at once, so this is an upper bound).
    let parts = ["/", "/api/summary", "/api/events?tail=100"];
    let mut first_render = Vec::new();
    let mut bytes = vec![0; parts.len()];
    for _ in 0..=samples {
        let mut ms = 0.0;
        for (k, p) in parts.iter().enumerate() {
            let (t, b) = timed_get(http, p)?;
            ms += t;
            bytes[k] = b;
        }
        first_render.push(ms);
    }
    first_render.remove(0); // warm-up
    let first_render_p50 = median(&first_render);
    let refresh_bytes: usize = bytes[1..].iter().sum();
    // Expanding a service fetches its instances (200 a node), every refresh while expanded.
    let mut detail = Vec::new();
    let mut detail_bytes = 0;
    for _ in 0..samples {
        let (t, b) = timed_get(http, "/api/service/load-ticker")?;
        detail.push(t);
        detail_bytes = b;
    }
    // The whole graph as SVG, as the page fetched it every 2 s before.
    let mut svg = Vec::new();
    let mut svg_bytes = 0;
    for _ in 0..samples.min(3) {
        let (t, b) = timed_get(http, "/api/graph.svg")?;
        svg.push(t);
        svg_bytes = b;
    }

    // Headless chromium: the page loaded and drawn (one refresh round), against chromium
    // showing a blank page; virtual time skips idle waits, the network waits are real.
    let scratch = cluster.scratch.0.clone();
    let url = format!("http://127.0.0.1:{http}/");
    // Also with one service expanded from the start (`?open=`): its 600 boxes drawn too.
    let expanded_url = format!("{url}?open=load-ticker");
    let (page_runs, expanded_runs, blank_runs) = rt.block_on(async {
        let (mut page, mut expanded, mut blank) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=samples.min(5) {
            let (ms, dom) = chromium_run(&scratch, &url).await;
            anyhow::ensure!(
                dom.contains("data-rounds=\"1\"") && dom.matches("class=\"node\"").count() == 3,
                "chromium did not draw the page (round done, 3 node columns): {}",
                &dom[..dom.len().min(2000)]
            );
            let (expanded_ms, dom) = chromium_run(&scratch, &expanded_url).await;
            anyhow::ensure!(
                dom.contains("data-instance=\"load-ticker#"),
                "chromium did not draw the expanded service: {}",
                &dom[..dom.len().min(2000)]
            );
            let (blank_ms, _) = chromium_run(&scratch, "about:blank").await;
            if i > 0 {
                page.push(ms);
                expanded.push(expanded_ms);
                blank.push(blank_ms);
            }
        }
        Ok::<_, anyhow::Error>((page, expanded, blank))
    })?;
    let chromium_p50 = median(&page_runs);
    let expanded_p50 = median(&expanded_runs);
    let blank_p50 = median(&blank_runs);
    println!(
        "web: {instances} instances on 3 nodes: first render fetches (page {} B, summary {} B, events {} B) p50 {first_render_p50:.1} ms (target < {TARGET_LOAD_MS} ms)",
        bytes[0], bytes[1], bytes[2]
    );
    println!(
        "web: one refresh (summary + events) {refresh_bytes} B (target < {TARGET_REFRESH_BYTES} B); with a service expanded + {detail_bytes} B in p50 {:.1} ms",
        median(&detail)
    );
    println!(
        "web: the whole-graph SVG the page used to fetch each refresh: {svg_bytes} B, p50 {:.1} ms",
        median(&svg)
    );
    println!(
        "web: headless chromium loading and drawing the page p50 {chromium_p50:.0} ms wall clock, a blank page {blank_p50:.0} ms (the difference, {:.0} ms, is the page)",
        chromium_p50 - blank_p50
    );
    println!(
        "web: the same with load-ticker expanded (600 instance boxes) p50 {expanded_p50:.0} ms ({:.0} ms more than a blank page)",
        expanded_p50 - blank_p50
    );
    Ok(json!({
        "instances": instances,
        "first_render_fetch_p50_ms": first_render_p50,
        "page_bytes": bytes[0],
        "summary_bytes": bytes[1],
        "events_bytes": bytes[2],
        "refresh_bytes": refresh_bytes,
        "service_detail_bytes": detail_bytes,
        "service_detail_p50_ms": median(&detail),
        "graph_svg_bytes": svg_bytes,
        "graph_svg_p50_ms": median(&svg),
        "chromium_page_p50_ms": chromium_p50,
        "chromium_expanded_p50_ms": expanded_p50,
        "chromium_blank_p50_ms": blank_p50,
        "samples": samples,
        "meets_target": expanded_p50 - blank_p50 < TARGET_LOAD_MS
            && first_render_p50 < TARGET_LOAD_MS
            && refresh_bytes + detail_bytes < TARGET_REFRESH_BYTES,
    }))
}
