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
#[path = "support/pki.rs"]
mod support_pki;
use support_pki::pki;

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
    fn start(
        name: &str,
        marker: &str,
        wrapper: &[&str],
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
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
            .envs(envs.iter().copied())
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

    /// Whether the process is still running.
    fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
/// (server, gRPC address, HTTP address). The limits are set through their
/// environment variables (REMASK_HEADER_TIMEOUT_S, ...), so that a binary
/// from before them starts too and shows the attack working.
fn serve(
    name: &str,
    wrapper: &[&str],
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Server, SocketAddr, SocketAddr) {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let server = Server::start(name, "remask serve:", wrapper, &args, envs);
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

/// Whether a fresh TLS connection to `addr` presents a certificate `ca`
/// signed: curl verifying against `ca` alone (exit 0: any HTTP answer;
/// 60: the certificate is not one `ca` signed).
fn presents_cert_of(addr: SocketAddr, ca: &Path) -> bool {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(format!("https://{addr}/health"))
        .output()
        .expect("run curl");
    match out.status.code() {
        Some(0) => true,
        Some(60) => false,
        other => panic!(
            "curl to {addr} exited with {other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The certificate and key are reloaded when their files change: after the
/// pair is replaced (renamed over, as a renewal writes it), new connections
/// to both the HTTP and the gRPC port get the new certificate, and the
/// server keeps serving; a corrupt replacement is refused with a warning and
/// the last good certificate stays.
#[test]
fn tls_certificates_are_reloaded_when_their_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let first = pki(dir.path(), "first");
    let second = pki(dir.path(), "second");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let (mut server, grpc, http) = serve(
        "tls-reload",
        &[],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    for addr in [http, grpc] {
        assert!(
            presents_cert_of(addr, &first.ca),
            "{addr}\n{}",
            server.log()
        );
        assert!(
            !presents_cert_of(addr, &second.ca),
            "{addr}\n{}",
            server.log()
        );
    }
    // The new pair, each file renamed over the old one.
    for (from, to) in [(&second.key, &key), (&second.cert, &cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !presents_cert_of(http, &second.ca) {
        assert!(
            Instant::now() < deadline,
            "still the old certificate 15 s after the files changed\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        presents_cert_of(grpc, &second.ca),
        "gRPC port\n{}",
        server.log()
    );
    for addr in [http, grpc] {
        assert!(
            !presents_cert_of(addr, &first.ca),
            "{addr}\n{}",
            server.log()
        );
    }
    assert!(
        server.log().contains("TLS certificate reloaded"),
        "{}",
        server.log()
    );
    // HTTPS still answers /health with 200.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&second.ca)
        .arg(format!("https://{http}/health"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        server.log()
    );

    // A corrupt certificate: a warning, and the last good pair stays.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server
        .log()
        .contains("still serving the previous certificate")
    {
        assert!(
            Instant::now() < deadline,
            "no warning 15 s after a corrupt certificate was written\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    for addr in [http, grpc] {
        assert!(
            presents_cert_of(addr, &second.ca),
            "{addr}\n{}",
            server.log()
        );
    }
    assert!(server.child_alive(), "{}", server.log());
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
        &[],
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
    let (server, grpc, http) = serve(
        "header-timeout",
        &[],
        &[],
        &[("REMASK_HEADER_TIMEOUT_S", "1")],
    );
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
/// 503, gRPC: an HTTP/2 GOAWAY with ENHANCE_YOUR_CALM, then closed), and
/// served again when a place frees up.
#[test]
fn connections_beyond_the_limit_are_refused() {
    let (server, grpc, http) = serve(
        "max-connections",
        &[],
        &[],
        &[
            ("REMASK_MAX_CONNECTIONS", "3"),
            ("REMASK_HEADER_TIMEOUT_S", "30"),
        ],
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
            fourth
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut frames = [0u8; 18];
            fourth.read_exact(&mut frames).unwrap();
            assert_eq!(frames[3], 0x4, "a SETTINGS frame first: {frames:?}");
            assert_eq!(frames[12], 0x7, "then a GOAWAY: {frames:?}");
            let mut payload = vec![0u8; usize::from(frames[11])];
            fourth.read_exact(&mut payload).unwrap();
            assert_eq!(payload[7], 0xb, "ENHANCE_YOUR_CALM: {payload:?}");
            assert!(String::from_utf8_lossy(&payload[8..]).contains("too many open connections"));
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
        &[],
        &[("REMASK_HEADER_TIMEOUT_S", "60")],
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
    eprintln!("CPU time of the server in 2 s at its descriptor limit: {used:?}");
    assert!(
        server.log().contains("Too many open files"),
        "the server never reached its descriptor limit:\n{}",
        server.log()
    );
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

/// A checkpoint of the `tiny` preset (f32), made once per test process.
fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch().join("tiny");
        let out = command(
            bin(),
            &[
                "model",
                "init",
                "--preset",
                "tiny",
                "--dtype",
                "f32",
                "--out",
                dir.to_str().unwrap(),
            ],
        )
        .output()
        .expect("run remask model init");
        assert!(out.status.success(), "{}", support_bin::describe(&out));
        dir
    })
}

/// A copy of the tiny checkpoint whose `tensor` holds a NaN at element 3.
fn tiny_with_nan(name: &str, tensor: &str) -> PathBuf {
    tiny_copy(name, |dir| {
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let begin = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
        let at = 8 + header_len + begin + 3 * 4;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    })
}

/// LoadShard and Forward from a gRPC client that is not the coordinator:
/// a refused LoadShard (layers outside the model, a path without a
/// checkpoint) leaves the loaded shard serving; Forward calls beyond what
/// the shard serves (a sequence over max_sequence_length, too many
/// sequences, more query rows than tokens) are INVALID_ARGUMENT with a
/// message that says so.
#[test]
fn malformed_worker_calls_are_refused_and_keep_the_shard() {
    use remask_proto::worker as pb;
    use remask_proto::worker::worker_client::WorkerClient;
    let model = tiny().to_str().unwrap().to_string();
    let nan = tiny_with_nan(
        "tiny-nan-worker",
        "model.transformer.blocks.1.ff_out.weight",
    );
    let worker = Server::start(
        "worker",
        "remask worker w:",
        &[],
        &["worker", "--listen", "127.0.0.1:0", "--id", "w"],
        &[],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = WorkerClient::connect(format!("http://{}", worker.addrs[0]))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let load = |model: &str, start: u32, end: u32, generation: u64| pb::LoadShardRequest {
            model: model.to_string(),
            shard: Some(pb::ShardSpec {
                layer_start: start,
                layer_end: end,
                embedding: true,
                head: true,
            }),
            generation,
        };
        client.load_shard(load(&model, 0, 2, 1)).await.unwrap();
        let forward = |lengths: Vec<u32>, queries: Vec<pb::HeadQuery>| pb::ForwardRequest {
            generation: 1,
            token_ids: vec![5; lengths.iter().map(|&l| l as usize).sum()],
            sequences: lengths
                .iter()
                .map(|&l| pb::Sequence {
                    length: l,
                    fed_start: 0,
                    fed_end: l,
                    ..Default::default()
                })
                .collect(),
            queries,
            ..Default::default()
        };
        // One sequence of 8 positions feeding `fed`, reading store 77.
        let read = |fed: std::ops::Range<u32>, queries: Vec<pb::HeadQuery>| pb::ForwardRequest {
            generation: 1,
            token_ids: vec![5; fed.len()],
            sequences: vec![pb::Sequence {
                length: 8,
                fed_start: fed.start,
                fed_end: fed.end,
                kv: pb::KvUse::Read as i32,
                cache: 77,
            }],
            queries,
            ..Default::default()
        };
        let query = |positions: Vec<u32>| pb::HeadQuery {
            positions,
            options: Some(pb::PredictOptions {
                temperature: 0.0,
                mask: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        client
            .forward(forward(vec![4], vec![query(vec![0, 1])]))
            .await
            .unwrap();

        // Refused loads: the shard of generation 1 still serves after each.
        for (what, request, code, needle) in [
            (
                "layers outside the model",
                load(&model, 0, 99, 2),
                tonic::Code::InvalidArgument,
                "layers 0..99",
            ),
            (
                "a path without a checkpoint",
                load("/nonexistent/model", 0, 2, 3),
                tonic::Code::FailedPrecondition,
                "/nonexistent/model",
            ),
            // Fails while loading, after the old shard made room: it is
            // loaded again.
            (
                "a checkpoint with a NaN weight",
                load(nan.to_str().unwrap(), 0, 2, 4),
                tonic::Code::FailedPrecondition,
                "'model.transformer.blocks.1.ff_out.weight' holds a non-finite value (NaN) at element 3",
            ),
        ] {
            let err = client.load_shard(request).await.unwrap_err();
            let status = client
                .status(pb::StatusRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(status.generation, 1, "{what}: {status:?}");
            client
                .forward(forward(vec![4], vec![query(vec![0, 1])]))
                .await
                .unwrap_or_else(|e| panic!("{what}: the shard no longer serves: {e:?}"));
            assert_eq!(err.code(), code, "{what}: {err:?}");
            assert!(err.message().contains(needle), "{what}: {}", err.message());
            if code == tonic::Code::InvalidArgument {
                // The layer range is the request's fault, not the checkpoint's.
                assert!(!err.message().contains("config.json"), "{}", err.message());
            }
        }

        // Forward beyond what the shard serves.
        for (what, request, needle) in [
            (
                "a sequence over max_sequence_length",
                forward(vec![513], vec![]),
                "more than the model's max_sequence_length 512",
            ),
            (
                "too many sequences",
                forward(vec![1; 5000], vec![]),
                "5000 sequences",
            ),
            (
                "more query rows than tokens",
                forward(vec![4], vec![query(vec![0; 100])]),
                "100 query rows for a batch of 4 tokens",
            ),
            (
                "fed positions past the sequence",
                read(4..12, vec![]),
                "fed positions 4..12 are not inside its 8 positions",
            ),
            (
                "a full forward that feeds part of its sequence",
                pb::ForwardRequest {
                    sequences: vec![pb::Sequence {
                        length: 8,
                        fed_start: 2,
                        fed_end: 8,
                        kv: pb::KvUse::Store as i32,
                        cache: 1,
                    }],
                    ..read(2..8, vec![])
                },
                "a full forward feeds every position",
            ),
            (
                "a query before the fed positions",
                read(4..8, vec![pb::HeadQuery { first: 4, ..query(vec![2]) }]),
                "position 2, before its first fed position 4",
            ),
            (
                "an unknown kv use",
                pb::ForwardRequest {
                    sequences: vec![pb::Sequence {
                        length: 4,
                        fed_end: 4,
                        kv: 9,
                        ..Default::default()
                    }],
                    ..forward(vec![4], vec![])
                },
                "unknown kv use",
            ),
        ] {
            let err = client.forward(request).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
            assert!(err.message().contains(needle), "{what}: {}", err.message());
        }
        // A store this worker does not hold: named, for the coordinator to
        // rebuild; releasing it, or another generation's, changes nothing.
        let err = client.forward(read(4..8, vec![])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("K/V cache 77 not held"), "{}", err.message());
        assert_eq!(err.metadata().get("remask-missing-caches").unwrap(), "77");
        let released = client
            .release_caches(pb::ReleaseCachesRequest {
                generation: 1,
                caches: vec![77, u64::MAX],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(released.released, 0);
        let other = client
            .release_caches(pb::ReleaseCachesRequest {
                generation: 9,
                caches: vec![1],
            })
            .await
            .unwrap_err();
        assert_eq!(other.code(), tonic::Code::FailedPrecondition);
        client
            .forward(forward(vec![4], vec![query(vec![0, 1])]))
            .await
            .expect("the shard still serves");
    });
}

/// A copy of the tiny checkpoint, changed by `edit(dir)`.
fn tiny_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    edit(&dir);
    dir
}

/// Sets config.json's `field` to `value`.
fn set_config(dir: &Path, field: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[field] = value;
    std::fs::write(&path, config.to_string()).unwrap();
}

/// `remask generate` of a short request on `model`: (exit code, stderr).
/// A death by signal (an abort) fails the test.
fn generate(model: &Path) -> (i32, String) {
    let out = command(
        bin(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--gen-length",
            "4",
            "--steps",
            "4",
            "--block-length",
            "4",
        ],
    )
    .output()
    .expect("run remask generate");
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {}", support_bin::describe(&out)));
    (code, support_bin::stderr(&out))
}

/// Corrupt model files are refused with exit code 2 and a message that
/// names the field or tensor at fault: absurd sizes (they aborted on a
/// 64 TB allocation), NaN weights (they generated token 0 over and over,
/// exit 0), values of the wrong type in valid JSON, inconsistent
/// safetensors offsets.
#[test]
fn corrupt_models_are_refused_by_name() {
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "max_sequence_length 2^42",
            tiny_copy("huge-seq", |d| {
                set_config(d, "max_sequence_length", serde_json::json!(1u64 << 42))
            }),
            vec!["max_sequence_length 4398046511104 is over the limit"],
        ),
        (
            "n_layers 2^40",
            tiny_copy("huge-layers", |d| {
                set_config(d, "n_layers", serde_json::json!(1u64 << 40))
            }),
            vec!["n_layers 1099511627776 is over the limit"],
        ),
        (
            "a NaN weight",
            tiny_with_nan("tiny-nan-cli", "model.transformer.blocks.0.q_proj.weight"),
            vec![
                "'model.transformer.blocks.0.q_proj.weight'",
                "non-finite value (NaN) at element 3",
            ],
        ),
        (
            "d_model a string",
            tiny_copy("string-d-model", |d| {
                set_config(d, "d_model", serde_json::json!("sixty-four"))
            }),
            vec!["\"d_model\": invalid type: string"],
        ),
        (
            "data_offsets of the wrong length",
            tiny_copy("bad-offsets", |d| {
                let path = d.join("model.safetensors");
                let mut bytes = std::fs::read(&path).unwrap();
                let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let mut header: serde_json::Value =
                    serde_json::from_slice(&bytes[8..8 + len]).unwrap();
                let name = "model.transformer.ln_f.weight";
                let end = header[name]["data_offsets"][1].as_u64().unwrap();
                header[name]["data_offsets"][1] = serde_json::json!(end - 4);
                // The same length, padded with spaces as the format allows.
                let mut text = header.to_string();
                text.push_str(&" ".repeat(len - text.len()));
                bytes.splice(8..8 + len, text.into_bytes());
                std::fs::write(&path, bytes).unwrap();
            }),
            vec!["tensor 'model.transformer.ln_f.weight'", "takes 256 bytes"],
        ),
    ];
    for (what, model, needles) in cases {
        let (code, stderr) = generate(&model);
        assert_eq!(code, 2, "{what}: exit code {code}\n{stderr}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{what}: no {needle:?} in\n{stderr}"
            );
        }
        for library in ["TensorInvalidInfo", "InvalidOffset", "not valid JSON"] {
            assert!(!stderr.contains(library), "{what}: {library} in\n{stderr}");
        }
    }
}

/// A corrupt TLS file is a usage error (exit code 2) reported before the
/// server says it listens, naming the file.
#[test]
fn corrupt_tls_files_are_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    for (what, cert, key, needle) in [
        ("a corrupt certificate", &garbage, &key, "garbage.pem"),
        ("a corrupt key", &cert, &garbage, "garbage.pem"),
        (
            "a key of another certificate",
            &cert,
            &other_key,
            "other-key.pem",
        ),
    ] {
        let out = command(
            bin(),
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--no-http",
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        let stderr = support_bin::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}:\n{stderr}");
        assert!(
            !stderr.contains("gRPC on"),
            "{what}: banner first:\n{stderr}"
        );
        assert!(stderr.contains(needle), "{what}: no {needle}:\n{stderr}");
    }
}

/// An HTTP/1.1 POST of `body` on a fresh connection: the status code.
fn http_post(addr: SocketAddr, path: &str, body: &[u8]) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let head = String::from_utf8_lossy(&out[..out.len().min(64)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {head:?}")))
}

/// Fuzzed request bodies on the OpenAI routes: byte edits and extreme field
/// values of valid bodies (a fixed-seed xorshift, 300 requests). Each gets a
/// well-formed answer that is not a server error, and the server serves on.
#[test]
fn fuzzed_http_bodies_get_client_errors() {
    let (server, _grpc, http) = serve("http-fuzz", &[], &[], &[]);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let completion = serde_json::json!({
        "model": "remask", "prompt": "Hello", "max_tokens": 8, "steps": 8, "block_length": 8,
        "temperature": 0.5, "seed": 1
    });
    let chat = serde_json::json!({
        "model": "remask", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
        "steps": 8, "stream": false
    });
    let extremes = [
        serde_json::json!(-1),
        serde_json::json!(0),
        serde_json::json!(u64::MAX),
        serde_json::json!(1e308),
        serde_json::json!(-1e308),
        serde_json::json!("x"),
        serde_json::json!(null),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(true),
    ];
    for i in 0..300 {
        let (path, base) = if i % 2 == 0 {
            ("/v1/completions", &completion)
        } else {
            ("/v1/chat/completions", &chat)
        };
        let body: Vec<u8> = if next() % 2 == 0 {
            let mut v = base.clone();
            let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            for _ in 0..1 + next() % 3 {
                let key = &keys[(next() % keys.len() as u64) as usize];
                v[key] = extremes[(next() % extremes.len() as u64) as usize].clone();
            }
            v.to_string().into_bytes()
        } else {
            let mut b = base.to_string().into_bytes();
            for _ in 0..1 + next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                match next() % 3 {
                    0 => b[at] = next() as u8,
                    1 => {
                        b.remove(at);
                    }
                    _ => b.insert(at, b"{}[]\",:0-e\\"[(next() % 11) as usize]),
                }
            }
            b
        };
        let status = http_post(http, path, &body).unwrap_or_else(|e| {
            panic!(
                "{path} {}: no answer: {e}\n{}",
                String::from_utf8_lossy(&body),
                server.log()
            )
        });
        assert!(
            (200..500).contains(&status) && status != 408,
            "{path} {}: status {status}\n{}",
            String::from_utf8_lossy(&body),
            server.log()
        );
    }
    let answer = http_get(http, "/health").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
