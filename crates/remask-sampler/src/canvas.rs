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

use crate::predict::{MAX_TOP_LOGPROBS, PredictOptions, Prediction, Remasking};
use crate::truncate::Truncate;

/// How many of a step's candidates (the masked positions of the current
/// block) are committed. `Fixed` is LLaDA's schedule; the others are the
/// fast engines' rules (Fast-dLLM's threshold and factor, the EB-sampler's
/// entropy bound), which commit as many tokens per forward pass as the
/// model is sure of: a block then runs until it is complete and `steps`
/// bounds nothing. Every rule commits at least one token per step.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum CommitRule {
    /// `steps / blocks` steps per block, the block's masks spread over them
    /// (`transfer_schedule`), the most confident first.
    #[default]
    Fixed,
    /// Every candidate with confidence >= tau, and always the most confident.
    Threshold(f64),
    /// The n-th most confident (n >= 2) while `c_n >= 1 - f / (n + 1)`.
    Factor(f64),
    /// The lowest-entropy candidates while the sum of their entropies but
    /// the largest stays <= gamma.
    Entropy(f64),
}

impl CommitRule {
    /// Whether a block runs until it is complete rather than on a schedule.
    pub fn is_adaptive(&self) -> bool {
        !matches!(self, CommitRule::Fixed)
    }

    /// The rule from at most one of its three parameters (the CLI's
    /// `--threshold`, `--factor`, `--entropy`, the API's fields of the
    /// same names); none is `Fixed`.
    pub fn from_parameters(
        threshold: Option<f64>,
        factor: Option<f64>,
        entropy: Option<f64>,
    ) -> Result<Self, InvalidRequest> {
        match (threshold, factor, entropy) {
            (None, None, None) => Ok(CommitRule::Fixed),
            (Some(t), None, None) => Ok(CommitRule::Threshold(t)),
            (None, Some(f), None) => Ok(CommitRule::Factor(f)),
            (None, None, Some(g)) => Ok(CommitRule::Entropy(g)),
            _ => Err(InvalidRequest::TwoRules),
        }
    }

    fn check(&self) -> Result<(), InvalidRequest> {
        match *self {
            CommitRule::Fixed => Ok(()),
            CommitRule::Threshold(t) if t.is_finite() && t > 0.0 && t <= 1.0 => Ok(()),
            CommitRule::Threshold(t) => Err(InvalidRequest::BadThreshold(t)),
            CommitRule::Factor(f) if f.is_finite() && f > 0.0 => Ok(()),
            CommitRule::Factor(f) => Err(InvalidRequest::BadFactor(f)),
            CommitRule::Entropy(g) if g.is_finite() && g >= 0.0 => Ok(()),
            CommitRule::Entropy(g) => Err(InvalidRequest::BadEntropy(g)),
        }
    }

    /// How many of the candidates, in `order` (indices into `preds`), this
    /// step commits: the order is by confidence for every rule but
    /// `Entropy`, by entropy for it.
    fn count(&self, fixed_k: usize, order: &[usize], preds: &[Prediction]) -> usize {
        let n = order.len();
        let conf = |i: usize| rank_confidence(preds[order[i]].confidence);
        match *self {
            CommitRule::Fixed => fixed_k.min(n),
            CommitRule::Threshold(tau) => (1..n).take_while(|&i| conf(i) >= tau).count() + 1,
            CommitRule::Factor(f) => {
                // Fast-dLLM's get_transfer_index_dynamic, boundary included:
                // index 0's threshold is -1; stop at the first failure; a
                // failure at the very first or the last index takes one more.
                let first_fail = (0..n)
                    .find(|&i| {
                        let threshold = if i == 0 {
                            -1.0
                        } else {
                            1.0 - f / (i as f64 + 2.0)
                        };
                        conf(i) < threshold
                    })
                    .unwrap_or(n.saturating_sub(1));
                if first_fail == 0 || first_fail + 1 == n {
                    first_fail + 1
                } else {
                    first_fail
                }
            }
            CommitRule::Entropy(gamma) => {
                // k + 1 candidates go while the first k entropies sum to <= gamma
                // (entropies are >= 0: the sums only grow).
                let mut k = 1;
                let mut sum = 0.0;
                while k < n {
                    sum += rank_entropy(preds[order[k - 1]].entropy);
                    if sum > gamma {
                        break;
                    }
                    k += 1;
                }
                k
            }
        }
    }
}

