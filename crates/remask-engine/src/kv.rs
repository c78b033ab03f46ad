//! K/V stores of the prefix and dual caches (Fast-dLLM's approximation).
//!
//! A request's first forward of a block stores every layer's keys and
//! values (after RoPE: positions are absolute, so these are the numbers a
//! later step would compute for an unchanged canvas). Its later steps of
//! the block feed fewer positions (`Seq::fed`); at each layer the keys and
//! values of the other positions come from the store, the fed ones are
//! fresh, and the fresh ones are not written back: the store is only
//! rebuilt by the next block's first forward.
//!
//! The store lives where the layers are: one per engine (a pipeline stage
//! or the whole model), holding for each rank its own heads. `Feed` is what
//! one forward pass sees of it.

use crate::backend::{Backend, Packing};
use remask_sampler::KvUse;
use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A store no step has used for this long is dropped: its request is gone
/// without a release (a lost message, a coordinator that restarted). A
/// request that is still running only costs a rebuild (a full forward from
/// its canvas) if it comes back.
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);

/// One packed sequence of a forward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq {
    /// The canvas positions fed, in order: the sequence's rows of the batch.
    pub fed: Range<usize>,
    /// The whole sequence's length: the keys its queries attend to.
    pub len: usize,
    pub kv: KvUse,
    /// Names the sequence's store (a request's conditional and guidance
    /// sequences have two).
    pub cache: u64,
}

impl Seq {
    /// A full forward over `len` positions, nothing stored.
    pub fn full(len: usize) -> Self {
        Seq {
            fed: 0..len,
            len,
            kv: KvUse::None,
            cache: 0,
        }
    }
}

/// Why a forward pass that reads or writes stores cannot run. Checked
/// before any rank starts, so that no rank is left waiting in a collective.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The stores were lost (a restart, a new assignment) or never made
    /// here: the owner of the canvas rebuilds them with a full forward.
    #[error(
        "K/V cache {} not held by this stage (lost to a restart or a new assignment, or \
         released): rebuild with a full forward",
        list(.0)
    )]
    Missing(Vec<u64>),
    #[error("K/V cache {cache} holds {held} positions, the step reads {len}")]
    LengthMismatch { cache: u64, held: usize, len: usize },
    #[error("K/V caches need {needed} more bytes; {used} of the budget of {budget} are in use")]
    Full {
        needed: usize,
        used: usize,
        budget: usize,
    },
    #[error("sequence {index}: {reason}")]
    BadSeq { index: usize, reason: String },
}

fn list(ids: &[u64]) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Seq {
    /// The sequence's shape is consistent with its use.
    pub fn check(&self, index: usize) -> Result<(), KvError> {
        let bad = |reason: String| Err(KvError::BadSeq { index, reason });
        if self.fed.start > self.fed.end || self.fed.end > self.len {
            return bad(format!(
                "fed positions {:?} are not inside its {} positions",
                self.fed, self.len
            ));
        }
        if self.kv != KvUse::Read && self.fed != (0..self.len) {
            return bad("a full forward feeds every position".into());
        }
        if self.fed.is_empty() {
            return bad("feeds no position".into());
        }
        Ok(())
    }
}

/// Keys and values of every layer of one sequence, for one rank.
pub struct KvCache<B: Backend> {
    len: usize,
    layers: Vec<(B::Tensor, B::Tensor)>,
    used: Instant,
}

/// One rank's stores.
pub struct KvStore<B: Backend> {
    caches: HashMap<u64, KvCache<B>>,
}

impl<B: Backend> Default for KvStore<B> {
    fn default() -> Self {
        KvStore {
            caches: HashMap::new(),
        }
    }
}

