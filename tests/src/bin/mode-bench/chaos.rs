//! `chaos`: random faults on five nodes in network namespaces against acknowledged writes and
//! singleton probes, then the figures (see `mode_tests::chaos`). Needs root.

use std::time::Duration;

use mode_tests::chaos::{self, ChaosConfig};
use mode_tests::Launcher;
use serde_json::Value;

pub fn chaos_suite(minutes: f64, nodes: u64, seed: u64, verbose: bool) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let cfg = ChaosConfig {
        duration: Duration::from_secs_f64(minutes * 60.0),
        nodes,
        seed,
        // This very build runs the nodes (`mode-bench __node`).
        launcher: Some(Launcher {
            program: std::env::current_exe()?,
            prefix: vec!["__node".into()],
            env: Vec::new(),
        }),
        verbose,
        ..ChaosConfig::default()
    };
    println!(
        "chaos: {nodes} nodes, {minutes} min of faults, seed {seed} (every node in its own network namespace)"
    );
    let report = rt.block_on(chaos::run(cfg));
    print!("{}", report.table());
    Ok(report.to_json())
}