impl std::str::FromStr for CommitRule {
    type Err = String;
    /// `fixed`, `threshold=T`, `factor=F` or `entropy=G`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("unknown commit rule '{s}': expected fixed, threshold=T, factor=F or entropy=G")
        };
        if s == "fixed" {
            return Ok(CommitRule::Fixed);
        }
        let (name, value) = s.split_once('=').ok_or_else(bad)?;
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("{name}: '{value}' is not a number"))?;
        let rule = match name.trim() {
            "threshold" => CommitRule::Threshold(v),
            "factor" => CommitRule::Factor(v),
            "entropy" => CommitRule::Entropy(v),
            _ => return Err(bad()),
        };
        rule.check().map_err(|e| e.to_string())?;
        Ok(rule)
    }
}

impl std::fmt::Display for CommitRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitRule::Fixed => f.write_str("fixed"),
            CommitRule::Threshold(t) => write!(f, "threshold={t}"),
            CommitRule::Factor(v) => write!(f, "factor={v}"),
            CommitRule::Entropy(g) => write!(f, "entropy={g}"),
        }
    }
}

/// A NaN confidence ranks as -inf.
fn rank_confidence(c: f64) -> f64 {
    if c.is_nan() { f64::NEG_INFINITY } else { c }
}

/// A NaN entropy ranks as +inf.
fn rank_entropy(h: f64) -> f64 {
    if h.is_nan() { f64::INFINITY } else { h }
}

/// How the steps of a block after its first reuse keys and values
/// (Fast-dLLM's caches, an approximation). The first forward of every block
/// is a full one that stores every layer's K and V; the later ones of the
/// block feed fewer positions and read the rest from that store, which is
/// never refreshed inside the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Every step is a full forward over the whole canvas (the reference).
    #[default]
    None,
    /// Later steps feed the block and everything right of it; K/V left of
    /// the block come from the store.
    Prefix,
    /// Later steps feed only the block; K/V left and right of it come from
    /// the store.
    Dual,
}

impl CacheMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Prefix => "prefix",
            CacheMode::Dual => "dual",
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "prefix" => Ok(CacheMode::Prefix),
            "dual" => Ok(CacheMode::Dual),
            _ => Err(format!(
                "unknown cache mode '{s}': expected none, prefix or dual"
            )),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sampler settings of one request (LLaDA's `generate()` arguments,
/// plus the commit rule, early stop and the cache mode).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    pub gen_length: usize,
    /// Total denoising steps over all blocks (the `Fixed` rule's schedule;
    /// 0 = not given, allowed with the adaptive rules, which ignore it).
    pub steps: usize,
    pub block_length: usize,
    pub remasking: Remasking,
    pub rule: CommitRule,
    /// Finish as soon as the answer is final (a stop token committed with
    /// everything before it committed); the rest of the span becomes EOS.
    /// Off, every step runs as in the reference.
    pub early_stop: bool,
    pub temperature: f64,
    pub cfg_scale: f64,
    pub seed: u64,
    pub logits_eos_inf: bool,
    pub confidence_eos_eot_inf: bool,
    pub cache: CacheMode,
    /// Record each answer token's log-probability at the step that
    /// committed it, with this many most likely alternatives (0 to
    /// `MAX_TOP_LOGPROBS`); `None`: nothing recorded, nothing asked of the
    /// head.
    pub logprobs: Option<usize>,
    /// top-k / top-p of the draw (no effect at temperature 0).
    pub truncate: Truncate,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            gen_length: 128,
            steps: 128,
            block_length: 32,
            remasking: Remasking::LowConfidence,
            rule: CommitRule::Fixed,
            early_stop: true,
            temperature: 0.0,
            cfg_scale: 0.0,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            cache: CacheMode::None,
            logprobs: None,
            truncate: Truncate::OFF,
        }
    }
}

