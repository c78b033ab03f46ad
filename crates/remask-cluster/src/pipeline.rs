//! The stages of one assignment, in order, and one forward pass through them.
//!
//! Hidden states are relayed through the coordinator: it sends token ids to
//! the first stage, each stage's hidden states to the next, and gets
//! predictions back from the last. A relay costs one extra transfer of the
//! hidden states per stage boundary (`fed tokens x d_model x 4` bytes: 1 MB
//! for 320 tokens of the `base` preset, a few hundred microseconds on
//! loopback against a step of hundreds of milliseconds); in exchange the
//! coordinator sees every failure directly and no worker needs to know
//! another. With a K/V cache only the fed positions travel (a dual-cache
//! step of a 32-token block: a tenth of a full step's bytes for 320 tokens).

use crate::convert::{
    MISSING_CACHES, bytes_to_f32, f32_to_bytes, predictions_from_pb, query_to_pb, seq_to_pb,
};
use crate::metrics::Metrics;
use crate::shard::{ShardError, ShardRunner};
use remask_engine::{KvError, Shard, StageInput, StageOutput, StepBatch};
use remask_proto::worker as pb;
use remask_proto::worker::worker_client::WorkerClient;
use remask_sampler::Prediction;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Largest gRPC message between coordinator and workers: hidden states of a
/// big batch of long sequences are far over tonic's 4 MB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// One stage: in this process, or a worker reached over gRPC.
#[derive(Clone)]
// One value per stage of a pipeline: the size of the remote variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum StageClient {
    Local(Arc<ShardRunner>),
    Remote {
        worker_id: String,
        client: WorkerClient<Channel>,
        generation: u64,
        kv: StageKv,
    },
}

/// What a stage's K/V stores may take: the coordinator admits requests
/// within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageKv {
    /// `None`: unbounded.
    pub budget: Option<u64>,
    /// Bytes of one position of one sequence.
    pub bytes_per_position: u64,
}

impl StageClient {
    pub fn worker_id(&self) -> &str {
        match self {
            StageClient::Local(_) => "local",
            StageClient::Remote { worker_id, .. } => worker_id,
        }
    }

    pub fn kv(&self) -> StageKv {
        match self {
            StageClient::Local(runner) => StageKv {
                budget: runner.kv_budget().map(|b| b as u64),
                bytes_per_position: runner.kv_bytes_per_position() as u64,
            },
            StageClient::Remote { kv, .. } => *kv,
        }
    }
}

/// Why a step failed, and on which worker.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} (worker {worker}) failed: {message}")]
pub struct StageFailure {
    pub stage: usize,
    pub worker: String,
    pub message: String,
}

/// Why a step did not run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A worker failed (or is gone): the manager replaces it.
    #[error(transparent)]
    Failed(StageFailure),
    /// A stage does not hold these K/V stores (a restarted or new worker):
    /// rebuild them and run the step again.
    #[error("stage {stage} does not hold K/V caches {caches:?}")]
    CachesMissing { stage: usize, caches: Vec<u64> },
    /// A stage's K/V budget is used up.
    #[error("stage {stage}: {message}")]
    CacheFull { stage: usize, message: String },
}

/// Timings of one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTiming {
    /// Wall time of the whole pass, transfers included.
    pub forward_ms: f64,
    /// Time the stages reported computing.
    pub compute_ms: f64,
}

