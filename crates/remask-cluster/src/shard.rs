//! What a stage computes: its layers over a packed batch, starting from token
//! ids (first stage) or hidden states (the others), ending in hidden states or,
//! on the last stage, in (token, confidence) for the queried positions only.
//! Shared by the worker process and the in-process stage of `remask serve`.

use remask_engine::{
    Backend, CpuBackend, Llada, Packing, Query, Shard, predict_queries, query_rows,
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

/// A loaded shard on the CPU backend.
pub struct ShardRunner {
    backend: CpuBackend,
    model: Llada<CpuBackend>,
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
        let backend = CpuBackend;
        let model = Llada::load(&backend, ckpt, shard)?;
        Ok(ShardRunner { backend, model })
    }

    pub fn shard(&self) -> &Shard {
        &self.model.shard
    }

    /// Runs the shard. Every input is checked first: a malformed request is an
    /// error, never a panic in the worker.
    pub fn run(
        &self,
        lengths: &[usize],
        input: StageInput,
        queries: &[Query],
    ) -> std::result::Result<StageOutput, ShardError> {
        let c = &self.model.config;
        let packing = Packing::new(lengths.iter().copied());
        let tokens = packing.tokens();
        if lengths.iter().any(|&l| l > c.max_sequence_length) {
            return Err(ShardError::HiddenSize {
                got: 0,
                tokens,
                d_model: c.d_model,
            });
        }
        let x = match (input, self.model.shard.embedding) {
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
                self.model.embed(&self.backend, &ids)
            }
            (StageInput::Hidden(h), false) => {
                if h.len() != tokens * c.d_model {
                    return Err(ShardError::HiddenSize {
                        got: h.len(),
                        tokens,
                        d_model: c.d_model,
                    });
                }
                self.backend.load_hidden(&h, tokens, c.d_model)
            }
            (StageInput::Ids(_), false) => return Err(ShardError::NeedsHidden),
            (StageInput::Hidden(_), true) => return Err(ShardError::NeedsIds),
        };
        let x = self.model.layers(&self.backend, x, &packing);
        if !self.model.shard.head {
            return Ok(StageOutput::Hidden(self.backend.to_host(x)));
        }
        let rows = query_rows(queries);
        if rows.iter().any(|&r| r >= tokens) {
            return Err(ShardError::QueryOutOfRange { rows: tokens });
        }
        let logits = self.model.head(&self.backend, &x, Some(&rows));
        Ok(StageOutput::Predictions(predict_queries(
            &logits,
            c.embedding_size(),
            queries,
        )))
    }
}
