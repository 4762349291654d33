//! A one-minute chaos run (`mode_tests::chaos`): random kill -9, partitions, flapping links and
//! SIGSTOP on five nodes in network namespaces. Nothing acknowledged may be lost, no singleton
//! may run twice, no probe process may be left over, and the cluster converges after heal.
//! Run alone: `cargo test -p mode-tests --test chaos -- chaos_one_minute` (as root).

use std::time::Duration;

use mode_tests::chaos::{self, ChaosConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_one_minute() {
    let seed = std::env::var("MODE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let report = chaos::run(ChaosConfig {
        duration: Duration::from_secs(60),
        seed,
        converge_timeout: Duration::from_secs(20),
        ..ChaosConfig::default()
    })
    .await;
    let table = report.table();
    println!("{table}");
    let problems: Vec<String> = [
        (!report.lost.is_empty())
            .then(|| format!("{} acknowledged writes lost", report.lost.len())),
        (report.not_made_but_present > 0).then(|| {
            format!(
                "{} writes said `not made` were applied",
                report.not_made_but_present
            )
        }),
        (report.overlaps > 0).then(|| {
            format!(
                "{} overlapping singleton runs (worst {} ms)",
                report.overlaps, report.worst_overlap_ms
            )
        }),
        (report.duplicates() > 0).then(|| {
            format!(
                "{} duplicate probe processes at the end",
                report.duplicates()
            )
        }),
        report
            .converge_s
            .is_none()
            .then(|| "the cluster did not converge within 20 s of the last fault".to_string()),
        (report.writes_acknowledged == 0).then(|| "no write was acknowledged".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        problems.is_empty(),
        "chaos seed {seed}: {}\n{table}\ntimeline:\n{}",
        problems.join("; "),
        report.timeline.join("\n")
    );
}
