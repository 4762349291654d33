//! The demo kinds of the quick start and the tests: `ticker`, `counter`, `crasher`, and
//! `webapp` (the seed tutorial's app tree as one instance).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{parse_config, InstanceSpec, Kind};
use crate::service::{Context, Result, Service, ServiceHandle};

/// How often `crasher` looks for its crash file.
const CRASH_FILE_POLL: Duration = Duration::from_millis(50);

/// How long the web server gives one client to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client counts as a recent user of the web app.
const USER_TTL: Duration = Duration::from_secs(5);

fn default_every_ms() -> u64 {
    1000
}

fn default_message() -> String {
    "tick".to_string()
}

/// A period in milliseconds, at least 1.
fn period(kind: &str, every_ms: u64) -> std::result::Result<Duration, String> {
    if every_ms == 0 {
        return Err(format!(
            "invalid {kind} config: field `every_ms` must be at least 1 (milliseconds)"
        ));
    }
    Ok(Duration::from_millis(every_ms))
}

fn build(service: impl Service, instance: &InstanceSpec) -> ServiceHandle {
    ServiceHandle::builder(service)
        .label(instance.label())
        .grace_period(instance.grace)
        .build()
}

// ---- ticker ------------------------------------------------------------------------------

/// `ticker`: logs a message every period.
pub(crate) struct TickerKind;

/// `{"every_ms": 1000, "message": "tick", "healthy_file": "/tmp/ok"}`: with `healthy_file`,
/// each tick reports the instance healthy while that file exists and unhealthy otherwise
/// (the health signal of an in-process kind, [`Context::set_healthy`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TickerConfig {
    #[serde(default = "default_every_ms")]
    every_ms: u64,
    #[serde(default = "default_message")]
    message: String,
    #[serde(default)]
    healthy_file: Option<std::path::PathBuf>,
}

impl TickerConfig {
    fn parse(
        config: &Value,
    ) -> std::result::Result<(Duration, String, Option<std::path::PathBuf>), String> {
        let config: TickerConfig = parse_config("ticker", config)?;
        Ok((
            period("ticker", config.every_ms)?,
            config.message,
            config.healthy_file,
        ))
    }
}

impl Kind for TickerKind {
    fn validate(&self, config: &Value) -> std::result::Result<(), String> {
        TickerConfig::parse(config).map(|_| ())
    }

    fn create(&self, instance: &InstanceSpec) -> std::result::Result<ServiceHandle, String> {
        let (every, message, healthy_file) = TickerConfig::parse(&instance.config)?;
        let ticker = Ticker {
            label: instance.label(),
            every,
            message: message.into(),
            healthy_file: healthy_file.map(Arc::from),
        };
        Ok(build(ticker, instance))
    }
}

struct Ticker {
    label: String,
    every: Duration,
    message: Arc<str>,
    healthy_file: Option<Arc<std::path::Path>>,
}

impl Service for Ticker {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (label, message) = (self.label.clone(), self.message.clone());
        let (health, c) = (self.healthy_file.clone(), ctx.clone());
        ctx.timer("tick", self.every, move || {
            tracing::info!("[{label}] {message}");
            if let Some(file) = &health {
                c.set_healthy(file.exists());
            }
            async { Ok(()) }
        });
        Ok(())
    }
}

// ---- counter -----------------------------------------------------------------------------

/// `counter`: counts ticks and logs the count.
pub(crate) struct CounterKind;

/// `{"every_ms": 1000}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterConfig {
    #[serde(default = "default_every_ms")]
    every_ms: u64,
}

impl CounterConfig {
    fn parse(config: &Value) -> std::result::Result<Duration, String> {
        let config: CounterConfig = parse_config("counter", config)?;
        period("counter", config.every_ms)
    }
}

impl Kind for CounterKind {
    fn validate(&self, config: &Value) -> std::result::Result<(), String> {
        CounterConfig::parse(config).map(|_| ())
    }

