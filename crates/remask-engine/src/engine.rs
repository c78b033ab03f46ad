//! One denoising step for any number of requests in one forward pass.
//!
//! `StepBatch::new` packs the canvases (and, with guidance, their
//! prompt-masked twins) into one batch and records, per request, which rows
//! the sampler needs (`Query`). Only those rows go through the output head,
//! and `predict_queries` turns each into (token, confidence). The in-process
//! `Engine` runs all of it; in a cluster the coordinator builds the batch, the
//! stages run the layers, and the last stage runs the head and the queries.

use crate::backend::{Backend, Packing};
use crate::collective::thread_group;
use crate::cpu::CpuBackend;
use crate::llada::{Llada, Shard};
use rayon::prelude::*;
use remask_model::{Checkpoint, LladaConfig, Result, SpecialTokens};
use remask_sampler::{
    Canvas, Committed, Partial, PredictOptions, Prediction, StepPlan, TokenSpace, combine, denoise,
    predict_partial,
};

/// What the sampler must know of a checkpoint: its vocabulary, special ids
/// (from its own tokenizer files) and length limit.
pub fn token_space(config: &LladaConfig, special: &SpecialTokens) -> TokenSpace {
    TokenSpace {
        vocab_size: config.vocab_size,
        mask: special.mask,
        eos: special.eos,
        eot: special.eot,
        max_sequence_length: config.max_sequence_length,
    }
}

/// The rows of one request that the sampler asks about.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// Row of canvas position 0 in the packed batch.
    pub cond_base: usize,
    /// Row of position 0 of the prompt-masked sequence, under guidance.
    pub uncond_base: Option<usize>,
    /// Canvas positions to predict.
    pub positions: Vec<usize>,
    /// The request's denoising step (keys the random draws).
    pub step: u64,
    pub options: PredictOptions,
}

impl Query {
    fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        let cond = self.positions.iter().map(|&p| self.cond_base + p);
        let uncond = self
            .uncond_base
            .into_iter()
            .flat_map(|b| self.positions.iter().map(move |&p| b + p));
        cond.chain(uncond)
    }
}

/// The input of one forward pass for a set of requests.
#[derive(Clone, Debug, PartialEq)]
pub struct StepBatch {
    pub ids: Vec<u32>,
    pub lengths: Vec<usize>,
    pub queries: Vec<Query>,
}

impl StepBatch {
    pub fn new(requests: &[(&Canvas, &StepPlan)]) -> Self {
        let mut batch = StepBatch {
            ids: Vec::new(),
            lengths: Vec::new(),
            queries: Vec::new(),
        };
        for (canvas, plan) in requests {
            let cond_base = batch.push(canvas.tokens());
            let uncond_base = canvas.unconditional().map(|un| batch.push(&un));
            batch.queries.push(Query {
                cond_base,
                uncond_base,
                positions: plan.positions.clone(),
                step: plan.step as u64,
                options: canvas.predict_options(),
            });
        }
        batch
    }

    fn push(&mut self, seq: &[u32]) -> usize {
        let at = self.ids.len();
        self.ids.extend_from_slice(seq);
        self.lengths.push(seq.len());
        at
    }

    pub fn packing(&self) -> Packing {
        Packing::new(self.lengths.iter().copied())
    }
}

/// The rows the head must compute for `queries`, in the order
/// `predict_queries` expects their logits.
pub fn query_rows(queries: &[Query]) -> Vec<usize> {
    queries.iter().flat_map(Query::rows).collect()
}

/// Predictions from the logits of `query_rows(queries)`, one list per query.
pub fn predict_queries(logits: &[f32], vocab: usize, queries: &[Query]) -> Vec<Vec<Prediction>> {
    combine_ranks(&[partial_queries(logits, 0..vocab, queries)], queries)
}

/// The whole model in this process.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llada<B>,
}

