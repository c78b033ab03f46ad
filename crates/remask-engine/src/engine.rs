//! One denoising step for any number of requests in one forward pass: the
//! canvases (and, with guidance, their prompt-masked twins) are packed into
//! one batch, only the rows the sampler asks about go through the output
//! head, and `remask_sampler::predict` turns each row into (token, confidence).

use crate::backend::{Backend, Packing};
use crate::llada::{Llada, Shard};
use rayon::prelude::*;
use remask_model::{Checkpoint, Result};
use remask_sampler::{Canvas, Committed, Prediction, StepPlan, denoise, predict};

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llada<B>,
}

impl<B: Backend> Engine<B> {
    /// The whole model in this process.
    pub fn load(backend: B, ckpt: &Checkpoint) -> Result<Self> {
        let model = Llada::load(&backend, ckpt, Shard::full(&ckpt.config))?;
        Ok(Engine { backend, model })
    }

    /// Predictions for every planned position of every request.
    pub fn predict(&self, requests: &[(&Canvas, &StepPlan)]) -> Vec<Vec<Prediction>> {
        let mut ids: Vec<u32> = Vec::new();
        let mut lengths = Vec::new();
        // Per request: row of position 0 in the conditional and the
        // unconditional sequence.
        let mut bases = Vec::new();
        for (canvas, _) in requests {
            let cond = ids.len();
            ids.extend_from_slice(canvas.tokens());
            lengths.push(canvas.tokens().len());
            let uncond = canvas.unconditional().map(|un| {
                let at = ids.len();
                ids.extend_from_slice(&un);
                lengths.push(un.len());
                at
            });
            bases.push((cond, uncond));
        }
        let mut rows = Vec::new();
        for ((_, plan), &(cond, uncond)) in requests.iter().zip(&bases) {
            rows.extend(plan.positions.iter().map(|&p| cond + p));
            if let Some(un) = uncond {
                rows.extend(plan.positions.iter().map(|&p| un + p));
            }
        }
        let packing = Packing::new(lengths);
        let logits = self
            .model
            .logits(&self.backend, &ids, &packing, Some(&rows));
        let vocab = self.model.config.embedding_size();
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];

        let mut first_row = 0;
        requests
            .iter()
            .zip(&bases)
            .map(|((canvas, plan), &(_, uncond))| {
                let n = plan.positions.len();
                let opts = canvas.predict_options();
                let start = first_row;
                first_row += if uncond.is_some() { 2 * n } else { n };
                plan.positions
                    .par_iter()
                    .enumerate()
                    .map_init(Vec::new, |scratch, (j, &pos)| {
                        let un = uncond.map(|_| row(start + n + j));
                        predict(
                            row(start + j),
                            un,
                            &opts,
                            plan.step as u64,
                            pos as u64,
                            scratch,
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Runs one request to completion; `on_step` sees each step's commits.
    pub fn generate(&self, canvas: &mut Canvas, on_step: impl FnMut(&Canvas, &[Committed])) {
        let result: std::result::Result<(), std::convert::Infallible> = denoise(
            canvas,
            |c, plan| Ok(self.predict(&[(c, plan)]).pop().unwrap()),
            on_step,
        );
        result.unwrap_or_else(|never| match never {})
    }
}
