//! `remask serve`, `remask coordinator`, `remask worker`: the server roles.

use crate::addr::{self, HostPort};
use crate::{CliError, CliResult, Globals, default_model};
use remask_cluster::auth::ApiKeys;
use remask_cluster::membership::{Registration, WorkerInfo, watch_members};
use remask_cluster::metrics::Metrics;
use remask_cluster::tls::TlsFiles;
use remask_cluster::{
    Coordinator, Manager, ModelMeta, Pipeline, Scheduler, SchedulerConfig, ShardRunner,
    StageClient, WorkerService, plan_shards, server, static_members,
};
use remask_engine::Shard;
use remask_model::{Checkpoint, LladaConfig, TextCodec};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(clap::Args)]
pub struct BatchArgs {
    /// Requests sharing one forward pass at most.
    #[arg(long, env = "REMASK_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting for a place at most; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "REMASK_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Commit rule of requests that name none: fixed (LLaDA's schedule),
    /// threshold=T, factor=F or entropy=G. Default: the checkpoint's
    /// generation_config.json `threshold` if it has one, else fixed.
    #[arg(long, env = "REMASK_RULE")]
    pub rule: Option<remask_sampler::CommitRule>,
    /// Seconds running requests wait for a stage to get a worker again after
    /// theirs failed or left (a spare, a restarted worker), then UNAVAILABLE;
    /// never past a request's deadline. 0: fail them at once.
    #[arg(long, env = "REMASK_FAILOVER_TIMEOUT", default_value_t = 30.0)]
    pub failover_timeout: f64,
    /// K/V cache mode of requests that name none: none (every step a full
    /// forward, as the reference; the default), prefix or dual (Fast-dLLM's caches).
    #[arg(long, env = "REMASK_CACHE")]
    pub cache: Option<remask_sampler::CacheMode>,
}

/// Where the K/V caches of the layers a process holds are bounded.
#[derive(clap::Args, Clone)]
pub struct KvArgs {
    /// Bytes the K/V caches of this process may take, e.g. 512MiB, 8GiB or
    /// 1000000 (0: unbounded). The coordinator admits requests within it: a
    /// request waits for room rather than evicting another's cache. Default:
    /// a quarter of the machine's memory.
    #[arg(long, env = "REMASK_KV_CACHE_BUDGET", value_parser = parse_bytes)]
    pub kv_cache_budget: Option<u64>,
}

impl KvArgs {
    pub fn budget(&self) -> Option<usize> {
        match self.kv_cache_budget {
            Some(0) => None,
            Some(b) => Some(b as usize),
            None => Some(default_kv_budget()),
        }
    }
}

/// A quarter of MemTotal, or 4 GiB where /proc/meminfo cannot be read.
fn default_kv_budget() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    total_kib.map_or(4 << 30, |kib| (kib * 1024 / 4) as usize)
}

/// `123`, `512K`, `64MiB`, `8G`, `1.5GiB` (K/M/G/T are powers of 1000,
/// KiB/MiB/GiB/TiB of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024f64.powi(2),
        "gi" | "gib" => 1024f64.powi(3),
        "ti" | "tib" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{s}': use K, M, G, KiB, MiB or GiB"
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size: a number of bytes, optionally with a unit"))?;
    let bytes = n * scale;
    if !(bytes.is_finite() && bytes < 2f64.powi(63)) {
        return Err(format!("'{s}' is too large"));
    }
    Ok(bytes as u64)
}

