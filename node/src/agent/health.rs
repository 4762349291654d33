//! Instance health checks, run by the agent of the instance's node: an HTTP GET, a TCP
//! connect or a command, every `interval_ms`, each given `timeout_ms`; `healthy_threshold`
//! successes in a row make the instance healthy, `unhealthy_threshold` failures in a row
//! unhealthy. Only a running instance is checked; a restart starts over without a verdict.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::model::spec::{HealthCheck, Probe};
use crate::service::{ServiceHandle, ServiceState};

const NONE: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// The verdict of one instance's check, shared with its checking task (which ends when this
/// is dropped).
pub(crate) struct Health {
    verdict: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Health {
    /// Start checking `instance` (slot `slot`; `env` for a command probe).
    pub(crate) fn start(
        check: HealthCheck,
        slot: u32,
        env: Vec<(String, String)>,
        instance: ServiceHandle,
    ) -> Health {
        let verdict = Arc::new(AtomicU8::new(NONE));
        let shared = verdict.clone();
        let task = tokio::spawn(async move {
            let interval = Duration::from_millis(check.interval_ms.max(1));
            let timeout = Duration::from_millis(check.timeout_ms.max(1));
            let (mut ok_run, mut bad_run) = (0u32, 0u32);
            let mut restarts = instance.restart_count();
            loop {
                if instance.state() != ServiceState::Running || instance.restart_count() != restarts
                {
                    restarts = instance.restart_count();
                    (ok_run, bad_run) = (0, 0);
                    shared.store(NONE, Ordering::Release);
                    tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
                    continue;
                }
                let passed = tokio::time::timeout(timeout, probe(&check, slot, &env))
                    .await
                    .unwrap_or(false);
                if passed {
                    ok_run = ok_run.saturating_add(1);
                    bad_run = 0;
                    if ok_run >= check.healthy_threshold {
                        shared.store(HEALTHY, Ordering::Release);
                    }
                } else {
                    bad_run = bad_run.saturating_add(1);
                    ok_run = 0;
                    if bad_run >= check.unhealthy_threshold {
                        shared.store(UNHEALTHY, Ordering::Release);
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Health { verdict, task }
    }

    /// The verdict: `None` before one (or while the instance does not run).
    pub(crate) fn verdict(&self) -> Option<bool> {
        match self.verdict.load(Ordering::Acquire) {
            HEALTHY => Some(true),
            UNHEALTHY => Some(false),
            _ => None,
        }
    }
}

/// One check: whether it passed.
async fn probe(check: &HealthCheck, slot: u32, env: &[(String, String)]) -> bool {
    match &check.probe {
        Probe::Http { path, .. } => match check.port(slot) {
            Some(port) => http_ok(port, path).await,
            None => false,
        },
        Probe::Tcp { .. } => match check.port(slot) {
            Some(port) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok(),
            None => false,
        },
        Probe::Command(argv) => {
            let Some((program, args)) = argv.split_first() else {
                return false;
            };
            tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                // A check cut by its timeout does not linger.
                .kill_on_drop(true)
                .status()
                .await
                .is_ok_and(|s| s.success())
        }
    }
}

/// `GET path` on 127.0.0.1:port answers with a 2xx or 3xx status.
async fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nUser-Agent: mode-health\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line is all we need.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    status_ok(&head)
}

/// Whether an HTTP answer's head starts with a 2xx or 3xx status line.
fn status_ok(head: &[u8]) -> bool {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/"));
    let code: Option<u16> = parts.next().and_then(|c| c.parse().ok());
    version_ok && code.is_some_and(|c| (200..400).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_and_3xx_answers_pass() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(!status_ok(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(!status_ok(b"garbage"));
        assert!(!status_ok(b""));
    }

    #[tokio::test]
    async fn http_and_tcp_probes_see_a_listener_and_its_absence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(std::sync::Mutex::new("200 OK"));
        let answer = status.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let line = *answer.lock().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {line}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let check = |probe| HealthCheck {
            probe,
            port_plus_slot: false,
            interval_ms: 10,
            timeout_ms: 500,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        let http = check(Probe::Http {
            port,
            path: "/healthz".into(),
        });
        assert!(probe(&http, 0, &[]).await);
        *status.lock().unwrap() = "503 Service Unavailable";
        assert!(!probe(&http, 0, &[]).await);
        assert!(probe(&check(Probe::Tcp { port }), 0, &[]).await);
        // Port + slot: nobody listens there.
        let mut shifted = check(Probe::Tcp { port });
        shifted.port_plus_slot = true;
        assert!(!probe(&shifted, 1, &[]).await || port == u16::MAX);
        let ok = check(Probe::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            "test \"$MODE_SLOT\" = 3".into(),
        ]));
        let env = vec![("MODE_SLOT".to_string(), "3".to_string())];
        assert!(probe(&ok, 3, &env).await);
        assert!(!probe(&ok, 3, &[]).await);
    }
}
