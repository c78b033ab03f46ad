//! The head-query protocol: what one denoising step asks of the output
//! head. `StepBatch::new` packs the canvases (and, with guidance, their
//! prompt-masked twins) into one batch and records, per request, which rows
//! the sampler needs (`Query`). Only those rows go through the head; each
//! vocabulary slice (the whole vocabulary, or a tensor-parallel rank's part
//! of it) reduces them to `Partial`s, on the host (`partial_queries`) or on
//! the device, and `combine_ranks` merges the slices into predictions. Full
//! logits never leave the backend. The in-process engine and the cluster's
//! last stage speak it alike; it depends only on the sampler.

use crate::backend::Packing;
use rayon::prelude::*;
use remask_sampler::{
    Canvas, Partial, PredictOptions, Prediction, StepPlan, combine, predict_partial,
};

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