/// Where `serve` and `coordinator` listen: the HTTP API and gRPC, on by
/// default on every interface (vLLM's `--host` and `--port`).
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Host the HTTP and gRPC servers bind: an address (0.0.0.0 = every IPv4
    /// interface, `::` = every interface, IPv4 too on a dual-stack system,
    /// 127.0.0.1 = this machine only) or a host name (the first of its
    /// addresses that can be bound, IPv4 first).
    #[arg(long, env = "REMASK_HOST", default_value = "0.0.0.0", value_parser = addr::parse_host)]
    pub host: String,
    /// Port of the OpenAI-compatible HTTP API (also /health and /metrics); 0: a free port.
    #[arg(long, env = "REMASK_PORT", default_value_t = 8000, value_parser = addr::parse_port)]
    pub port: u16,
    /// Port of the gRPC API; 0: a free port.
    #[arg(long, env = "REMASK_GRPC_PORT", default_value_t = 50051, value_parser = addr::parse_port)]
    pub grpc_port: u16,
    /// Serve no HTTP API (gRPC only).
    #[arg(long, env = "REMASK_NO_HTTP", conflicts_with = "http_listen")]
    pub no_http: bool,
    /// HOST:PORT of the gRPC API, instead of --host and --grpc-port
    /// (e.g. 127.0.0.1:50051, [::1]:50051, localhost:50051).
    #[arg(long, env = "REMASK_LISTEN")]
    pub listen: Option<HostPort>,
    /// HOST:PORT of the HTTP API, instead of --host and --port.
    #[arg(long, env = "REMASK_HTTP_LISTEN")]
    pub http_listen: Option<HostPort>,
}

/// The addresses of [`ListenArgs`], resolved.
struct Resolved {
    grpc: Vec<SocketAddr>,
    http: Option<Vec<SocketAddr>>,
}

/// The listeners of a coordinator, bound.
struct Bound {
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
}

impl ListenArgs {
    fn grpc(&self) -> HostPort {
        self.listen
            .clone()
            .unwrap_or_else(|| HostPort::new(&self.host, self.grpc_port))
    }

    fn http(&self) -> Option<HostPort> {
        if self.no_http {
            return None;
        }
        Some(
            self.http_listen
                .clone()
                .unwrap_or_else(|| HostPort::new(&self.host, self.port)),
        )
    }

    /// Resolves both addresses (before the model is read: a bad host name
    /// is a usage error, exit code 2).
    fn resolve(&self, rt: &tokio::runtime::Runtime) -> CliResult<Resolved> {
        let grpc = self.grpc();
        let http = self.http();
        if let Some(h) = &http
            && *h == grpc
            && h.port != 0
        {
            return Err(CliError::Usage(format!(
                "HTTP and gRPC would both listen on {h}: give them different ports (--port, --grpc-port)"
            )));
        }
        let grpc_what = match &self.listen {
            Some(l) => format!("--listen {l}"),
            None => format!("--host {}", self.host),
        };
        let http_what = match &self.http_listen {
            Some(l) => format!("--http-listen {l}"),
            None => format!("--host {}", self.host),
        };
        rt.block_on(async {
            Ok(Resolved {
                grpc: grpc.resolve(&grpc_what).await?,
                http: match &http {
                    Some(h) => Some(h.resolve(&http_what).await?),
                    None => None,
                },
            })
        })
    }
}

impl Resolved {
    async fn bind(&self) -> CliResult<Bound> {
        let grpc = addr::bind(&self.grpc).await?;
        let http = match &self.http {
            Some(addrs) => Some(addr::bind(addrs).await?),
            None => None,
        };
        Ok(Bound { grpc, http })
    }
}

impl Bound {
    /// `, HTTP on A; gRPC on B` for the listening line.
    fn note(&self) -> CliResult<String> {
        Ok(format!(
            "{}; gRPC on {}",
            http_note(&self.http),
            self.grpc.local_addr().map_err(anyhow::Error::from)?
        ))
    }

    /// One line on stderr when a port is open beyond loopback and no API key
    /// guards it: anyone who reaches the port can run requests.
    fn warn_if_open(&self, role: &str, coordinator: &Coordinator) {
        if !coordinator.api_keys.is_open() {
            return;
        }
        let open: Vec<String> = [("HTTP", self.http.as_ref()), ("gRPC", Some(&self.grpc))]
            .into_iter()
            .filter_map(|(what, l)| {
                let a = l?.local_addr().ok()?;
                (!addr::is_loopback(&a)).then(|| format!("{what} on {a}"))
            })
            .collect();
        if !open.is_empty() {
            eprintln!(
                "warning: remask {role}: {} {} reachable beyond this machine and no API key is set: \
                 anyone who can connect can run requests (set --api-key or --api-key-file, \
                 or --host 127.0.0.1 to stay local)",
                open.join(" and "),
                if open.len() == 1 { "is" } else { "are" }
            );
        }
    }
}

