//! The worker process: holds one shard and runs forward passes for the
//! coordinator. It loads whatever shard it is told to (`LoadShard`), so a
//! worker can be re-assigned to another stage without a restart.

use crate::convert::{
    MISSING_CACHES, bytes_to_f32, f32_to_bytes, predictions_to_pb, query_from_pb, seq_from_pb,
    shard_from_pb, shard_to_pb,
};
use crate::shard::{ShardError, ShardRunner};
use remask_engine::{KvError, StageInput, StageOutput};
use remask_model::Checkpoint;
use remask_proto::worker as pb;
use remask_proto::worker::worker_server::Worker;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

struct Loaded {
    runner: Arc<ShardRunner>,
    generation: u64,
    model: String,
}

/// Why a shard did not load: the checkpoint, or the GPUs.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Model(#[from] remask_model::ModelError),
    #[error("{0}")]
    Gpu(String),
}

/// The shard over the GPUs `devices`. CUDA errors (a missing library, a bad
/// GPU) are not the checkpoint's: their text is passed on as it is.
#[cfg(feature = "cuda")]
fn load_gpus(
    ckpt: &Checkpoint,
    shard: remask_engine::Shard,
    devices: &[usize],
    kv_budget: Option<usize>,
) -> Result<ShardRunner, LoadError> {
    ShardRunner::load_cuda(ckpt, shard, devices, kv_budget).map_err(LoadError::Gpu)
}

#[cfg(not(feature = "cuda"))]
fn load_gpus(
    _: &Checkpoint,
    _: remask_engine::Shard,
    _: &[usize],
    _: Option<usize>,
) -> Result<ShardRunner, LoadError> {
    Err(LoadError::Gpu(
        "this worker was built without the CUDA backend".into(),
    ))
}

pub struct WorkerService {
    id: String,
    /// `--model` of the worker, which wins over the coordinator's path.
    model_override: Option<PathBuf>,
    /// Thread ranks each shard is split over on the CPU.
    tensor_parallel: usize,
    /// GPU ordinals of the CUDA backend, one tensor-parallel rank each
    /// (NCCL); empty for the CPU.
    devices: Vec<usize>,
    /// Bytes the K/V stores of a loaded shard may take.
    kv_budget: Option<usize>,
    loaded: RwLock<Option<Loaded>>,
    metrics: Arc<crate::metrics::WorkerMetrics>,
}

impl WorkerService {
    pub fn new(
        id: String,
        model_override: Option<PathBuf>,
        tensor_parallel: usize,
        devices: Vec<usize>,
        kv_budget: Option<usize>,
    ) -> Self {
        WorkerService {
            metrics: Arc::new(crate::metrics::WorkerMetrics::new(&id)),
            id,
            model_override,
            tensor_parallel: tensor_parallel.max(1),
            devices,
            kv_budget,
            loaded: RwLock::new(None),
        }
    }

    /// The worker's own metrics (served on `--metrics-listen`).
    pub fn metrics(&self) -> Arc<crate::metrics::WorkerMetrics> {
        self.metrics.clone()
    }

    /// The loaded runner, if it serves assignment `generation`.
    async fn runner(&self, generation: u64) -> Result<Arc<ShardRunner>, Status> {
        let loaded = self.loaded.read().await;
        let loaded = loaded
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("no shard is loaded"))?;
        if loaded.generation != generation {
            return Err(Status::failed_precondition(format!(
                "assignment {} is loaded, not {generation}",
                loaded.generation
            )));
        }
        Ok(loaded.runner.clone())
    }
}

