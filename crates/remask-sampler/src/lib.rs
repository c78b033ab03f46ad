//! LLaDA's denoising sampler, kept pure: no I/O, no clocks, no global random
//! state. The CLI, the cluster coordinator, the tests and the benchmarks all
//! drive the same `Canvas`, so they produce the same tokens for the same seed.
//!
//! Data flow of one step (`BatchStep`): `Canvas::plan` names the masked
//! positions of the current block; the model's logits at those positions go
//! through `predict` (guidance, temperature, confidence, entropy);
//! `Canvas::commit` keeps what the request's `CommitRule` chooses, and ends
//! the request early once its answer is final.

mod canvas;
mod defaults;
mod predict;
pub mod rng;
pub mod truncate;

pub use canvas::{
    BatchStep, CacheMode, Canvas, CommitRule, Committed, FinishReason, InvalidRequest, KvUse,
    SamplerConfig, StepPlan, TokenLogprob, TokenSpace, denoise, transfer_schedule,
};
pub use defaults::{Defaults, Settings};
pub use predict::{
    MAX_TOP_LOGPROBS, Partial, PredictOptions, Prediction, Remasking, TopK, combine, guided_logits,
    predict, predict_partial,
};
pub use truncate::Truncate;

#[cfg(test)]
mod schedule_props;