/// What clients see: the HTTP API and API keys.
#[derive(clap::Args)]
pub struct FrontArgs {
    /// A client API key (repeat the flag, or comma-separate in REMASK_API_KEY);
    /// with any key set, requests need `Authorization: Bearer <key>`.
    #[arg(
        long = "api-key",
        env = "REMASK_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of client API keys, one per line.
    #[arg(long, env = "REMASK_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Let chat messages hold the tokenizer's special tokens as text (they
    /// become real control tokens, so a user can forge a turn of another
    /// role: Hugging Face's and vLLM's behaviour). Off: such a message is
    /// refused with INVALID_ARGUMENT / HTTP 400.
    #[arg(long, env = "REMASK_ALLOW_SPECIAL_TOKENS_IN_CHAT")]
    pub allow_special_tokens_in_chat: bool,
    /// The model's name in the APIs (`model` of requests and responses,
    /// `/v1/models`, gRPC ModelInfo). Default: the checkpoint directory's
    /// name (`remask-demo` for the embedded default model).
    #[arg(long, env = "REMASK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Origins whose browser pages may call the HTTP API (CORS),
    /// comma-separated, or `*` for any. Default: none, so a web page of
    /// another site cannot use a server it can reach (vLLM allows any).
    #[arg(long, env = "REMASK_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Seconds between keep-alive comments on an HTTP event stream while no
    /// event is due (a request waiting for a place, a long step).
    #[arg(long, env = "REMASK_SSE_KEEP_ALIVE_S", default_value_t = 15.0)]
    pub sse_keep_alive_s: f64,
}

impl FrontArgs {
    fn http_options(&self) -> CliResult<remask_cluster::coordinator::HttpOptions> {
        if !(self.sse_keep_alive_s.is_finite()
            && self.sse_keep_alive_s >= 0.1
            && self.sse_keep_alive_s <= 3600.0)
        {
            return Err(CliError::Usage(format!(
                "--sse-keep-alive-s must be between 0.1 and 3600 seconds, got {}",
                self.sse_keep_alive_s
            )));
        }
        for origin in &self.allowed_origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && origin.bytes().all(|b| b.is_ascii_graphic())
                    && !origin.ends_with('/'));
            if !ok {
                return Err(CliError::Usage(format!(
                    "--allowed-origins: '{origin}' is not an origin: give scheme://host[:port] \
                     (no path, no trailing slash) or *"
                )));
            }
        }
        Ok(remask_cluster::coordinator::HttpOptions {
            sse_keep_alive: Duration::from_secs_f64(self.sse_keep_alive_s),
            allowed_origins: self.allowed_origins.clone(),
        })
    }
}

/// What a listening port tolerates from its clients (the gRPC port, and the
/// HTTP port of a coordinator): silent or slow clients are cut off, and the
/// number of connections is bounded.
#[derive(clap::Args, Clone)]
pub struct ConnArgs {
    /// Seconds a client has, from connecting, to finish the TLS handshake and
    /// send the first bytes of a request (all of the HTTP/2 preface); also the
    /// limit on each HTTP/1 request head and on answering an HTTP/2 ping.
    #[arg(long, env = "REMASK_HEADER_TIMEOUT_S", default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Open connections per listening port at most; beyond, new ones are
    /// closed at once (after a 503 on a plain HTTP port, an HTTP/2 GOAWAY on a plain gRPC port).
    #[arg(long, env = "REMASK_MAX_CONNECTIONS", default_value_t = remask_cluster::listen::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
}

impl ConnArgs {
    fn limits(&self) -> CliResult<remask_cluster::listen::Limits> {
        if !(self.header_timeout_s.is_finite()
            && self.header_timeout_s > 0.0
            && self.header_timeout_s <= 3600.0)
        {
            return Err(CliError::Usage(format!(
                "--header-timeout-s must be between 0 and 3600 seconds, got {}",
                self.header_timeout_s
            )));
        }
        if self.max_connections == 0 {
            return Err(CliError::Usage(
                "--max-connections must be at least 1".into(),
            ));
        }
        Ok(remask_cluster::listen::Limits {
            header_timeout: Duration::from_secs_f64(self.header_timeout_s),
            max_connections: self.max_connections,
        })
    }
}

