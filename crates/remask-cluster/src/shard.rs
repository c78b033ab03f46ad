//! What a stage computes: its layers over the fed rows of a packed batch,
//! starting from token ids (first stage) or hidden states (the others),
//! ending in hidden states or, on the last stage, in (token, confidence,
//! entropy) for the queried positions only; the stage's K/V stores live in
//! its engine. Shared by the worker process and the in-process stage of
//! `remask serve`; this file checks what arrives, `Engine::forward` computes.

use remask_engine::{CacheUsage, Engine, KvError, Query, Seq, Shard, StageInput, StageOutput};
use remask_model::{Checkpoint, Result};

/// A loaded shard over a group of ranks: CPU thread ranks (one without
/// tensor parallelism), or one NCCL rank per GPU on CUDA.
pub struct ShardRunner {
    inner: Ranks,
}

enum Ranks {
    Cpu(Engine),
    #[cfg(feature = "cuda")]
    Cuda(Engine<remask_engine::cuda::CudaBackend>),
}

/// Calls `$f` on the engine, whichever backend it runs on.
macro_rules! engine {
    ($self:expr, $e:ident => $f:expr) => {
        match &$self.inner {
            Ranks::Cpu($e) => $f,
            #[cfg(feature = "cuda")]
            Ranks::Cuda($e) => $f,
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("this stage has no embedding: it needs hidden states, not token ids")]
    NeedsHidden,
    #[error("the first stage needs token ids, not hidden states")]
    NeedsIds,
    #[error("hidden states of {got} values do not match {tokens} fed tokens x d_model {d_model}")]
    HiddenSize {
        got: usize,
        tokens: usize,
        d_model: usize,
    },
    #[error("token ids ({ids}) do not match the fed positions ({tokens} tokens)")]
    IdsSize { ids: usize, tokens: usize },
    #[error("token id {0} is outside the embedding")]
    TokenOutOfRange(u32),
    #[error("query rows reach past the batch ({rows} rows)")]
    QueryOutOfRange { rows: usize },
    #[error(
        "sequence {index} has {length} tokens, more than the model's max_sequence_length {max}"
    )]
    TooLong {
        index: usize,
        length: usize,
        max: usize,
    },
    #[error("{sequences} sequences in one forward pass; at most {MAX_SEQUENCES} are served")]
    TooManySequences { sequences: usize },
    #[error(
        "{tokens} tokens in one forward pass; at most {max} are served (hidden states of \
         d_model {d_model} in f32 must fit a {MAX_MESSAGE_BYTES}-byte message)"
    )]
    TooManyTokens {
        tokens: usize,
        max: usize,
        d_model: usize,
    },
    #[error("{rows} query rows for a batch of {tokens} tokens; each row is queried once at most")]
    TooManyQueryRows { rows: usize, tokens: usize },
    #[error("a query asks for position {position}, before its first fed position {first}")]
    QueryBeforeFed { position: usize, first: usize },
    #[error("{0}")]
    Kv(#[from] KvError),
}

/// Sequences one forward pass may carry: twice (classifier-free guidance)
/// the largest `--max-batch` the coordinator accepts.
pub const MAX_SEQUENCES: usize = 1024;
use crate::pipeline::MAX_MESSAGE_BYTES;

/// Tokens one forward pass may carry: the stage's hidden states
/// (`tokens x d_model` f32) must fit one message, as they do between stages;
/// the same bound on the first stage keeps a small request of token ids from
/// asking for gigabytes of activations.
pub fn max_tokens(d_model: usize) -> usize {
    MAX_MESSAGE_BYTES / (4 * d_model.max(1))
}

impl ShardRunner {
    /// The shard split over `tensor_parallel` ranks (threads on the CPU),
    /// its K/V stores bounded by `kv_budget` bytes.
    pub fn load_tp(
        ckpt: &Checkpoint,
        shard: Shard,
        tensor_parallel: usize,
        kv_budget: Option<usize>,
    ) -> Result<Self> {
        let engine = Engine::load_shard(ckpt, shard, tensor_parallel)?.with_kv_budget(kv_budget);
        Ok(ShardRunner {
            inner: Ranks::Cpu(engine),
        })
    }

    /// The shard split over the GPUs `devices` (the CUDA backend), one
    /// tensor-parallel rank per GPU; one GPU is a group of one.
    #[cfg(feature = "cuda")]
    pub fn load_cuda(
        ckpt: &Checkpoint,
        shard: Shard,
        devices: &[usize],
        kv_budget: Option<usize>,
    ) -> std::result::Result<Self, String> {
        let group = remask_engine::cuda::tp_group(devices).map_err(|e| e.to_string())?;
        let engine = Engine::from_backends(group, ckpt, shard).map_err(|e| e.to_string())?;
        Ok(ShardRunner {
            inner: Ranks::Cuda(engine.with_kv_budget(kv_budget)),
        })
    }

    pub fn shard(&self) -> &Shard {
        engine!(self, e => e.shard())
    }

    fn config(&self) -> &remask_model::LladaConfig {
        engine!(self, e => e.config())
    }

    /// K/V bytes per position of one sequence on this stage.
    pub fn kv_bytes_per_position(&self) -> usize {
        engine!(self, e => e.kv_bytes_per_position())
    }

    pub fn kv_budget(&self) -> Option<usize> {
        engine!(self, e => e.kv_budget())
    }

    pub fn cache_usage(&self) -> CacheUsage {
        engine!(self, e => e.cache_usage())
    }

    /// Drops the stores of `caches`; returns how many were held.
    pub fn release(&self, caches: &[u64]) -> usize {
        engine!(self, e => e.release(caches))
    }

