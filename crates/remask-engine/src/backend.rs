//! The operations the LLaDA forward pass needs, as a trait: the model is
//! written once (`llada.rs`) and each backend (CPU here; CUDA later)
//! implements these few kernels.

use remask_model::{DType, GeneratedTensor, Result, TensorRef};
use std::ops::Range;

/// Sequences packed back to back into one token dimension. Attention never
/// crosses a sequence boundary and positions restart at 0 in each sequence,
/// so sequences of different lengths share one forward pass without padding
/// and each gets exactly the result it would get alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Start of each sequence, then the total: `[0, len0, len0+len1, ...]`.
    pub offsets: Vec<usize>,
}

impl Packing {
    pub fn new(lengths: impl IntoIterator<Item = usize>) -> Self {
        let mut offsets = vec![0];
        for len in lengths {
            offsets.push(offsets.last().unwrap() + len);
        }
        Packing { offsets }
    }

    pub fn tokens(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    pub fn sequences(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.offsets.windows(2).map(|w| w[0]..w[1])
    }

    /// Position of every token within its own sequence.
    pub fn positions(&self) -> Vec<u32> {
        self.sequences().flat_map(|r| 0..r.len() as u32).collect()
    }
}

/// Head layout of the attention inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `Backend::generated_weight`'s default: drawn on the host, loaded as bf16.
pub fn generated_on_host<B: Backend + ?Sized>(
    backend: &B,
    t: &GeneratedTensor,
    rows: Range<usize>,
    cols: Range<usize>,
) -> B::Weight {
    let shape = match t.shape.len() {
        1 => vec![cols.len()],
        _ => vec![rows.len(), cols.len()],
    };
    let bytes = t.bf16_bytes(rows, cols);
    backend
        .load_weight(TensorRef {
            dtype: DType::BF16,
            shape: &shape,
            bytes: &bytes,
        })
        .expect("every backend loads bf16")
}

/// Kernels of the forward pass. Activations are matrices of `rows` tokens by
/// `cols` features; weights are stored `[out, in]` as in the checkpoint.
pub trait Backend: Send + Sync {
    /// An activation matrix on the device.
    type Tensor: Send;
    /// A weight (matrix or vector) on the device.
    type Weight: Send + Sync;

    /// Uploads a checkpoint tensor (any stored dtype).
    fn load_weight(&self, tensor: TensorRef<'_>) -> Result<Self::Weight>;
    /// The block `rows` x `cols` of a generated tensor (`model init
    /// --on-device-weights`): element (r, c) of the whole tensor has index
    /// `r * columns + c`, so a tensor-parallel rank's block holds the same
    /// values as those elements of the whole. A vector `[n]` is one row
    /// (`rows` = 0..1) and gives a vector `[cols.len()]`. The default draws
    /// the values on the host, rounds them to bf16 as the file `model init
    /// --dtype bf16` holds them, and goes through `load_weight`, so results
    /// are those of loading that file; a GPU backend draws them on the device.
    fn generated_weight(
        &self,
        t: &GeneratedTensor,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Self::Weight {
        generated_on_host(self, t, rows, cols)
    }
    /// Uploads f32 values computed on the host (e.g. RoPE tables).
    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Self::Weight;

    /// Rows `ids` of `table`.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Self::Tensor;
    /// `x * rsqrt(mean(x^2) + eps) * weight`, per row, in f32.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `x W^T` for `W` stored `[out, in]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Self::Tensor;
    /// Rotate-half RoPE in place on every head of `x`; `cos`/`sin` are
    /// `[max_positions, head_dim / 2]` tables.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        cos: &Self::Weight,
        sin: &Self::Weight,
    );
    /// Bidirectional attention within each packed sequence, grouped KV
    /// heads: the rows of sequence i of `q` (by `queries`) attend to every
    /// row of sequence i of `k`/`v` (by `keys`). The two packings are the
    /// same for a full forward; with a K/V cache a sequence feeds fewer
    /// queries than it has keys.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: Heads,
        queries: &Packing,
        keys: &Packing,
    ) -> Self::Tensor;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// The given rows of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// Row ranges of tensors of one width, one after the other (the K/V of
    /// a cached step: stored rows around fresh ones).
    fn concat_rows(&self, pieces: &[(&Self::Tensor, Range<usize>)]) -> Self::Tensor;
    /// Moves to the host as row-major f32.
    fn to_host(&self, x: Self::Tensor) -> Vec<f32>;
    /// Reads on the host as row-major f32, leaving `x` where it is (the
    /// head's logits stay for the rounds of a truncated draw).
    fn read_host<'a>(&self, x: &'a Self::Tensor) -> std::borrow::Cow<'a, [f32]>;
    /// (rank, world size) of this backend's tensor-parallel group; (0, 1)
    /// without tensor parallelism.
    fn rank_world(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Sums `x` over the tensor-parallel group (after the row-parallel
    /// projections); nothing to do without tensor parallelism.
    fn all_reduce(&self, _x: &mut Self::Tensor) {}
    /// The head's partials for the queried rows of `logits` (the rows of
    /// `query_rows(queries)`, over the vocabulary slice `vocab`); the draw
    /// of queried position `i` (in query order) keeps the keys at least
    /// `floors[i]` (a truncated draw's threshold; empty: every token). The
    /// default reduces on the host; a GPU backend reduces on the device so
    /// that full logits never leave it.
    fn head_partials(
        &self,
        logits: &Self::Tensor,
        vocab: std::ops::Range<usize>,
        queries: &[crate::query::Query],
        floors: &[u32],
    ) -> Vec<Vec<remask_sampler::Partial>> {
        crate::query::partial_queries(&self.read_host(logits), vocab, queries, floors)
    }
    /// One round of the truncation's select (`remask_sampler::truncate`):
    /// the histogram of this vocabulary slice for each queried position that
    /// has a round (in query order; empty bins for the others).
    fn head_histograms(
        &self,
        logits: &Self::Tensor,
        vocab: std::ops::Range<usize>,
        queries: &[crate::query::Query],
        rounds: &[Option<remask_sampler::truncate::Round>],
    ) -> Vec<remask_sampler::truncate::Bins> {
        crate::query::histogram_queries(&self.read_host(logits), vocab, queries, rounds)
    }
    /// Hidden states arriving from elsewhere (another pipeline stage).
    fn load_hidden(&self, values: &[f32], rows: usize, cols: usize) -> Self::Tensor;
}
