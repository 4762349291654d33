//! A workload for health-check tests and the rollout benchmark: listens on 127.0.0.1:PORT
//! (plus `$MODE_SLOT` with `--plus-slot`) and answers every HTTP request `200 <version>`, or
//! `503` while `--fail-file` exists; while `--down-file` exists it does not listen at all (TCP
//! checks fail). Stops on SIGTERM like any process (default action).
//!
//! `health-target --port 20000 --plus-slot --version v1 --fail-file /tmp/sick`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

struct Args {
    port: u16,
    plus_slot: bool,
    version: String,
    fail_file: Option<PathBuf>,
    down_file: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        port: 0,
        plus_slot: false,
        version: "v1".into(),
        fail_file: None,
        down_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--port" => args.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--plus-slot" => args.plus_slot = true,
            "--version" => args.version = value()?,
            "--fail-file" => args.fail_file = Some(value()?.into()),
            "--down-file" => args.down_file = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.plus_slot {
        let slot: u16 = std::env::var("MODE_SLOT")
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("--plus-slot needs MODE_SLOT")?;
        args.port = args
            .port
            .checked_add(slot)
            .ok_or("port + slot is over 65535")?;
    }
    if args.port == 0 {
        return Err("--port is required".into());
    }
    Ok(args)
}

fn exists(p: &Option<PathBuf>) -> bool {
    p.as_ref().is_some_and(|p| p.exists())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("health-target: {e}");
            std::process::exit(2);
        }
    };
    loop {
        while exists(&args.down_file) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", args.port)) {
                Ok(l) => break l,
                Err(e) => {
                    eprintln!("health-target: binding port {}: {e}; retrying", args.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        while !exists(&args.down_file) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let (status, body) = if exists(&args.fail_file) {
                        ("503 Service Unavailable", "failing".to_string())
                    } else {
                        ("200 OK", args.version.clone())
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}
