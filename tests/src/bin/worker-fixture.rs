//! A small program run by the worker process tests: one service whose behaviour flags choose
//! (crash, panic in a hook, hang on stop, block the runtime, fail to start).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mode::service::{Context, Result, Service, ServiceHandle};
use mode::worker::LogFormat;
use mode::Worker;

#[derive(Parser, Clone)]
struct Args {
    /// Crash this many ms after start.
    #[arg(long)]
    crash_after_ms: Option<u64>,
    /// Never finish on_stop.
    #[arg(long)]
    hang_on_stop: bool,
    /// The task ignores the stop.
    #[arg(long)]
    hang_task: bool,
    /// Panic in this hook (on_start or on_stop).
    #[arg(long)]
    panic_in: Option<String>,
    /// Block the runtime thread this long, 200 ms after start.
    #[arg(long)]
    block_ms: Option<u64>,
    /// Fail in on_start.
    #[arg(long)]
    fail_start: bool,
    #[arg(long, default_value_t = 30_000)]
    shutdown_timeout_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    blocking_threshold_ms: u64,
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    #[arg(long)]
    worker_threads: Option<usize>,
}

struct Fixture(Args);

impl Service for Fixture {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        if self.0.fail_start {
            return Err("port 80 is already in use".into());
        }
        if self.0.panic_in.as_deref() == Some("on_start") {
            panic!("simulated panic in on_start");
        }
        let args = self.0.clone();
        ctx.timer("heartbeat", Duration::from_millis(100), || async { Ok(()) });
        let c = ctx.clone();
        ctx.spawn("work", async move {
            if let Some(ms) = args.block_ms {
                c.sleep(Duration::from_millis(200)).await;
                std::thread::sleep(Duration::from_millis(ms));
            }
            if let Some(ms) = args.crash_after_ms {
                c.sleep(Duration::from_millis(ms)).await;
                return Err("simulated failure".into());
            }
            c.stopped().await;
            if args.hang_task {
                std::future::pending::<()>().await;
            }
            Ok(())
        });
        println!("READY");
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        if self.0.panic_in.as_deref() == Some("on_stop") {
            panic!("simulated panic in on_stop");
        }
        if self.0.hang_on_stop {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let svc = ServiceHandle::builder(Fixture(args.clone()))
        .grace_period(Duration::from_secs(60))
        .build();
    let mut worker = Worker::new(svc);
    if let Some(n) = args.worker_threads {
        worker = worker.worker_threads(n);
    }
    worker
        .log_level("info")
        .log_format(args.log_format)
        .shutdown_timeout(Duration::from_millis(args.shutdown_timeout_ms))
        .blocking_threshold(Some(Duration::from_millis(args.blocking_threshold_ms)))
        .run()
}