    /// Runs the shard. Every input is checked first: a malformed request is an
    /// error, never a panic in the worker.
    pub fn run(
        &self,
        seqs: &[Seq],
        input: StageInput<'_>,
        queries: &[Query],
    ) -> std::result::Result<StageOutput, ShardError> {
        let c = self.config();
        let shard = self.shard();
        if seqs.len() > MAX_SEQUENCES {
            return Err(ShardError::TooManySequences {
                sequences: seqs.len(),
            });
        }
        for (index, seq) in seqs.iter().enumerate() {
            if seq.len > c.max_sequence_length {
                return Err(ShardError::TooLong {
                    index,
                    length: seq.len,
                    max: c.max_sequence_length,
                });
            }
            seq.check(index)?;
        }
        // No overflow: at most MAX_SEQUENCES x max_sequence_length (bounded by the config).
        let tokens: usize = seqs.iter().map(|s| s.fed.len()).sum();
        if tokens > max_tokens(c.d_model) {
            return Err(ShardError::TooManyTokens {
                tokens,
                max: max_tokens(c.d_model),
                d_model: c.d_model,
            });
        }
        match (&input, shard.embedding) {
            (StageInput::Ids(ids), true) => {
                if ids.len() != tokens {
                    return Err(ShardError::IdsSize {
                        ids: ids.len(),
                        tokens,
                    });
                }
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.embedding_size()) {
                    return Err(ShardError::TokenOutOfRange(bad));
                }
            }
            (StageInput::Hidden(h), false) => {
                if h.len() != tokens * c.d_model {
                    return Err(ShardError::HiddenSize {
                        got: h.len(),
                        tokens,
                        d_model: c.d_model,
                    });
                }
            }
            (StageInput::Ids(_), false) => return Err(ShardError::NeedsHidden),
            (StageInput::Hidden(_), true) => return Err(ShardError::NeedsIds),
        }
        if shard.head {
            // Counted before the rows are collected: their number is the
            // request's to choose.
            let n_rows: usize = queries
                .iter()
                .map(|q| q.positions.len() * (1 + q.uncond_base.is_some() as usize))
                .sum();
            if n_rows > tokens {
                return Err(ShardError::TooManyQueryRows {
                    rows: n_rows,
                    tokens,
                });
            }
            for q in queries {
                for &position in &q.positions {
                    if position < q.first {
                        return Err(ShardError::QueryBeforeFed {
                            position,
                            first: q.first,
                        });
                    }
                    let offset = position - q.first;
                    let base = q.cond_base.max(q.uncond_base.unwrap_or(0));
                    if base.checked_add(offset).is_none_or(|r| r >= tokens) {
                        return Err(ShardError::QueryOutOfRange { rows: tokens });
                    }
                }
            }
        }
        let queries = if shard.head { queries } else { &[] };
        Ok(engine!(self, e => e.forward(seqs, input, queries))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remask_engine::StepBatch;
    use remask_model::{DType, InitOptions, Preset, init_checkpoint};
    use remask_sampler::{Canvas, SamplerConfig};

    /// A stage split over thread ranks computes what one rank computes: the
    /// same hidden states mid-pipeline, the same predictions at the end (the
    /// group path that CUDA groups share).
    #[test]
    fn tensor_parallel_stages_match_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            dtype: DType::F32,
            ..InitOptions::default()
        };
        // tiny: 4 heads, 2 KV heads: divisible by 2.
        init_checkpoint(Preset::get("tiny").unwrap(), &opts, dir.path()).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let c = &ckpt.config;
        let special = remask_model::TextCodec::load(dir.path())
            .unwrap()
            .special_tokens(c)
            .unwrap();
        let space = remask_engine::token_space(c, &special);
        let config = SamplerConfig {
            gen_length: 8,
            steps: 4,
            block_length: 8,
            temperature: 0.7,
            cfg_scale: 0.5,
            seed: 2,
            ..SamplerConfig::default()
        };
        let canvas = Canvas::new(&[5, 6, 7], config, space).unwrap();
        let plan = canvas.plan();
        let batch = StepBatch::new(&[(0, &canvas, &plan)]);
        let split = c.n_layers / 2;
        let first = Shard {
            layers: 0..split,
            embedding: true,
            head: false,
        };
        let last = Shard {
            layers: split..c.n_layers,
            embedding: false,
            head: true,
        };
        let run = |world: usize| {
            let a = ShardRunner::load_tp(&ckpt, first.clone(), world, None).unwrap();
            let b = ShardRunner::load_tp(&ckpt, last.clone(), world, None).unwrap();
            let ids = StageInput::Ids(&batch.ids);
            let Ok(StageOutput::Hidden(h)) = a.run(&batch.seqs, ids, &batch.queries) else {
                panic!("the first stage gives hidden states")
            };
            let hidden = StageInput::Hidden(&h);
            let Ok(StageOutput::Predictions(p)) = b.run(&batch.seqs, hidden, &batch.queries) else {
                panic!("the last stage gives predictions")
            };
            (h, p)
        };
        let (h1, p1) = run(1);
        let (h2, p2) = run(2);
        let scale = h1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = h1
            .iter()
            .zip(&h2)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff / scale < 1e-4, "hidden states differ by {diff}");
        assert_eq!(p1.len(), p2.len());
        for (a, b) in p1[0].iter().zip(&p2[0]) {
            assert_eq!(a.token, b.token);
            assert!((a.confidence - b.confidence).abs() < 1e-4, "{a:?} {b:?}");
        }
    }
}
