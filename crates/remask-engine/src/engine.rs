//! The whole model in this process: one engine type for every
//! tensor-parallel world size (1 included). A step runs every rank at once
//! (they meet in the all-reduces), each reduces its vocabulary slice to one
//! `Partial` per queried position through `Llada::partials` (on the device
//! for CUDA), and the partials are combined: full logits are never
//! assembled. The ranks are thread ranks of the CPU backend (`load`) or any
//! backends that already know their place in a group (`from_backends`:
//! NCCL ranks, one per GPU).

use crate::backend::{Backend, Packing};
use crate::collective::thread_group;
use crate::cpu::CpuBackend;
use crate::llada::{Llada, Shard};
use crate::query::{StepBatch, combine_ranks};
use remask_model::{Checkpoint, LladaConfig, Result, SpecialTokens};
use remask_sampler::{Canvas, Prediction, StepPlan, TokenSpace};

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

/// The model (or one pipeline stage of it) over a group of ranks.
pub struct Engine<B: Backend = CpuBackend> {
    ranks: Vec<(B, Llada<B>)>,
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
        Ok(Engine { ranks })
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
    /// NCCL likewise needs every rank's call in flight at once). A group of
    /// one runs on the caller's thread.
    pub fn on_ranks<T: Send>(&self, f: impl Fn(&B, &Llada<B>) -> T + Sync) -> Vec<T> {
        if let [(backend, model)] = &self.ranks[..] {
            return vec![f(backend, model)];
        }
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

    /// One step: each rank runs `Llada::partials`, which reduces its slice of
    /// the head through `head_partials` (on the host for the CPU, on the
    /// device for CUDA).
    pub fn run(&self, batch: &StepBatch) -> Vec<Vec<Prediction>> {
        let packing = batch.packing();
        let per_rank = self.on_ranks(|b, m| m.partials(b, &batch.ids, &packing, &batch.queries));
        combine_ranks(&per_rank, &batch.queries)
    }

    /// Predictions for every planned position of every request.
    pub fn predict(&self, requests: &[(&Canvas, &StepPlan)]) -> Vec<Vec<Prediction>> {
        self.run(&StepBatch::new(requests))
    }
}