/// An answer token's log-probability at the step that committed it, and
/// the most likely alternatives there (`SamplerConfig::logprobs`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f64,
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f64)>,
}

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The answer ended with EOS or an end of turn.
    Stop,
    /// The span was used up without a stop token.
    Length,
}

impl FinishReason {
    /// The name OpenAI's API and the metrics use.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
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
    #[error("threshold must be a number in (0, 1], got {0}")]
    BadThreshold(f64),
    #[error("factor must be a finite number > 0, got {0}")]
    BadFactor(f64),
    #[error("entropy must be a finite number >= 0, got {0}")]
    BadEntropy(f64),
    #[error("threshold, factor and entropy are three commit rules: give at most one")]
    TwoRules,
    #[error("top_logprobs must be between 0 and {max}, got {0}", max = MAX_TOP_LOGPROBS)]
    TooManyTopLogprobs(usize),
    #[error("top_p must be a number in (0, 1], got {0}")]
    BadTopP(f64),
}

/// Commit counts for the steps of one block: `n` masks over `steps` steps,
/// `n / steps` each and the remainder on the first steps (LLaDA's
/// `get_num_transfer_tokens`; 20 over 6 gives [4, 4, 3, 3, 3, 3]).
pub fn transfer_schedule(n: usize, steps: usize) -> Vec<usize> {
    let (base, rem) = (n / steps, n % steps);
    (0..steps).map(|i| base + usize::from(i < rem)).collect()
}

/// What one step's forward pass does with the request's K/V store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvUse {
    /// A full forward, nothing kept (`CacheMode::None`).
    None,
    /// A full forward that also stores every layer's K and V (the first
    /// forward of a block).
    Store,
    /// Feeds `StepPlan::fed` only; K/V of the other positions come from the
    /// store.
    Read,
}

/// The work of one denoising step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// Global step index of the request, 0-based over all blocks (keys the
    /// random draws).
    pub step: usize,
    /// How many of `positions` this step commits under the `Fixed` rule; the
    /// adaptive rules commit between 1 and all of them. 0: the step commits
    /// nothing and needs no forward pass (more fixed steps than masks).
    pub transfer: usize,
    /// Positions that can be committed now: the masked positions of the
    /// current block. Predictions are needed for exactly these.
    pub positions: Vec<usize>,
    /// The canvas positions the forward pass feeds (the whole canvas unless
    /// `kv` is `Read`); `positions` lie inside.
    pub fed: std::ops::Range<usize>,
    pub kv: KvUse,
}

impl StepPlan {
    /// Whether this step needs predictions (one forward pass).
    pub fn needs_forward(&self) -> bool {
        self.transfer > 0
    }
}

/// One committed position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Committed {
    pub position: usize,
    pub token: u32,
    pub confidence: f64,
    /// The token's log-probability (`Prediction::logprob`).
    pub logprob: f64,
}

