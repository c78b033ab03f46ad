//! The LLaDA forward pass and one denoising step.
//!
//! - `backend`: the kernel trait the forward pass is written against;
//! - `cpu`: the CPU backend (gemm + rayon, f32);
//! - `query`: the head-query protocol (what a step asks of the output head,
//!   per vocabulary slice, and how slices combine);
//! - `llada`: the model, loadable as a whole or as a shard of layers;
//! - `engine`: the model over a group of ranks (world 1 included): canvases
//!   in, (token, confidence, entropy) per masked position out;
//! - `launch`: how the CUDA kernels are launched (pure, tested on the CPU).

pub mod backend;
pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
mod fastmath;
pub mod launch;
pub mod llada;
pub mod query;

pub use backend::{Backend, Heads, Packing};
pub use cpu::{CpuBackend, Matrix};
pub use engine::{Engine, token_space};
pub use llada::{Llada, Shard};
pub use query::{Query, StepBatch, combine_ranks, partial_queries, query_rows};

#[cfg(test)]
mod tests;
