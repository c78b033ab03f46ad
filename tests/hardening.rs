//! Attacks on the servers' ports, made the way an attacker would: raw
//! sockets that send nothing, half a request head or half the HTTP/2
//! preface; more connections than the server may hold; a server at its
//! descriptor limit; malformed worker calls from a gRPC client that is not
//! the coordinator. Every server is a real `remask` process on loopback.
//!
//! The binary is `$REMASK_BIN`, or `target/<profile>/remask` next to this
//! test executable (build it first: `cargo build --release -p remask-cli`).

#[path = "support/bin.rs"]
#[allow(dead_code)]
mod support_bin;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};
use support_bin::bin;
use tempfile::TempDir;

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn scratch() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| TempDir::with_prefix("remask-hardening-").expect("a temp dir"))
        .path()
}

/// `remask ARGS` without inherited `REMASK_*` variables, with a scratch cache.
fn command(program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REMASK_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("REMASK_CACHE_DIR", scratch().join("cache"))
        .env("NO_COLOR", "1");
    cmd
}

/// A running server, killed on Drop; `addrs` are the addresses its
/// listening line names (`... on ADDR`), in order.
struct Server {
    child: Child,
    log: PathBuf,
    addrs: Vec<SocketAddr>,
}

impl Server {
    /// `remask ARGS` (through `wrapper`, e.g. `prlimit ...`, when given);
    /// waits for the line that starts with `marker`.
    fn start(name: &str, marker: &str, wrapper: &[&str], args: &[&str]) -> Server {
        let log = scratch().join(format!("{name}.log"));
        let file = File::create(&log).expect("a log file");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut all: Vec<&str> = rest.to_vec();
                let remask = bin().to_str().expect("a UTF-8 path");
                all.push(remask);
                all.extend(args);
                command(Path::new(program), &all)
            }
            None => command(bin(), args),
        };
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("run remask");
        let mut server = Server {
            child,
            log,
            addrs: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = server.log();
            if let Some(line) = text.lines().find(|l| l.starts_with(marker)) {
                server.addrs = line
                    .split(" on ")
                    .skip(1)
                    .filter_map(|w| {
                        w.split(|c: char| c == ';' || c == ',' || c.is_whitespace())
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect();
                assert!(!server.addrs.is_empty(), "no address in {line:?}");
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start within {START_TIMEOUT:?}:\n{text}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// user + system CPU time of the process so far, from /proc/PID/stat.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/PID/stat");
        // The fields after the command name (which is in parentheses).
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 (1-based), in clock ticks.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz = clock_ticks_per_second();
        Duration::from_secs_f64(ticks as f64 / hz as f64)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// `remask serve` of the embedded model with gRPC and HTTP on free ports:
/// (server, gRPC address, HTTP address).
fn serve(name: &str, wrapper: &[&str], extra: &[&str]) -> (Server, SocketAddr, SocketAddr) {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let server = Server::start(name, "remask serve:", wrapper, &args);
    // "..., HTTP on A; gRPC on B"
    let (http, grpc) = (server.addrs[0], server.addrs[1]);
    (server, grpc, http)
}

/// Whether the server closed `stream` within `within`: a read returns the
/// end of the stream or a reset; a read still waiting then means open.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // HTTP/2 SETTINGS, a 408...: read on until the close.
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => return false,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A plain HTTP/1.1 GET on a fresh connection: the status line and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A self-signed certificate for 127.0.0.1: (cert.pem, key.pem).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Two TCP connections that never send a ClientHello must not delay an
/// HTTPS client: handshakes run side by side, each with its own deadline.
#[test]
fn https_clients_are_not_held_up_by_silent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let (server, _grpc, http) = serve(
        "https-silent",
        &[],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://{http}/health");
    let curl = |max: &str| {
        Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                max,
            ])
            .arg(&url)
            .output()
            .expect("run curl")
    };
    // Warm up: the server answers HTTPS at all.
    let out = curl("20");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        server.log()
    );

    let _silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(http).unwrap()).collect();
    thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let out = curl("20");
    let took = start.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        server.log()
    );
    assert!(
        took < Duration::from_secs(2),
        "an HTTPS request behind two silent connections took {took:?}"
    );
}

