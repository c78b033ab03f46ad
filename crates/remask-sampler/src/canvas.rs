//! The canvas of one request and LLaDA's block-wise denoising schedule.
//!
//! A `Canvas` is a small state machine: `plan()` says which positions need a
//! prediction at the current step and how many of them to commit, and
//! `commit()` applies the predictions. Whoever owns the canvas (the CLI, the
//! coordinator of a cluster) runs the forward passes in between; the canvas
//! itself does no I/O, and its result depends only on the predictions it is
//! given.
//!
//! The generated span normally ends the canvas (`prompt ++ masks`). With a
//! suffix it sits between two fixed texts (`prompt ++ masks ++ suffix`):
//! infilling, which a bidirectional model does with the same sampler, since
//! every position sees the whole canvas.

use crate::predict::{PredictOptions, Prediction, Remasking};

/// The sampler settings of one request (LLaDA's `generate()` arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    pub gen_length: usize,
    /// Total denoising steps over all blocks.
    pub steps: usize,
    pub block_length: usize,
    pub remasking: Remasking,
    pub temperature: f64,
    pub cfg_scale: f64,
    pub seed: u64,
    pub logits_eos_inf: bool,
    pub confidence_eos_eot_inf: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            gen_length: 128,
            steps: 128,
            block_length: 32,
            remasking: Remasking::LowConfidence,
            temperature: 0.0,
            cfg_scale: 0.0,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
        }
    }
}

/// What the sampler must know about the model's vocabulary; every id comes
/// from the checkpoint's own files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenSpace {
    pub vocab_size: usize,
    pub mask: u32,
    pub eos: u32,
    pub eot: Option<u32>,
    pub max_sequence_length: usize,
}

impl TokenSpace {
    /// EOS, or the end of a chat turn.
    pub fn is_stop(&self, token: u32) -> bool {
        token == self.eos || Some(token) == self.eot
    }

    /// The answer in a generated span: the tokens before the first EOS or
    /// end of turn. LLaDA pads what it does not need with EOS; anything a
    /// model commits after its first stop token is not part of its answer
    /// (the reference decodes it all; servers stop there, as an
    /// autoregressive model would have).
    pub fn answer<'a>(&self, generated: &'a [u32]) -> &'a [u32] {
        let end = generated
            .iter()
            .position(|&t| self.is_stop(t))
            .unwrap_or(generated.len());
        &generated[..end]
    }
}

/// A request the sampler refuses; the message says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    #[error("gen_length must be at least 1")]
    ZeroGenLength,
    #[error("steps must be at least 1")]
    ZeroSteps,
    #[error("block_length must be at least 1")]
    ZeroBlockLength,
    #[error("gen_length {gen_length} is not a multiple of block_length {block_length}")]
    GenNotMultipleOfBlock {
        gen_length: usize,
        block_length: usize,
    },
    #[error(
        "steps {steps} is more than gen_length {gen_length}: every step must be able to commit a token"
    )]
    TooManySteps { steps: usize, gen_length: usize },
    #[error(
        "steps {steps} is not a multiple of the number of blocks {blocks} (gen_length / block_length)"
    )]
    StepsNotMultipleOfBlocks { steps: usize, blocks: usize },
    #[error(
        "prompt ({prompt}) + gen_length ({gen_length}) + suffix ({suffix}) = {total} tokens exceeds the model's max_sequence_length {max}"
    )]
    TooLong {
        prompt: usize,
        gen_length: usize,
        suffix: usize,
        total: usize,
        max: usize,
    },
    #[error(
        "token id {id} at prompt position {position} is outside the vocabulary (size {vocab_size})"
    )]
    TokenOutOfVocab {
        id: u32,
        position: usize,
        vocab_size: usize,
    },
    #[error(
        "prompt position {position} holds the mask token {id}; to infill, give the text after the gap as the suffix"
    )]
    MaskInPrompt { id: u32, position: usize },
    #[error(
        "token id {id} at suffix position {position} is outside the vocabulary (size {vocab_size})"
    )]
    SuffixTokenOutOfVocab {
        id: u32,
        position: usize,
        vocab_size: usize,
    },
    #[error("suffix position {position} holds the mask token {id}")]
    MaskInSuffix { id: u32, position: usize },
    #[error("temperature must be a finite number >= 0, got {0}")]
    BadTemperature(f64),
    #[error("cfg_scale must be a finite number >= 0, got {0}")]
    BadCfgScale(f64),
}

/// Commit counts for the steps of one block: `n` masks over `steps` steps,
/// `n / steps` each and the remainder on the first steps (LLaDA's
/// `get_num_transfer_tokens`; 20 over 6 gives [4, 4, 3, 3, 3, 3]).
pub fn transfer_schedule(n: usize, steps: usize) -> Vec<usize> {
    let (base, rem) = (n / steps, n % steps);
    (0..steps).map(|i| base + usize::from(i < rem)).collect()
}