impl<B: Backend> Engine<B> {
    pub fn load(backend: B, ckpt: &Checkpoint) -> Result<Self> {
        let model = Llada::load(&backend, ckpt, Shard::full(&ckpt.config))?;
        Ok(Engine { backend, model })
    }

    /// Runs a packed batch through every layer and the head.
    pub fn run(&self, batch: &StepBatch) -> Vec<Vec<Prediction>> {
        let rows = query_rows(&batch.queries);
        let logits = self
            .model
            .logits(&self.backend, &batch.ids, &batch.packing(), Some(&rows));
        predict_queries(&logits, self.model.config.embedding_size(), &batch.queries)
    }

    /// Like `run`, but the head is reduced by the backend (on the GPU for
    /// CUDA): only (token, confidence) partials come back, never logits.
    pub fn run_fused(&self, batch: &StepBatch) -> Vec<Vec<Prediction>> {
        let partials =
            self.model
                .partials(&self.backend, &batch.ids, &batch.packing(), &batch.queries);
        combine_ranks(&[partials], &batch.queries)
    }

    /// Predictions for every planned position of every request.
    pub fn predict(&self, requests: &[(&Canvas, &StepPlan)]) -> Vec<Vec<Prediction>> {
        self.run(&StepBatch::new(requests))
    }

    /// Runs one request to completion; `on_step` sees each step's commits.
    pub fn generate(&self, canvas: &mut Canvas, on_step: impl FnMut(&Canvas, &[Committed])) {
        let result: std::result::Result<(), std::convert::Infallible> = denoise(
            canvas,
            |c, plan| Ok(self.predict(&[(c, plan)]).pop().unwrap()),
            on_step,
        );
        result.unwrap_or_else(|never| match never {})
    }
}

/// Partials of one vocabulary slice for every queried position, from that
/// slice's logits of `query_rows(queries)` (see `predict_queries`).
pub fn partial_queries(
    logits: &[f32],
    vocab: std::ops::Range<usize>,
    queries: &[Query],
) -> Vec<Vec<Partial>> {
    let width = vocab.len();
    let row = |i: usize| &logits[i * width..(i + 1) * width];
    let mut first = 0;
    queries
        .iter()
        .map(|q| {
            let n = q.positions.len();
            let start = first;
            first += if q.uncond_base.is_some() { 2 * n } else { n };
            q.positions
                .par_iter()
                .enumerate()
                .map_init(Vec::new, |scratch, (j, &pos)| {
                    let un = q.uncond_base.map(|_| row(start + n + j));
                    predict_partial(
                        row(start + j),
                        un,
                        vocab.start,
                        &q.options,
                        q.step,
                        pos as u64,
                        scratch,
                    )
                })
                .collect()
        })
        .collect()
}

/// The whole model split over `world` tensor-parallel ranks, each a thread
/// with its block of every projection and its slice of the vocabulary. A step
/// runs all ranks at once (they meet in the all-reduces), each reduces its
/// vocabulary slice to one `Partial` per position (on the device for CUDA),
/// and the partials are combined: full logits are never assembled. The ranks
/// are thread ranks of the CPU backend (`load`) or any backends that already
/// know their place in a group (`from_backends`: NCCL ranks, one per GPU).
pub struct TpEngine<B: Backend = CpuBackend> {
    ranks: Vec<(B, Llada<B>)>,
}

impl TpEngine<CpuBackend> {
    pub fn load(ckpt: &Checkpoint, world: usize) -> Result<Self> {
        Self::load_shard(ckpt, Shard::full(&ckpt.config), world)
    }

    /// One pipeline stage split over `world` ranks: stages and
    /// tensor-parallel groups combine.
    pub fn load_shard(ckpt: &Checkpoint, shard: Shard, world: usize) -> Result<Self> {
        let backends = thread_group(world.max(1))
            .into_iter()
            .map(|rank| CpuBackend::with_collective(std::sync::Arc::new(rank)))
            .collect();
        Self::from_backends(backends, ckpt, shard)
    }
}