    fn create(&self, instance: &InstanceSpec) -> std::result::Result<ServiceHandle, String> {
        let counter = Counter {
            label: instance.label(),
            every: CounterConfig::parse(&instance.config)?,
            count: Arc::default(),
        };
        Ok(build(counter, instance))
    }
}

/// The count survives restarts of the instance (not a reschedule, which builds a new one).
struct Counter {
    label: String,
    every: Duration,
    count: Arc<AtomicU64>,
}

impl Service for Counter {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (label, count) = (self.label.clone(), self.count.clone());
        ctx.timer("count", self.every, move || {
            let n = count.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!("[{label}] count = {n}");
            async { Ok(()) }
        });
        Ok(())
    }
}

// ---- crasher -----------------------------------------------------------------------------

/// `crasher`: crashes after a delay, or whenever a file appears.
pub(crate) struct CrasherKind;

/// `{"after_ms": 1000, "crash_file": "/tmp/crash"}`, at least one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CrasherConfig {
    #[serde(default)]
    after_ms: Option<u64>,
    #[serde(default)]
    crash_file: Option<PathBuf>,
}

impl CrasherConfig {
    fn parse(config: &Value) -> std::result::Result<Self, String> {
        let config: CrasherConfig = parse_config("crasher", config)?;
        if config.after_ms.is_none() && config.crash_file.is_none() {
            return Err(
                "invalid crasher config: set `after_ms` (crash that many milliseconds \
                        after starting) or `crash_file` (crash when that file appears), or both"
                    .into(),
            );
        }
        if config
            .crash_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            return Err("invalid crasher config: field `crash_file` is empty: give a path".into());
        }
        Ok(config)
    }
}

impl Kind for CrasherKind {
    fn validate(&self, config: &Value) -> std::result::Result<(), String> {
        CrasherConfig::parse(config).map(|_| ())
    }

    fn create(&self, instance: &InstanceSpec) -> std::result::Result<ServiceHandle, String> {
        let config = CrasherConfig::parse(&instance.config)?;
        let crasher = Crasher {
            label: instance.label(),
            after_ms: config.after_ms,
            crash_file: config.crash_file,
        };
        Ok(build(crasher, instance))
    }
}

struct Crasher {
    label: String,
    after_ms: Option<u64>,
    crash_file: Option<PathBuf>,
}

