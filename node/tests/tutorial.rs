//! The tutorial example as a real process: it serves HTTP, prints the README's lifecycle
//! lines, writes its beacon as dot, and stops cleanly on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `cargo test` builds the package's examples next to the test binaries' `deps/` folder.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir.join("examples").join("tutorial")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_tutorial_serves_http_writes_its_graph_and_stops_on_ctrl_c() {
    let dot = std::env::temp_dir().join(format!("mode-tutorial-{}.dot", std::process::id()));
    let mut child = Killed(
        Command::new(example_binary())
            .args(["--port", "0", "--dot"])
            .arg(&dot)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tutorial example is built by cargo test"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = Vec::new();
    let port: u16 = loop {
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .expect("a 'Serving on port' line");
        log.push(line.clone());
        if let Some(p) = line.split("Serving on port ").nth(1) {
            break p.trim().parse().unwrap();
        }
    };

    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains("Hello from mode!"), "{reply}");

    std::thread::sleep(Duration::from_millis(1200));
    let ok = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the tutorial did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    log.extend(rx.try_iter());
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));

    let log = log.join("\n");
    let order = [
        "[^Worker]: Starting...",
        "[^-AppService]: Starting...",
        "[^--Websockets]: Starting...",
        "[^--UserCache]: Starting...",
        "[^--Webserver]: Starting...",
        "[^Worker]: Stopping on signal received (SIGINT)...",
        "[^-AppService]: Stopping...",
        "[^--Webserver]: Closing server",
        "[^--Webserver]: -Stopped!",
        "[^--UserCache]: -Stopped!",
        "[^--Websockets]: -Stopped!",
        "[^-AppService]: -Stopped!",
        "[^Worker]: -Stopped!",
    ];
    let mut at = 0;
    for line in order {
        let found = log[at..]
            .find(line)
            .unwrap_or_else(|| panic!("'{line}' in order in:\n{log}"));
        at += found + line.len();
    }
    assert!(out.contains("STARTING WEBSOCKET SERVER"), "{out}");
    assert!(out.contains("REMOVING EXPIRED USERS"), "{out}");

    let graph = std::fs::read_to_string(&dot).unwrap();
    let _ = std::fs::remove_file(&dot);
    for node in [
        "Worker",
        "AppService",
        "Websockets",
        "UserCache",
        "Webserver",
        "remove_expired_users",
    ] {
        assert!(
            graph.contains(&format!("label=\"{node}\\n")),
            "{node} in {graph}"
        );
    }
}
