//! The properties the cluster's fuzz targets check, shared by both drivers:
//! cargo-fuzz (`fuzz/`, libFuzzer on a nightly toolchain) and the stable
//! `cargo test` run over the seed corpus and its random mutations
//! (`tests/fuzz.rs`). Each function takes arbitrary bytes, decodes them as
//! the request a client or a coordinator sends (a decode error is the
//! expected outcome of most inputs) and hands them to the real handler in
//! process, on a tiny random checkpoint with its real tokenizer; it panics
//! only when a property is broken. No sockets: a run is CPU-bound, so
//! thousands of cases a second reach the handlers' checks.
//!
//! - `generate`: a `GenerateRequest` through `Coordinator::canvas` and the
//!   unary `Generate` handler (the coordinator has no pipeline).
//! - `worker_forward`, `worker_load_shard`, `worker_release_caches`: the
//!   worker's messages through its service, a shard loaded once; a refused
//!   call never costs the worker its shard.
//! - `http_completions`, `http_chat`, `http_tokenize`, `http_detokenize`:
//!   request bodies through the HTTP router.

use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use crate::{Coordinator, ModelMeta, Pipeline, Scheduler, SchedulerConfig, WorkerService};
use prost::Message as _;
use remask_model::{Checkpoint, DType, InitOptions, LladaConfig, Preset, TextCodec};
use remask_proto::v1 as gen_pb;
use remask_proto::v1::generation_server::Generation;
use remask_proto::worker as pb;
use remask_proto::worker::worker_server::Worker;
use remask_sampler::Canvas;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tonic::{Code, Request};

/// The runtime the handlers run on: multi-threaded, as the servers' is
/// (the HTTP handlers and `canvas_blocking` call `block_in_place`, which a
/// current-thread runtime refuses).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// `f` as a task of the runtime (a worker thread, as a server's handler
/// runs); a panic in it panics here.
fn on_runtime<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    let rt = runtime();
    rt.block_on(rt.spawn(f))
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Where every fuzzed LoadShard's `model` starting with it points: the
/// checkpoint's directory (its path differs per machine, seeds cannot hold it).
pub const CHECKPOINT_PLACEHOLDER: &str = "CHECKPOINT";

/// The tiny random checkpoint (`remask model init --preset tiny`, f32, two
/// weight files and their index) every target serves. Written once per
/// machine and version under the temp dir, then reused: the fuzz runs of
/// CI leave one small directory, not one per run.
pub fn checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("remask-fuzz-tiny-{}", env!("CARGO_PKG_VERSION")));
        let usable = |d: &Path| Checkpoint::open(d).is_ok() && TextCodec::load(d).is_ok();
        if !usable(&dir) {
            // Written aside and renamed into place: a concurrent run sees
            // a whole checkpoint or none.
            let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&scratch);
            let opts = InitOptions {
                dtype: DType::F32,
                shards: 2,
                ..InitOptions::default()
            };
            remask_model::init_checkpoint(Preset::get("tiny").expect("tiny"), &opts, &scratch)
                .expect("the tiny checkpoint");
            if std::fs::rename(&scratch, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&scratch);
                if !usable(&dir) {
                    panic!("cannot write the fuzz checkpoint {}", dir.display());
                }
            }
        }
        dir
    })
}

/// A coordinator over the checkpoint's config and tokenizer, as
/// `remask coordinator` builds it (`cluster_cmd.rs`), with no pipeline: a
/// request that passes every check is answered UNAVAILABLE ("no pipeline").
pub fn coordinator() -> &'static Arc<Coordinator> {
    type Sender = tokio::sync::watch::Sender<Option<Arc<Pipeline>>>;
    static C: OnceLock<(Arc<Coordinator>, Sender)> = OnceLock::new();
    &C.get_or_init(|| {
        let dir = checkpoint();
        let config = LladaConfig::from_file(&dir.join("config.json")).expect("config.json");
        let codec = Arc::new(TextCodec::load(dir).expect("the tokenizer"));
        let special = codec.special_tokens(&config).expect("special tokens");
        let metrics = Arc::new(Metrics::new("fuzz"));
        // The senders stay alive: a closed channel would stop the scheduler.
        let (no_pipeline, pipeline) = tokio::sync::watch::channel(None);
        let (failures, failed) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(failed);
        let _runtime = runtime().enter();
        let scheduler = Scheduler::start(
            SchedulerConfig {
                max_batch: 8,
                max_queue: 16,
                failover_timeout: std::time::Duration::ZERO,
            },
            pipeline.clone(),
            failures,
            codec.clone(),
            metrics.clone(),
        );
        let coordinator = Coordinator {
            meta: ModelMeta {
                name: crate::coordinator::model_name(&dir.display().to_string()),
                defaults: remask_sampler::Defaults::default(),
                config,
                codec,
                special,
                random_weights: true,
            },
            scheduler,
            pipeline,
            stages: 1,
            metrics,
            api_keys: ApiKeys::load(&[], None).expect("no API keys"),
            http: Default::default(),
        };
        (Arc::new(coordinator), no_pipeline)
    })
    .0
}