#[derive(Clone, Debug)]
pub struct Canvas {
    config: SamplerConfig,
    space: TokenSpace,
    x: Vec<u32>,
    prompt_len: usize,
    /// Fixed tokens after the generated span (infilling); usually 0.
    suffix_len: usize,
    blocks: usize,
    /// The current block; `blocks` once every block is complete.
    block: usize,
    /// Steps taken in the current block.
    block_step: usize,
    /// Forward passes taken in the current block (the first stores the K/V).
    block_forwards: usize,
    /// The canvas as the current block's first forward saw it: what a lost
    /// K/V store is rebuilt from (`block_start_tokens`).
    block_start: Vec<u32>,
    /// Commit counts of the current block's steps (the `Fixed` rule).
    schedule: Vec<usize>,
    step: usize,
    forwards: usize,
    /// Tokens committed from predictions (not the EOS of an early stop).
    committed: usize,
    /// Finished early: the answer was final before the span was complete.
    stopped: bool,
    /// Per generated position, what the step that committed it reported
    /// (`SamplerConfig::logprobs`; empty when not asked for).
    logprobs: Vec<Option<TokenLogprob>>,
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
        let mut x = prompt.to_vec();
        x.resize(prompt.len() + config.gen_length, space.mask);
        x.extend_from_slice(suffix);
        let mut canvas = Canvas {
            config,
            space,
            x,
            prompt_len: prompt.len(),
            suffix_len: suffix.len(),
            blocks: config.gen_length / config.block_length,
            block: 0,
            block_step: 0,
            block_forwards: 0,
            block_start: Vec::new(),
            schedule: Vec::new(),
            step: 0,
            forwards: 0,
            committed: 0,
            stopped: false,
            logprobs: if config.logprobs.is_some() {
                vec![None; config.gen_length]
            } else {
                Vec::new()
            },
        };
        canvas.start_block();
        Ok(canvas)
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    pub fn space(&self) -> &TokenSpace {
        &self.space
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

    /// The longest run of committed tokens at the start of the answer: what
    /// can no longer change (a stream may send its text).
    pub fn final_prefix(&self) -> &[u32] {
        let g = self.generated();
        let end = g
            .iter()
            .position(|&t| t == self.space.mask || self.space.is_stop(t))
            .unwrap_or(g.len());
        &g[..end]
    }

    /// The fixed text after the generated span (empty unless infilling).
    pub fn suffix(&self) -> &[u32] {
        &self.x[self.x.len() - self.suffix_len..]
    }

    pub fn mask_id(&self) -> u32 {
        self.space.mask
    }

    pub fn is_done(&self) -> bool {
        self.stopped || self.block == self.blocks
    }

    /// Why the request finished (call once `is_done()`).
    pub fn finish_reason(&self) -> FinishReason {
        if self.answer().len() < self.generated().len() {
            FinishReason::Stop
        } else {
            FinishReason::Length
        }
    }

    /// Steps taken so far (with the `Fixed` rule including those that
    /// committed nothing).
    pub fn step(&self) -> usize {
        self.step
    }

    /// Forward passes this canvas took part in.
    pub fn forwards(&self) -> usize {
        self.forwards
    }

    /// Tokens committed from the model's predictions so far (an early stop's
    /// EOS fill not included): over `forwards()`, the tokens per forward.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// The input of the unconditional pass of classifier-free guidance: the
    /// canvas with only the prompt (and suffix) masked. `None` without guidance.
    pub fn unconditional(&self) -> Option<Vec<u32>> {
        (self.config.cfg_scale > 0.0).then(|| self.prompt_masked(&self.x))
    }

    fn prompt_masked(&self, x: &[u32]) -> Vec<u32> {
        let mut un = x.to_vec();
        let n = un.len();
        un[..self.prompt_len].fill(self.space.mask);
        un[n - self.suffix_len..].fill(self.space.mask);
        un
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
            top_logprobs: self.config.logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS) as u8,
            truncate: self.config.truncate,
        }
    }

    /// The log-probabilities of the generated tokens `range` (within the
    /// answer: `0..answer().len()`, or up to a stop string), as the steps
    /// that committed them reported; `None` unless `SamplerConfig::logprobs`.
    /// A position committed by no step (the EOS of an early stop) has -inf.
    pub fn logprobs(&self, range: std::ops::Range<usize>) -> Option<Vec<TokenLogprob>> {
        self.config.logprobs?;
        let generated = self.generated();
        let end = range.end.min(generated.len());
        Some(
            (range.start.min(end)..end)
                .map(|i| {
                    self.logprobs[i].clone().unwrap_or(TokenLogprob {
                        token: generated[i],
                        logprob: f64::NEG_INFINITY,
                        top: Vec::new(),
                    })
                })
                .collect(),
        )
    }

    fn block_range(&self) -> std::ops::Range<usize> {
        let start = self.prompt_len + self.block * self.config.block_length;
        start..start + self.config.block_length
    }

    fn start_block(&mut self) {
        self.block_step = 0;
        self.block_forwards = 0;
        if self.config.rule == CommitRule::Fixed {
            let n = self.x[self.block_range()]
                .iter()
                .filter(|&&t| t == self.space.mask)
                .count();
            let steps_per_block = self.config.steps / self.blocks;
            self.schedule = transfer_schedule(n, steps_per_block);
        }
    }

    /// The current step's plan. Call only while `!is_done()`.
    pub fn plan(&self) -> StepPlan {
        let positions: Vec<usize> = self
            .block_range()
            .filter(|&p| self.x[p] == self.space.mask)
            .collect();
        let transfer = match self.config.rule {
            CommitRule::Fixed => self.schedule[self.block_step],
            _ => positions.len(),
        };
        let block = self.block_range();
        let (kv, fed) = match self.config.cache {
            CacheMode::None => (KvUse::None, 0..self.x.len()),
            _ if self.block_forwards == 0 => (KvUse::Store, 0..self.x.len()),
            CacheMode::Prefix => (KvUse::Read, block.start..self.x.len()),
            CacheMode::Dual => (KvUse::Read, block),
        };
        StepPlan {
            step: self.step,
            transfer,
            positions,
            fed,
            kv,
        }
    }

    /// The tokens the current block's K/V store was made from (the canvas
    /// at the block's first forward), for a step that reads it; `None` when
    /// the next step does not read a store. A worker that lost the store
    /// (restart, replacement, eviction) gets it back exactly from these.
    pub fn block_start_tokens(&self) -> Option<&[u32]> {
        (self.config.cache != CacheMode::None && self.block_forwards > 0)
            .then_some(&self.block_start[..])
    }

    /// `unconditional()` of `block_start_tokens()`.
    pub fn block_start_unconditional(&self) -> Option<Vec<u32>> {
        let start = self.block_start_tokens()?;
        (self.config.cfg_scale > 0.0).then(|| self.prompt_masked(start))
    }

    /// Commits the predictions (one per `plan.positions`, in that order)
    /// that the request's rule chooses, and advances one step. Candidates
    /// are ranked by confidence (by entropy for `Entropy`); ties go to the
    /// lower position, a NaN confidence ranks as -inf.
    pub fn commit(&mut self, plan: &StepPlan, predictions: &[Prediction]) -> Vec<Committed> {
        assert_eq!(plan.step, self.step, "plan of another step");
        if plan.kv == KvUse::Store && plan.needs_forward() {
            self.block_start.clone_from(&self.x);
        }
        assert_eq!(
            plan.positions.len(),
            predictions.len(),
            "one prediction per position"
        );
        let mut order: Vec<usize> = (0..predictions.len()).collect();
        let by_position = |a: &usize, b: &usize| plan.positions[*a].cmp(&plan.positions[*b]);
        match self.config.rule {
            CommitRule::Entropy(_) => order.sort_by(|a, b| {
                rank_entropy(predictions[*a].entropy)
                    .total_cmp(&rank_entropy(predictions[*b].entropy))
                    .then(by_position(a, b))
            }),
            _ => order.sort_by(|a, b| {
                rank_confidence(predictions[*b].confidence)
                    .total_cmp(&rank_confidence(predictions[*a].confidence))
                    .then(by_position(a, b))
            }),
        }
        let k = if plan.needs_forward() {
            self.config.rule.count(plan.transfer, &order, predictions)
        } else {
            0
        };
        let committed: Vec<Committed> = order[..k]
            .iter()
            .map(|&i| Committed {
                position: plan.positions[i],
                token: predictions[i].token,
                confidence: predictions[i].confidence,
                logprob: predictions[i].logprob,
            })
            .collect();
        for c in &committed {
            self.x[c.position] = c.token;
        }
        if self.config.logprobs.is_some() {
            for &i in &order[..k] {
                let p = &predictions[i];
                if let Some(slot) = plan.positions[i]
                    .checked_sub(self.prompt_len)
                    .and_then(|g| self.logprobs.get_mut(g))
                {
                    *slot = Some(TokenLogprob {
                        token: p.token,
                        logprob: p.logprob,
                        top: p.top.iter().collect(),
                    });
                }
            }
        }
        self.committed += committed.len();
        self.step += 1;
        self.forwards += usize::from(plan.needs_forward());
        self.block_forwards += usize::from(plan.needs_forward());
        self.block_step += 1;
        let block_over = match self.config.rule {
            CommitRule::Fixed => self.block_step == self.schedule.len(),
            _ => self.x[self.block_range()]
                .iter()
                .all(|&t| t != self.space.mask),
        };
        if self.config.early_stop {
            self.stop_if_final();
        }
        if block_over && !self.stopped {
            self.block += 1;
            if self.block < self.blocks {
                self.start_block();
            }
        }
        committed
    }

    /// Ends the answer after its first `len` tokens, which must be final
    /// (within `final_prefix`): a stop string matched there, so the rest of
    /// the span becomes EOS and the request is done, as with a stop token.
    pub fn end_answer(&mut self, len: usize) {
        assert!(
            len <= self.final_prefix().len(),
            "only a final prefix can end the answer"
        );
        let (start, end) = (self.prompt_len, self.x.len() - self.suffix_len);
        self.x[start + len..end].fill(self.space.eos);
        self.stopped = true;
    }

    /// Exact early stop: once a stop token is committed with every position
    /// before it committed, the answer cannot change any more; the rest of
    /// the span becomes EOS and the request is done.
    fn stop_if_final(&mut self) {
        let (start, end) = (self.prompt_len, self.x.len() - self.suffix_len);
        let Some(first) = self.x[start..end]
            .iter()
            .position(|&t| t == self.space.mask || self.space.is_stop(t))
        else {
            return;
        };
        if self.x[start + first] == self.space.mask {
            return;
        }
        self.x[start + first + 1..end].fill(self.space.eos);
        self.stopped = true;
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
    c.rule.check()?;
    // With an adaptive rule `steps` is optional (0); given, it is checked as
    // for `Fixed`.
    if c.steps == 0 && !c.rule.is_adaptive() {
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
    if let Some(k) = c.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        return Err(TooManyTopLogprobs(k));
    }
    let p = c.truncate.top_p;
    if !(p > 0.0 && p <= 1.0) {
        return Err(BadTopP(p));
    }
    Ok(())
}

