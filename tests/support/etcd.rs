//! A real, throw-away etcd server for tests.
//!
//! Std only and free of crate-level attributes so that any test crate can include it with
//! `#[path = ".../tests/support/etcd.rs"] mod etcd;`. Each `Etcd` runs on its own free loopback
//! ports with its own data dir, so tests can run in parallel; everything is cleaned up on Drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long `start`/`restart` wait for etcd to report healthy before giving up.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// A running etcd child process (killed and its files removed on Drop).
#[allow(dead_code)]
pub struct Etcd {
    /// Client URL, e.g. "http://127.0.0.1:34567".
    pub endpoint: String,
    /// etcd's data dir (inside `base_dir`); public so a test can wipe it between `kill` and
    /// `restart` to simulate an etcd that lost its state.
    pub data_dir: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    base_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

#[allow(dead_code)]
impl Etcd {
    /// Starts etcd and blocks until it answers `/health`. Panics if etcd is not installed or
    /// does not become healthy within 10 s (with etcd's stderr in the message).
    pub fn start() -> Etcd {
        let bin = find_etcd();
        // Hold both listeners at once so the two ports differ; drop them right before spawning.
        let (client_port, peer_port) = {
            let a = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
            let b = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
            (
                a.local_addr().unwrap().port(),
                b.local_addr().unwrap().port(),
            )
        };
        let base_dir = unique_temp_dir();
        std::fs::create_dir_all(&base_dir).expect("create etcd temp dir");
        let mut etcd = Etcd {
            endpoint: format!("http://127.0.0.1:{client_port}"),
            data_dir: base_dir.join("data"),
            child: None,
            bin,
            base_dir,
            client_port,
            peer_port,
        };
        etcd.spawn();
        etcd
    }

    /// Kills etcd (SIGKILL, like a crash) but keeps its data dir and ports for `restart`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it is running, then starts it again on the same ports and data dir and
    /// waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let stderr = std::fs::File::create(self.stderr_path()).expect("create etcd stderr log");
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg("t")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.client_port).into();
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if health_ok(addr) {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.kill();
                let stderr = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
                panic!(
                    "etcd at {} not healthy (exit status: {exited:?}) after {HEALTH_TIMEOUT:?}; stderr:\n{stderr}",
                    self.endpoint
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.base_dir.join("stderr.log")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.base_dir);
    }
}

/// ETCD_BIN, else `etcd` on PATH, else /usr/bin/etcd.
fn find_etcd() -> PathBuf {
    if let Some(bin) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(bin);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => p,
        None if Path::new("/usr/bin/etcd").is_file() => PathBuf::from("/usr/bin/etcd"),
        None => panic!("etcd not found: apt-get install etcd-server (or set ETCD_BIN)"),
    }
}

fn unique_temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "remask-etcd-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One `GET /health` over plain HTTP/1.0; true once etcd says `"health":"true"`.
fn health_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.contains("\"health\":\"true\"")
}