/// A `GenerateRequest` (protobuf bytes): `Coordinator::canvas` lays out a
/// canvas that fits the model and is consistent, or refuses with
/// INVALID_ARGUMENT; the unary handler agrees, answering UNAVAILABLE (no
/// pipeline) where the canvas was laid out. Never a panic, never another code.
pub fn generate(data: &[u8]) {
    let Ok(req) = gen_pb::GenerateRequest::decode(data) else {
        return;
    };
    let c = coordinator();
    // As the handler checks: the stop strings, then the canvas.
    let canvas = c.stop_strings(&req).and_then(|_| c.canvas(&req));
    match &canvas {
        Ok(canvas) => check_canvas(c, canvas),
        Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?} for {req:?}"),
    }
    let handler = c.clone();
    let request = req.clone();
    let answer =
        on_runtime(async move { Generation::generate(&*handler, Request::new(request)).await });
    let Err(status) = answer else {
        panic!("generated without a pipeline: {req:?}")
    };
    let expected = if canvas.is_ok() {
        Code::Unavailable
    } else {
        Code::InvalidArgument
    };
    assert_eq!(status.code(), expected, "{status:?} for {req:?}");
}

/// What an accepted canvas must be: prompt, masks, suffix within the model's
/// max_sequence_length, the ids within the vocabulary (no mask among the
/// fixed ones), whole blocks, and a first step inside the canvas.
fn check_canvas(c: &Coordinator, canvas: &Canvas) {
    let (cfg, space, tokens) = (canvas.config(), canvas.space(), canvas.tokens());
    let (prompt, suffix) = (&tokens[..canvas.prompt_len()], canvas.suffix());
    assert!(
        tokens.len() <= c.meta.config.max_sequence_length,
        "{} tokens",
        tokens.len()
    );
    assert_eq!(
        tokens.len(),
        prompt.len() + cfg.gen_length + suffix.len(),
        "{cfg:?}"
    );
    assert!(!prompt.is_empty(), "an empty prompt");
    assert!(
        cfg.gen_length > 0
            && cfg.block_length > 0
            && cfg.gen_length.is_multiple_of(cfg.block_length),
        "{cfg:?}"
    );
    assert!(canvas.generated().iter().all(|&t| t == space.mask));
    for &t in prompt.iter().chain(suffix) {
        assert!(
            (t as usize) < space.vocab_size && t != space.mask,
            "fixed token {t} in {tokens:?}"
        );
    }
    assert!(!canvas.is_done());
    let plan = canvas.plan();
    let gap = prompt.len()..prompt.len() + cfg.gen_length;
    assert!(
        plan.fed.start <= plan.fed.end && plan.fed.end <= tokens.len(),
        "{plan:?}"
    );
    assert!(
        plan.positions.iter().all(|p| gap.contains(p)),
        "{plan:?} outside {gap:?}"
    );
}

/// A worker with the whole tiny model loaded as assignment 1, and a Forward
/// whose answer it records: the call that must keep being answered the same
/// way, whatever was refused in between.
pub struct WorkerFixture {
    service: WorkerService,
    load: pb::LoadShardRequest,
    good: pb::ForwardRequest,
    answer: Vec<pb::Predictions>,
    cases: std::sync::atomic::AtomicU64,
}

/// Bytes the fixture's K/V stores may take: room for 2048 positions of the
/// tiny model, so fuzzed stores cannot grow without bound.
const KV_BUDGET: usize = 1 << 20;

