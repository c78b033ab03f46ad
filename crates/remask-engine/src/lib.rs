//! The LLaDA forward pass and one denoising step.
//!
//! - `backend`: the kernel trait the forward pass is written against;
//! - `cpu`: the CPU backend (gemm + rayon, f32);
//! - `llada`: the model, loadable as a whole or as a shard of layers;
//! - `engine`: canvases in, (token, confidence) per masked position out;
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

pub use backend::{Backend, Heads, Packing};
pub use cpu::{CpuBackend, Matrix};
pub use engine::{
    Engine, Query, StepBatch, TpEngine, combine_ranks, partial_queries, predict_queries,
    query_rows, token_space,
};
pub use llada::{Llada, Shard};

#[cfg(test)]
mod tests;
