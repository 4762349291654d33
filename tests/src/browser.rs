//! Driving the web view in headless chromium: finding the browser, running it, and a
//! recording proxy that serves the node's page with a probe script added (same origin, so
//! the page's own fetches go through it) and counts the bytes of every answer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The browser the web-view tests drive: Debian's chromium (installed by `.ci/run`).
pub fn chromium() -> PathBuf {
    for p in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no chromium found: install Debian's `chromium` package (.ci/run does)");
}

/// The flags of a headless run in a `width`×`height` window with its own profile under
/// `scratch`, for `virtual_ms` of virtual time (timers run fast; network waits are real).
pub fn headless_args(scratch: &Path, width: u32, height: u32, virtual_ms: u64) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        "--hide-scrollbars".into(),
        format!(
            "--user-data-dir={}",
            scratch.join("chromium-profile").display()
        ),
        format!("--window-size={width},{height}"),
        format!("--virtual-time-budget={virtual_ms}"),
    ]
}

/// One answer the proxy passed on: the request's path and the bytes of the response
/// (status line, headers and body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: String,
    pub status: u16,
    pub bytes: usize,
}

/// Serves `page` at `/` and passes every other `GET` on to the node's HTTP port, recording
/// each answer. Stops when dropped.
pub struct PageProxy {
    pub port: u16,
    log: Arc<Mutex<Vec<Fetched>>>,
    stop: Arc<AtomicBool>,
}

impl PageProxy {
    /// A proxy in front of `127.0.0.1:node_http` that answers `/` with `page`.
    pub fn start(node_http: u16, page: String) -> PageProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().expect("proxy address").port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log_, stop_, page) = (log.clone(), stop.clone(), Arc::new(page));
        std::thread::spawn(move || {
            while !stop_.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (log, page) = (log_.clone(), page.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, node_http, &page, &log);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PageProxy { port, log, stop }
    }

    /// Everything passed on so far, in order.
    pub fn log(&self) -> Vec<Fetched> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for PageProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut conn: TcpStream,
    node_http: u16,
    page: &str,
    log: &Mutex<Vec<Fetched>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let response = if path == "/" || path.starts_with("/?") {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
            page.len()
        )
        .into_bytes()
    } else {
        // The browser's request as it was (conditional headers included), on a connection
        // of its own.
        let mut request: String = head
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                !l.is_empty() && !l.starts_with("connection:") && !l.starts_with("keep-alive:")
            })
            .map(|l| format!("{l}\r\n"))
            .collect();
        request.push_str("connection: close\r\n\r\n");
        let mut node = TcpStream::connect(("127.0.0.1", node_http))?;
        node.set_read_timeout(Some(Duration::from_secs(30)))?;
        node.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        node.read_to_end(&mut response)?;
        response
    };
    let status = String::from_utf8_lossy(&response[..response.len().min(20)])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    log.lock().unwrap().push(Fetched {
        path,
        status,
        bytes: response.len(),
    });
    conn.write_all(&response)?;
    conn.flush()
}

/// The node's page with `script` run after the page's own (the probe of a test).
pub fn with_probe(page: &str, script: &str) -> String {
    page.replacen(
        "</body>",
        &format!("<pre id=\"probe-result\"></pre>\n<script>\n{script}\n</script>\n</body>"),
        1,
    )
}

/// What the probe wrote into `<pre id="probe-result">` (percent-encoded JSON, so no HTML
/// escaping gets in the way), parsed; `None` when it wrote nothing.
pub fn probe_result(dom: &str) -> Option<serde_json::Value> {
    let start = dom.find("<pre id=\"probe-result\">")? + "<pre id=\"probe-result\">".len();
    let end = start + dom[start..].find("</pre>")?;
    let encoded = &dom[start..end];
    if encoded.is_empty() {
        return None;
    }
    let mut bytes = Vec::with_capacity(encoded.len());
    let raw = encoded.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    serde_json::from_slice(&bytes).ok()
}

/// Run chromium headless with `args` and then `url`, within `limit`; its output.
pub async fn run(args: &[String], url: &str, limit: Duration) -> std::process::Output {
    tokio::time::timeout(
        limit,
        tokio::process::Command::new(chromium())
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("chromium finished within {limit:?}"))
    .expect("run chromium")
}

/// The width and height in a PNG's header.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    Some((word(16), word(20)))
}
