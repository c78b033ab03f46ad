//! End-to-end cluster tests: real `remask worker`, `remask coordinator` and
//! `remask serve` processes on loopback (with a real etcd where the cluster
//! discovers its workers), driven by `remask generate --endpoint`.
//!
//! The contract checked here: a request through any cluster gives exactly the
//! ids of the in-process `remask generate --model` with the same settings
//! (also when requests share forward passes); a worker that dies fails the
//! requests in flight with UNAVAILABLE at once and the cluster serves again as
//! soon as a worker can take its stage; a cluster missing a stage answers
//! UNAVAILABLE at once instead of hanging.
//!
//! The binary is `$REMASK_BIN`, or `target/<profile>/remask` next to this test
//! executable (build it first: `cargo build --release -p remask-cli`). etcd is
//! `$ETCD_BIN`, `etcd` on PATH, or /usr/bin/etcd.
//!
//! Every child process lives in a guard that kills it on Drop, so a failing
//! test leaves nothing running. Servers listen on `127.0.0.1:0` (a free port
//! chosen by the kernel, so parallel tests never race for a port) and the test
//! reads the bound address from the line each role prints on stderr.

#[path = "support/etcd.rs"]
mod etcd;

use etcd::Etcd;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A `generate` that does not finish within this fails its test instead of hanging the run.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a fresh cluster may take to serve its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A request to a cluster missing a stage must fail within this.
const FAIL_FAST: Duration = Duration::from_secs(3);
/// Lease TTL of the workers whose death the tests wait for (seconds).
const LEASE_TTL: &str = "2";
/// The readiness probe: a tiny request that every preset accepts.
const PROBE: &str = "--prompt-ids 1,2,3 --gen-length 4 --steps 4 --block-length 4";

// ---------------------------------------------------------------------------
// Harness: the binary, scratch dirs, checkpoints
// ---------------------------------------------------------------------------

#[path = "support/bin.rs"]
mod support_bin;
use support_bin::{bin, describe, stderr, stdout};
#[path = "support/pki.rs"]
mod support_pki;
use support_pki::{Pki, pki};

/// A directory for the whole test process: the shared checkpoints, a scratch
/// cache and the servers' logs. Never deleted (statics are not dropped).
fn process_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| TempDir::with_prefix("remask-cluster-tests-").expect("a temp dir"))
        .path()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `remask ARGS` with every inherited `REMASK_*` variable removed (the CLI
/// reads them as flag defaults), a scratch `REMASK_CACHE_DIR`, no colours.
fn command(args: &[String]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REMASK_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("REMASK_CACHE_DIR", process_dir().join("cache"))
        .env("NO_COLOR", "1");
    cmd
}

/// An argument list: the words of `words` (split on whitespace), then `rest`
/// verbatim (paths, values with spaces).
fn argv(words: &str, rest: &[&str]) -> Vec<String> {
    words
        .split_whitespace()
        .chain(rest.iter().copied())
        .map(str::to_string)
        .collect()
}

/// A checkpoint of `preset` (f32), made once per test binary and shared read-only.
fn checkpoint(preset: &'static str) -> &'static Path {
    static MODELS: OnceLock<std::sync::Mutex<BTreeMap<&'static str, &'static Path>>> =
        OnceLock::new();
    let models = MODELS.get_or_init(Default::default);
    let mut models = models.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = models.get(preset) {
        return dir;
    }
    let dir: &'static Path = Box::leak(process_dir().join(preset).into_boxed_path());
    let out = Pending::spawn(&argv(
        &format!("model init --preset {preset} --dtype f32 --out"),
        &[path_str(dir)],
    ))
    .wait();
    assert!(
        out.status.success(),
        "model init failed\n{}",
        describe(&out)
    );
    models.insert(preset, dir);
    dir
}

/// The `tiny` preset: 2 layers.
fn tiny() -> &'static Path {
    checkpoint("tiny")
}

/// The `small` preset: 4 layers, enough for 3 stages.
fn small() -> &'static Path {
    checkpoint("small")
}

// ---------------------------------------------------------------------------
// Harness: short-lived children (generate)
// ---------------------------------------------------------------------------

/// A running `remask` whose stdout and stderr are collected; killed on Drop.
struct Pending {
    args: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    done: bool,
}