/// Connections that send nothing, half a request head, or half the HTTP/2
/// preface are closed after --header-timeout-s, on the HTTP and the gRPC
/// port; a well-behaved client is served meanwhile.
#[test]
fn silent_and_partial_clients_are_cut_off() {
    let (server, grpc, http) = serve("header-timeout", &[], &["--header-timeout-s", "1"]);
    let open = |addr: SocketAddr, bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s
    };
    let mut cases = vec![
        ("HTTP, nothing", open(http, b"")),
        (
            "HTTP, half a head",
            open(http, b"GET /health HTTP/1.1\r\nhost: x\r\n"),
        ),
        (
            "HTTP, half the HTTP/2 preface",
            open(http, b"PRI * HTTP/2.0\r\n"),
        ),
        ("gRPC, nothing", open(grpc, b"")),
        (
            "gRPC, half the HTTP/2 preface",
            open(grpc, b"PRI * HTTP/2.0\r\n"),
        ),
    ];
    thread::sleep(Duration::from_millis(100));
    let answer = http_get(http, "/health").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for (what, stream) in &mut cases {
        assert!(
            closed_within(stream, Duration::from_secs(4)),
            "{what}: still open 4 s after connecting with --header-timeout-s 1\n{}",
            server.log()
        );
    }
}

/// Beyond --max-connections a new connection is refused at once (HTTP: a
/// 503, gRPC: closed), and served again when a place frees up.
#[test]
fn connections_beyond_the_limit_are_refused() {
    let (server, grpc, http) = serve(
        "max-connections",
        &[],
        &["--max-connections", "3", "--header-timeout-s", "30"],
    );
    for addr in [http, grpc] {
        let mut idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        thread::sleep(Duration::from_millis(300));
        if addr == http {
            let answer = http_get(http, "/health").unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 503"),
                "a 4th HTTP connection: {answer}\n{}",
                server.log()
            );
        } else {
            let mut fourth = TcpStream::connect(grpc).unwrap();
            assert!(
                closed_within(&mut fourth, Duration::from_secs(2)),
                "a 4th gRPC connection was not closed"
            );
        }
        idle.pop();
        thread::sleep(Duration::from_millis(300));
        if addr == http {
            let answer = http_get(http, "/health").unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        } else {
            let mut third = TcpStream::connect(grpc).unwrap();
            assert!(
                !closed_within(&mut third, Duration::from_millis(500)),
                "a gRPC connection with a free place was closed"
            );
        }
    }
}

/// At RLIMIT_NOFILE, accept fails with EMFILE while connections wait: the
/// server must back off instead of retrying at once. Idle clients exhaust the
/// server's descriptors (limit 64) on both ports; the server's CPU time over
/// 2 s must stay near idle, and it serves again once they leave.
#[test]
fn accept_backs_off_at_the_descriptor_limit() {
    let (server, grpc, http) = serve(
        "emfile",
        &["prlimit", "--nofile=64:64", "--"],
        &["--header-timeout-s", "60"],
    );
    let mut clients = Vec::new();
    for addr in [grpc, http] {
        for _ in 0..60 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                clients.push(s);
            }
        }
    }
    // Let the server accept what it can and run into the limit.
    thread::sleep(Duration::from_millis(500));
    let before = server.cpu_time();
    thread::sleep(Duration::from_secs(2));
    let used = server.cpu_time() - before;
    assert!(
        used < Duration::from_millis(300),
        "the server used {used:?} of CPU in 2 s at its descriptor limit\n{}",
        server.log()
    );
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(http, "/health") {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => break,
            other => assert!(
                Instant::now() < deadline,
                "no service after the clients left: {other:?}\n{}",
                server.log()
            ),
        }
        thread::sleep(Duration::from_millis(100));
    }
}
