//! The LLaDA forward pass and one denoising step.
//!
//! - `backend`: the kernel trait the forward pass is written against;
//! - `cpu`: the CPU backend (gemm + rayon, f32);
//! - `query`: the head-query protocol (what a step asks of the output head,
//!   per vocabulary slice, and how slices combine);
//! - `llada`: the model, loadable as a whole or as a shard of layers;
//! - `kv`: the K/V stores of the prefix and dual caches;
//! - `engine`: the model (or a stage) over a group of ranks (world 1
//!   included), holding its layers' K/V stores: canvases in, (token,
//!   confidence, entropy) per masked position out;
//! - `launch`: how the CUDA kernels are launched (pure, tested on the CPU).

pub mod backend;
pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
mod fastmath;
pub mod kv;
pub mod launch;
pub mod llada;
pub mod query;

pub use backend::{Backend, Heads, Packing};
pub use cpu::{CpuBackend, Matrix};
pub use engine::{CacheUsage, Engine, StageInput, StageOutput, token_space};
pub use kv::{KvError, Seq};
pub use llada::{Llada, Shard};
pub use query::{
    Query, StepBatch, StepRequest, cache_ids, combine_ranks, histogram_queries, partial_queries,
    query_rows, run_selects, selects, truncates,
};

#[cfg(test)]
mod tests;
