//! The model, or one pipeline stage of it, in this process: one engine type
//! for every tensor-parallel world size (1 included) and every place in a
//! pipeline. `forward` is the one step path: the whole model in process and
//! every stage of a cluster run it. It runs every rank at once (they meet in
//! the all-reduces); on the last stage each rank reduces its vocabulary
//! slice to one `Partial` per queried position (on the device for CUDA) and
//! the partials are combined: full logits are never assembled. The engine
//! also holds the K/V stores of its layers (`kv`), per rank its own heads.
//! The ranks are thread ranks of the CPU backend (`load`) or any backends
//! that already know their place in a group (`from_backends`: NCCL ranks,
//! one per GPU).

use crate::backend::{Backend, Packing};
use crate::collective::thread_group;
use crate::cpu::CpuBackend;
use crate::kv::{Feed, KvError, KvStore, Seq};
use crate::llada::{Llada, Shard};
use crate::query::{
    Query, StepBatch, StepRequest, combine_ranks, query_rows, run_selects, selects, truncates,
};
use remask_model::{Checkpoint, LladaConfig, Result, SpecialTokens};
use remask_sampler::{KvUse, Partial, Prediction, TokenSpace};
use std::sync::Mutex;

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

/// What a stage starts from: token ids (the first stage) or the previous
/// stage's hidden states (`[fed rows, d_model]`).
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    Ids(&'a [u32]),
    Hidden(&'a [f32]),
}

/// What a stage gives: hidden states for the next, or on the last stage one
/// prediction per queried position.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOutput {
    Hidden(Vec<f32>),
    Predictions(Vec<Vec<Prediction>>),
}

/// The K/V stores an engine holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Sequences with a store.
    pub caches: usize,
    pub bytes: usize,
}

/// The model (or one pipeline stage of it) over a group of ranks.
pub struct Engine<B: Backend = CpuBackend> {
    ranks: Vec<(B, Llada<B>)>,
    /// One store per rank, locked for a whole forward pass (a release waits
    /// for the step to end).
    kv: Mutex<Vec<KvStore<B>>>,
    /// Bytes the stores may take at most (all ranks); `None`: unbounded.
    kv_budget: Option<usize>,
}

impl Engine<CpuBackend> {
    /// The whole model on `world` CPU thread ranks (1: no tensor parallelism).
    pub fn load(ckpt: &Checkpoint, world: usize) -> Result<Self> {
        Self::load_shard(ckpt, Shard::full(&ckpt.config), world)
    }

    /// One pipeline stage split over `world` ranks: stages and
    /// tensor-parallel groups combine.
    pub fn load_shard(ckpt: &Checkpoint, shard: Shard, world: usize) -> Result<Self> {
        if world <= 1 {
            return Self::from_backends(vec![CpuBackend::default()], ckpt, shard);
        }
        let backends = thread_group(world)
            .into_iter()
            .map(|rank| CpuBackend::with_collective(std::sync::Arc::new(rank)))
            .collect();
        Self::from_backends(backends, ckpt, shard)
    }
}