impl Pending {
    fn spawn(args: &[String]) -> Pending {
        let mut child = command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin().display()));
        fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        }
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        Pending {
            args: args.join(" "),
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            done: false,
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The output once the child exits, or None if it is still running after `limit`.
    fn wait_timeout(&mut self, limit: Duration) -> Option<Output> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for remask") {
                break status;
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        };
        self.done = true;
        Some(Output {
            status,
            stdout: self
                .stdout
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
        })
    }

    /// The output; panics if the child runs past [`TIMEOUT`].
    fn wait(mut self) -> Output {
        match self.wait_timeout(TIMEOUT) {
            Some(out) => out,
            None => panic!("`remask {}` did not finish within {TIMEOUT:?}", self.args),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses a successful `--json` output.
fn parse_json(out: &Output) -> Result<Value, String> {
    if !out.status.success() {
        return Err(format!("remask failed\n{}", describe(out)));
    }
    let text = stdout(out);
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != 1 {
        return Err(format!("expected one line of JSON\n{}", describe(out)));
    }
    serde_json::from_str(lines[0])
        .map_err(|e| format!("stdout is not JSON: {e}\n{}", describe(out)))
}

// ---------------------------------------------------------------------------
// Harness: servers (worker, coordinator, serve)
// ---------------------------------------------------------------------------

/// Where one test's servers write their stderr; dumped into failure messages.
struct Logs {
    dir: PathBuf,
}

impl Logs {
    fn new(test: &str) -> Logs {
        let dir = process_dir().join("logs").join(test);
        std::fs::create_dir_all(&dir).expect("a log dir");
        Logs { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        self.dir.join(format!(
            "{:02}-{name}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The tail of every server log of the test.
    fn dump(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let tail: String = {
                let chars: Vec<char> = text.chars().collect();
                chars[chars.len().saturating_sub(3000)..].iter().collect()
            };
            out.push_str(&format!("\n--- {} ---\n{tail}", f.display()));
        }
        out
    }
}

/// A long-running `remask` server; killed (SIGKILL) on Drop.
struct Server {
    name: String,
    child: Child,
    log: PathBuf,
    /// The bound address, host:port.
    addr: String,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts `remask ARGS` and waits for the line starting with `marker` that
    /// ends in `on ADDR`; panics (with the log) if it exits or does not print it.
    fn start(
        logs: &Logs,
        name: &str,
        marker: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Server {
        let log = logs.file(name);
        let file = File::create(&log).expect("a server log");
        let child = command(args)
            .envs(envs.iter().copied())
            .stdout(file.try_clone().expect("a log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin().display()));
        let mut server = Server {
            name: name.to_string(),
            child,
            log,
            addr: String::new(),
            exited: None,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = server.log();
            let addr = text
                .lines()
                .filter(|l| l.starts_with(marker))
                .find_map(|l| {
                    l.rfind(" on ").map(|i| {
                        l[i + 4..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
                });
            if let Some(addr) = addr.filter(|a| !a.is_empty()) {
                server.addr = addr;
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "`remask {}` ({name}) exited with {status} before listening\n{text}",
                    args.join(" ")
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "`remask {}` ({name}) did not print `{marker} ... on ADDR` within {START_TIMEOUT:?}\n{text}",
                    args.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a crash.
    fn crash(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// SIGTERM (a graceful stop) and the exit status, or None if it is still
    /// running after `limit`.
    fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `remask worker` with id `id`, registering in `etcd` (lease TTL [`LEASE_TTL`]) if given.
fn worker(logs: &Logs, id: &str, etcd: Option<&Etcd>) -> Server {
    let mut args = argv("worker --listen 127.0.0.1:0 --id", &[id]);
    if let Some(etcd) = etcd {
        args.extend(argv("--lease-ttl", &[LEASE_TTL, "--etcd", &etcd.endpoint]));
    }
    Server::start(logs, id, &format!("remask worker {id}:"), &args, &[])
}

/// `remask coordinator --stages N` with `discovery` (`--etcd URL` or `--workers A,B`)
/// and any further flags. Logs at info level for `remask_cluster`, so the stage
/// assignments can be read.
fn coordinator(logs: &Logs, model: &Path, stages: usize, discovery: &[&str]) -> Server {
    let mut args = argv(
        &format!("coordinator --listen 127.0.0.1:0 --no-http --stages {stages} --model"),
        &[path_str(model)],
    );
    args.extend(discovery.iter().map(|s| s.to_string()));
    Server::start(
        logs,
        "coordinator",
        "remask coordinator:",
        &args,
        &[("REMASK_LOG", "remask_cluster=info,warn")],
    )
}

/// `remask serve`: a coordinator with an in-process worker.
fn serve(logs: &Logs, model: &Path) -> Server {
    let args = argv(
        "serve --listen 127.0.0.1:0 --no-http --model",
        &[path_str(model)],
    );
    Server::start(logs, "serve", "remask serve:", &args, &[])
}

/// Drops ANSI escape sequences (in case the log has colours despite NO_COLOR).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Stage -> worker id, from the coordinator's `stage assigned stage=S worker=ID`
/// log lines (the latest assignment of each stage wins).
fn assignments(coordinator: &Server) -> BTreeMap<usize, String> {
    let mut map = BTreeMap::new();
    for line in strip_ansi(&coordinator.log()).lines() {
        if !line.contains("stage assigned") {
            continue;
        }
        let field = |name: &str| {
            line.split_whitespace().find_map(|t| {
                t.strip_prefix(name)
                    .map(|v| v.trim_matches('"').to_string())
            })
        };
        if let (Some(stage), Some(worker)) = (field("stage="), field("worker="))
            && let Ok(stage) = stage.parse()
        {
            map.insert(stage, worker);
        }
    }
    map
}

// ---------------------------------------------------------------------------
// Harness: requests
// ---------------------------------------------------------------------------

/// `remask generate --json --model MODEL REQUEST`: the in-process reference.
fn local(model: &Path, request: &[String]) -> Value {
    let mut args = argv("generate --json --model", &[path_str(model)]);
    args.extend(request.iter().cloned());
    let out = Pending::spawn(&args).wait();
    parse_json(&out).unwrap_or_else(|e| panic!("in-process `remask {}`: {e}", args.join(" ")))
}

fn remote_args(endpoint: &str, request: &[String]) -> Vec<String> {
    let mut args = argv("generate --json --endpoint", &[endpoint]);
    args.extend(request.iter().cloned());
    args
}

/// `remask generate --json --endpoint ENDPOINT REQUEST`.
fn remote(endpoint: &str, request: &[String]) -> Output {
    Pending::spawn(&remote_args(endpoint, request)).wait()
}

/// A successful remote request's JSON; panics with the servers' logs otherwise.
fn remote_json(logs: &Logs, endpoint: &str, request: &[String]) -> Value {
    let out = remote(endpoint, request);
    parse_json(&out).unwrap_or_else(|e| {
        panic!(
            "`remask {}`: {e}\n=== server logs ==={}",
            remote_args(endpoint, request).join(" "),
            logs.dump()
        )
    })
}

/// The fields of a result that must not depend on where it was computed.
const SAME_FIELDS: [&str; 14] = [
    "token_ids",
    "prompt_ids",
    "generated_ids",
    "text",
    "steps",
    "forwards",
    "finish_reason",
    "gen_length",
    "block_length",
    "rule",
    "cache",
    "top_k",
    "top_p",
    "random_weights",
];

/// Panics unless `got` (through a cluster) holds the same result as `want` (in process).
fn assert_same(what: &str, got: &Value, want: &Value) {
    for key in SAME_FIELDS {
        assert!(
            !want[key].is_null(),
            "{what}: the in-process JSON lacks {key}: {want}"
        );
        assert_eq!(
            got[key], want[key],
            "{what}: {key} differs from the in-process result\n  cluster:    {got}\n  in-process: {want}"
        );
    }
}

/// Polls `endpoint` with [`PROBE`] until a request succeeds; returns the time it took.
fn wait_serving(logs: &Logs, endpoint: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let probe = argv(PROBE, &[]);
    loop {
        let out = remote(endpoint, &probe);
        if out.status.success() {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!(
                "{endpoint} does not serve within {within:?}; last probe:\n{}\n=== server logs ==={}",
                describe(&out),
                logs.dump()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One probe: it must fail within [`FAIL_FAST`] with exit 1 and "unavailable"
/// on stderr. Returns how long it took.
fn assert_unavailable_fast(logs: &Logs, endpoint: &str, when: &str) -> Duration {
    let start = Instant::now();
    let mut pending = Pending::spawn(&remote_args(endpoint, &argv(PROBE, &[])));
    let Some(out) = pending.wait_timeout(FAIL_FAST) else {
        panic!(
            "{when}: a request to {endpoint} is still running after {FAIL_FAST:?} \
             (expected UNAVAILABLE at once)\n=== server logs ==={}",
            logs.dump()
        );
    };
    let took = start.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{when}: expected exit 1 (UNAVAILABLE)\n{}\n=== server logs ==={}",
        describe(&out),
        logs.dump()
    );
    assert!(
        stderr(&out).to_lowercase().contains("unavailable"),
        "{when}: expected \"unavailable\" on stderr\n{}",
        describe(&out)
    );
    assert!(
        out.stdout.is_empty(),
        "{when}: expected nothing on stdout\n{}",
        describe(&out)
    );
    took
}

/// The commit rules at settings where the `small` preset's random weights
/// commit several tokens in some steps and one in others (4 blocks of 8:
/// 19, 8 and 10 forwards for 32 tokens), for the equivalence tests.
fn rule_configs() -> Vec<(&'static str, Vec<String>)> {
    vec![
        (
            "threshold 0.3",
            argv(
                "--prompt-ids 7,8,9 --gen-length 32 --block-length 8 --threshold 0.3",
                &[],
            ),
        ),
        (
            "factor 4",
            argv(
                "--prompt-ids 7,8,9 --gen-length 32 --block-length 8 --factor 4",
                &[],
            ),
        ),
        (
            "entropy 10, temperature 0.6",
            argv(
                "--prompt-ids 7,8,9 --gen-length 32 --block-length 8 --entropy 10 --temperature 0.6 --seed 4",
                &[],
            ),
        ),
        (
            "factor 4, cfg 1, no early stop",
            argv(
                "--prompt-ids 5,6 --gen-length 16 --block-length 8 --factor 4 --cfg-scale 1 --no-early-stop",
                &[],
            ),
        ),
    ]
}

/// Both K/V cache modes with the fixed schedule, threshold and factor
/// rules (and guidance), for the equivalence tests: ids and forward counts
/// are a property of the mode, never of the topology. On the `small`
/// preset each of these differs from its run without a cache
/// (`caches_change_the_ids` checks it), so matching tests something.
fn cache_configs() -> Vec<(&'static str, Vec<String>)> {
    let base = [
        (
            "fixed",
            "--prompt-ids 7,8,9 --gen-length 32 --steps 16 --block-length 8",
        ),
        (
            "threshold 0.3",
            "--prompt-ids 7,8,9 --gen-length 32 --block-length 8 --threshold 0.3",
        ),
        (
            "factor 4, cfg 1",
            "--prompt-ids 5,6 --gen-length 24 --block-length 8 --factor 4 --cfg-scale 1",
        ),
    ];
    let mut configs = Vec::new();
    for mode in ["prefix", "dual"] {
        for (name, args) in base {
            let name: &'static str = Box::leak(format!("{name}, cache {mode}").into_boxed_str());
            configs.push((name, argv(&format!("{args} --cache {mode}"), &[])));
        }
    }
    configs
}

/// The request of a cache configuration without its `--cache`.
fn without_cache(request: &[String]) -> Vec<String> {
    let at = request.iter().position(|a| a == "--cache").unwrap();
    [&request[..at], &request[at + 2..]].concat()
}

/// Sampler configurations for the equivalence tests: (name, request
/// arguments); the truncated draws, then the commit rules last.
fn sampler_configs() -> Vec<(&'static str, Vec<String>)> {
    let mut configs = fixed_configs();
    configs.extend(truncate_configs());
    configs.extend(rule_configs());
    configs
}

/// top-k / top-p of the draw at temperature > 0: the thresholds are found
/// over the whole vocabulary, however it is split across stages' ranks, so
/// the ids are the in-process ones. On the `small` preset's near-flat random
/// logits top-k 8 then top-p 0.5 keeps a few tokens (both selects run), and
/// top-p 0.2 alone, under guidance, many (the mass select runs every round).
fn truncate_configs() -> Vec<(&'static str, Vec<String>)> {
    vec![
        (
            "temperature 1 top-k 8 top-p 0.5 seed 6",
            argv(
                "--prompt-ids 1,2,3 --gen-length 16 --steps 8 --block-length 16 --temperature 1.0 \
                 --top-k 8 --top-p 0.5 --seed 6",
                &[],
            ),
        ),
        (
            "threshold 0.3, temperature 1.5 top-p 0.2, cfg 0.5",
            argv(
                "--prompt-ids 7,8,9 --gen-length 16 --block-length 8 --threshold 0.3 \
                 --temperature 1.5 --top-p 0.2 --cfg-scale 0.5 --seed 2",
                &[],
            ),
        ),
    ]
}

/// The fixed schedule's configurations.
fn fixed_configs() -> Vec<(&'static str, Vec<String>)> {
    vec![
        (
            "greedy, one block",
            argv(
                "--prompt-ids 1,2,3,4,5 --gen-length 16 --steps 16 --block-length 16",
                &[],
            ),
        ),
        (
            "greedy, four blocks",
            argv(
                "--prompt-ids 7,8,9 --gen-length 32 --steps 16 --block-length 8",
                &[],
            ),
        ),
        (
            "steps == gen_length",
            argv(
                "--prompt-ids 11,12 --gen-length 24 --steps 24 --block-length 8",
                &[],
            ),
        ),
        (
            "temperature 0.8 seed 3",
            argv(
                "--prompt-ids 1,2,3 --gen-length 16 --steps 8 --block-length 16 --temperature 0.8 --seed 3",
                &[],
            ),
        ),
        (
            "cfg_scale 1.5",
            argv(
                "--prompt-ids 4,5,6,7 --gen-length 16 --steps 16 --block-length 8 --cfg-scale 1.5",
                &[],
            ),
        ),
        (
            "random remasking seed 5",
            argv(
                "--prompt-ids 3,1,4,1,5 --gen-length 16 --steps 8 --block-length 8 --remasking random --seed 5",
                &[],
            ),
        ),
        (
            "chat prompt",
            argv(
                "--chat --gen-length 16 --steps 16 --block-length 16 --prompt",
                &["What is a masked diffusion model?"],
            ),
        ),
        (
            "everything at once",
            argv(
                "--gen-length 24 --steps 12 --block-length 8 --temperature 0.5 --seed 17 \
                 --cfg-scale 0.7 --remasking random --logits-eos-inf --confidence-eos-eot-inf --prompt",
                &["plain text prompt"],
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// etcd + a 3-stage coordinator + 3 workers: every sampler configuration gives
/// the in-process ids.
#[test]
fn etcd_cluster_matches_in_process() {
    let logs = Logs::new("etcd_cluster_matches_in_process");
    let model = small();
    let etcd = Etcd::start();
    let _workers: Vec<Server> = (0..3)
        .map(|i| worker(&logs, &format!("w{i}"), Some(&etcd)))
        .collect();
    let coord = coordinator(&logs, model, 3, &["--etcd", &etcd.endpoint]);
    let ready = wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    eprintln!("etcd cluster (3 stages) serving after {ready:?}");

    let assigned = assignments(&coord);
    let mut ids: Vec<&String> = assigned.values().collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (assigned.len(), ids.len()),
        (3, 3),
        "expected 3 stages on 3 distinct workers, got {assigned:?}\n{}",
        logs.dump()
    );

    for (name, request) in sampler_configs().into_iter().chain(cache_configs()) {
        let want = local(model, &request);
        let got = remote_json(&logs, &coord.addr, &request);
        assert_same(name, &got, &want);
        // The coordinator serves the checkpoint under its directory's name,
        // never its path.
        let served = model.file_name().unwrap().to_str().unwrap();
        assert_eq!(got["model"], served, "{name}: the served model name");
    }
}

/// The cache configurations of the equivalence tests are ones where the
/// cache changes the ids (in process).
#[test]
fn caches_change_the_ids() {
    let model = small();
    for (name, request) in cache_configs() {
        let cached = local(model, &request);
        let plain = local(model, &without_cache(&request));
        assert_ne!(
            cached["generated_ids"], plain["generated_ids"],
            "{name}: the cache changes nothing here; pick another configuration"
        );
        assert_eq!(cached["cache"], request.last().unwrap().as_str());
    }
}

/// The truncated configurations of the equivalence tests are ones where
/// top-k / top-p change the ids (in process), and the result reports them.
#[test]
fn truncation_changes_the_ids() {
    let model = small();
    for (name, request) in truncate_configs() {
        let truncated = local(model, &request);
        let mut plain = Vec::new();
        let mut args = request.iter();
        while let Some(a) = args.next() {
            if a == "--top-k" || a == "--top-p" {
                args.next();
            } else {
                plain.push(a.clone());
            }
        }
        let plain = local(model, &plain);
        assert_ne!(
            truncated["generated_ids"], plain["generated_ids"],
            "{name}: top-k / top-p change nothing here; pick another configuration"
        );
        assert_eq!((&plain["top_k"], &plain["top_p"]), (&json!(0), &json!(1.0)));
        assert!(
            truncated["top_k"] != json!(0) || truncated["top_p"] != json!(1.0),
            "{name}: {truncated}"
        );
    }
}

/// A static cluster (`--workers A,B`, workers without etcd): the in-process ids.
#[test]
fn static_cluster_matches_in_process() {
    let logs = Logs::new("static_cluster_matches_in_process");
    let model = small();
    let a = worker(&logs, "s0", None);
    let b = worker(&logs, "s1", None);
    let list = format!("{},{}", a.addr, b.addr);
    let coord = coordinator(&logs, model, 2, &["--workers", &list]);
    let ready = wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    eprintln!("static cluster (2 stages) serving after {ready:?}");

    let assigned = assignments(&coord);
    assert_eq!(
        assigned,
        BTreeMap::from([
            (0, "static-0000".to_string()),
            (1, "static-0001".to_string())
        ]),
        "stage i goes to the i-th listed worker\n{}",
        logs.dump()
    );
    for (name, request) in sampler_configs().into_iter().take(2) {
        let want = local(model, &request);
        let got = remote_json(&logs, &coord.addr, &request);
        assert_same(name, &got, &want);
    }
}

/// 10 concurrent requests of different lengths, settings and commit rules to
/// one `serve` share forward passes; each gets exactly its solo in-process
/// result.
#[test]
fn concurrent_requests_get_their_solo_results() {
    let logs = Logs::new("concurrent_requests_get_their_solo_results");
    let model = small();
    let server = serve(&logs, model);
    let requests: Vec<Vec<String>> = vec![
        argv(
            "--prompt-ids 1,2,3 --gen-length 8 --steps 8 --block-length 8",
            &[],
        ),
        argv(
            "--prompt-ids 1,2,3,4,5,6,7,8,9,10 --gen-length 16 --steps 8 --block-length 4",
            &[],
        ),
        argv(
            "--prompt-ids 5,4,3,2,1 --gen-length 24 --steps 12 --block-length 8 --temperature 0.7 --seed 11",
            &[],
        ),
        argv(
            "--prompt-ids 21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40 \
             --gen-length 32 --steps 32 --block-length 32 --cfg-scale 1.5",
            &[],
        ),
        argv(
            "--prompt-ids 42 --gen-length 40 --steps 20 --block-length 20 --remasking random --seed 9",
            &[],
        ),
        argv(
            "--prompt-ids 100,200,300,400,500,600,700 --gen-length 48 --steps 24 --block-length 16 \
             --temperature 1.0 --seed 2 --cfg-scale 0.5",
            &[],
        ),
        argv(
            "--gen-length 56 --steps 28 --block-length 8 --prompt",
            &["a longer plain prompt that the tokenizer splits into several tokens"],
        ),
        argv(
            "--chat --gen-length 64 --steps 32 --block-length 32 --logits-eos-inf --prompt",
            &["hello"],
        ),
        // The adaptive rules batched with the fixed schedule.
        argv(
            "--prompt-ids 7,8,9 --gen-length 32 --block-length 8 --threshold 0.3",
            &[],
        ),
        argv(
            "--prompt-ids 9,8,7,6 --gen-length 24 --block-length 8 --entropy 10",
            &[],
        ),
    ];
    let solo: Vec<Value> = requests.iter().map(|r| local(model, r)).collect();
    wait_serving(&logs, &server.addr, READY_TIMEOUT);

    let start = Instant::now();
    let pending: Vec<Pending> = requests
        .iter()
        .map(|r| Pending::spawn(&remote_args(&server.addr, r)))
        .collect();
    let outputs: Vec<Output> = pending.into_iter().map(Pending::wait).collect();
    let wall = start.elapsed();
    eprintln!("{} concurrent requests done in {wall:?}", requests.len());
    let mut busy_ms = 0.0;
    for (i, (out, want)) in outputs.iter().zip(&solo).enumerate() {
        let got = parse_json(out).unwrap_or_else(|e| {
            panic!(
                "concurrent request {i} (`{}`): {e}\n=== server logs ==={}",
                requests[i].join(" "),
                logs.dump()
            )
        });
        eprintln!(
            "concurrent request {i}: gen_length {}, elapsed {:.0} ms, queue {:.0} ms",
            got["gen_length"],
            got["elapsed_ms"].as_f64().unwrap_or(0.0),
            got["queue_ms"].as_f64().unwrap_or(0.0)
        );
        busy_ms += got["elapsed_ms"].as_f64().unwrap_or(0.0);
        assert_same(&format!("concurrent request {i}"), &got, want);
    }
    // Served one after the other, the requests' server-side times would add up to
    // less than the wall time: more means they shared forward passes.
    assert!(
        busy_ms > wall.as_secs_f64() * 1e3,
        "the requests did not overlap (sum of elapsed_ms {busy_ms:.0} ms, wall {wall:?}): \
         this run did not exercise batching"
    );
}

/// kill -9 of a worker mid-request without a spare: the request waits
/// `--failover-timeout` (1 s here) for a worker, then fails with UNAVAILABLE;
/// new requests fail fast while its stage is empty, and a new worker restores
/// service with the in-process ids.
#[test]
fn worker_crash_fails_in_flight_then_recovers() {
    let logs = Logs::new("worker_crash_fails_in_flight_then_recovers");
    let model = small();
    let check = argv(
        "--prompt-ids 9,8,7,6 --gen-length 16 --steps 8 --block-length 8",
        &[],
    );
    let want = local(model, &check);

    let etcd = Etcd::start();
    let mut workers = [
        worker(&logs, "w0", Some(&etcd)),
        worker(&logs, "w1", Some(&etcd)),
    ];
    let coord = coordinator(
        &logs,
        model,
        2,
        &["--etcd", &etcd.endpoint, "--failover-timeout", "1"],
    );
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    let assigned = assignments(&coord);
    let victim_id = assigned
        .get(&1)
        .unwrap_or_else(|| {
            panic!(
                "no stage 1 assignment in the log: {assigned:?}\n{}",
                logs.dump()
            )
        })
        .clone();
    let survivor_id = assigned.get(&0).cloned().unwrap_or_default();
    assert_ne!(
        victim_id, survivor_id,
        "one worker holds both stages: {assigned:?}"
    );
    let victim = workers
        .iter()
        .position(|w| w.name == victim_id)
        .unwrap_or_else(|| panic!("stage 1 is on an unknown worker {victim_id}"));

    // A long request (512 steps over 515 positions: many seconds).
    let long = argv(
        "--prompt-ids 1,2,3 --gen-length 512 --steps 512 --block-length 32",
        &[],
    );
    let mut in_flight = Pending::spawn(&remote_args(&coord.addr, &long));
    thread::sleep(Duration::from_millis(1500));
    assert!(
        in_flight.is_running(),
        "the long request finished before the crash: make it longer\n{:?}",
        in_flight.wait_timeout(Duration::ZERO).map(|o| describe(&o))
    );

    workers[victim].crash();
    let killed_at = Instant::now();
    let Some(out) = in_flight.wait_timeout(Duration::from_secs(5)) else {
        panic!(
            "the in-flight request still runs 5 s after its stage-1 worker was killed\n=== server logs ==={}",
            logs.dump()
        );
    };
    let failed_after = killed_at.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the in-flight request must fail with exit 1\n{}",
        describe(&out)
    );
    assert!(
        stderr(&out).to_lowercase().contains("unavailable"),
        "the in-flight request must fail with UNAVAILABLE\n{}",
        describe(&out)
    );
    eprintln!("in-flight request failed {failed_after:?} after the kill");
    assert!(
        failed_after >= Duration::from_millis(900),
        "the in-flight request must wait --failover-timeout for a worker first: it failed after {failed_after:?}"
    );

    // No replacement yet: fail fast, before and after the dead worker's lease
    // expires (TTL 2 s) and while the coordinator retries it.
    let until = Instant::now() + Duration::from_secs(3);
    let mut probes = 0;
    while Instant::now() < until || probes < 3 {
        let took = assert_unavailable_fast(&logs, &coord.addr, "stage 1 has no worker");
        eprintln!("probe without stage 1 failed in {took:?}");
        probes += 1;
        thread::sleep(Duration::from_millis(500));
    }

    let started = Instant::now();
    let _replacement = worker(&logs, "w2", Some(&etcd));
    let back = wait_serving(&logs, &coord.addr, Duration::from_secs(15));
    eprintln!(
        "serving again {back:?} after the probe loop, {:?} after the new worker started",
        started.elapsed()
    );
    let got = remote_json(&logs, &coord.addr, &check);
    assert_same("after recovery", &got, &want);
    let assigned = assignments(&coord);
    assert_eq!(
        assigned,
        BTreeMap::from([(0, survivor_id), (1, "w2".to_string())]),
        "stage 0 stays on its worker; stage 1 goes to the new one\n{}",
        logs.dump()
    );
}

/// kill -9 of a worker mid-request with a spare registered: every in-flight
/// request (unary and streaming, fixed schedule and adaptive rules) waits
/// for the spare to take the stage over and finishes with its solo ids.
#[test]
fn in_flight_requests_survive_a_worker_crash() {
    use remask_proto::v1 as pb;
    let logs = Logs::new("in_flight_requests_survive_a_worker_crash");
    let model = small();
    let etcd = Etcd::start();
    let mut workers: Vec<Server> = (0..3)
        .map(|i| worker(&logs, &format!("w{i}"), Some(&etcd)))
        .collect();
    let coord = coordinator(&logs, model, 2, &["--etcd", &etcd.endpoint]);
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    let before = assignments(&coord);
    let victim_id = before[&1].clone();
    let victim = workers
        .iter()
        .position(|w| w.name == victim_id)
        .expect("stage 1 is on a known worker");

    // Long enough to be in flight when the worker dies (hundreds of steps).
    let unary = [
        argv(
            "--prompt-ids 1,2,3 --gen-length 160 --steps 160 --block-length 32",
            &[],
        ),
        argv(
            "--prompt-ids 4,5 --gen-length 128 --steps 128 --block-length 64 --temperature 0.8 --seed 3 --cache prefix",
            &[],
        ),
        argv(
            "--prompt-ids 7,8,9 --gen-length 192 --block-length 8 --factor 1 --no-early-stop --cache dual",
            &[],
        ),
        argv(
            "--prompt-ids 9,8 --gen-length 192 --steps 96 --block-length 32 --cache dual --no-early-stop",
            &[],
        ),
    ];
    let t = Instant::now();
    let solo: Vec<Value> = unary.iter().map(|r| local(model, r)).collect();
    eprintln!("solo runs took {:?}", t.elapsed());
    let stream_request = pb::GenerateRequest {
        prompt_ids: vec![6, 5, 4, 3],
        gen_length: Some(128),
        steps: Some(128),
        block_length: Some(32),
        full_canvas: true,
        cache: pb::CacheMode::Prefix as i32,
        ..Default::default()
    };
    let stream_solo = local(
        model,
        &argv(
            "--prompt-ids 6,5,4,3 --gen-length 128 --steps 128 --block-length 32 --no-early-stop --cache prefix",
            &[],
        ),
    );
    let mut pending: Vec<Pending> = unary
        .iter()
        .map(|r| Pending::spawn(&remote_args(&coord.addr, r)))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = format!("http://{}", coord.addr);
    let streamed = rt.spawn(async move {
        let mut client = pb::generation_client::GenerationClient::connect(endpoint)
            .await
            .expect("connect");
        let mut stream = client
            .generate_stream(stream_request)
            .await
            .expect("stream starts")
            .into_inner();
        let mut steps = 0;
        loop {
            match stream.message().await {
                Ok(Some(m)) => match m.event {
                    Some(pb::generate_stream_response::Event::Step(_)) => steps += 1,
                    Some(pb::generate_stream_response::Event::Done(d)) => return Ok((steps, d)),
                    None => return Err("an empty message".to_string()),
                },
                Ok(None) => return Err("the stream ended without a result".to_string()),
                Err(status) => return Err(format!("{}: {}", status.code(), status.message())),
            }
        }
    });
    thread::sleep(Duration::from_millis(1000));
    assert!(
        pending.iter_mut().all(Pending::is_running),
        "a request finished before the crash: make them longer"
    );
    workers[victim].crash();
    let killed_at = Instant::now();
    for (i, (p, want)) in pending.iter_mut().zip(&solo).enumerate() {
        let Some(out) = p.wait_timeout(Duration::from_secs(120)) else {
            panic!(
                "request {i} still runs 120 s after the crash
=== server logs ==={}",
                logs.dump()
            )
        };
        let got = parse_json(&out).unwrap_or_else(|e| {
            panic!(
                "request {i} failed after the crash: {e}
=== server logs ==={}",
                logs.dump()
            )
        });
        assert_same(&format!("request {i} across the crash"), &got, want);
    }
    let (steps, done) = rt.block_on(streamed).unwrap().unwrap_or_else(|e| {
        panic!(
            "the stream failed: {e}
=== server logs ==={}",
            logs.dump()
        )
    });
    assert_eq!(
        steps, 128,
        "one step message per step, none lost or repeated"
    );
    assert_eq!(
        serde_json::json!(done.generated_ids),
        stream_solo["generated_ids"],
        "the streamed request across the crash"
    );
    eprintln!(
        "every in-flight request finished {:?} after the crash",
        killed_at.elapsed()
    );
    let after = assignments(&coord);
    assert_ne!(
        after[&1],
        victim_id,
        "stage 1 moved to the spare
{}",
        logs.dump()
    );
    assert_eq!(after[&0], before[&0], "stage 0 stayed");
    // The spare held none of the running requests' K/V caches: they were
    // rebuilt from the canvases (and the ids above are the solo ones).
    assert!(
        coord
            .log()
            .contains("a worker does not hold K/V caches: rebuilding them from the canvases"),
        "no cache was rebuilt\n{}",
        logs.dump()
    );
}

/// 200 streaming requests with K/V caches, cancelled by their clients after
/// their first step (or while they wait): the worker holds caches while
/// they run and none once they are gone.
#[test]
fn cancelled_requests_release_their_caches() {
    use remask_proto::v1 as pb;
    use remask_proto::worker as wpb;
    let logs = Logs::new("cancelled_requests_release_their_caches");
    let args = argv(
        "worker --listen 127.0.0.1:0 --id kv --metrics-listen 127.0.0.1:0",
        &[],
    );
    let w = Server::start(&logs, "kv", "remask worker kv:", &args, &[]);
    let coord = coordinator(&logs, tiny(), 1, &["--workers", &w.addr]);
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (coord_url, worker_url) = (
        format!("http://{}", coord.addr),
        format!("http://{}", w.addr),
    );
    let status = || {
        let url = worker_url.clone();
        rt.block_on(async move {
            let mut c = wpb::worker_client::WorkerClient::connect(url)
                .await
                .unwrap();
            c.status(wpb::StatusRequest {}).await.unwrap().into_inner()
        })
    };
    let (first_steps, held) = rt.block_on(async {
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let url = coord_url.clone();
                tokio::spawn(async move {
                    let mut client = pb::generation_client::GenerationClient::connect(url)
                        .await
                        .expect("connect");
                    let request = pb::GenerateRequest {
                        prompt_ids: vec![1 + i % 50, 2, 3],
                        gen_length: Some(256),
                        steps: Some(256),
                        block_length: Some(32),
                        full_canvas: true,
                        cache: if i % 2 == 0 {
                            pb::CacheMode::Prefix
                        } else {
                            pb::CacheMode::Dual
                        } as i32,
                        ..Default::default()
                    };
                    let mut stream = client.generate_stream(request).await.ok()?.into_inner();
                    // The first step message, unless the request waited too
                    // long: either way the client goes away.
                    let first = tokio::time::timeout(Duration::from_millis(300), stream.message());
                    matches!(first.await, Ok(Ok(Some(_)))).then_some(())
                })
            })
            .collect();
        // While the first ones run, the worker holds their caches.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut c = wpb::worker_client::WorkerClient::connect(worker_url.clone())
            .await
            .unwrap();
        let held = c.status(wpb::StatusRequest {}).await.unwrap().into_inner();
        let mut steps = 0;
        for t in tasks {
            steps += usize::from(t.await.unwrap().is_some());
        }
        (steps, held)
    });
    assert!(first_steps > 0, "no request got to its first step");
    assert!(
        held.kv_caches > 0 && held.kv_cache_bytes > 0,
        "no cache was held while the requests ran: {held:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = status();
    while last.kv_caches > 0 || last.kv_cache_bytes > 0 {
        assert!(
            Instant::now() < deadline,
            "60 s after 200 cancelled requests the worker still holds {} caches ({} bytes)\n{}",
            last.kv_caches,
            last.kv_cache_bytes,
            logs.dump()
        );
        thread::sleep(Duration::from_millis(100));
        last = status();
    }
    assert!(last.kv_budget_bytes > 0, "the worker has a default budget");
    // The worker's own /metrics say the same.
    let log = w.log();
    let metrics_addr = log
        .split("metrics on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the banner:\n{log}"));
    let mut conn = std::net::TcpStream::connect(metrics_addr).unwrap();
    std::io::Write::write_all(
        &mut conn,
        b"GET /metrics HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut conn, &mut text).unwrap();
    assert!(
        text.contains("remask:worker_kv_caches{worker=\"kv\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("remask:worker_kv_cache_bytes{worker=\"kv\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("remask:worker_forward_time_seconds_count{worker=\"kv\"}"),
        "{text}"
    );
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    // And the cluster still serves, with a cache.
    let request = argv(
        "--prompt-ids 7,8,9 --gen-length 16 --block-length 8 --factor 4 --cache dual",
        &[],
    );
    assert_same(
        "after the cancellations",
        &remote_json(&logs, &coord.addr, &request),
        &local(tiny(), &request),
    );
    eprintln!("{first_steps} of 200 requests ran a step before their client left");
}

/// A worker's K/V budget: a request whose caches can never fit is refused
/// with RESOURCE_EXHAUSTED and a message; requests that fit one at a time
/// wait for room (none evicts another's cache) and each gets its solo ids;
/// requests without a cache are not held back.
#[test]
fn kv_budget_admits_within_and_refuses_what_never_fits() {
    use remask_proto::v1 as pb;
    let logs = Logs::new("kv_budget");
    let model = tiny();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| config[k].as_u64().unwrap() as usize;
    // K and V of every layer, f32: a 48-position canvas takes 48 x this.
    let per_position = 2 * n("n_layers") * n("n_kv_heads") * (n("d_model") / n("n_heads")) * 4;
    let budget = (60 * per_position).to_string();
    let args = argv(
        "worker --listen 127.0.0.1:0 --id small-budget --kv-cache-budget",
        &[&budget],
    );
    let w = Server::start(&logs, "w", "remask worker small-budget:", &args, &[]);
    let coord = coordinator(&logs, model, 1, &["--workers", &w.addr]);
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);

    // 3 + 64 = 67 positions > 60: never.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{}", coord.addr);
    let too_big = pb::GenerateRequest {
        prompt_ids: vec![1, 2, 3],
        gen_length: Some(64),
        block_length: Some(16),
        factor: Some(3.0),
        cache: pb::CacheMode::Dual as i32,
        ..Default::default()
    };
    let status = rt.block_on(async {
        let mut client = pb::generation_client::GenerationClient::connect(url.clone())
            .await
            .unwrap();
        client.generate(too_big).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("K/V caches take") && status.message().contains("--cache none"),
        "{}",
        status.message()
    );

    // 3 + 48 = 51 positions fit, but not two at once: they take turns.
    let fits = |i: u32| {
        argv(
            &format!(
                "--prompt-ids 1,2,{} --gen-length 48 --steps 48 --block-length 16 --cache prefix --no-early-stop",
                3 + i
            ),
            &[],
        )
    };
    let plain = argv(
        "--prompt-ids 5,6,7 --gen-length 16 --steps 16 --block-length 16",
        &[],
    );
    let mut pending: Vec<Pending> = (0..3)
        .map(|i| Pending::spawn(&remote_args(&coord.addr, &fits(i))))
        .collect();
    pending.push(Pending::spawn(&remote_args(&coord.addr, &plain)));
    let mut done = Vec::new();
    for p in &mut pending {
        let out = p.wait_timeout(Duration::from_secs(120)).expect("finishes");
        done.push(parse_json(&out).unwrap_or_else(|e| {
            panic!(
                "{e}
{}",
                logs.dump()
            )
        }));
    }
    for (i, got) in done[..3].iter().enumerate() {
        assert_same(
            &format!("cached request {i}"),
            got,
            &local(model, &fits(i as u32)),
        );
    }
    assert_same(
        "the request without a cache",
        &done[3],
        &local(model, &plain),
    );
}

/// 3 workers for 2 stages: SIGTERM of an assigned worker hands its stage to
/// the spare within 5 s; SIGTERM of another leaves the cluster UNAVAILABLE.
#[test]
fn spare_worker_takes_over() {
    let logs = Logs::new("spare_worker_takes_over");
    let model = small();
    let check = argv(
        "--prompt-ids 2,7,1,8 --gen-length 16 --steps 16 --block-length 8",
        &[],
    );
    let want = local(model, &check);

    let etcd = Etcd::start();
    let mut workers: Vec<Server> = (0..3)
        .map(|i| worker(&logs, &format!("w{i}"), Some(&etcd)))
        .collect();
    let coord = coordinator(&logs, model, 2, &["--etcd", &etcd.endpoint]);
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    let before = assignments(&coord);
    assert_eq!(
        before.len(),
        2,
        "expected 2 assigned stages: {before:?}\n{}",
        logs.dump()
    );
    let spare = workers
        .iter()
        .map(|w| w.name.clone())
        .find(|id| !before.values().any(|a| a == id))
        .unwrap_or_else(|| panic!("no spare worker: {before:?}"));
    let index = |workers: &[Server], id: &str| {
        workers
            .iter()
            .position(|w| w.name == id)
            .expect("a known worker")
    };

    // Terminate the stage-0 worker: its lease is revoked, the spare takes stage 0.
    let first = before[&0].clone();
    let terminated_at = Instant::now();
    let i = index(&workers, &first);
    let status = workers[i].terminate(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| {
        panic!(
            "worker {first} still runs 10 s after SIGTERM (graceful shutdown hangs)\n=== server logs ==={}",
            logs.dump()
        )
    });
    assert!(
        status.success(),
        "worker {first} exited with {status} after SIGTERM\n{}",
        logs.dump()
    );
    let left = Duration::from_secs(5).saturating_sub(terminated_at.elapsed());
    wait_serving(&logs, &coord.addr, left);
    eprintln!(
        "serving {:?} after SIGTERM of the stage-0 worker",
        terminated_at.elapsed()
    );
    let got = remote_json(&logs, &coord.addr, &check);
    assert_same("after the spare took over", &got, &want);
    let after = assignments(&coord);
    assert_eq!(
        after,
        BTreeMap::from([(0, spare.clone()), (1, before[&1].clone())]),
        "the spare takes stage 0, stage 1 stays\n{}",
        logs.dump()
    );

    // Terminate the stage-1 worker: no spare left, so the cluster stops serving
    // (soon: the lease is revoked on a graceful stop) and says so at once.
    let second = before[&1].clone();
    let i = index(&workers, &second);
    let status = workers[i].terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "worker {second} after SIGTERM: {status:?}\n{}",
        logs.dump()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = remote(&coord.addr, &argv(PROBE, &[]));
        if !out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still serving 5 s after the only worker of stage 1 stopped\n{}",
            logs.dump()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_unavailable_fast(&logs, &coord.addr, "one worker left for two stages");
}

/// A coordinator whose stages have no workers answers UNAVAILABLE at once,
/// still does with one worker for two stages, and serves once both are there.
#[test]
fn unavailable_without_workers() {
    let logs = Logs::new("unavailable_without_workers");
    let model = tiny();
    let etcd = Etcd::start();
    let coord = coordinator(&logs, model, 2, &["--etcd", &etcd.endpoint]);
    let took = assert_unavailable_fast(&logs, &coord.addr, "no workers");
    eprintln!("request without workers failed in {took:?}");

    let _w0 = worker(&logs, "w0", Some(&etcd));
    // Give the coordinator time to see (and load) the first worker.
    thread::sleep(Duration::from_millis(1000));
    assert_unavailable_fast(&logs, &coord.addr, "one worker for two stages");

    let _w1 = worker(&logs, "w1", Some(&etcd));
    let ready = wait_serving(&logs, &coord.addr, Duration::from_secs(15));
    eprintln!("serving {ready:?} after the second worker registered");
    let request = argv(
        "--prompt-ids 1,2,3,4 --gen-length 16 --steps 8 --block-length 8",
        &[],
    );
    let got = remote_json(&logs, &coord.addr, &request);
    assert_same("two workers", &got, &local(model, &request));
}

/// PEM files of a test PKI: a CA and a leaf it signed for 127.0.0.1/localhost.
/// Mutual TLS: the coordinator serves clients over TLS and reaches a worker
/// that accepts only certificates of the cluster CA; a coordinator with a
/// certificate from another CA, or without TLS, is refused by the worker.
#[test]
fn mutual_tls_between_coordinator_and_workers() {
    let logs = Logs::new("mutual_tls");
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "cluster");
    let rogue = pki(dir.path(), "rogue");
    let tls = |p: &Pki, ca: &Path| {
        vec![
            "--tls-cert".to_string(),
            path_str(&p.cert).to_string(),
            "--tls-key".to_string(),
            path_str(&p.key).to_string(),
            "--tls-ca".to_string(),
            path_str(ca).to_string(),
        ]
    };
    let mut args = argv("worker --listen 127.0.0.1:0 --id tls-worker", &[]);
    args.extend(tls(&good, &good.ca));
    let worker = Server::start(&logs, "tls-worker", "remask worker tls-worker:", &args, &[]);

    let start_coordinator = |name: &str, extra: Vec<String>| {
        let mut args = argv(
            // HTTP on a free loopback port, unless `extra` names one
            "coordinator --host 127.0.0.1 --port 0 --listen 127.0.0.1:0 --stages 1 --model",
            &[path_str(tiny())],
        );
        args.extend(argv("--workers", &[&worker.addr]));
        args.extend(extra);
        Server::start(
            &logs,
            name,
            "remask coordinator:",
            &args,
            &[("REMASK_LOG", "remask_cluster=info,warn")],
        )
    };
    let request = argv(
        "--prompt-ids 1,2,3 --gen-length 8 --steps 8 --block-length 8",
        &[],
    );
    let want = local(tiny(), &request);

    // The right certificates: served over TLS, same result as in process.
    let mut extra = tls(&good, &good.ca);
    extra.extend(argv("--http-listen 127.0.0.1:0", &[]));
    let coordinator = start_coordinator("tls-coordinator", extra);
    let endpoint = format!("https://{}", coordinator.addr);
    let mut with_ca = request.clone();
    with_ca.extend(argv("--tls-ca", &[path_str(&good.ca)]));
    let deadline = Instant::now() + READY_TIMEOUT;
    let got = loop {
        let out = remote(&endpoint, &with_ca);
        if out.status.success() {
            break parse_json(&out).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the TLS cluster does not serve: {}\n=== logs ==={}",
            describe(&out),
            logs.dump()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_same("over mutual TLS", &got, &want);
    // The HTTP API is served over TLS with the same certificate.
    let log = coordinator.log();
    let http = log
        .split("HTTP on ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no HTTP address in the coordinator's log:\n{log}"));
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("https://{http}/health"))
            .output()
            .expect("curl")
    };
    let ok = curl(&["--cacert", path_str(&good.ca)]);
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "200",
        "HTTPS /health with the CA"
    );
    let refused = curl(&["--cacert", path_str(&rogue.ca)]);
    assert_ne!(
        String::from_utf8_lossy(&refused.stdout),
        "200",
        "HTTPS trusted by another CA"
    );
    // A client that does not speak TLS, or does not trust the CA, gets nothing.
    let plain = remote(&format!("http://{}", coordinator.addr), &request);
    assert!(
        !plain.status.success(),
        "plaintext to a TLS coordinator succeeded"
    );
    let mut wrong_ca = request.clone();
    wrong_ca.extend(argv("--tls-ca", &[path_str(&rogue.ca)]));
    let untrusted = remote(&endpoint, &wrong_ca);
    assert!(
        !untrusted.status.success(),
        "a client trusting another CA connected"
    );
    drop(coordinator);

    // A coordinator whose certificate another CA signed is refused by the
    // worker: the cluster never serves.
    let rogue_coordinator = start_coordinator("rogue-coordinator", tls(&rogue, &good.ca));
    let endpoint = format!("https://{}", rogue_coordinator.addr);
    let mut rogue_client = request.clone();
    rogue_client.extend(argv("--tls-ca", &[path_str(&rogue.ca)]));
    thread::sleep(Duration::from_millis(1500));
    let out = remote(&endpoint, &rogue_client);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).to_lowercase().contains("unavailable"),
        "{}",
        describe(&out)
    );
    assert!(
        rogue_coordinator.log().contains("cannot load the shard"),
        "the worker should have refused the rogue coordinator:\n{}",
        rogue_coordinator.log()
    );
    drop(rogue_coordinator);

    // Without TLS the coordinator cannot reach the worker at all.
    let plain_coordinator = start_coordinator("plain-coordinator", Vec::new());
    thread::sleep(Duration::from_millis(1500));
    assert_unavailable_fast(
        &logs,
        &plain_coordinator.addr,
        "a plaintext coordinator and a TLS worker",
    );
}

/// A stand-in OTLP collector: records the names of the spans it receives.
#[derive(Default, Clone)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.spans.lock().unwrap();
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().map(|s| s.name.clone()));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// `--otlp-endpoint`: the spans of a request and of its denoising steps reach
/// an OTLP collector (flushed at the latest when the server stops).
#[test]
fn spans_reach_an_otlp_collector() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let logs = Logs::new("otlp");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut args = argv(
        "serve --listen 127.0.0.1:0 --no-http --model",
        &[path_str(tiny())],
    );
    args.extend(argv("--otlp-endpoint", &[&format!("http://{addr}")]));
    let mut server = Server::start(&logs, "serve-otlp", "remask serve:", &args, &[]);
    let request = argv(
        "--prompt-ids 1,2,3 --gen-length 8 --steps 4 --block-length 8",
        &[],
    );
    remote_json(&logs, &server.addr, &request);
    assert!(
        server.terminate(Duration::from_secs(10)).is_some(),
        "serve did not stop on SIGTERM"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = collector.spans.lock().unwrap().clone();
        if spans.iter().any(|s| s == "generate")
            && spans.iter().filter(|s| *s == "step").count() >= 4
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector got {spans:?}, expected a `generate` span and 4 `step` spans\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `--log-format json`: every log line is one JSON object with level,
/// message and fields (here: the coordinator failing to reach a worker).
#[test]
fn json_logs() {
    let logs = Logs::new("json_logs");
    let mut args = argv(
        "coordinator --listen 127.0.0.1:0 --no-http --stages 1 --log-format json --model",
        &[path_str(tiny())],
    );
    args.extend(argv("--workers 127.0.0.1:1", &[]));
    let coordinator = Server::start(
        &logs,
        "json-coordinator",
        "remask coordinator:",
        &args,
        &[("REMASK_LOG", "warn")],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = coordinator.log();
        let records: Vec<Value> = log
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if let Some(r) = records
            .iter()
            .find(|r| r["fields"]["message"] == "cannot load the shard on this worker")
        {
            assert_eq!(r["level"], "WARN", "{r}");
            assert!(
                r["fields"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("127.0.0.1:1")),
                "{r}"
            );
            assert!(r["timestamp"].is_string(), "{r}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no JSON warning in the log:\n{log}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Stages and tensor-parallel groups combine: two workers, each splitting
/// its stage over 2 thread ranks, give the in-process ids.
#[test]
fn tensor_parallel_workers_match_in_process() {
    let logs = Logs::new("tensor_parallel");
    let start = |id: &str| {
        let args = argv(
            &format!("worker --listen 127.0.0.1:0 --tensor-parallel 2 --id {id}"),
            &[],
        );
        Server::start(&logs, id, &format!("remask worker {id}:"), &args, &[])
    };
    let (a, b) = (start("tp-a"), start("tp-b"));
    let workers = format!("{},{}", a.addr, b.addr);
    let coordinator = coordinator(&logs, small(), 2, &["--workers", &workers]);
    wait_serving(&logs, &coordinator.addr, READY_TIMEOUT);
    let configs = fixed_configs()
        .into_iter()
        .take(4)
        .chain(truncate_configs())
        .chain(rule_configs())
        .chain(cache_configs());
    for (name, request) in configs {
        let got = remote_json(&logs, &coordinator.addr, &request);
        assert_same(
            &format!("TP=2 x 2 stages, {name}"),
            &got,
            &local(small(), &request),
        );
    }
}

/// Log-probabilities and alternatives come back from the last stage's
/// tensor-parallel ranks through the worker protocol: the in-process ones,
/// up to the rounding of tensor parallelism's sums.
#[test]
fn tensor_parallel_workers_return_the_in_process_logprobs() {
    let logs = Logs::new("tensor_parallel_logprobs");
    let start = |id: &str| {
        let args = argv(
            &format!("worker --listen 127.0.0.1:0 --tensor-parallel 2 --id {id}"),
            &[],
        );
        Server::start(&logs, id, &format!("remask worker {id}:"), &args, &[])
    };
    let (a, b) = (start("tp-lp-a"), start("tp-lp-b"));
    let workers = format!("{},{}", a.addr, b.addr);
    let coordinator = coordinator(&logs, small(), 2, &["--workers", &workers]);
    wait_serving(&logs, &coordinator.addr, READY_TIMEOUT);
    let sampled = |name: &str| name.starts_with("greedy, one") || name.starts_with("temperature");
    for (name, mut request) in fixed_configs().into_iter().filter(|(n, _)| sampled(n)) {
        request.extend(argv("--top-logprobs 3", &[]));
        let (got, want) = (
            remote_json(&logs, &coordinator.addr, &request),
            local(small(), &request),
        );
        assert_eq!(got["generated_ids"], want["generated_ids"], "{name}");
        let (got, want) = (
            got["logprobs"].as_array().unwrap(),
            want["logprobs"].as_array().unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(!got.is_empty(), "{name}: the answer has tokens");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["token_id"], w["token_id"], "{name}");
            let close =
                |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-3;
            assert!(close(&g["logprob"], &w["logprob"]), "{name}: {g} vs {w}");
            let (gt, wt) = (
                g["top_logprobs"].as_array().unwrap(),
                w["top_logprobs"].as_array().unwrap(),
            );
            assert_eq!(gt.len(), 3);
            for (a, b) in gt.iter().zip(wt) {
                assert_eq!(a[0], b[0], "{name}: alternatives");
                assert!(close(&a[1], &b[1]), "{name}: {a} vs {b}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Where servers listen: defaults, variables, host names
// ---------------------------------------------------------------------------

/// A TCP port free on every interface just now (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The HTTP status of GET `url` (curl), or "000" when nothing answers.
fn http_status(url: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The log of `server` once it holds `needle`; panics after a few seconds.
fn log_with(server: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no {needle:?} in the log:\n{log}",
            server.name
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Without address flags, `serve` listens on every interface: HTTP on
/// REMASK_PORT, gRPC on REMASK_GRPC_PORT (the defaults, 8000 and 50051, are
/// in the next test), and warns that no API key guards them.
#[test]
fn serve_listens_on_the_ports_of_its_environment() {
    let logs = Logs::new("serve_listens_on_the_ports_of_its_environment");
    let (http, grpc) = (free_port(), free_port());
    assert_ne!(http, grpc);
    let server = Server::start(
        &logs,
        "serve-env",
        "remask serve:",
        &argv("serve --model", &[path_str(tiny())]),
        &[
            ("REMASK_PORT", &http.to_string()),
            ("REMASK_GRPC_PORT", &grpc.to_string()),
        ],
    );
    let log = log_with(&server, "warning:");
    assert!(
        log.contains(&format!("HTTP on 0.0.0.0:{http}; gRPC on 0.0.0.0:{grpc}")),
        "{log}"
    );
    let warning = log.lines().find(|l| l.starts_with("warning:")).unwrap();
    assert!(
        warning.contains("no API key is set") && warning.contains(&format!("0.0.0.0:{grpc}")),
        "{warning}"
    );
    wait_serving(&logs, &format!("127.0.0.1:{grpc}"), READY_TIMEOUT);
    assert_eq!(
        http_status(&format!("http://127.0.0.1:{http}/health")),
        "200"
    );
}

/// `remask serve` with no address flag at all: HTTP on 0.0.0.0:8000, gRPC on
/// 0.0.0.0:50051. The only test that uses those ports; skipped (with a note)
/// when another process holds one of them.
#[test]
fn serve_without_address_flags_listens_on_8000_and_50051() {
    for port in [8000, 50051] {
        if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", port)) {
            eprintln!("skipped: port {port} is taken on this machine ({e})");
            return;
        }
    }
    let logs = Logs::new("serve_without_address_flags_listens_on_8000_and_50051");
    let server = Server::start(
        &logs,
        "serve-defaults",
        "remask serve:",
        &argv("serve --model", &[path_str(tiny())]),
        &[],
    );
    let log = server.log();
    assert!(
        log.contains("HTTP on 0.0.0.0:8000; gRPC on 0.0.0.0:50051"),
        "{log}"
    );
    assert_eq!(server.addr, "0.0.0.0:50051");
    wait_serving(&logs, "localhost:50051", READY_TIMEOUT);
    assert_eq!(http_status("http://localhost:8000/health"), "200");
}

/// Address flags take host names (`localhost:PORT`), resolved at start-up
/// (IPv4 first): serve, a worker with its metrics port, and a coordinator
/// with `--host`. Loopback only, so no warning.
#[test]
fn host_names_are_resolved() {
    let logs = Logs::new("host_names_are_resolved");
    let serve = Server::start(
        &logs,
        "serve-localhost",
        "remask serve:",
        &argv(
            "serve --listen localhost:0 --http-listen localhost:0 --model",
            &[path_str(tiny())],
        ),
        &[],
    );
    let log = serve.log();
    assert!(log.contains("HTTP on 127.0.0.1:"), "{log}");
    assert!(serve.addr.starts_with("127.0.0.1:"), "{log}");
    let port = serve.addr.rsplit(':').next().unwrap();
    wait_serving(&logs, &format!("localhost:{port}"), READY_TIMEOUT);

    let worker = Server::start(
        &logs,
        "named",
        "remask worker named:",
        &argv(
            "worker --listen localhost:0 --metrics-listen localhost:0 --id named",
            &[],
        ),
        &[],
    );
    let wlog = log_with(&worker, "metrics on ");
    assert!(worker.addr.starts_with("127.0.0.1:"), "{wlog}");
    let metrics = wlog
        .split("metrics on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    assert!(metrics.starts_with("127.0.0.1:"), "{wlog}");
    assert_eq!(http_status(&format!("http://{metrics}/metrics")), "200");

    let workers = format!("localhost:{}", worker.addr.rsplit(':').next().unwrap());
    let coord = Server::start(
        &logs,
        "coordinator-localhost",
        "remask coordinator:",
        &argv(
            "coordinator --host localhost --port 0 --grpc-port 0 --stages 1 --model",
            &[path_str(tiny()), "--workers", &workers],
        ),
        &[],
    );
    let clog = coord.log();
    assert!(clog.contains("HTTP on 127.0.0.1:"), "{clog}");
    wait_serving(&logs, &coord.addr, READY_TIMEOUT);
    for s in [&serve, &worker, &coord] {
        assert!(!s.log().contains("warning:"), "{}:\n{}", s.name, s.log());
    }
}
