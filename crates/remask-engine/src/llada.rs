//! The LLaDA transformer (block_type "llama"), written once over `Backend`.
//! Field names mirror the checkpoint's tensor names, so this file reads
//! side by side with docs/LLADA.md:
//!
//! ```text
//! x = wte[ids]
//! per block:  h = attn_norm(x);  x += attn_out(Attn(rope(q_proj h), rope(k_proj h), v_proj h))
//!             h = ff_norm(x);    x += ff_out(silu(ff_proj h) * up_proj h)
//! logits = ff_out_head(ln_f(x))          (wte when weight_tying)
//! ```
//! Attention is bidirectional: there is no causal mask.

use crate::backend::{Backend, Heads, Packing};
use crate::kv::Feed;
use remask_model::{Checkpoint, LladaConfig, Result, TensorRef, WeightSource};
use std::ops::Range;

/// The part of the model one process holds: a contiguous range of layers,
/// plus the embedding on the first stage and the head on the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub layers: Range<usize>,
    pub embedding: bool,
    pub head: bool,
}

impl Shard {
    pub fn full(config: &LladaConfig) -> Self {
        Shard {
            layers: 0..config.n_layers,
            embedding: true,
            head: true,
        }
    }
}

pub struct Block<B: Backend> {
    attn_norm: B::Weight,
    q_proj: B::Weight,
    k_proj: B::Weight,
    v_proj: B::Weight,
    attn_out: B::Weight,
    ff_norm: B::Weight,
    ff_proj: B::Weight,
    up_proj: B::Weight,
    ff_out: B::Weight,
}

pub struct Llada<B: Backend> {
    pub config: LladaConfig,
    pub shard: Shard,
    wte: Option<B::Weight>,
    blocks: Vec<Block<B>>,
    ln_f: Option<B::Weight>,
    /// `model.transformer.ff_out`, or a second copy of `wte` when tied; under
    /// tensor parallelism only this rank's rows (`vocab`).
    head: Option<B::Weight>,
    /// This rank's slice of the vocabulary (all of it without tensor parallelism).
    pub vocab: Range<usize>,
    /// This rank's attention heads.
    heads: Heads,
    rope_cos: B::Weight,
    rope_sin: B::Weight,
}

/// Under tensor parallelism a rank holds a block of each projection:
/// column-parallel (a slice of the output rows: q/k/v by heads, ff_proj and
/// up_proj by hidden units, the head by vocabulary) or row-parallel (a slice
/// of the input columns: attn_out, ff_out, whose partial outputs are then
/// summed over the ranks). `None` is the whole tensor. The backend receives
/// the block in the stored dtype (the CUDA backend keeps matrices in bf16),
/// or draws it itself for a generated checkpoint.
fn block<B: Backend>(
    backend: &B,
    source: WeightSource<'_>,
    part: Option<(Range<usize>, Range<usize>)>,
) -> Result<B::Weight> {
    match source {
        WeightSource::Generated(g) => {
            let (n_rows, n_cols) = g.rows_cols();
            let (rows, cols) = part.unwrap_or((0..n_rows, 0..n_cols));
            Ok(backend.generated_weight(&g, rows, cols))
        }
        WeightSource::Stored(t) => {
            let (n_rows, n_cols) = match t.shape {
                [n] => (1, *n),
                [r, c] => (*r, *c),
                _ => unreachable!("checked 1-D or 2-D"),
            };
            let Some((rows, cols)) = part.filter(|p| *p != (0..n_rows, 0..n_cols)) else {
                return backend.load_weight(t);
            };
            let size = t.dtype.size();
            let mut bytes = Vec::with_capacity(rows.len() * cols.len() * size);
            for r in rows.clone() {
                let start = (r * n_cols + cols.start) * size;
                bytes.extend_from_slice(&t.bytes[start..start + cols.len() * size]);
            }
            let shape = match t.shape.len() {
                1 => vec![cols.len()],
                _ => vec![rows.len(), cols.len()],
            };
            backend.load_weight(TensorRef {
                dtype: t.dtype,
                shape: &shape,
                bytes: &bytes,
            })
        }
    }
}