/// The work of one denoising step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// Global step index of the request, 0-based over all blocks.
    pub step: usize,
    /// How many of `positions` this step commits.
    pub transfer: usize,
    /// Positions that can be committed now: masked, and left of the end of the
    /// current block. Predictions are needed for exactly these.
    pub positions: Vec<usize>,
}

/// One committed position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Committed {
    pub position: usize,
    pub token: u32,
    pub confidence: f64,
}

#[derive(Clone, Debug)]
pub struct Canvas {
    config: SamplerConfig,
    space: TokenSpace,
    x: Vec<u32>,
    prompt_len: usize,
    /// Fixed tokens after the generated span (infilling); usually 0.
    suffix_len: usize,
    steps_per_block: usize,
    /// Commit counts of the current block.
    schedule: Vec<usize>,
    step: usize,
}

impl Canvas {
    /// Lays out `prompt ++ [mask] * gen_length`, after checking every setting.
    pub fn new(
        prompt: &[u32],
        config: SamplerConfig,
        space: TokenSpace,
    ) -> Result<Self, InvalidRequest> {
        Self::infill(prompt, &[], config, space)
    }

    /// Lays out `prompt ++ [mask] * gen_length ++ suffix`: the generation fills
    /// the gap between the two fixed texts.
    pub fn infill(
        prompt: &[u32],
        suffix: &[u32],
        config: SamplerConfig,
        space: TokenSpace,
    ) -> Result<Self, InvalidRequest> {
        validate(prompt, suffix, &config, &space)?;
        let steps_per_block = config.steps / (config.gen_length / config.block_length);
        let mut x = prompt.to_vec();
        x.resize(prompt.len() + config.gen_length, space.mask);
        x.extend_from_slice(suffix);
        let mut canvas = Canvas {
            config,
            space,
            x,
            prompt_len: prompt.len(),
            suffix_len: suffix.len(),
            steps_per_block,
            schedule: Vec::new(),
            step: 0,
        };
        canvas.start_block();
        Ok(canvas)
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The whole sequence: prompt, then the generation (masks where nothing
    /// has been committed yet), then the suffix if any.
    pub fn tokens(&self) -> &[u32] {
        &self.x
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The generated span (without the suffix).
    pub fn generated(&self) -> &[u32] {
        &self.x[self.prompt_len..self.x.len() - self.suffix_len]
    }

    /// The generated tokens before the first EOS or end of turn
    /// (`TokenSpace::answer`): what the CLI and the servers decode as text.
    pub fn answer(&self) -> &[u32] {
        self.space.answer(self.generated())
    }

    /// The fixed text after the generated span (empty unless infilling).
    pub fn suffix(&self) -> &[u32] {
        &self.x[self.x.len() - self.suffix_len..]
    }

    pub fn mask_id(&self) -> u32 {
        self.space.mask
    }

    pub fn is_done(&self) -> bool {
        self.step == self.config.steps
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The input of the unconditional pass of classifier-free guidance: the
    /// canvas with only the prompt (and suffix) masked. `None` without guidance.
    pub fn unconditional(&self) -> Option<Vec<u32>> {
        (self.config.cfg_scale > 0.0).then(|| {
            let mut un = self.x.clone();
            let n = un.len();
            un[..self.prompt_len].fill(self.space.mask);
            un[n - self.suffix_len..].fill(self.space.mask);
            un
        })
    }

    /// The options `predict` needs for this request.
    pub fn predict_options(&self) -> PredictOptions {
        PredictOptions {
            temperature: self.config.temperature,
            cfg_scale: self.config.cfg_scale,
            remasking: self.config.remasking,
            seed: self.config.seed,
            logits_eos_inf: self.config.logits_eos_inf,
            confidence_eos_eot_inf: self.config.confidence_eos_eot_inf,
            eos: self.space.eos,
            eot: self.space.eot,
            mask: self.space.mask,
        }
    }

    fn block(&self) -> usize {
        self.step / self.steps_per_block
    }

    fn block_end(&self) -> usize {
        self.prompt_len + (self.block() + 1) * self.config.block_length
    }

    fn start_block(&mut self) {
        let start = self.prompt_len + self.block() * self.config.block_length;
        let n = self.x[start..self.block_end()]
            .iter()
            .filter(|&&t| t == self.space.mask)
            .count();
        self.schedule = transfer_schedule(n, self.steps_per_block);
    }

    /// The current step's plan. Call only while `!is_done()`.
    pub fn plan(&self) -> StepPlan {
        let end = self.block_end();
        let positions = (self.prompt_len..end)
            .filter(|&p| self.x[p] == self.space.mask)
            .collect();
        StepPlan {
            step: self.step,
            transfer: self.schedule[self.step % self.steps_per_block],
            positions,
        }
    }

    /// Commits the `plan.transfer` most confident of the predictions (one per
    /// `plan.positions`, in that order) and advances one step. Ties go to the
    /// lower position; a NaN confidence ranks as -inf.
    pub fn commit(&mut self, plan: &StepPlan, predictions: &[Prediction]) -> Vec<Committed> {
        assert_eq!(plan.step, self.step, "plan of another step");
        assert_eq!(
            plan.positions.len(),
            predictions.len(),
            "one prediction per position"
        );
        let rank = |c: f64| if c.is_nan() { f64::NEG_INFINITY } else { c };
        let mut order: Vec<usize> = (0..predictions.len()).collect();
        order.sort_by(|&a, &b| {
            rank(predictions[b].confidence)
                .total_cmp(&rank(predictions[a].confidence))
                .then(plan.positions[a].cmp(&plan.positions[b]))
        });
        let committed: Vec<Committed> = order
            .into_iter()
            .take(plan.transfer)
            .map(|i| Committed {
                position: plan.positions[i],
                token: predictions[i].token,
                confidence: predictions[i].confidence,
            })
            .collect();
        for c in &committed {
            self.x[c.position] = c.token;
        }
        self.step += 1;
        if !self.is_done() && self.step.is_multiple_of(self.steps_per_block) {
            self.start_block();
        }
        committed
    }
}

fn validate(
    prompt: &[u32],
    suffix: &[u32],
    c: &SamplerConfig,
    space: &TokenSpace,
) -> Result<(), InvalidRequest> {
    use InvalidRequest::*;
    if prompt.is_empty() {
        return Err(EmptyPrompt);
    }
    if c.gen_length == 0 {
        return Err(ZeroGenLength);
    }
    if c.steps == 0 {
        return Err(ZeroSteps);
    }
    if c.block_length == 0 {
        return Err(ZeroBlockLength);
    }
    if !c.gen_length.is_multiple_of(c.block_length) {
        return Err(GenNotMultipleOfBlock {
            gen_length: c.gen_length,
            block_length: c.block_length,
        });
    }
    // Also bounds the work of one request: a step that cannot commit is a
    // forward pass (or a stream message) for nothing.
    if c.steps > c.gen_length {
        return Err(TooManySteps {
            steps: c.steps,
            gen_length: c.gen_length,
        });
    }
    let blocks = c.gen_length / c.block_length;
    if !c.steps.is_multiple_of(blocks) {
        return Err(StepsNotMultipleOfBlocks {
            steps: c.steps,
            blocks,
        });
    }
    let total = prompt
        .len()
        .saturating_add(c.gen_length)
        .saturating_add(suffix.len());
    if total > space.max_sequence_length {
        return Err(TooLong {
            prompt: prompt.len(),
            gen_length: c.gen_length,
            suffix: suffix.len(),
            total,
            max: space.max_sequence_length,
        });
    }
    if let Some((position, &id)) = prompt
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= space.vocab_size)
    {
        return Err(TokenOutOfVocab {
            id,
            position,
            vocab_size: space.vocab_size,
        });
    }
    if let Some(position) = prompt.iter().position(|&t| t == space.mask) {
        return Err(MaskInPrompt {
            id: space.mask,
            position,
        });
    }
    if let Some((position, &id)) = suffix
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= space.vocab_size)
    {
        return Err(SuffixTokenOutOfVocab {
            id,
            position,
            vocab_size: space.vocab_size,
        });
    }
    if let Some(position) = suffix.iter().position(|&t| t == space.mask) {
        return Err(MaskInSuffix {
            id: space.mask,
            position,
        });
    }
    if !(c.temperature.is_finite() && c.temperature >= 0.0) {
        return Err(BadTemperature(c.temperature));
    }
    if !(c.cfg_scale.is_finite() && c.cfg_scale >= 0.0) {
        return Err(BadCfgScale(c.cfg_scale));
    }
    Ok(())
}

/// Runs a canvas to completion. `predict` returns one prediction per planned
/// position (it runs the forward pass); `on_step` sees every step's commits.
/// Steps that commit nothing (more steps than masks in a block) skip the
/// forward pass: they could not change the result.
pub fn denoise<E>(
    canvas: &mut Canvas,
    mut predict: impl FnMut(&Canvas, &StepPlan) -> Result<Vec<Prediction>, E>,
    mut on_step: impl FnMut(&Canvas, &[Committed]),
) -> Result<(), E> {
    while !canvas.is_done() {
        let plan = canvas.plan();
        let predictions = if plan.transfer == 0 {
            vec![
                Prediction {
                    token: canvas.mask_id(),
                    confidence: f64::NEG_INFINITY,
                };
                plan.positions.len()
            ]
        } else {
            predict(canvas, &plan)?
        };
        let committed = canvas.commit(&plan, &predictions);
        on_step(canvas, &committed);
    }
    Ok(())
}