impl<B: Backend> TpEngine<B> {
    /// Loads `shard` on a group of backends, one per rank, in any order: each
    /// says which rank it is through `rank_world()` and loads only its blocks.
    /// The ranks load at once, one thread each (for an 8B model on several
    /// GPUs, slicing and uploading the weights is most of the start-up).
    ///
    /// Panics if the backends are not ranks 0..n of one group of n.
    pub fn from_backends(mut backends: Vec<B>, ckpt: &Checkpoint, shard: Shard) -> Result<Self> {
        let world = backends.len();
        assert!(world > 0, "a tensor-parallel group needs at least one rank");
        backends.sort_by_key(|b| b.rank_world().0);
        for (i, b) in backends.iter().enumerate() {
            assert_eq!(
                b.rank_world(),
                (i, world),
                "backend {i} of a group of {world} is not rank {i} of {world}"
            );
        }
        let models: Vec<Result<Llada<B>>> = std::thread::scope(|s| {
            let handles: Vec<_> = backends
                .iter()
                .map(|b| {
                    let shard = shard.clone();
                    s.spawn(move || Llada::load(b, ckpt, shard))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked while loading"))
                .collect()
        });
        let ranks = backends
            .into_iter()
            .zip(models)
            .map(|(b, m)| Ok((b, m?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(TpEngine { ranks })
    }

    pub fn shard(&self) -> &Shard {
        &self.ranks[0].1.shard
    }

    pub fn config(&self) -> &remask_model::LladaConfig {
        &self.ranks[0].1.config
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Runs `f` on every rank at once, one thread each (not rayon workers:
    /// a rank waiting in an all-reduce must not hold a worker the others need;
    /// NCCL likewise needs every rank's call in flight at once).
    pub fn on_ranks<T: Send>(&self, f: impl Fn(&B, &Llada<B>) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter()
                .map(|(backend, model)| s.spawn(|| f(backend, model)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked"))
                .collect()
        })
    }

    /// Full logits (for tests and `remask forward`): the ranks' vocabulary
    /// slices side by side.
    pub fn logits(&self, ids: &[u32], packing: &Packing, rows: Option<&[usize]>) -> Vec<f32> {
        let slices = self.on_ranks(|b, m| (m.vocab.clone(), m.logits(b, ids, packing, rows)));
        let vocab: usize = slices.iter().map(|(v, _)| v.len()).sum();
        let n = slices[0].1.len() / slices[0].0.len();
        let mut out = vec![0f32; n * vocab];
        for (range, part) in &slices {
            for r in 0..n {
                out[r * vocab + range.start..r * vocab + range.end]
                    .copy_from_slice(&part[r * range.len()..(r + 1) * range.len()]);
            }
        }
        out
    }

    /// One step: each rank reduces its slice of the head through
    /// `head_partials` (on the host for the CPU, on the device for CUDA).
    pub fn run(&self, batch: &StepBatch) -> Vec<Vec<Prediction>> {
        let packing = batch.packing();
        let per_rank = self.on_ranks(|b, m| m.partials(b, &batch.ids, &packing, &batch.queries));
        combine_ranks(&per_rank, &batch.queries)
    }

    pub fn predict(&self, requests: &[(&Canvas, &StepPlan)]) -> Vec<Vec<Prediction>> {
        self.run(&StepBatch::new(requests))
    }
}

/// Each rank's partials (per query, per position) combined into predictions.
pub fn combine_ranks(per_rank: &[Vec<Vec<Partial>>], queries: &[Query]) -> Vec<Vec<Prediction>> {
    queries
        .iter()
        .enumerate()
        .map(|(qi, q)| {
            (0..q.positions.len())
                .map(|j| {
                    let partials: Vec<Partial> = per_rank.iter().map(|r| r[qi][j]).collect();
                    combine(&partials, &q.options, q.step, q.positions[j] as u64)
                })
                .collect()
        })
        .collect()
}
