//! The seed README's tutorial, rebuilt: an app service with a websocket service, a user cache
//! whose timer removes expired users, and a web server that really listens — run by a Worker.
//!
//! ```text
//! cargo run -p mode-node --example tutorial -- [--port 8000] [--dot beacon.dot]
//! ```
//! Ctrl-C stops it gracefully; `kill -USR1 <pid>` logs the beacon tree.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use mode::service::{Context, Result, Service, ServiceHandle};
use mode::worker::LogFormat;
use mode::Worker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "mode's tutorial: an app with websockets, a user cache and a web server")]
struct Args {
    /// Port of the web server (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Write the beacon graph as Graphviz dot to this file once started.
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Log level or filter.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

/// Users seen recently, with their expiry.
type Users = Arc<Mutex<HashMap<String, Instant>>>;

struct Websockets;

impl Service for Websockets {
    async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
        println!("STARTING WEBSOCKET SERVER");
        Ok(())
    }
}

struct UserCache {
    users: Users,
}

impl Service for UserCache {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let users = self.users.clone();
        ctx.timer("remove_expired_users", Duration::from_secs(1), move || {
            let users = users.clone();
            async move {
                println!("REMOVING EXPIRED USERS");
                let now = Instant::now();
                users
                    .lock()
                    .map_err(|_| "user cache poisoned")?
                    .retain(|_, expiry| *expiry > now);
                Ok(())
            }
        });
        Ok(())
    }
}

struct Webserver {
    port: u16,
    users: Users,
}

impl Service for Webserver {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        let port = listener.local_addr()?.port();
        tracing::info!("[{}]: Serving on port {port}", ctx.handle().log_prefix());
        let (users, c) = (self.users.clone(), ctx.clone());
        ctx.spawn("accept", async move {
            while let Some(accepted) = c.wait(listener.accept()).await {
                let (mut socket, peer) = accepted?;
                let users = users.clone();
                users
                    .lock()
                    .map_err(|_| "user cache poisoned")?
                    .insert(peer.to_string(), Instant::now() + Duration::from_secs(5));
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let n = users.lock().map(|u| u.len()).unwrap_or(0);
                    let body = format!("Hello from mode! {n} recent users.\n");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
            Ok(())
        });
        Ok(())
    }

    async fn on_stop(&mut self, ctx: &Context) -> Result<()> {
        let p = ctx.handle().log_prefix();
        tracing::info!("[{p}]: Closing server");
        tracing::info!("[{p}]: Waiting for server to close handle");
        Ok(())
    }

    async fn on_shutdown(&mut self, ctx: &Context) -> Result<()> {
        tracing::info!("[{}]: Cleanup", ctx.handle().log_prefix());
        Ok(())
    }
}

struct AppService {
    port: u16,
    dot: Option<PathBuf>,
}

impl Service for AppService {
    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        let users = Users::default();
        vec![
            ServiceHandle::new(Websockets),
            ServiceHandle::new(UserCache {
                users: users.clone(),
            }),
            ServiceHandle::new(Webserver {
                port: self.port,
                users,
            }),
        ]
    }

    async fn on_started(&mut self, ctx: &Context) -> Result<()> {
        if let Some(path) = &self.dot {
            let root = ctx
                .handle()
                .parent()
                .unwrap_or_else(|| ctx.handle().clone());
            println!("WRITING GRAPH TO {}", path.display());
            std::fs::write(path, root.beacon().to_dot())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let app = ServiceHandle::new(AppService {
        port: args.port,
        dot: args.dot,
    });
    Worker::new(app)
        .log_level(args.log_level)
        .log_format(args.log_format)
        .run()
}