impl WorkerFixture {
    fn new() -> Self {
        let service = WorkerService::new("fuzz".into(), None, 1, Vec::new(), Some(KV_BUDGET));
        let dir = checkpoint();
        let config = LladaConfig::from_file(&dir.join("config.json")).expect("config.json");
        let special = TextCodec::load(dir)
            .and_then(|codec| codec.special_tokens(&config))
            .expect("special tokens");
        let load = pb::LoadShardRequest {
            model: dir.display().to_string(),
            shard: Some(pb::ShardSpec {
                layer_start: 0,
                layer_end: config.n_layers as u32,
                embedding: true,
                head: true,
            }),
            generation: 1,
        };
        let m = special.mask;
        let good = pb::ForwardRequest {
            generation: 1,
            sequences: vec![pb::Sequence {
                length: 8,
                fed_start: 0,
                fed_end: 8,
                ..Default::default()
            }],
            token_ids: vec![10, 11, 12, 13, m, m, m, m],
            queries: vec![pb::HeadQuery {
                positions: vec![4, 5, 6, 7],
                options: Some(pb::PredictOptions {
                    mask: m,
                    eos: special.eos,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut fixture = WorkerFixture {
            service,
            load,
            good,
            answer: Vec::new(),
            cases: Default::default(),
        };
        fixture.reload();
        fixture.answer = fixture.good_answer();
        fixture
    }

    fn service(&'static self) -> &'static WorkerService {
        &self.service
    }

    /// Loads assignment 1 again (after a fuzzed LoadShard replaced it).
    fn reload(&self) {
        let request = Request::new(self.load.clone());
        runtime()
            .block_on(self.service.load_shard(request))
            .expect("the fixture's shard loads");
    }

    fn good_answer(&self) -> Vec<pb::Predictions> {
        let request = Request::new(self.good.clone());
        runtime()
            .block_on(self.service.forward(request))
            .expect("the known good Forward is served")
            .into_inner()
            .predictions
    }

    fn status(&self) -> pb::StatusResponse {
        runtime()
            .block_on(self.service.status(Request::new(pb::StatusRequest {})))
            .expect("Status")
            .into_inner()
    }

    /// The worker holds assignment 1, whole, and answers the known good
    /// Forward as it did at first.
    fn check_serving(&self, after: &dyn std::fmt::Debug) {
        let status = self.status();
        assert_eq!(status.generation, 1, "after {after:?}: {status:?}");
        assert_eq!(status.shard, self.load.shard, "after {after:?}");
        assert_eq!(self.good_answer(), self.answer, "after {after:?}");
    }

    /// `check_serving` every 16th call (a Forward costs more than most
    /// refused calls).
    fn check_sometimes(&self, after: &dyn std::fmt::Debug) {
        use std::sync::atomic::Ordering;
        if self
            .cases
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(16)
        {
            self.check_serving(after);
        }
    }
}

/// One fixture per target: the drivers run targets on parallel threads, and
/// one target's LoadShard must not change what another's checks expect.
fn fixture(cell: &'static OnceLock<WorkerFixture>) -> &'static WorkerFixture {
    cell.get_or_init(WorkerFixture::new)
}

fn refused_forward(code: Code) -> bool {
    // worker.rs `forward_status`, and `runner` (no or another assignment).
    matches!(
        code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted
    )
}

static FORWARD: OnceLock<WorkerFixture> = OnceLock::new();

/// What the worker answers a Forward (`data`, protobuf), its stores
/// released afterwards: for the corpus's own checks.
pub fn forward_answer(data: &[u8]) -> Result<pb::ForwardResponse, tonic::Status> {
    let req =
        pb::ForwardRequest::decode(data).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let service = fixture(&FORWARD).service();
    let release = pb::ReleaseCachesRequest {
        generation: req.generation,
        caches: req.sequences.iter().map(|s| s.cache).collect(),
    };
    let answer = on_runtime(async move { service.forward(Request::new(req)).await });
    let _ = on_runtime(async move { service.release_caches(Request::new(release)).await });
    answer.map(tonic::Response::into_inner)
}

/// A `ForwardRequest`: served, or refused with INVALID_ARGUMENT,
/// FAILED_PRECONDITION (another assignment, missing K/V stores) or
/// RESOURCE_EXHAUSTED (the K/V budget); the stores it made are released
/// afterwards, as the coordinator does. The shard keeps serving.
pub fn worker_forward(data: &[u8]) {
    let Ok(req) = pb::ForwardRequest::decode(data) else {
        return;
    };
    let f = fixture(&FORWARD);
    let service = f.service();
    let request = req.clone();
    let answer = on_runtime(async move { service.forward(Request::new(request)).await });
    match &answer {
        Ok(response) => {
            let r = response.get_ref();
            assert!(
                r.hidden.is_empty() && r.predictions.len() == req.queries.len(),
                "the last stage answers each query: {r:?} for {req:?}"
            );
            for (p, q) in r.predictions.iter().zip(&req.queries) {
                assert!(
                    p.tokens.len() == q.positions.len()
                        && p.confidences.len() == q.positions.len()
                        && p.entropies.len() == q.positions.len(),
                    "{p:?} for {q:?}"
                );
            }
        }
        Err(s) => assert!(refused_forward(s.code()), "{s:?} for {req:?}"),
    }
    let release = pb::ReleaseCachesRequest {
        generation: 1,
        caches: req.sequences.iter().map(|s| s.cache).collect(),
    };
    on_runtime(async move { service.release_caches(Request::new(release)).await })
        .expect("releasing the request's stores");
    f.check_sometimes(&req);
}

/// A `LoadShardRequest` (its `model` may start with `CHECKPOINT`, the
/// fixture's directory): loaded, then Status reports it; or refused with
/// INVALID_ARGUMENT (layers outside the model, no shard) or
/// FAILED_PRECONDITION (no checkpoint there), and the previous shard still
/// serves, the same answers as before.
pub fn worker_load_shard(data: &[u8]) {
    static F: OnceLock<WorkerFixture> = OnceLock::new();
    let Ok(mut req) = pb::LoadShardRequest::decode(data) else {
        return;
    };
    if let Some(rest) = req.model.strip_prefix(CHECKPOINT_PLACEHOLDER) {
        req.model = format!("{}{rest}", checkpoint().display());
    }
    let f = fixture(&F);
    let service = f.service();
    let request = req.clone();
    match on_runtime(async move { service.load_shard(Request::new(request)).await }) {
        Ok(_) => {
            let status = f.status();
            assert_eq!(status.generation, req.generation, "{status:?} for {req:?}");
            assert_eq!(status.shard, req.shard, "{status:?} for {req:?}");
            f.reload();
            f.check_serving(&req);
        }
        Err(s) => {
            assert!(
                matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition),
                "{s:?} for {req:?}"
            );
            f.check_serving(&req);
        }
    }
}

/// A `ReleaseCachesRequest`: how many of the named stores were held (at
/// most as many as it names), or FAILED_PRECONDITION for another
/// assignment; the shard keeps serving.
pub fn worker_release_caches(data: &[u8]) {
    static F: OnceLock<WorkerFixture> = OnceLock::new();
    let Ok(req) = pb::ReleaseCachesRequest::decode(data) else {
        return;
    };
    let f = fixture(&F);
    let service = f.service();
    let request = req.clone();
    match on_runtime(async move { service.release_caches(Request::new(request)).await }) {
        Ok(r) => assert!(r.get_ref().released as usize <= req.caches.len()),
        Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?} for {req:?}"),
    }
    f.check_sometimes(&req);
}

/// A POST of `body` to `path` through the HTTP router, in process: the
/// status and the body, which must be JSON.
pub fn post(path: &'static str, body: &[u8]) -> (u16, serde_json::Value) {
    use tower::ServiceExt;
    static ROUTER: OnceLock<axum::Router> = OnceLock::new();
    let router = ROUTER
        .get_or_init(|| crate::http::router(coordinator().clone()))
        .clone();
    let request = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("a request");
    let (status, bytes) = on_runtime(async move {
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20).await;
        (status, bytes.expect("the whole body"))
    });
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: {status}, not JSON ({e}): {} for {:?}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(body)
        )
    });
    (status.as_u16(), json)
}

/// A POST body through the HTTP router: a status among `allowed`, and
/// every error (400, 404, 413, 503, ...) a JSON body in OpenAI's shape
/// `{"error": {"message", "type", "param", "code"}}`; never a 5xx but the
/// 503 of a cluster without a pipeline. Returns the body of a 200.
fn http(path: &'static str, data: &[u8], allowed: &[u16]) -> Option<serde_json::Value> {
    let (status, json) = post(path, data);
    let text = String::from_utf8_lossy(data);
    assert!(
        allowed.contains(&status),
        "{path}: {status} {json} for {text:?}"
    );
    if status < 400 {
        return Some(json);
    }
    let error = &json["error"];
    let string_or_null = |v: &serde_json::Value| v.is_string() || v.is_null();
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty())
            && error["type"].is_string()
            && string_or_null(&error["param"])
            && string_or_null(&error["code"]),
        "{path}: {status} not in OpenAI's error shape: {json} for {text:?}"
    );
    None
}