impl Service for Crasher {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        if let Some(ms) = self.after_ms {
            let c = ctx.clone();
            ctx.spawn("crash_after", async move {
                if c.sleep(Duration::from_millis(ms)).await {
                    return Err(format!("crasher: crashing as configured after {ms} ms").into());
                }
                Ok(())
            });
        }
        if let Some(path) = self.crash_file.clone() {
            let (c, label) = (ctx.clone(), self.label.clone());
            ctx.spawn("crash_file", async move {
                while c.sleep(CRASH_FILE_POLL).await {
                    // A stat is quick; tokio::fs would add a blocking-pool hop per poll.
                    if path.exists() {
                        // Consumed, so that each new file is one crash (and the restarted
                        // instance runs until the next one).
                        if let Err(e) = std::fs::remove_file(&path) {
                            tracing::warn!("[{label}] cannot remove {}: {e}", path.display());
                        }
                        return Err(format!(
                            "crasher: crashing as requested by {}",
                            path.display()
                        )
                        .into());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

// ---- webapp ------------------------------------------------------------------------------

/// `webapp`: the seed tutorial's app — Websockets, UserCache, Webserver — as one instance.
pub(crate) struct WebappKind;

/// `{"port": 0}`; 0 picks a free port (shown in the beacon as the `accept 127.0.0.1:PORT`
/// task of the Webserver, and logged).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebappConfig {
    #[serde(default)]
    port: u16,
}

impl Kind for WebappKind {
    fn validate(&self, config: &Value) -> std::result::Result<(), String> {
        parse_config::<WebappConfig>("webapp", config).map(|_| ())
    }

    fn create(&self, instance: &InstanceSpec) -> std::result::Result<ServiceHandle, String> {
        let config: WebappConfig = parse_config("webapp", &instance.config)?;
        let app = AppService {
            label: instance.label(),
            port: config.port,
            grace: instance.grace,
        };
        Ok(build(app, instance))
    }
}

/// Users seen recently, with their expiry.
type Users = Arc<Mutex<HashMap<String, Instant>>>;

struct AppService {
    label: String,
    port: u16,
    grace: Duration,
}

impl Service for AppService {
    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        let users = Users::default();
        let label = &self.label;
        vec![
            ServiceHandle::builder(Websockets {
                label: label.clone(),
            })
            .grace_period(self.grace)
            .build(),
            ServiceHandle::builder(UserCache {
                label: label.clone(),
                users: users.clone(),
            })
            .grace_period(self.grace)
            .build(),
            ServiceHandle::builder(Webserver {
                label: label.clone(),
                port: self.port,
                users,
            })
            .grace_period(self.grace)
            .build(),
        ]
    }
}

struct Websockets {
    label: String,
}

impl Service for Websockets {
    async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
        tracing::info!("[{}] starting websocket server", self.label);
        Ok(())
    }
}

struct UserCache {
    label: String,
    users: Users,
}

impl Service for UserCache {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (label, users) = (self.label.clone(), self.users.clone());
        ctx.timer("remove_expired_users", Duration::from_secs(1), move || {
            let now = Instant::now();
            let left = users.lock().map(|mut users| {
                users.retain(|_, expiry| *expiry > now);
                users.len()
            });
            let result = match left {
                Ok(left) => {
                    tracing::debug!("[{label}] removed expired users; {left} left");
                    Ok(())
                }
                Err(_) => Err("user cache poisoned".into()),
            };
            async move { result }
        });
        Ok(())
    }
}

struct Webserver {
    label: String,
    port: u16,
    users: Users,
}

impl Service for Webserver {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", self.port))?;
        let address = listener.local_addr()?;
        tracing::info!("[{}] serving on port {}", self.label, address.port());
        let (label, users, c) = (self.label.clone(), self.users.clone(), ctx.clone());
        ctx.spawn(format!("accept {address}"), async move {
            while let Some(accepted) = c.wait(listener.accept()).await {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    // A client gone before the accept (or out of descriptors for a moment)
                    // does not take the server down.
                    Err(e) => {
                        tracing::warn!("[{label}] accept failed: {e}");
                        c.sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let recent = match users.lock() {
                    Ok(mut users) => {
                        users.insert(peer.to_string(), Instant::now() + USER_TTL);
                        users.len()
                    }
                    Err(_) => return Err("user cache poisoned".into()),
                };
                let label = label.clone();
                tokio::spawn(async move {
                    let answered =
                        tokio::time::timeout(CLIENT_TIMEOUT, answer(socket, &label, recent));
                    if let Ok(Err(e)) = answered.await {
                        tracing::debug!("[{label}] answering {peer} failed: {e}");
                    }
                });
            }
            Ok(())
        });
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        tracing::info!("[{}] closing server", self.label);
        Ok(())
    }
}

/// Answer one HTTP/1 request: 200 with a short text for a GET, 405 for anything else.
async fn answer(mut socket: TcpStream, label: &str, recent: usize) -> std::io::Result<()> {
    let mut request = [0u8; 1024];
    let n = socket.read(&mut request).await?;
    let (status, body) = if request[..n].starts_with(b"GET ") {
        (
            "200 OK",
            format!("Hello from mode! {label}: {recent} recent users.\n"),
        )
    } else {
        (
            "405 Method Not Allowed",
            "Only GET is served here.\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(reply.as_bytes()).await?;
    socket.shutdown().await
}
