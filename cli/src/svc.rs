//! `modectl svc`: apply specs, list and inspect services, scale, rolling restart, remove.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Subcommand;
use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::output::table;
use crate::{read, with_request_id, write, Client, Failure};

#[derive(Subcommand)]
pub(crate) enum SvcCmd {
    /// Validate and store the specs in a YAML or JSON file (one spec, a list, or documents).
    Apply {
        /// The spec file.
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
        /// Wait until every instance runs, showing progress, or fail clearly.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_timeout: u64,
    },
    /// List services.
    Ls,
    /// A service's instances: nodes, states, restart counts, last crash reasons.
    Get {
        /// Service name.
        name: String,
    },
    /// Change the number of instances.
    Scale {
        /// Service name.
        name: String,
        /// Instances wanted.
        replicas: u32,
    },
    /// Restart every instance, one at a time, each once the previous one runs again.
    Restart {
        /// Service name.
        name: String,
    },
    /// Remove a service. Refused while other services depend on it, unless --force (they
    /// stop first).
    Rm {
        /// Service name.
        name: String,
        /// Remove it even though other services depend on it.
        #[arg(long)]
        force: bool,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
    },
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// `(slot, placement)` pairs of one service.
fn instances(placements: &Value, name: &str) -> Vec<(u64, Value)> {
    placements[name]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(slot, p)| (slot.parse().unwrap_or(0), p.clone()))
        .collect()
}

