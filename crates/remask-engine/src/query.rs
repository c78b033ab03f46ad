//! The head-query protocol: what one denoising step asks of the output
//! head. `StepBatch::new` packs the canvases (and, with guidance, their
//! prompt-masked twins) into one batch and records, per request, which rows
//! the sampler needs (`Query`). Only those rows go through the head; each
//! vocabulary slice (the whole vocabulary, or a tensor-parallel rank's part
//! of it) reduces them to `Partial`s, on the host (`partial_queries`) or on
//! the device, and `combine_ranks` merges the slices into predictions. Full
//! logits never leave the backend. The in-process engine and the cluster's
//! last stage speak it alike; it depends only on the sampler.

use crate::kv::Seq;
use rayon::prelude::*;
use remask_sampler::truncate::{Bins, Round, Select};
use remask_sampler::{
    Canvas, KvUse, Partial, PredictOptions, Prediction, StepPlan, combine, guided_logits,
    predict_partial,
};

/// The rows of one request that the sampler asks about.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// Row of canvas position `first` (the first fed position) in the
    /// packed batch.
    pub cond_base: usize,
    /// Same for the prompt-masked sequence, under guidance.
    pub uncond_base: Option<usize>,
    /// The canvas position of the base rows (0 unless a K/V store feeds
    /// the positions before it).
    pub first: usize,
    /// Canvas positions to predict.
    pub positions: Vec<usize>,
    /// The request's denoising step (keys the random draws).
    pub step: u64,
    pub options: PredictOptions,
}

impl Query {
    fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        let cond = self
            .positions
            .iter()
            .map(|&p| self.cond_base + p - self.first);
        let uncond = self
            .uncond_base
            .into_iter()
            .flat_map(move |b| self.positions.iter().map(move |&p| b + p - self.first));
        cond.chain(uncond)
    }

    /// Every queried position lies in `first..first + fed` (checked before
    /// a stage computes rows from them).
    pub fn check(&self, fed: usize) -> bool {
        self.positions
            .iter()
            .all(|&p| p >= self.first && p - self.first < fed)
    }
}

/// One request of a step: the name of its K/V stores, its canvas and plan.
pub type StepRequest<'a> = (u64, &'a Canvas, &'a StepPlan);

/// The input of one forward pass for a set of requests: the fed ids of
/// every sequence, back to back, what each sequence feeds and does with its
/// K/V store, and what the head is asked.
#[derive(Clone, Debug, PartialEq)]
pub struct StepBatch {
    pub ids: Vec<u32>,
    pub seqs: Vec<Seq>,
    pub queries: Vec<Query>,
}

/// The store names of request `id`: its conditional sequence, and the
/// prompt-masked one under guidance.
pub fn cache_ids(id: u64) -> [u64; 2] {
    [2 * id, 2 * id + 1]
}

impl StepBatch {
    fn empty() -> Self {
        StepBatch {
            ids: Vec::new(),
            seqs: Vec::new(),
            queries: Vec::new(),
        }
    }

    /// The step of each request, as its plan says.
    pub fn new(requests: &[StepRequest<'_>]) -> Self {
        let mut batch = Self::empty();
        for &(id, canvas, plan) in requests {
            let [cond, uncond] = cache_ids(id);
            let cond_base = batch.push(canvas.tokens(), plan, cond);
            let uncond_base = canvas
                .unconditional()
                .map(|un| batch.push(&un, plan, uncond));
            batch.queries.push(Query {
                cond_base,
                uncond_base,
                first: plan.fed.start,
                positions: plan.positions.clone(),
                step: plan.step as u64,
                options: canvas.predict_options(),
            });
        }
        batch
    }

    /// A full forward that rebuilds the K/V stores of each request's
    /// current block, exactly as its block's first forward made them (from
    /// `Canvas::block_start_tokens`); nothing is predicted. Requests whose
    /// next step reads no store are left out.
    pub fn rebuild(requests: &[(u64, &Canvas)]) -> Self {
        let mut batch = Self::empty();
        for &(id, canvas) in requests {
            let Some(tokens) = canvas.block_start_tokens() else {
                continue;
            };
            let store = |len| StepPlan {
                step: 0,
                transfer: 0,
                positions: Vec::new(),
                fed: 0..len,
                kv: KvUse::Store,
            };
            let [cond, uncond] = cache_ids(id);
            batch.push(tokens, &store(tokens.len()), cond);
            if let Some(un) = canvas.block_start_unconditional() {
                batch.push(&un, &store(un.len()), uncond);
            }
        }
        batch
    }

    fn push(&mut self, seq: &[u32], plan: &StepPlan, cache: u64) -> usize {
        let at = self.ids.len();
        self.ids.extend_from_slice(&seq[plan.fed.clone()]);
        self.seqs.push(Seq {
            fed: plan.fed.clone(),
            len: seq.len(),
            kv: plan.kv,
            cache,
        });
        at
    }

    /// The rows fed per sequence.
    pub fn fed_lengths(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.fed.len()).collect()
    }
}

