//! A loopback TCP proxy the test can cut and heal: what a partition between one node and the
//! rest looks like to that node (its connections reset, new ones refused), without network
//! namespaces.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Forwards connections from its own port to `target`.
pub struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target` (HOST:PORT).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        let port = listener.local_addr().expect("its address").port();
        let (cut, open, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(Vec::<TcpStream>::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, o, s, target) = (cut.clone(), open.clone(), stop.clone(), target.to_string());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if c.load(Ordering::Acquire) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let pipes = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = pipes else {
                    continue;
                };
                {
                    let mut open = o.lock().unwrap_or_else(|p| p.into_inner());
                    open.push(client);
                    open.push(server);
                }
                thread::spawn(move || pipe(c1, s1));
                thread::spawn(move || pipe(s2, c2));
            }
        });
        Proxy {
            port,
            cut,
            open,
            stop,
        }
    }

    /// `127.0.0.1:PORT`, what the proxied node is told to call.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Reset every connection through it and refuse new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Forward again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