/// `n` split in `world` equal parts, or an error naming what does not divide.
fn part(what: &str, n: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    if !n.is_multiple_of(world) {
        return Err(remask_model::ModelError::Unsupported(format!(
            "tensor parallelism {world}: {what} ({n}) is not divisible by it"
        )));
    }
    let len = n / world;
    Ok(rank * len..(rank + 1) * len)
}

impl<B: Backend> Llada<B> {
    /// Loads the tensors of `shard` (and only those) from the checkpoint.
    pub fn load(backend: &B, ckpt: &Checkpoint, shard: Shard) -> Result<Self> {
        let c = ckpt.config.clone();
        let (d, hd, e) = (c.d_model, c.head_dim(), c.embedding_size());
        let kv = c.n_kv_heads() * hd;
        let mlp = c.mlp_hidden();
        let (rank, world) = backend.rank_world();
        let q_heads = part("n_heads", c.n_heads, rank, world)?;
        let kv_heads = part("n_kv_heads", c.n_kv_heads(), rank, world)?;
        let (q_rows, kv_rows) = (
            q_heads.start * hd..q_heads.end * hd,
            kv_heads.start * hd..kv_heads.end * hd,
        );
        let mlp_rows = part("mlp_hidden_size", mlp, rank, world)?;
        let vocab = part("embedding_size", e, rank, world)?;
        // A whole checked tensor, stored or generated.
        let w = |name: &str, shape: &[usize]| block(backend, ckpt.weight(name, shape)?, None);
        // A block of a checked tensor: rows x cols of it.
        let wb = |name: &str, shape: &[usize], rows: Range<usize>, cols: Range<usize>| {
            block(backend, ckpt.weight(name, shape)?, Some((rows, cols)))
        };
        let wte_name = "model.transformer.wte.weight";
        let wte = shard.embedding.then(|| w(wte_name, &[e, d])).transpose()?;
        let blocks = shard
            .layers
            .clone()
            .map(|i| {
                let p = |n: &str| format!("model.transformer.blocks.{i}.{n}.weight");
                Ok(Block {
                    attn_norm: w(&p("attn_norm"), &[d])?,
                    q_proj: wb(&p("q_proj"), &[d, d], q_rows.clone(), 0..d)?,
                    k_proj: wb(&p("k_proj"), &[kv, d], kv_rows.clone(), 0..d)?,
                    v_proj: wb(&p("v_proj"), &[kv, d], kv_rows.clone(), 0..d)?,
                    attn_out: wb(&p("attn_out"), &[d, d], 0..d, q_rows.clone())?,
                    ff_norm: w(&p("ff_norm"), &[d])?,
                    ff_proj: wb(&p("ff_proj"), &[mlp, d], mlp_rows.clone(), 0..d)?,
                    up_proj: wb(&p("up_proj"), &[mlp, d], mlp_rows.clone(), 0..d)?,
                    ff_out: wb(&p("ff_out"), &[d, mlp], 0..d, mlp_rows.clone())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (ln_f, head) = if shard.head {
            let head_name = if c.weight_tying {
                wte_name
            } else {
                "model.transformer.ff_out.weight"
            };
            (
                Some(w("model.transformer.ln_f.weight", &[d])?),
                Some(wb(head_name, &[e, d], vocab.clone(), 0..d)?),
            )
        } else {
            (None, None)
        };
        let (cos, sin) = rope_tables(c.max_sequence_length, hd, c.rope_theta);
        let heads = Heads {
            n_heads: q_heads.len(),
            n_kv_heads: kv_heads.len(),
            head_dim: hd,
        };
        Ok(Llada {
            vocab,
            heads,
            rope_cos: backend.upload(&cos, c.max_sequence_length, hd / 2),
            rope_sin: backend.upload(&sin, c.max_sequence_length, hd / 2),
            config: c,
            shard,
            wte,
            blocks,
            ln_f,
            head,
        })
    }

    /// Token ids to hidden states (first stage only).
    pub fn embed(&self, backend: &B, ids: &[u32]) -> B::Tensor {
        let wte = self.wte.as_ref().expect("this shard has no embedding");
        backend.embed(wte, ids)
    }

    /// Runs this shard's layers over the fed rows of packed sequences. With
    /// K/V stores (`feed`), a sequence's queries may be fewer than its keys:
    /// the others come from its store.
    pub fn layers(&self, backend: &B, mut x: B::Tensor, feed: &mut Feed<B>) -> B::Tensor {
        let heads = self.heads;
        let eps = self.config.rms_norm_eps as f32;
        let (cos, sin) = (&self.rope_cos, &self.rope_sin);
        for (i, b) in self.blocks.iter().enumerate() {
            let h = backend.rms_norm(&x, &b.attn_norm, eps);
            let mut q = backend.linear(&h, &b.q_proj);
            let mut k = backend.linear(&h, &b.k_proj);
            let v = backend.linear(&h, &b.v_proj);
            backend.rope(&mut q, heads.head_dim, &feed.positions, cos, sin);
            backend.rope(&mut k, heads.head_dim, &feed.positions, cos, sin);
            let a = match feed.keys_values(backend, i, &k, &v) {
                Some((k, v)) => backend.attention(&q, &k, &v, heads, &feed.packing, &feed.keys),
                None => backend.attention(&q, &k, &v, heads, &feed.packing, &feed.packing),
            };
            let mut o = backend.linear(&a, &b.attn_out);
            backend.all_reduce(&mut o);
            backend.add_assign(&mut x, &o);

            let h = backend.rms_norm(&x, &b.ff_norm, eps);
            let gate = backend.linear(&h, &b.ff_proj);
            let up = backend.linear(&h, &b.up_proj);
            let f = backend.silu_mul(&gate, &up);
            let mut o = backend.linear(&f, &b.ff_out);
            backend.all_reduce(&mut o);
            backend.add_assign(&mut x, &o);
        }
        x
    }

    /// Bytes of one position's keys and values over this shard's layers
    /// (this rank's heads, f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.blocks.len() * self.heads.n_kv_heads * self.heads.head_dim * 4
    }

    /// Logits of the given rows (all rows when `None`), `[rows, vocab.len()]`
    /// on the host (last stage only): the whole vocabulary, or this rank's
    /// slice of it under tensor parallelism. Only the rows asked for go through the
    /// head, which is most of the cost for short canvases and large vocabularies.
    pub fn head(&self, backend: &B, x: &B::Tensor, rows: Option<&[usize]>) -> Vec<f32> {
        backend.to_host(self.head_logits(backend, x, rows))
    }

    /// The same logits, left on the device (for a fused head reduction).
    pub fn head_logits(&self, backend: &B, x: &B::Tensor, rows: Option<&[usize]>) -> B::Tensor {
        let (ln_f, head) = match (&self.ln_f, &self.head) {
            (Some(n), Some(h)) => (n, h),
            _ => panic!("this shard has no head"),
        };
        let eps = self.config.rms_norm_eps as f32;
        let h = match rows {
            Some(rows) => backend.rms_norm(&backend.gather_rows(x, rows), ln_f, eps),
            None => backend.rms_norm(x, ln_f, eps),
        };
        backend.linear(&h, head)
    }

    /// The whole model on one shard: ids of packed sequences to logits.
    pub fn logits(
        &self,
        backend: &B,
        ids: &[u32],
        packing: &Packing,
        rows: Option<&[usize]>,
    ) -> Vec<f32> {
        let mut feed = Feed::plain(packing.sequences().map(|s| s.len()));
        let x = self.embed(backend, ids);
        let x = self.layers(backend, x, &mut feed);
        self.head(backend, &x, rows)
    }
}

/// `cos`/`sin` of `pos * inv_freq` for every position, in f32 as the
/// reference computes them: `inv_freq = 1 / theta^(arange(0, hd, 2) / hd)`.
fn rope_tables(max_positions: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let theta = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for pos in 0..max_positions {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}