/// The rows the head must compute for `queries`, in the order
/// `predict_queries` expects their logits.
pub fn query_rows(queries: &[Query]) -> Vec<usize> {
    queries.iter().flat_map(Query::rows).collect()
}

/// `f(query, j, cond row, prompt-masked row, flat index)` for every queried
/// position of `queries`, in parallel, over one slice's logits of
/// `query_rows(queries)`; the flat index counts positions in query order.
fn per_position<T: Send>(
    logits: &[f32],
    width: usize,
    queries: &[Query],
    f: impl Fn(&Query, usize, &[f32], Option<&[f32]>, usize, &mut Vec<f32>) -> T + Sync,
) -> Vec<Vec<T>> {
    let row = |i: usize| &logits[i * width..(i + 1) * width];
    let (mut first, mut flat) = (0, 0);
    queries
        .iter()
        .map(|q| {
            let n = q.positions.len();
            let (start, base) = (first, flat);
            first += if q.uncond_base.is_some() { 2 * n } else { n };
            flat += n;
            (0..n)
                .into_par_iter()
                .map_init(Vec::new, |scratch, j| {
                    let un = q.uncond_base.map(|_| row(start + n + j));
                    f(q, j, row(start + j), un, base + j, scratch)
                })
                .collect()
        })
        .collect()
}

/// Partials of one vocabulary slice for every queried position, from that
/// slice's logits of `query_rows(queries)`; `floors` as
/// `Backend::head_partials` takes them.
pub fn partial_queries(
    logits: &[f32],
    vocab: std::ops::Range<usize>,
    queries: &[Query],
    floors: &[u32],
) -> Vec<Vec<Partial>> {
    per_position(
        logits,
        vocab.len(),
        queries,
        |q, j, cond, un, i, scratch| {
            let floor = floors.get(i).copied().unwrap_or(0);
            let pos = q.positions[j] as u64;
            predict_partial(
                cond,
                un,
                vocab.start,
                &q.options,
                q.step,
                pos,
                floor,
                scratch,
            )
        },
    )
}

/// One select round's histograms of one vocabulary slice (flat, one per
/// queried position in query order; empty for positions without a round).
pub fn histogram_queries(
    logits: &[f32],
    vocab: std::ops::Range<usize>,
    queries: &[Query],
    rounds: &[Option<Round>],
) -> Vec<Bins> {
    per_position(
        logits,
        vocab.len(),
        queries,
        |q, _, cond, un, i, scratch| {
            let mut bins = Bins::default();
            if let Some(round) = rounds.get(i).copied().flatten() {
                guided_logits(cond, un, vocab.start, &q.options, scratch);
                round.histogram(scratch, &mut bins);
            }
            bins
        },
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Whether some query truncates its draw (the head then runs the select's
/// rounds: `truncated_predictions`).
pub fn truncates(queries: &[Query]) -> bool {
    queries.iter().any(|q| q.options.truncates())
}

/// The select of every queried position (flat, in query order) from the
/// ranks' untruncated partials, which give each row's largest logit.
pub fn selects(per_rank: &[Vec<Vec<Partial>>], queries: &[Query]) -> Vec<Option<Select>> {
    queries
        .iter()
        .enumerate()
        .flat_map(|(qi, q)| {
            (0..q.positions.len()).map(move |j| {
                let max = per_rank
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, r| m.max(r[qi][j].max));
                Select::new(&q.options, max)
            })
        })
        .collect()
}

/// Runs the selects to their thresholds: `round(rounds)` gives each rank's
/// histograms of one round (flat, per position); returns each position's
/// threshold key (0: untruncated). At most eight rounds.
pub fn run_selects(
    mut selects: Vec<Option<Select>>,
    mut round: impl FnMut(&[Option<Round>]) -> Vec<Vec<Bins>>,
) -> Vec<u32> {
    loop {
        let rounds: Vec<Option<Round>> = selects
            .iter()
            .map(|s| s.as_ref().and_then(Select::round))
            .collect();
        if rounds.iter().all(Option::is_none) {
            break;
        }
        let per_rank = round(&rounds);
        for (i, select) in selects.iter_mut().enumerate() {
            if let Some(s) = select.as_mut().filter(|_| rounds[i].is_some()) {
                let mut bins = Bins::default();
                for r in &per_rank {
                    bins.add(&r[i]);
                }
                s.update(&bins);
            }
        }
    }
    selects
        .iter()
        .map(|s| s.as_ref().and_then(Select::threshold).unwrap_or(0))
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