/// A refused Forward as gRPC: missing stores are FAILED_PRECONDITION with
/// their names in a trailer (the coordinator rebuilds them), a full budget
/// RESOURCE_EXHAUSTED, anything else about the request INVALID_ARGUMENT.
fn forward_status(e: ShardError) -> Status {
    match e {
        ShardError::Kv(KvError::Missing(ids)) => {
            let names: Vec<String> = ids.iter().map(u64::to_string).collect();
            let mut meta = tonic::metadata::MetadataMap::new();
            if let Ok(v) = names.join(",").parse() {
                meta.insert(MISSING_CACHES, v);
            }
            let message = KvError::Missing(ids).to_string();
            Status::with_metadata(tonic::Code::FailedPrecondition, message, meta)
        }
        ShardError::Kv(e @ KvError::Full { .. }) => Status::resource_exhausted(e.to_string()),
        e => Status::invalid_argument(e.to_string()),
    }
}

impl WorkerService {
    /// Loads `previous`'s shard again after a failed LoadShard replaced it
    /// (its runner is dropped first, to make room, as a load does).
    async fn restore(
        &self,
        previous: Loaded,
        load: impl FnOnce(Checkpoint, remask_engine::Shard) -> Result<ShardRunner, LoadError>
        + Send
        + 'static,
    ) {
        let Loaded {
            runner,
            generation,
            model,
        } = previous;
        let shard = runner.shard().clone();
        drop(runner);
        let dir = PathBuf::from(&model);
        let reloaded = tokio::task::spawn_blocking(move || {
            let ckpt = Checkpoint::open(&dir).map_err(LoadError::from)?;
            load(ckpt, shard)
        })
        .await;
        match reloaded {
            Ok(Ok(runner)) => {
                tracing::info!(generation, "the previous shard is loaded again");
                *self.loaded.write().await = Some(Loaded {
                    runner: Arc::new(runner),
                    generation,
                    model,
                });
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot load the previous shard again"),
            Err(e) => tracing::error!(error = %e, "cannot load the previous shard again"),
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    #[tracing::instrument(skip_all, fields(worker = %self.id))]
    async fn load_shard(
        &self,
        request: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        let spec = req
            .shard
            .ok_or_else(|| Status::invalid_argument("LoadShard needs a shard"))?;
        let shard = shard_from_pb(&spec);
        let dir = self
            .model_override
            .clone()
            .unwrap_or_else(|| PathBuf::from(&req.model));
        let start = Instant::now();
        // Everything a request decides is checked before the old shard goes:
        // a refused LoadShard leaves the stage serving.
        let ckpt = {
            let dir2 = dir.clone();
            tokio::task::spawn_blocking(move || Checkpoint::open(dir2))
                .await
                .map_err(|e| Status::internal(format!("load task failed: {e}")))?
                .map_err(|e| {
                    Status::failed_precondition(format!("cannot load {}: {e}", dir.display()))
                })?
        };
        let n_layers = ckpt.config.n_layers;
        if shard.layers.start > shard.layers.end || shard.layers.end > n_layers {
            return Err(Status::invalid_argument(format!(
                "LoadShard: layers {}..{} are not a range within the {n_layers} layers of {}",
                shard.layers.start,
                shard.layers.end,
                dir.display()
            )));
        }
        // Then the old shard is dropped: two copies of a large stage may not
        // fit. Should the new one fail to load, the old one is loaded again.
        let previous = self.loaded.write().await.take();
        let tensor_parallel = self.tensor_parallel;
        let devices = self.devices.clone();
        let kv_budget = self.kv_budget;
        let load = move |ckpt: Checkpoint, shard: remask_engine::Shard| {
            if devices.is_empty() {
                Ok(ShardRunner::load_tp(
                    &ckpt,
                    shard,
                    tensor_parallel,
                    kv_budget,
                )?)
            } else {
                load_gpus(&ckpt, shard, &devices, kv_budget)
            }
        };
        let loaded = {
            let load = load.clone();
            tokio::task::spawn_blocking(move || load(ckpt, shard))
                .await
                .map_err(|e| Status::internal(format!("load task failed: {e}")))?
        };
        let runner = match loaded {
            Ok(runner) => runner,
            Err(e) => {
                if let Some(previous) = previous {
                    self.restore(previous, load).await;
                }
                return Err(Status::failed_precondition(format!(
                    "cannot load {}: {e}",
                    dir.display()
                )));
            }
        };
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::info!(generation = req.generation, layers = ?runner.shard().layers, load_ms, "shard loaded");
        let response = pb::LoadShardResponse {
            load_ms,
            kv_budget_bytes: runner.kv_budget().unwrap_or(0) as u64,
            kv_bytes_per_position: runner.kv_bytes_per_position() as u64,
        };
        *self.loaded.write().await = Some(Loaded {
            runner: Arc::new(runner),
            generation: req.generation,
            model: dir.display().to_string(),
        });
        Ok(Response::new(response))
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let req = request.into_inner();
        let runner = self.runner(req.generation).await?;
        let seqs = req
            .sequences
            .iter()
            .map(seq_from_pb)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Status::invalid_argument("a sequence has an unknown kv use"))?;
        let hidden = if runner.shard().embedding {
            Vec::new()
        } else {
            bytes_to_f32(&req.hidden)
                .ok_or_else(|| Status::invalid_argument("hidden states are not f32"))?
        };
        let queries = req
            .queries
            .iter()
            .map(query_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        let start = Instant::now();
        let metrics = self.metrics.clone();
        let output = tokio::task::spawn_blocking(move || {
            let input = if runner.shard().embedding {
                StageInput::Ids(&req.token_ids)
            } else {
                StageInput::Hidden(&hidden)
            };
            let out = runner.run(&seqs, input, &queries);
            metrics.caches(runner.cache_usage(), runner.kv_budget());
            out
        })
        .await
        .map_err(|e| Status::internal(format!("compute task failed: {e}")))?
        .map_err(forward_status)?;
        let compute_ms = start.elapsed().as_secs_f64() * 1e3;
        self.metrics
            .forward_time
            .get_or_create(self.metrics.label())
            .observe(compute_ms / 1e3);
        let response = match output {
            StageOutput::Hidden(h) => pb::ForwardResponse {
                hidden: f32_to_bytes(&h),
                predictions: Vec::new(),
                compute_ms,
            },
            StageOutput::Predictions(p) => pb::ForwardResponse {
                hidden: Vec::new(),
                predictions: p.iter().map(|p| predictions_to_pb(p)).collect(),
                compute_ms,
            },
        };
        Ok(Response::new(response))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let loaded = self.loaded.read().await;
        let backend = if self.devices.is_empty() {
            "cpu"
        } else {
            "cuda"
        };
        let usage = loaded
            .as_ref()
            .map(|l| l.runner.cache_usage())
            .unwrap_or_default();
        Ok(Response::new(pb::StatusResponse {
            id: self.id.clone(),
            backend: backend.into(),
            shard: loaded.as_ref().map(|l| shard_to_pb(l.runner.shard())),
            generation: loaded.as_ref().map_or(0, |l| l.generation),
            model: loaded.as_ref().map(|l| l.model.clone()).unwrap_or_default(),
            kv_caches: usage.caches as u32,
            kv_cache_bytes: usage.bytes as u64,
            kv_budget_bytes: self.kv_budget.unwrap_or(0) as u64,
        }))
    }

    async fn release_caches(
        &self,
        request: Request<pb::ReleaseCachesRequest>,
    ) -> Result<Response<pb::ReleaseCachesResponse>, Status> {
        let req = request.into_inner();
        let runner = self.runner(req.generation).await?;
        let metrics = self.metrics.clone();
        let released = tokio::task::spawn_blocking(move || {
            let released = runner.release(&req.caches);
            metrics.caches(runner.cache_usage(), runner.kv_budget());
            released
        })
        .await
        .map_err(|e| Status::internal(format!("release task failed: {e}")))?;
        Ok(Response::new(pb::ReleaseCachesResponse {
            released: released as u32,
        }))
    }
}