/// One denoising step of a batch of canvases, in two halves around the
/// forward pass: `new` plans every canvas's step and says which need
/// predictions (`requests`), `commit` applies them. The CLI, `remask eval`
/// and the cluster's scheduler all step through this, so a request gets the
/// same tokens whoever runs it.
pub struct BatchStep {
    plans: Vec<StepPlan>,
}

impl BatchStep {
    /// Plans the current step of each canvas (none may be done).
    pub fn new<'a>(canvases: impl IntoIterator<Item = &'a Canvas>) -> Self {
        BatchStep {
            plans: canvases.into_iter().map(Canvas::plan).collect(),
        }
    }

    pub fn plans(&self) -> &[StepPlan] {
        &self.plans
    }

    /// The canvases (indices into the planned ones) whose step needs a
    /// forward pass, in order; a step that commits nothing needs none.
    pub fn active(&self) -> Vec<usize> {
        (0..self.plans.len())
            .filter(|&i| self.plans[i].needs_forward())
            .collect()
    }

    /// Commits every canvas's step: `predictions` holds one list per
    /// `active()` canvas, in that order. Returns each canvas's commits.
    pub fn commit<'a>(
        &self,
        canvases: impl IntoIterator<Item = &'a mut Canvas>,
        predictions: Vec<Vec<Prediction>>,
    ) -> Vec<Vec<Committed>> {
        let mut predictions = predictions.into_iter();
        canvases
            .into_iter()
            .zip(&self.plans)
            .map(|(canvas, plan)| {
                let preds = if plan.needs_forward() {
                    predictions
                        .next()
                        .expect("one prediction list per active canvas")
                } else {
                    vec![Prediction::none(canvas.mask_id()); plan.positions.len()]
                };
                canvas.commit(plan, &preds)
            })
            .collect()
    }
}

/// Runs a canvas to completion. `predict` returns one prediction per planned
/// position (it runs the forward pass); `on_step` sees every step's commits
/// (and may end the answer: a stop string).
pub fn denoise<E>(
    canvas: &mut Canvas,
    mut predict: impl FnMut(&Canvas, &StepPlan) -> Result<Vec<Prediction>, E>,
    mut on_step: impl FnMut(&mut Canvas, &[Committed]),
) -> Result<(), E> {
    while !canvas.is_done() {
        let step = BatchStep::new([&*canvas]);
        let predictions = match step.active().first() {
            Some(_) => vec![predict(canvas, &step.plans()[0])?],
            None => Vec::new(),
        };
        let committed = step.commit([&mut *canvas], predictions);
        on_step(canvas, &committed[0]);
    }
    Ok(())
}