impl<B: Backend> Engine<B> {
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
        let kv = Mutex::new(ranks.iter().map(|_| KvStore::default()).collect());
        Ok(Engine {
            ranks,
            kv,
            kv_budget: None,
        })
    }

    /// Bounds the bytes the K/V stores may take: a step that would store
    /// more fails with `KvError::Full` (the coordinator admits requests
    /// within the budget, so a request waits for room rather than evicting
    /// another's store).
    pub fn with_kv_budget(mut self, bytes: Option<usize>) -> Self {
        self.kv_budget = bytes;
        self
    }

    pub fn kv_budget(&self) -> Option<usize> {
        self.kv_budget
    }

    /// K/V bytes of one position of one sequence over every rank.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.ranks
            .iter()
            .map(|(_, m)| m.kv_bytes_per_position())
            .sum()
    }

    pub fn shard(&self) -> &Shard {
        &self.ranks[0].1.shard
    }

    pub fn config(&self) -> &LladaConfig {
        &self.ranks[0].1.config
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Runs `f` on every rank at once, one thread each (not rayon workers:
    /// a rank waiting in an all-reduce must not hold a worker the others need;
    /// NCCL likewise needs every rank's call in flight at once), with each
    /// rank's own input. A group of one runs on the caller's thread.
    fn on_ranks_each<I: Send, T: Send>(
        &self,
        inputs: Vec<I>,
        f: impl Fn(&B, &Llada<B>, I) -> T + Sync,
    ) -> Vec<T> {
        assert_eq!(inputs.len(), self.ranks.len(), "one input per rank");
        if let [(backend, model)] = &self.ranks[..] {
            let input = inputs.into_iter().next().expect("one rank");
            return vec![f(backend, model, input)];
        }
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter()
                .zip(inputs)
                .map(|((backend, model), input)| s.spawn(move || f(backend, model, input)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked"))
                .collect()
        })
    }

    /// `f` on every rank at once (see `on_ranks_each`).
    pub fn on_ranks<T: Send>(&self, f: impl Fn(&B, &Llada<B>) -> T + Sync) -> Vec<T> {
        self.on_ranks_each(vec![(); self.ranks.len()], |b, m, ()| f(b, m))
    }

    /// Full logits (for tests, `remask forward` and `bench`): the ranks'
    /// vocabulary slices side by side.
    pub fn logits(&self, ids: &[u32], packing: &Packing, rows: Option<&[usize]>) -> Vec<f32> {
        let mut slices = self.on_ranks(|b, m| (m.vocab.clone(), m.logits(b, ids, packing, rows)));
        if slices.len() == 1 {
            return slices.pop().expect("one rank").1;
        }
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

    /// One forward pass of this engine's layers over the fed rows of
    /// `seqs`, reading and writing their K/V stores as each says. The
    /// caller has checked the shapes (`input` holds one row per fed
    /// position, every query inside its sequence's fed rows); the stores are
    /// checked here, before any rank starts.
    pub fn forward(
        &self,
        seqs: &[Seq],
        input: StageInput<'_>,
        queries: &[Query],
    ) -> std::result::Result<StageOutput, KvError> {
        let mut stores = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        // Every rank holds the same names: rank 0's decide for all.
        for id in stores[0].idle(crate::kv::IDLE_LIMIT) {
            stores.iter_mut().for_each(|s| {
                s.remove(id);
            });
        }
        self.check_stores(&stores[0], seqs)?;
        let feeds: Vec<Feed<B>> = stores.iter_mut().map(|s| s.feed(seqs)).collect();
        let rows = query_rows(queries);
        // A truncated draw needs the logits again for the select's rounds.
        let keep_logits = truncates(queries);
        let d_model = self.config().d_model;
        let outputs = self.on_ranks_each(feeds, |backend, model, mut feed| {
            let x = match input {
                StageInput::Ids(ids) => model.embed(backend, ids),
                StageInput::Hidden(h) => backend.load_hidden(h, h.len() / d_model, d_model),
            };
            let x = model.layers(backend, x, &mut feed);
            let out = if !model.shard.head {
                // Every rank holds the same hidden states after the last
                // all-reduce: rank 0's are the stage's (not worth a copy off
                // the GPU for the others).
                let first = backend.rank_world().0 == 0;
                RankOutput::Hidden(if first {
                    backend.to_host(x)
                } else {
                    Vec::new()
                })
            } else if rows.is_empty() {
                RankOutput::Partials(queries.iter().map(|_| Vec::new()).collect(), None)
            } else {
                let logits = model.head_logits(backend, &x, Some(&rows));
                let partials = backend.head_partials(&logits, model.vocab.clone(), queries, &[]);
                RankOutput::Partials(partials, keep_logits.then_some(logits))
            };
            (out, feed)
        });
        let mut partials = Vec::with_capacity(outputs.len());
        let mut logits = Vec::with_capacity(outputs.len());
        let mut hidden = None;
        for (store, (out, feed)) in stores.iter_mut().zip(outputs) {
            store.finish(feed);
            match out {
                RankOutput::Hidden(h) => {
                    hidden.get_or_insert(h);
                }
                RankOutput::Partials(p, l) => {
                    partials.push(p);
                    logits.extend(l);
                }
            }
        }
        if let Some(h) = hidden {
            return Ok(StageOutput::Hidden(h));
        }
        if logits.len() == self.ranks.len() {
            partials = self.truncated_partials(&partials, logits, queries);
        }
        Ok(StageOutput::Predictions(combine_ranks(&partials, queries)))
    }

    /// The partials of a step with truncated draws: the select's rounds
    /// (each rank histograms its slice of the kept logits, the engine sums
    /// and decides) find every truncated position's threshold, then each
    /// rank reduces again with the thresholds. A few numbers per position
    /// and round leave a rank, never its logits.
    fn truncated_partials(
        &self,
        untruncated: &[Vec<Vec<Partial>>],
        logits: Vec<B::Tensor>,
        queries: &[Query],
    ) -> Vec<Vec<Vec<Partial>>> {
        let mut logits = logits;
        let floors = run_selects(selects(untruncated, queries), |rounds| {
            let kept = std::mem::take(&mut logits);
            let (bins, back): (Vec<_>, Vec<_>) = self
                .on_ranks_each(kept, |b, m, l| {
                    (b.head_histograms(&l, m.vocab.clone(), queries, rounds), l)
                })
                .into_iter()
                .unzip();
            logits = back;
            bins
        });
        self.on_ranks_each(logits, |b, m, l| {
            b.head_partials(&l, m.vocab.clone(), queries, &floors)
        })
    }

    /// No store is read twice, the stores `seqs` read are held with their
    /// length, and what they store fits the budget.
    fn check_stores(&self, store: &KvStore<B>, seqs: &[Seq]) -> std::result::Result<(), KvError> {
        // A store is taken out for the pass that reads it: a second reader
        // would find it gone (a panic a fuzzed Forward found). Every
        // sequence of a request names a store of its own.
        let mut read = std::collections::HashSet::new();
        for (index, s) in seqs.iter().enumerate() {
            if s.kv == KvUse::Read && !read.insert(s.cache) {
                return Err(KvError::BadSeq {
                    index,
                    reason: format!(
                        "reads K/V cache {}, which an earlier sequence of the pass reads",
                        s.cache
                    ),
                });
            }
        }
        let missing: Vec<u64> = seqs
            .iter()
            .filter(|s| s.kv == KvUse::Read && store.holds(s.cache).is_none())
            .map(|s| s.cache)
            .collect();
        if !missing.is_empty() {
            return Err(KvError::Missing(missing));
        }
        for s in seqs.iter().filter(|s| s.kv == KvUse::Read) {
            let held = store.holds(s.cache).expect("checked");
            if held != s.len {
                return Err(KvError::LengthMismatch {
                    cache: s.cache,
                    held,
                    len: s.len,
                });
            }
        }
        if let Some(budget) = self.kv_budget {
            let per = self.kv_bytes_per_position();
            let used = store.positions() * per;
            let mut seen = std::collections::HashSet::new();
            let new: usize = seqs
                .iter()
                .filter(|s| s.kv == KvUse::Store && seen.insert(s.cache))
                .map(|s| s.len.saturating_sub(store.holds(s.cache).unwrap_or(0)))
                .sum();
            let needed = new * per;
            if used + needed > budget {
                return Err(KvError::Full {
                    needed,
                    used,
                    budget,
                });
            }
        }
        Ok(())
    }

    /// Drops the stores of `caches` (a request finished, was cancelled or
    /// expired); returns how many were held.
    pub fn release(&self, caches: &[u64]) -> usize {
        let mut stores = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = 0;
        for (r, store) in stores.iter_mut().enumerate() {
            for &c in caches {
                if store.remove(c) && r == 0 {
                    held += 1;
                }
            }
        }
        held
    }

    /// Drops every store (a new assignment).
    pub fn clear_caches(&self) {
        let mut stores = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        stores.iter_mut().for_each(KvStore::clear);
    }

    pub fn cache_usage(&self) -> CacheUsage {
        let stores = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        CacheUsage {
            caches: stores[0].len(),
            bytes: stores[0].positions() * self.kv_bytes_per_position(),
        }
    }

    /// One step of the whole model (this engine must hold every layer).
    pub fn run(&self, batch: &StepBatch) -> std::result::Result<Vec<Vec<Prediction>>, KvError> {
        match self.forward(&batch.seqs, StageInput::Ids(&batch.ids), &batch.queries)? {
            StageOutput::Predictions(p) => Ok(p),
            StageOutput::Hidden(_) => panic!("Engine::run needs the whole model"),
        }
    }

    /// Predictions for every planned position of every request.
    pub fn predict(
        &self,
        requests: &[StepRequest<'_>],
    ) -> std::result::Result<Vec<Vec<Prediction>>, KvError> {
        self.run(&StepBatch::new(requests))
    }
}

/// What one rank returns: the stage's hidden states, or its partials of the
/// head (its vocabulary slice) on the last stage.
enum RankOutput<T> {
    Hidden(Vec<f32>),
    /// With the logits when the step truncates draws.
    Partials(Vec<Vec<Partial>>, Option<T>),
}
