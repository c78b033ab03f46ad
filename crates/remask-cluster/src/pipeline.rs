//! The stages of one assignment, in order, and one forward pass through them.
//!
//! Hidden states are relayed through the coordinator: it sends token ids to
//! the first stage, each stage's hidden states to the next, and gets
//! predictions back from the last. A relay costs one extra transfer of the
//! hidden states per stage boundary (`tokens x d_model x 4` bytes: 1 MB for
//! 320 tokens of the `base` preset, a few hundred microseconds on loopback
//! against a step of hundreds of milliseconds); in exchange the coordinator
//! sees every failure directly and no worker needs to know another.

use crate::convert::{bytes_to_f32, f32_to_bytes, predictions_from_pb, query_to_pb};
use crate::metrics::Metrics;
use crate::shard::{ShardRunner, StageInput, StageOutput};
use remask_engine::{Shard, StepBatch};
use remask_proto::worker as pb;
use remask_proto::worker::worker_client::WorkerClient;
use remask_sampler::Prediction;
use std::sync::Arc;
use std::time::Instant;
use tonic::transport::Channel;

/// Largest gRPC message between coordinator and workers: hidden states of a
/// big batch of long sequences are far over tonic's 4 MB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// One stage: in this process, or a worker reached over gRPC.
#[derive(Clone)]
pub enum StageClient {
    Local(Arc<ShardRunner>),
    Remote {
        worker_id: String,
        client: WorkerClient<Channel>,
        generation: u64,
    },
}

impl StageClient {
    pub fn worker_id(&self) -> &str {
        match self {
            StageClient::Local(_) => "local",
            StageClient::Remote { worker_id, .. } => worker_id,
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
}

impl Pipeline {
    pub fn workers(&self) -> Vec<String> {
        self.stages
            .iter()
            .map(|s| s.worker_id().to_string())
            .collect()
    }

    /// One full bidirectional forward pass of `batch` through every stage.
    pub async fn step(
        &self,
        batch: &StepBatch,
        metrics: &Metrics,
    ) -> Result<(Vec<Vec<Prediction>>, StepTiming), StageFailure> {
        let start = Instant::now();
        let mut compute_ms = 0.0;
        let lengths: Vec<u32> = batch.lengths.iter().map(|&l| l as u32).collect();
        let mut input = StageInput::Ids(batch.ids.clone());
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter().enumerate() {
            let queries = if i == last {
                batch.queries.clone()
            } else {
                Vec::new()
            };
            let fail = |message: String| StageFailure {
                stage: i,
                worker: stage.worker_id().to_string(),
                message,
            };
            let stage_start = Instant::now();
            let output = match stage {
                StageClient::Local(runner) => {
                    let runner = runner.clone();
                    let lengths = batch.lengths.clone();
                    let t = Instant::now();
                    let out =
                        tokio::task::spawn_blocking(move || runner.run(&lengths, input, &queries))
                            .await
                            .map_err(|e| fail(format!("compute task failed: {e}")))?
                            .map_err(|e| fail(e.to_string()))?;
                    compute_ms += t.elapsed().as_secs_f64() * 1e3;
                    out
                }
                StageClient::Remote {
                    client, generation, ..
                } => {
                    let (token_ids, hidden) = match input {
                        StageInput::Ids(ids) => (ids, Vec::new()),
                        StageInput::Hidden(h) => (Vec::new(), f32_to_bytes(&h)),
                    };
                    let request = pb::ForwardRequest {
                        generation: *generation,
                        lengths: lengths.clone(),
                        token_ids,
                        hidden,
                        queries: queries.iter().map(query_to_pb).collect(),
                    };
                    let response = client
                        .clone()
                        .forward(request)
                        .await
                        .map_err(|s| fail(format!("{}: {}", s.code(), s.message())))?
                        .into_inner();
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
            input = match output {
                StageOutput::Hidden(h) if i < last => StageInput::Hidden(h),
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
            };
        }
        unreachable!("the last stage returns")
    }
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