impl<B: Backend> KvStore<B> {
    pub fn len(&self) -> usize {
        self.caches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    pub fn holds(&self, cache: u64) -> Option<usize> {
        self.caches.get(&cache).map(|c| c.len)
    }

    pub fn remove(&mut self, cache: u64) -> bool {
        self.caches.remove(&cache).is_some()
    }

    pub fn clear(&mut self) {
        self.caches.clear();
    }

    /// The stores idle for longer than `limit`.
    pub fn idle(&self, limit: Duration) -> Vec<u64> {
        self.caches
            .iter()
            .filter(|(_, c)| c.used.elapsed() > limit)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Positions held, over all stores (bytes = this x `bytes_per_position`).
    pub fn positions(&self) -> usize {
        self.caches.values().map(|c| c.len).sum()
    }

    /// The step's view of the stores of `seqs` (already checked against
    /// them): the read ones are taken out for the step, `finish` puts them
    /// back with the new ones.
    pub fn feed(&mut self, seqs: &[Seq]) -> Feed<B> {
        let kv = seqs
            .iter()
            .map(|s| match s.kv {
                KvUse::None => SeqKv::Fresh,
                KvUse::Store => SeqKv::Store(Vec::new()),
                KvUse::Read => SeqKv::Read(self.caches.remove(&s.cache).expect("checked")),
            })
            .collect();
        Feed::new(seqs, kv)
    }

    /// Keeps what a step stored and gives back what it read.
    pub fn finish(&mut self, feed: Feed<B>) {
        for (seq, kv) in feed.seqs.into_iter().zip(feed.kv) {
            match kv {
                SeqKv::Fresh => {}
                SeqKv::Store(layers) => {
                    self.caches.insert(
                        seq.cache,
                        KvCache {
                            len: seq.len,
                            layers,
                            used: Instant::now(),
                        },
                    );
                }
                SeqKv::Read(mut cache) => {
                    cache.used = Instant::now();
                    self.caches.insert(seq.cache, cache);
                }
            }
        }
    }
}

/// What one sequence of a step does with its store.
pub enum SeqKv<B: Backend> {
    Fresh,
    /// Collects every layer's K and V.
    Store(Vec<(B::Tensor, B::Tensor)>),
    Read(KvCache<B>),
}

/// What one forward pass feeds: the fed rows packed per sequence, their
/// absolute positions, and per sequence what happens with its K/V.
pub struct Feed<B: Backend> {
    seqs: Vec<Seq>,
    kv: Vec<SeqKv<B>>,
    /// The fed rows, per sequence (the queries).
    pub packing: Packing,
    /// The keys each sequence's queries attend to.
    pub keys: Packing,
    /// Absolute position of every fed row (RoPE).
    pub positions: Vec<u32>,
}

impl<B: Backend> Feed<B> {
    fn new(seqs: &[Seq], kv: Vec<SeqKv<B>>) -> Self {
        let packing = Packing::new(seqs.iter().map(|s| s.fed.len()));
        let keys = Packing::new(seqs.iter().map(|s| match s.kv {
            KvUse::Read => s.len,
            _ => s.fed.len(),
        }));
        let positions = seqs
            .iter()
            .flat_map(|s| s.fed.clone().map(|p| p as u32))
            .collect();
        Feed {
            seqs: seqs.to_vec(),
            kv,
            packing,
            keys,
            positions,
        }
    }

    /// A full forward of sequences without stores.
    pub fn plain(lengths: impl IntoIterator<Item = usize>) -> Self {
        let seqs: Vec<Seq> = lengths.into_iter().map(Seq::full).collect();
        let kv = seqs.iter().map(|_| SeqKv::Fresh).collect();
        Feed::new(&seqs, kv)
    }

    /// The keys and values layer `layer` attends to, from its fresh `k`
    /// and `v` (rows = the fed rows): stores them for the sequences that
    /// store; `None` when no sequence reads (attend to `k`, `v` as they are).
    pub fn keys_values(
        &mut self,
        backend: &B,
        layer: usize,
        k: &B::Tensor,
        v: &B::Tensor,
    ) -> Option<(B::Tensor, B::Tensor)> {
        let mut reads = false;
        for (rows, kv) in self.packing.sequences().zip(&mut self.kv) {
            match kv {
                SeqKv::Store(layers) => layers.push((
                    backend.concat_rows(&[(k, rows.clone())]),
                    backend.concat_rows(&[(v, rows)]),
                )),
                SeqKv::Read(_) => reads = true,
                SeqKv::Fresh => {}
            }
        }
        if !reads {
            return None;
        }
        let mut kp = Vec::new();
        let mut vp = Vec::new();
        for ((rows, kv), seq) in self.packing.sequences().zip(&self.kv).zip(&self.seqs) {
            if let SeqKv::Read(cache) = kv {
                let (ck, cv) = &cache.layers[layer];
                kp.push((ck, 0..seq.fed.start));
                vp.push((cv, 0..seq.fed.start));
                kp.push((k, rows.clone()));
                vp.push((v, rows));
                kp.push((ck, seq.fed.end..seq.len));
                vp.push((cv, seq.fed.end..seq.len));
            } else {
                kp.push((k, rows.clone()));
                vp.push((v, rows));
            }
        }
        kp.retain(|(_, r)| !r.is_empty());
        vp.retain(|(_, r)| !r.is_empty());
        Some((backend.concat_rows(&kp), backend.concat_rows(&vp)))
    }
}
