//! `modectl graph`: the combined beacon graph of the cluster, as a tree, JSON, dot or SVG,
//! once or redrawn on every change.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use clap::{Args, ValueEnum};
use mode::graph::{svg, ClusterGraph, Palette};
use mode_proto::v1 as pb;

use tracing::Instrument as _;

use crate::conn::{Call, Conn};
use crate::output::{printable, printable_strings, Breaks};
use crate::{convert, Failure};

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

/// The merged graph, as the renderers take it.
async fn fetch(conn: &mut Conn, args: &GraphArgs) -> Result<ClusterGraph, Failure> {
    let reply = rpc!(
        conn,
        Call::Read,
        graph,
        pb::GraphRequest {
            service: args.service.clone().unwrap_or_default(),
            node: args.node.unwrap_or(0),
            deadline_ms: args.deadline_ms,
            daemon: args.daemon,
        }
    )
    .await?;
    Ok(convert::graph(&reply))
}

/// The graph drawn, with the cluster's text in it [`printable`]: the renderers draw a copy whose
/// strings are escaped (so the tree's own colours stay), JSON is escaped as a whole.
fn draw(graph: &ClusterGraph, format: GraphFormat, palette: Palette) -> String {
    let render = |graph: &ClusterGraph, palette| match format {
        GraphFormat::Tree => graph.render_tree(palette),
        GraphFormat::Dot => graph.to_dot(),
        GraphFormat::Svg => svg::render(graph),
        GraphFormat::Json if crate::output::yaml() => serde_norway::to_string(graph)
            .unwrap_or_else(|e| format!("# cannot write this as YAML: {e}\n")),
        GraphFormat::Json => {
            let mut s = serde_json::to_string(graph).unwrap_or_default();
            s.push('\n');
            s
        }
    };
    if format == GraphFormat::Json {
        return printable(&render(graph, palette), Breaks::Keep).into_owned();
    }
    match escaped(graph) {
        Some(graph) => render(&graph, palette),
        // (Never seen: the graph's own type round-trips.) Plain, and escaped as a whole.
        None => printable(&render(graph, Palette::Plain), Breaks::Keep).into_owned(),
    }
}

/// A copy of `graph` with each of its strings [`printable`] as one line.
fn escaped(graph: &ClusterGraph) -> Option<ClusterGraph> {
    let mut value = serde_json::to_value(graph).ok()?;
    printable_strings(&mut value);
    serde_json::from_value(value).ok()
}

fn warn_unreachable(graph: &ClusterGraph) {
    for n in graph.nodes.iter().filter(|n| !n.reachable) {
        say_err!(
            "warning: node {} ({}) did not answer: {}",
            n.id,
            n.address,
            n.error.as_deref().unwrap_or("unknown error")
        );
    }
}

/// Write to stdout; a closed pipe (`modectl graph | head`) is not an error.
fn emit(parts: &[&[u8]]) -> Result<bool, Failure> {
    let mut out = std::io::stdout().lock();
    let written = parts
        .iter()
        .try_for_each(|p| out.write_all(p))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure::new(1, format!("writing the graph: {e}"))),
    }
}

impl GraphArgs {
    /// The client must wait for the node at least as long as the node waits for the others.
    pub(crate) fn timeout_s(&self) -> u64 {
        u64::from(self.deadline_ms).div_ceil(1000) + 5
    }

    /// Whether it runs until interrupted.
    pub(crate) fn watching(&self) -> bool {
        self.watch
    }
}

pub(crate) async fn run(args: &GraphArgs, conn: &mut Conn, json: bool) -> Result<(), Failure> {
    let format = args.format.unwrap_or(if json {
        GraphFormat::Json
    } else {
        GraphFormat::Tree
    });
    let terminal = std::io::stdout().is_terminal();
    let palette = if mode::worker::colour_wanted(terminal, std::env::var_os("NO_COLOR").as_deref())
    {
        Palette::Ansi
    } else {
        Palette::Plain
    };
    if !args.watch {
        let graph = fetch(conn, args).await?;
        emit(&[draw(&graph, format, palette).as_bytes()])?;
        warn_unreachable(&graph);
        return Ok(());
    }
    let mut shown: Option<String> = None;
    let mut failing = false;
    loop {
        // One trace per look, not one trace for the whole watch.
        let look = tracing::info_span!(
            target: mode::telemetry::TARGET,
            parent: None,
            "modectl",
            otel.name = "modectl graph --watch",
            otel.kind = "client",
        );
        match fetch(conn, args).instrument(look).await {
            Ok(graph) => {
                let signature = graph.signature();
                if shown.as_ref() != Some(&signature) || failing {
                    let mut frame = Vec::new();
                    if terminal {
                        // Clear the screen and go home before redrawing.
                        frame.extend_from_slice(b"\x1b[2J\x1b[H");
                    }
                    frame.extend_from_slice(draw(&graph, format, palette).as_bytes());
                    if !terminal && format != GraphFormat::Json {
                        // A separator between snapshots in a pipe or file.
                        frame.extend_from_slice(b"---\n");
                    }
                    if !emit(&[&frame])? {
                        // Whoever read the output has gone.
                        return Ok(());
                    }
                    shown = Some(signature);
                    failing = false;
                }
            }
            // A bad flag stays bad; anything else (a node restarting, an election, a replica
            // behind) may pass: say so and keep asking.
            Err(f) if f.code == 2 => return Err(f),
            Err(f) => {
                say_err!("error: {} (retrying)", f.message);
                failing = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
}