pub(crate) async fn run(
    cmd: &SvcCmd,
    client: &mut Client,
    endpoint: &str,
    json: bool,
) -> Result<(), Failure> {
    match cmd {
        SvcCmd::Apply {
            file,
            wait,
            wait_timeout,
        } => {
            let cannot_read =
                |e: std::io::Error| fail(2, format!("cannot read {}: {e}", file.display()));
            let size = std::fs::metadata(file).map_err(cannot_read)?.len();
            let limit = mode::model::limits::MAX_REQUEST_BYTES as u64;
            if size > limit {
                return Err(fail(
                    2,
                    format!(
                        "{}: the file is {size} bytes, over the limit of {limit} bytes for one apply (and a spec is at most {} bytes): split it",
                        file.display(),
                        mode::model::limits::MAX_SPEC_BYTES
                    ),
                ));
            }
            let text = std::fs::read_to_string(file).map_err(cannot_read)?;
            let reply = client
                .apply_specs(with_request_id(pb::ApplySpecsRequest {
                    text,
                    file: file.display().to_string(),
                }))
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::InvalidArgument => fail(2, s.message()),
                    _ => Failure::from_status(endpoint, &s),
                })?
                .into_inner();
            for line in &reply.results {
                if !json {
                    println!("{line}");
                }
            }
            let names: Vec<String> = reply
                .results
                .iter()
                .filter_map(|r| r.split('\'').nth(1).map(str::to_string))
                .collect();
            if *wait {
                wait_running(
                    client,
                    endpoint,
                    &names,
                    Duration::from_secs(*wait_timeout),
                    json,
                )
                .await?;
            } else if json {
                println!("{}", json!({"applied": names, "results": reply.results}));
            }
        }
        SvcCmd::Ls => {
            let specs = read(client, endpoint, "specs", false).await?;
            let placements = read(client, endpoint, "placements", false).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"specs": specs, "placements": placements})
                    )
                    .unwrap_or_default()
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = specs
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let name = s["name"].as_str().unwrap_or("");
                    let inst = instances(&placements, name);
                    let running = inst.iter().filter(|(_, p)| p["state"] == "running").count();
                    let wanted = if s["singleton"] == true {
                        1
                    } else {
                        s["replicas"].as_u64().unwrap_or(0)
                    };
                    let restarts: u64 = inst
                        .iter()
                        .map(|(_, p)| p["restart_count"].as_u64().unwrap_or(0))
                        .sum();
                    vec![
                        name.to_string(),
                        s["kind"].as_str().unwrap_or("").to_string(),
                        format!("{running}/{wanted}"),
                        restarts.to_string(),
                        s["generation"].to_string(),
                    ]
                })
                .collect();
            table(
                &["NAME", "KIND", "RUNNING", "RESTARTS", "GENERATION"],
                &rows,
            );
        }
        SvcCmd::Get { name } => {
            let spec = read(client, endpoint, &format!("spec:{name}"), false).await?;
            let placements = read(client, endpoint, "placements", false).await?;
            let inst = instances(&placements, name);
            if json {
                let map: BTreeMap<String, Value> = inst
                    .iter()
                    .map(|(s, p)| (s.to_string(), p.clone()))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"spec": spec, "instances": map}))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            println!(
                "service {name}: kind {}, generation {}",
                spec["kind"].as_str().unwrap_or(""),
                spec["generation"]
            );
            let rows: Vec<Vec<String>> = inst
                .iter()
                .map(|(slot, p)| {
                    vec![
                        format!("{name}#{slot}"),
                        p["node"].to_string(),
                        p["state"].as_str().unwrap_or("").to_string(),
                        p["restart_count"].to_string(),
                        p["last_crash"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            table(
                &["INSTANCE", "NODE", "STATE", "RESTARTS", "LAST CRASH"],
                &rows,
            );
        }
        SvcCmd::Scale { name, replicas } => {
            let mut spec = read(client, endpoint, &format!("spec:{name}"), false).await?;
            if spec["singleton"] == true {
                return Err(fail(
                    2,
                    format!("'{name}' is a singleton: it always has exactly one instance"),
                ));
            }
            spec["replicas"] = json!(replicas);
            let reply = client
                .apply_specs(with_request_id(pb::ApplySpecsRequest {
                    text: spec.to_string(),
                    file: format!("scale {name}"),
                }))
                .await
                .map_err(|s| Failure::from_status(endpoint, &s))?
                .into_inner();
            if json {
                println!("{}", json!({"service": name, "replicas": replicas}));
            } else {
                println!("{} ({replicas} replicas)", reply.results.join("; "));
            }
        }
        SvcCmd::Restart { name } => {
            read(client, endpoint, &format!("spec:{name}"), false).await?;
            let placements = read(client, endpoint, "placements", false).await?;
            for (slot, _) in instances(&placements, name) {
                write(
                    client,
                    endpoint,
                    json!({"op": "restart_instance", "service": name, "slot": slot}),
                )
                .await?;
                if !json {
                    println!("restarting {name}#{slot}...");
                }
                // Give the node a moment to act, then wait until it runs again.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let p = read(client, endpoint, "placements", false).await?;
                    if p[name][slot.to_string()]["state"] == "running" {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(fail(
                            1,
                            format!("{name}#{slot} did not run again within 60 s"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if !json {
                println!("{name} restarted");
            }
        }
        SvcCmd::Rm { name, wait, force } => {
            let r = write(
                client,
                endpoint,
                json!({"op": "delete_spec", "name": name, "force": force}),
            )
            .await?;
            if r["ok"] != true {
                let message = r["message"].as_str().unwrap_or("");
                return Err(fail(
                    if message.contains("is needed by") {
                        1
                    } else {
                        3
                    },
                    r["message"]
                        .as_str()
                        .unwrap_or("no such service")
                        .to_string(),
                ));
            }
            if *wait {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let specs = read(client, endpoint, "specs", false).await?;
                    if !specs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|s| s["name"] == name.as_str())
                    {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(fail(1, format!("'{name}' was not removed within 60 s")));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if json {
                println!("{}", json!({"removed": name}));
            } else {
                println!("{}", r["message"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

/// Show progress until every instance of `names` runs; fail on an instance that exceeded its
/// restart intensity or could not be placed.
async fn wait_running(
    client: &mut Client,
    endpoint: &str,
    names: &[String],
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    loop {
        let specs = read(client, endpoint, "specs", false).await?;
        let placements = read(client, endpoint, "placements", false).await?;
        let events = read(client, endpoint, "events", false).await?;
        let mut done = true;
        let mut parts = Vec::new();
        for name in names {
            let spec = specs
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == name.as_str());
            let wanted = spec
                .map(|s| {
                    if s["singleton"] == true {
                        1
                    } else {
                        s["replicas"].as_u64().unwrap_or(0)
                    }
                })
                .unwrap_or(0);
            let inst = instances(&placements, name);
            let running = inst.iter().filter(|(_, p)| p["state"] == "running").count() as u64;
            if let Some((slot, p)) = inst.iter().find(|(_, p)| p["state"] == "failed") {
                return Err(fail(
                    1,
                    format!(
                        "{name}#{slot} failed on node {}: {}",
                        p["node"],
                        p["last_crash"].as_str().unwrap_or("unknown reason")
                    ),
                ));
            }
            if running < wanted {
                done = false;
                if let Some(e) = events
                    .as_array()
                    .into_iter()
                    .flatten()
                    .rev()
                    .find(|e| e["kind"] == "unplaced" && e["service"] == name.as_str())
                {
                    if inst.len() < wanted as usize {
                        return Err(fail(
                            1,
                            e["message"]
                                .as_str()
                                .unwrap_or("could not be placed")
                                .to_string(),
                        ));
                    }
                }
            }
            parts.push(format!("{name} {running}/{wanted} running"));
        }
        let line = parts.join(", ");
        if line != last_line && !json {
            println!("{line}");
            last_line = line;
        }
        if done {
            if json {
                println!("{}", json!({"running": names}));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(
                4,
                format!("not every instance runs after {timeout:?}: {last_line}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