pub struct Pipeline {
    pub stages: Vec<StageClient>,
    /// ReleaseCaches calls in flight: the next step waits for them, so a
    /// worker has freed a finished request's caches before it is asked to
    /// store a newly admitted one's (admission counted on that room).
    releasing: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How long a worker has to answer a ReleaseCaches call.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Pipeline {
    pub fn new(stages: Vec<StageClient>) -> Self {
        Pipeline {
            stages,
            releasing: Default::default(),
        }
    }

    pub fn workers(&self) -> Vec<String> {
        self.stages
            .iter()
            .map(|s| s.worker_id().to_string())
            .collect()
    }

    /// One bidirectional forward pass of `batch` through every stage.
    pub async fn step(
        &self,
        batch: &StepBatch,
        metrics: &Metrics,
    ) -> Result<(Vec<Vec<Prediction>>, StepTiming), StepError> {
        let releasing =
            std::mem::take(&mut *self.releasing.lock().unwrap_or_else(|e| e.into_inner()));
        for call in releasing {
            let _ = call.await;
        }
        let start = Instant::now();
        let mut compute_ms = 0.0;
        let seqs: Vec<_> = batch.seqs.iter().map(seq_to_pb).collect();
        let batch = Arc::new(batch.clone());
        // The previous stage's hidden states (None: the first stage).
        let mut hidden: Option<Vec<f32>> = None;
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter().enumerate() {
            let fail = |message: String| {
                StepError::Failed(StageFailure {
                    stage: i,
                    worker: stage.worker_id().to_string(),
                    message,
                })
            };
            let stage_start = Instant::now();
            let output = match stage {
                StageClient::Local(runner) => {
                    let (runner, batch) = (runner.clone(), batch.clone());
                    let input_hidden = hidden.take();
                    let t = Instant::now();
                    let out = tokio::task::spawn_blocking(move || {
                        let input = match &input_hidden {
                            None => StageInput::Ids(&batch.ids),
                            Some(h) => StageInput::Hidden(h),
                        };
                        let queries = if i == last { &batch.queries[..] } else { &[] };
                        runner.run(&batch.seqs, input, queries)
                    })
                    .await
                    .map_err(|e| fail(format!("compute task failed: {e}")))?;
                    compute_ms += t.elapsed().as_secs_f64() * 1e3;
                    match out {
                        Ok(out) => out,
                        Err(ShardError::Kv(KvError::Missing(caches))) => {
                            return Err(StepError::CachesMissing { stage: i, caches });
                        }
                        Err(ShardError::Kv(e @ KvError::Full { .. })) => {
                            return Err(StepError::CacheFull {
                                stage: i,
                                message: e.to_string(),
                            });
                        }
                        Err(e) => return Err(fail(e.to_string())),
                    }
                }
                StageClient::Remote {
                    client, generation, ..
                } => {
                    let (token_ids, hidden) = match hidden.take() {
                        None => (batch.ids.clone(), Vec::new()),
                        Some(h) => (Vec::new(), f32_to_bytes(&h)),
                    };
                    let queries = if i == last {
                        batch.queries.iter().map(query_to_pb).collect()
                    } else {
                        Vec::new()
                    };
                    let request = pb::ForwardRequest {
                        generation: *generation,
                        sequences: seqs.clone(),
                        token_ids,
                        hidden,
                        queries,
                    };
                    let response = match client.clone().forward(request).await {
                        Ok(r) => r.into_inner(),
                        Err(s) => return Err(remote_error(i, stage.worker_id(), s)),
                    };
                    compute_ms += response.compute_ms;
                    if i == last {
                        StageOutput::Predictions(
                            response
                                .predictions
                                .iter()
                                .map(predictions_from_pb)
                                .collect::<Option<_>>()
                                .ok_or_else(|| {
                                    fail("predictions with lists of different lengths".into())
                                })?,
                        )
                    } else {
                        StageOutput::Hidden(
                            bytes_to_f32(&response.hidden)
                                .ok_or_else(|| fail("hidden states are not f32".into()))?,
                        )
                    }
                }
            };
            metrics
                .stage_forward_time
                .get_or_create(&metrics.stage(i, stage.worker_id()))
                .observe(stage_start.elapsed().as_secs_f64());
            match output {
                StageOutput::Hidden(h) if i < last => {
                    metrics
                        .stage_bytes
                        .get_or_create(metrics.model())
                        .observe((h.len() * 4) as f64);
                    hidden = Some(h);
                }
                StageOutput::Predictions(p) if i == last => {
                    if p.len() != batch.queries.len()
                        || p.iter()
                            .zip(&batch.queries)
                            .any(|(p, q)| p.len() != q.positions.len())
                    {
                        return Err(fail("predictions do not match the queries".into()));
                    }
                    let timing = StepTiming {
                        forward_ms: start.elapsed().as_secs_f64() * 1e3,
                        compute_ms,
                    };
                    return Ok((p, timing));
                }
                _ => {
                    return Err(fail(
                        "the stage returned the wrong kind of output for its place".into(),
                    ));
                }
            }
        }
        unreachable!("the last stage returns")
    }

    /// Drops the K/V stores `caches` on every stage, without waiting: a
    /// store a worker no longer holds is nothing to release.
    pub fn release(&self, caches: Vec<u64>) {
        if caches.is_empty() {
            return;
        }
        for stage in &self.stages {
            match stage {
                StageClient::Local(runner) => {
                    runner.release(&caches);
                }
                StageClient::Remote {
                    client,
                    generation,
                    worker_id,
                    ..
                } => {
                    let mut client = client.clone();
                    let request = pb::ReleaseCachesRequest {
                        generation: *generation,
                        caches: caches.clone(),
                    };
                    let worker = worker_id.clone();
                    let call = tokio::spawn(async move {
                        match tokio::time::timeout(RELEASE_TIMEOUT, client.release_caches(request))
                            .await
                        {
                            Ok(Ok(_)) => {}
                            Ok(Err(s)) => {
                                tracing::debug!(%worker, status = %s, "K/V caches not released")
                            }
                            Err(_) => tracing::debug!(%worker, "ReleaseCaches timed out"),
                        }
                    });
                    self.releasing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(call);
                }
            }
        }
    }
}

/// A worker's refusal of a step: missing stores (their names in the
/// trailer) and a full budget are the cache's, everything else a failure.
fn remote_error(stage: usize, worker: &str, s: tonic::Status) -> StepError {
    if s.code() == tonic::Code::FailedPrecondition
        && let Some(names) = s.metadata().get(MISSING_CACHES)
        && let Ok(names) = names.to_str()
    {
        let caches: Vec<u64> = names.split(',').filter_map(|n| n.parse().ok()).collect();
        if !caches.is_empty() {
            return StepError::CachesMissing { stage, caches };
        }
    }
    if s.code() == tonic::Code::ResourceExhausted {
        return StepError::CacheFull {
            stage,
            message: s.message().to_string(),
        };
    }
    StepError::Failed(StageFailure {
        stage,
        worker: worker.to_string(),
        message: format!("{}: {}", s.code(), s.message()),
    })
}

/// Splits `n_layers` into `stages` contiguous ranges of near-equal size (the
/// first stages take the remainder); the first also holds the embedding and
/// the last the final norm and head.
pub fn plan_shards(n_layers: usize, stages: usize) -> Vec<Shard> {
    let (base, rem) = (n_layers / stages, n_layers % stages);
    let mut start = 0;
    (0..stages)
        .map(|i| {
            let len = base + usize::from(i < rem);
            let shard = Shard {
                layers: start..start + len,
                embedding: i == 0,
                head: i == stages - 1,
            };
            start += len;
            shard
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_layers_once() {
        let s = plan_shards(32, 3);
        assert_eq!(
            s.iter().map(|s| s.layers.clone()).collect::<Vec<_>>(),
            vec![0..11, 11..22, 22..32]
        );
        assert!(s[0].embedding && !s[1].embedding && s[2].head && !s[0].head);
        let one = plan_shards(2, 1);
        assert!(one[0].embedding && one[0].head && one[0].layers == (0..2));
    }
}