/// TLS from PEM files.
#[derive(clap::Args, Clone)]
pub struct TlsArgs {
    /// Certificate (PEM) this process presents: to clients, and between
    /// coordinator and workers.
    #[arg(long, env = "REMASK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "REMASK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) of the cluster: workers accept only coordinators with a
    /// certificate it signed, and the coordinator only such workers.
    #[arg(long, env = "REMASK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }
}

fn tls_usage(e: remask_cluster::tls::TlsError) -> CliError {
    CliError::Usage(e.to_string())
}

/// Every TLS file given parses and the key goes with the certificate:
/// reported (exit code 2) before the server says it is listening.
fn check_public_tls(files: &TlsFiles) -> CliResult {
    files.check().map_err(tls_usage)?;
    files.public_server(&[]).map_err(tls_usage)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Checkpoint directory, or a Hugging Face Hub model ORG/NAME[@REVISION] (default: the embedded default model).
    #[arg(long, env = "REMASK_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub addr: ListenArgs,
    /// Split the model over this many tensor-parallel ranks (threads on the
    /// CPU). With --backend cuda the ranks are GPUs: 0 to N-1, or those of --devices
    /// (then 1 or their number).
    #[arg(long, env = "REMASK_TENSOR_PARALLEL", default_value_t = 1)]
    pub tensor_parallel: usize,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub kv: KvArgs,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("discovery").required(true).args(["etcd", "workers"])))]
pub struct CoordinatorArgs {
    /// Checkpoint directory (or a Hub model ORG/NAME[@REVISION]); the coordinator reads its config and tokenizer,
    /// and workers load their shards from the same path unless they have their own --model.
    #[arg(long, env = "REMASK_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub addr: ListenArgs,
    /// etcd endpoints, comma-separated: workers are discovered there.
    #[arg(long, env = "REMASK_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Static worker addresses (host:port), comma-separated, in stage order.
    #[arg(long, env = "REMASK_WORKERS", value_delimiter = ',')]
    pub workers: Option<Vec<String>>,
    /// Pipeline stages: the layers are split into this many contiguous ranges.
    #[arg(long, env = "REMASK_STAGES", default_value_t = 1)]
    pub stages: usize,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "REMASK_CLUSTER_PREFIX", default_value = "/remask")]
    pub cluster_prefix: String,
    /// Seconds a worker may take to load its shard.
    #[arg(long, env = "REMASK_LOAD_TIMEOUT", default_value_t = 600)]
    pub load_timeout: u64,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// HOST:PORT of the worker's gRPC API (an address, [IPv6]:PORT, or a host name).
    #[arg(long, env = "REMASK_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: HostPort,
    /// etcd endpoints, comma-separated, to register in (omit for static clusters).
    #[arg(long, env = "REMASK_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// host:port the coordinator dials (default: the listen address).
    #[arg(long, env = "REMASK_ADVERTISE")]
    pub advertise: Option<String>,
    /// Unique, stable id in the cluster (default: the advertised address).
    #[arg(long, env = "REMASK_ID")]
    pub id: Option<String>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    /// Checkpoint directory on this machine, or a Hub model ORG/NAME[@REVISION] (default: the coordinator's path).
    #[arg(long, env = "REMASK_MODEL")]
    pub model: Option<PathBuf>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "REMASK_CLUSTER_PREFIX", default_value = "/remask")]
    pub cluster_prefix: String,
    /// Lease time to live in seconds: how fast the cluster notices a dead worker.
    #[arg(long, env = "REMASK_LEASE_TTL", default_value_t = 3)]
    pub lease_ttl: i64,
    /// Split each shard over this many tensor-parallel ranks (threads on the
    /// CPU). With --backend cuda the ranks are GPUs: 0 to N-1, or those of --devices
    /// (then 1 or their number).
    #[arg(long, env = "REMASK_TENSOR_PARALLEL", default_value_t = 1)]
    pub tensor_parallel: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// HOST:PORT of an HTTP server for this worker's own `/metrics`
    /// (Prometheus: its forward passes, K/V caches, the process); off when unset.
    #[arg(long, env = "REMASK_METRICS_LISTEN")]
    pub metrics_listen: Option<HostPort>,
    #[command(flatten)]
    pub kv: KvArgs,
}

fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(e.into()))
}

/// Ctrl-C or SIGTERM (what Kubernetes sends): stop accepting, finish, and
/// let a worker revoke its etcd lease so it leaves the cluster at once.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("remask: shutting down");
}

/// What the coordinator reads of the checkpoint; `default_name` is the
/// served name unless --served-model-name gives one.
fn model_meta(
    dir: &Path,
    default_name: String,
    front: &FrontArgs,
    batch: &BatchArgs,
) -> CliResult<ModelMeta> {
    if !dir.join("config.json").is_file() {
        return Err(remask_model::ModelError::NotADirectory(dir.to_path_buf()).into());
    }
    let name = front.served_model_name.clone().unwrap_or(default_name);
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(CliError::Usage(
            "--served-model-name must be 1 to 256 characters, none of them control characters"
                .into(),
        ));
    }
    let config = LladaConfig::from_file(&dir.join("config.json"))?;
    let codec =
        TextCodec::load(dir)?.allow_special_tokens_in_chat(front.allow_special_tokens_in_chat);
    let special = codec.special_tokens(&config)?;
    Ok(ModelMeta {
        name,
        defaults: crate::defaults::load(dir, batch.rule, batch.cache)?,
        random_weights: default_model::is_random(&config),
        config,
        codec: Arc::new(codec),
        special,
    })
}

fn check_batch(b: &BatchArgs) -> CliResult {
    if b.max_batch == 0 || b.max_queue == 0 {
        return Err(CliError::Usage(
            "--max-batch and --max-queue must be at least 1".into(),
        ));
    }
    // A forward pass carries up to two sequences a request (guidance), and
    // workers serve at most MAX_SEQUENCES.
    let most = remask_cluster::shard::MAX_SEQUENCES / 2;
    if b.max_batch > most {
        return Err(CliError::Usage(format!(
            "--max-batch must be at most {most}, got {}",
            b.max_batch
        )));
    }
    if !(b.failover_timeout.is_finite() && (0.0..=86_400.0).contains(&b.failover_timeout)) {
        return Err(CliError::Usage(format!(
            "--failover-timeout must be between 0 and 86400 seconds, got {}",
            b.failover_timeout
        )));
    }
    Ok(())
}

