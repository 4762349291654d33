//! `modectl graph`: the combined beacon graph of the cluster, as a tree, JSON, dot or SVG,
//! once or redrawn on every change.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use clap::{Args, ValueEnum};
use mode::graph::{svg, ClusterGraph, Palette};
use mode_proto::v1 as pb;

use crate::{Client, Failure};

#[derive(Args)]
pub(crate) struct GraphArgs {
    /// How to draw it (`-o json` also selects JSON).
    #[arg(long, value_enum)]
    format: Option<GraphFormat>,
    /// Only this service's instances (and the dependency edges touching it).
    #[arg(long)]
    service: Option<String>,
    /// Only this node.
    #[arg(long)]
    node: Option<u64>,
    /// Include each node's daemon services (Raft, servers, agent, control loop).
    #[arg(long)]
    daemon: bool,
    /// How long the answering node waits for each other node, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    deadline_ms: u32,
    /// Keep redrawing whenever the graph changes.
    #[arg(short, long)]
    watch: bool,
    /// How often `--watch` asks, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    interval_ms: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum GraphFormat {
    /// An indented tree, coloured by state on a terminal.
    Tree,
    /// The merged graph as JSON.
    Json,
    /// Graphviz dot.
    Dot,
    /// SVG, laid out without Graphviz.
    Svg,
}

/// The graph's JSON as the node sent it.
async fn fetch_json(
    client: &mut Client,
    endpoint: &str,
    args: &GraphArgs,
) -> Result<Vec<u8>, Failure> {
    let reply = client
        .graph(pb::GraphRequest {
            service: args.service.clone().unwrap_or_default(),
            node: args.node.unwrap_or(0),
            deadline_ms: args.deadline_ms,
            daemon: args.daemon,
        })
        .await
        .map_err(|s| Failure::from_status(endpoint, &s))?
        .into_inner();
    Ok(reply.graph_json)
}

fn decode<T: serde::de::DeserializeOwned>(endpoint: &str, json: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(json).map_err(|e| Failure {
        code: 1,
        message: format!("undecodable graph from {endpoint}: {e}"),
    })
}

async fn fetch(
    client: &mut Client,
    endpoint: &str,
    args: &GraphArgs,
) -> Result<ClusterGraph, Failure> {
    let json = fetch_json(client, endpoint, args).await?;
    decode(endpoint, &json)
}

/// What the unreachable-node warnings need of a graph (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct Reachability {
    nodes: Vec<NodeReachability>,
}

#[derive(serde::Deserialize)]
struct NodeReachability {
    id: u64,
    address: String,
    reachable: bool,
    #[serde(default)]
    error: Option<String>,
}

fn draw(graph: &ClusterGraph, format: GraphFormat, palette: Palette) -> String {
    match format {
        GraphFormat::Tree => graph.render_tree(palette),
        GraphFormat::Json => {
            let mut s = serde_json::to_string(graph).unwrap_or_default();
            s.push('\n');
            s
        }
        GraphFormat::Dot => graph.to_dot(),
        GraphFormat::Svg => svg::render(graph),
    }
}

fn warn_unreachable(graph: &Reachability) {
    for n in graph.nodes.iter().filter(|n| !n.reachable) {
        eprintln!(
            "warning: node {} ({}) did not answer: {}",
            n.id,
            n.address,
            n.error.as_deref().unwrap_or("unknown error")
        );
    }
}

pub(crate) async fn run(
    args: &GraphArgs,
    client: &mut Client,
    endpoint: &str,
    json: bool,
) -> Result<(), Failure> {
    let format = args.format.unwrap_or(if json {
        GraphFormat::Json
    } else {
        GraphFormat::Tree
    });
    let terminal = std::io::stdout().is_terminal();
    let palette = if terminal && std::env::var_os("NO_COLOR").is_none() {
        Palette::Ansi
    } else {
        Palette::Plain
    };
    if !args.watch {
        let json = fetch_json(client, endpoint, args).await?;
        if format == GraphFormat::Json {
            // As the node sent it (compact): 10k instances are megabytes, not worth rebuilding.
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&json);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        } else {
            let graph: ClusterGraph = decode(endpoint, &json)?;
            print!("{}", draw(&graph, format, palette));
        }
        warn_unreachable(&decode(endpoint, &json)?);
        return Ok(());
    }
    let mut shown: Option<String> = None;
    let mut failing = false;
    loop {
        match fetch(client, endpoint, args).await {
            Ok(graph) => {
                let signature = graph.signature();
                if shown.as_ref() != Some(&signature) || failing {
                    let mut out = std::io::stdout().lock();
                    if terminal {
                        // Clear the screen and go home before redrawing.
                        let _ = write!(out, "\x1b[2J\x1b[H");
                    }
                    let _ = write!(out, "{}", draw(&graph, format, palette));
                    if !terminal && format != GraphFormat::Json {
                        // A separator between snapshots in a pipe or file.
                        let _ = writeln!(out, "---");
                    }
                    let _ = out.flush();
                    shown = Some(signature);
                    failing = false;
                }
            }
            // A watch outlives a node restarting or an election: say so and keep asking.
            Err(f) if f.code == 4 => {
                eprintln!("error: {} (retrying)", f.message);
                failing = true;
            }
            Err(f) => return Err(f),
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
}
