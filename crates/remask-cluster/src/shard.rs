//! What a stage computes: its layers over a packed batch, starting from token
//! ids (first stage) or hidden states (the others), ending in hidden states or,
//! on the last stage, in (token, confidence) for the queried positions only.
//! Shared by the worker process and the in-process stage of `remask serve`.

use remask_engine::{
    Backend, CpuBackend, Llada, Packing, Query, Shard, TpEngine, combine_ranks, partial_queries,
    predict_queries, query_rows,
};
use remask_model::{Checkpoint, Result};
use remask_sampler::Prediction;

pub enum StageInput {
    Ids(Vec<u32>),
    Hidden(Vec<f32>),
}

pub enum StageOutput {
    Hidden(Vec<f32>),
    Predictions(Vec<Vec<Prediction>>),
}

/// A loaded shard on the CPU backend: one rank, or a tensor-parallel group
/// of thread ranks.
pub struct ShardRunner {
    inner: Ranks,
}

enum Ranks {
    One(CpuBackend, Box<Llada<CpuBackend>>),
    Group(TpEngine),
    #[cfg(feature = "cuda")]
    Cuda(
        remask_engine::cuda::CudaBackend,
        Box<Llada<remask_engine::cuda::CudaBackend>>,
    ),
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("this stage has no embedding: it needs hidden states, not token ids")]
    NeedsHidden,
    #[error("the first stage needs token ids, not hidden states")]
    NeedsIds,
    #[error("hidden states of {got} values do not match {tokens} tokens x d_model {d_model}")]
    HiddenSize {
        got: usize,
        tokens: usize,
        d_model: usize,
    },
    #[error("token ids ({ids}) do not match the sequence lengths ({tokens} tokens)")]
    IdsSize { ids: usize, tokens: usize },
    #[error("token id {0} is outside the embedding")]
    TokenOutOfRange(u32),
    #[error("query rows reach past the batch ({rows} rows)")]
    QueryOutOfRange { rows: usize },
}

impl ShardRunner {
    pub fn load(ckpt: &Checkpoint, shard: Shard) -> Result<Self> {
        Self::load_tp(ckpt, shard, 1)
    }

    /// The shard split over `tensor_parallel` ranks (threads on the CPU).
    pub fn load_tp(ckpt: &Checkpoint, shard: Shard, tensor_parallel: usize) -> Result<Self> {
        let inner = if tensor_parallel <= 1 {
            let backend = CpuBackend::default();
            let model = Llada::load(&backend, ckpt, shard)?;
            Ranks::One(backend, Box::new(model))
        } else {
            Ranks::Group(TpEngine::load_shard(ckpt, shard, tensor_parallel)?)
        };
        Ok(ShardRunner { inner })
    }

    /// The shard on GPU `device` (the CUDA backend).
    #[cfg(feature = "cuda")]
    pub fn load_cuda(
        ckpt: &Checkpoint,
        shard: Shard,
        device: usize,
    ) -> std::result::Result<Self, String> {
        let backend = remask_engine::cuda::CudaBackend::new(device).map_err(|e| e.to_string())?;
        let model = Llada::load(&backend, ckpt, shard).map_err(|e| e.to_string())?;
        Ok(ShardRunner {
            inner: Ranks::Cuda(backend, Box::new(model)),
        })
    }

    pub fn shard(&self) -> &Shard {
        match &self.inner {
            Ranks::One(_, m) => &m.shard,
            Ranks::Group(g) => g.shard(),
            #[cfg(feature = "cuda")]
            Ranks::Cuda(_, m) => &m.shard,
        }
    }

    fn config(&self) -> &remask_model::LladaConfig {
        match &self.inner {
            Ranks::One(_, m) => &m.config,
            Ranks::Group(g) => g.config(),
            #[cfg(feature = "cuda")]
            Ranks::Cuda(_, m) => &m.config,
        }
    }

    /// Runs the shard. Every input is checked first: a malformed request is an
    /// error, never a panic in the worker.
    pub fn run(
        &self,
        lengths: &[usize],
        input: StageInput,
        queries: &[Query],
    ) -> std::result::Result<StageOutput, ShardError> {
        let c = self.config();
        let shard = self.shard();
        let packing = Packing::new(lengths.iter().copied());
        let tokens = packing.tokens();
        if lengths.iter().any(|&l| l > c.max_sequence_length) {
            return Err(ShardError::HiddenSize {
                got: 0,
                tokens,
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
        let rows = query_rows(queries);
        if shard.head && rows.iter().any(|&r| r >= tokens) {
            return Err(ShardError::QueryOutOfRange { rows: tokens });
        }
        let d_model = c.d_model;
        // Every rank runs the same code on its blocks; after the last
        // all-reduce all ranks hold the same hidden states.
        let rank = |backend: &CpuBackend, model: &Llada<CpuBackend>| {
            let x = match &input {
                StageInput::Ids(ids) => model.embed(backend, ids),
                StageInput::Hidden(h) => backend.load_hidden(h, tokens, d_model),
            };
            let x = model.layers(backend, x, &packing);
            if model.shard.head {
                Err(model.head(backend, &x, Some(&rows)))
            } else {
                Ok(backend.to_host(x))
            }
        };
        Ok(match &self.inner {
            Ranks::One(backend, model) => match rank(backend, model) {
                Ok(hidden) => StageOutput::Hidden(hidden),
                Err(logits) => {
                    StageOutput::Predictions(predict_queries(&logits, c.embedding_size(), queries))
                }
            },
            // On the GPU the head is reduced on the device: only partials come back.
            #[cfg(feature = "cuda")]
            Ranks::Cuda(backend, model) => {
                let x = match &input {
                    StageInput::Ids(ids) => model.embed(backend, ids),
                    StageInput::Hidden(h) => backend.load_hidden(h, tokens, d_model),
                };
                let x = model.layers(backend, x, &packing);
                if model.shard.head {
                    let logits = model.head_logits(backend, &x, Some(&rows));
                    let partials = backend.head_partials(logits, model.vocab.clone(), queries);
                    StageOutput::Predictions(combine_ranks(&[partials], queries))
                } else {
                    StageOutput::Hidden(backend.to_host(x))
                }
            }
            Ranks::Group(group) => {
                let mut outputs = group.on_ranks(|backend, model| {
                    rank(backend, model)
                        .map_err(|logits| partial_queries(&logits, model.vocab.clone(), queries))
                });
                if shard.head {
                    let partials: Vec<_> = outputs.into_iter().filter_map(|o| o.err()).collect();
                    StageOutput::Predictions(combine_ranks(&partials, queries))
                } else {
                    StageOutput::Hidden(outputs.swap_remove(0).unwrap_or_default())
                }
            }
        })
    }
}