/// What a completion or chat body may get without a pipeline: refused
/// (400, 404 an unknown model, 413 too large) or 503.
const GENERATION_STATUSES: &[u16] = &[400, 404, 413, 503];

/// A `POST /v1/completions` body.
pub fn http_completions(data: &[u8]) {
    http("/v1/completions", data, GENERATION_STATUSES);
}

/// A `POST /v1/chat/completions` body.
pub fn http_chat(data: &[u8]) {
    http("/v1/chat/completions", data, GENERATION_STATUSES);
}

/// A `POST /tokenize` body: refused, or a count that is the number of
/// tokens, each within the model's embedding.
pub fn http_tokenize(data: &[u8]) {
    let Some(json) = http("/tokenize", data, &[200, 400, 404, 413]) else {
        return;
    };
    let tokens = json["tokens"].as_array().expect("tokens");
    assert_eq!(json["count"].as_u64(), Some(tokens.len() as u64), "{json}");
    let embedding = coordinator().meta.config.embedding_size() as u64;
    assert!(
        tokens
            .iter()
            .all(|t| t.as_u64().is_some_and(|t| t < embedding)),
        "{json}"
    );
}

/// A `POST /detokenize` body: refused, or the text of the tokens.
pub fn http_detokenize(data: &[u8]) {
    if let Some(json) = http("/detokenize", data, &[200, 400, 404, 413]) {
        assert!(json["prompt"].is_string(), "{json}");
    }
}