/// Coordinator and an in-process worker holding the whole model.
pub fn serve(args: ServeArgs, globals: &Globals) -> CliResult {
    check_batch(&args.batch)?;
    let limits = args.conn.limits()?;
    // The TLS files, checked before the model is read.
    let tls_files = args.tls.files();
    check_public_tls(&tls_files)?;
    // The GPUs (empty on the CPU), checked before the model is read.
    let gpus = args.device.gpus(args.tensor_parallel)?;
    let rt = runtime()?;
    let addrs = args.addr.resolve(&rt)?;
    let default_name = match &args.model {
        None => default_model::NAME.to_string(),
        Some(dir) => crate::hub::served_name(dir),
    };
    let dir = default_model::resolve(args.model, globals)?;
    let meta = model_meta(&dir, default_name, &args.front, &args.batch)?;
    let ckpt = Checkpoint::open(&dir)?;
    let shard = Shard::full(&ckpt.config);
    let runner = if gpus.is_empty() {
        ShardRunner::load_tp(&ckpt, shard.clone(), args.tensor_parallel, args.kv.budget())?
    } else {
        #[cfg(feature = "cuda")]
        {
            ShardRunner::load_cuda(&ckpt, shard.clone(), &gpus, args.kv.budget()).map_err(|e| {
                CliError::Usage(format!(
                    "--backend cuda (GPUs {}): {e}",
                    crate::device::list(&gpus)
                ))
            })?
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("no GPUs without the cuda feature")
    };
    rt.block_on(async move {
        let pipeline = Pipeline::new(vec![StageClient::Local(Arc::new(runner))]);
        let (_pipeline_tx, pipeline_rx) = watch::channel(Some(Arc::new(pipeline)));
        let (failures_tx, _failures_rx) = mpsc::unbounded_channel();
        let bound = addrs.bind().await?;
        let metrics = Arc::new(Metrics::new(&meta.name));
        metrics.workers.get_or_create(metrics.model()).set(1);
        metrics
            .shard_coverage
            .get_or_create(metrics.model())
            .set(1.0);
        let coordinator = start_coordinator(
            meta,
            &args.batch,
            &args.front,
            pipeline_rx,
            failures_tx,
            1,
            metrics,
        )?;
        eprintln!(
            "remask serve: {} with an in-process worker{}",
            dir.display(),
            bound.note()?,
        );
        bound.warn_if_open("serve", &coordinator);
        server::serve_coordinator(
            bound.grpc,
            bound.http,
            &tls_files,
            limits,
            coordinator,
            shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}

fn http_note(http: &Option<tokio::net::TcpListener>) -> String {
    http.as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| format!(", HTTP on {a}"))
        .unwrap_or_default()
}

fn start_coordinator(
    meta: ModelMeta,
    batch: &BatchArgs,
    front: &FrontArgs,
    pipeline: watch::Receiver<Option<Arc<Pipeline>>>,
    failures: mpsc::UnboundedSender<remask_cluster::pipeline::StageFailure>,
    stages: usize,
    metrics: Arc<Metrics>,
) -> CliResult<Arc<Coordinator>> {
    let api_keys = ApiKeys::load(&front.api_keys, front.api_key_file.as_deref()).map_err(|e| {
        CliError::Usage(format!(
            "cannot read --api-key-file {}: {e}",
            front
                .api_key_file
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        ))
    })?;
    let scheduler = Scheduler::start(
        SchedulerConfig {
            max_batch: batch.max_batch,
            max_queue: batch.max_queue,
            failover_timeout: Duration::from_secs_f64(batch.failover_timeout),
        },
        pipeline.clone(),
        failures,
        meta.codec.clone(),
        metrics.clone(),
    );
    Ok(Arc::new(Coordinator {
        meta,
        scheduler,
        pipeline,
        stages,
        metrics,
        api_keys,
        http: front.http_options()?,
    }))
}

/// The coordinator of a cluster of workers.
pub fn coordinator(args: CoordinatorArgs) -> CliResult {
    check_batch(&args.batch)?;
    let limits = args.conn.limits()?;
    let rt = runtime()?;
    let addrs = args.addr.resolve(&rt)?;
    let name = crate::hub::served_name(&args.model);
    let model_dir = crate::hub::resolve_path(args.model.clone())?;
    let meta = model_meta(&model_dir, name, &args.front, &args.batch)?;
    let n_layers = meta.config.n_layers;
    if args.stages == 0 || args.stages > n_layers {
        return Err(CliError::Usage(format!(
            "--stages must be between 1 and the model's {n_layers} layers, got {}",
            args.stages
        )));
    }
    if let Some(w) = &args.workers
        && w.len() < args.stages
    {
        return Err(CliError::Usage(format!(
            "--workers lists {} addresses for {} stages",
            w.len(),
            args.stages
        )));
    }
    let tls_files = args.tls.files();
    check_public_tls(&tls_files)?;
    let worker_tls = tls_files.worker_client().map_err(tls_usage)?;
    rt.block_on(async move {
        let members = match (&args.etcd, &args.workers) {
            (Some(etcd), _) => watch_members(etcd.clone(), args.cluster_prefix.clone()),
            (None, Some(workers)) => static_members(workers, worker_tls.is_some()),
            (None, None) => unreachable!("clap requires one"),
        };
        let (pipeline_tx, pipeline_rx) = watch::channel(None);
        let (failures_tx, failures_rx) = mpsc::unbounded_channel();
        let model = model_dir.display().to_string();
        let metrics = Arc::new(Metrics::new(&meta.name));
        let manager = Manager::new(
            model,
            plan_shards(n_layers, args.stages),
            members,
            failures_rx,
            pipeline_tx,
            Duration::from_secs(args.load_timeout),
            metrics.clone(),
            worker_tls,
        );
        tokio::spawn(manager.run());
        let bound = addrs.bind().await?;
        let coordinator = start_coordinator(
            meta,
            &args.batch,
            &args.front,
            pipeline_rx,
            failures_tx,
            args.stages,
            metrics,
        )?;
        eprintln!(
            "remask coordinator: {} stages{}",
            args.stages,
            bound.note()?
        );
        bound.warn_if_open("coordinator", &coordinator);
        server::serve_coordinator(
            bound.grpc,
            bound.http,
            &tls_files,
            limits,
            coordinator,
            shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}

/// A worker: serves the Worker API and, with --etcd, registers itself.
pub fn worker(args: WorkerArgs) -> CliResult {
    let devices = args.device.gpus(args.tensor_parallel)?;
    if args.lease_ttl < 1 {
        return Err(CliError::Usage(
            "--lease-ttl must be at least 1 second".into(),
        ));
    }
    let limits = args.conn.limits()?;
    // --model ORG/NAME: the Hub model's snapshot, found or fetched before serving.
    let model = args
        .model
        .clone()
        .map(crate::hub::resolve_path)
        .transpose()?;
    let tls = args.tls.files().worker_server().map_err(tls_usage)?;
    let rt = runtime()?;
    let listen = rt.block_on(args.listen.resolve(&format!("--listen {}", args.listen)))?;
    let metrics_listen = match &args.metrics_listen {
        Some(m) => Some(rt.block_on(m.resolve(&format!("--metrics-listen {m}")))?),
        None => None,
    };
    rt.block_on(async move {
        let listener = addr::bind(&listen).await?;
        let bound = listener.local_addr().map_err(anyhow::Error::from)?;
        let advertise = args.advertise.clone().unwrap_or_else(|| bound.to_string());
        let id = args.id.clone().unwrap_or_else(|| advertise.clone());
        let info = WorkerInfo {
            id: id.clone(),
            addr: format!(
                "{}://{advertise}",
                if tls.is_some() { "https" } else { "http" }
            ),
            backend: args.device.backend.clone(),
            devices: devices.iter().map(|&d| d as u32).collect(),
        };
        // Register in the background, retrying while etcd is not reachable
        // yet (in Kubernetes, workers may start before etcd does).
        let registration = args.etcd.clone().map(|etcd| {
            let prefix = args.cluster_prefix.clone();
            let ttl = args.lease_ttl;
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(200);
                loop {
                    match Registration::register(&etcd, &prefix, info.clone(), ttl).await {
                        Ok(r) => {
                            tracing::info!(key = r.key(), "registered in etcd");
                            return r;
                        }
                        Err(e) => {
                            eprintln!(
                                "remask worker: cannot register yet: {e}; retrying in {backoff:?}"
                            );
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            })
        });
        let service = WorkerService::new(
            id.clone(),
            model.clone(),
            args.tensor_parallel,
            devices,
            args.kv.budget(),
        );
        let mut metrics_note = String::new();
        if let Some(addrs) = metrics_listen {
            let http = addr::bind(&addrs).await?;
            metrics_note = format!(
                "\nremask worker {id}: metrics on {}",
                http.local_addr().map_err(anyhow::Error::from)?
            );
            tokio::spawn(server::serve_worker_metrics(
                http,
                limits,
                service.metrics(),
            ));
        }
        eprintln!("remask worker {id}: listening on {bound}{metrics_note}");
        let result = server::serve_worker(listener, tls, limits, service, shutdown_signal()).await;
        if let Some(task) = registration {
            if task.is_finished() {
                if let Ok(r) = task.await {
                    r.deregister().await;
                }
            } else {
                task.abort();
            }
        }
        result?;
        Ok(())
    })
}
