//! From one position's logits to a prediction: the token the model proposes
//! (`x0` in LLaDA's `generate()`) and the confidence used to rank positions
//! for remasking.
//!
//! This runs wherever the logits are: on the CPU after an in-process forward
//! pass, or on the last pipeline stage of a cluster, which then sends back only
//! `(token, confidence)` pairs instead of full vocabulary rows.

use crate::rng::{NoiseKey, Stream};
use crate::truncate::{self, Truncate};

/// How the positions to commit are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Remasking {
    /// Commit the predictions with the highest softmax probability.
    #[default]
    LowConfidence,
    /// Commit random positions (a uniform draw per position).
    Random,
}

impl std::str::FromStr for Remasking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low_confidence" => Ok(Remasking::LowConfidence),
            "random" => Ok(Remasking::Random),
            other => Err(format!(
                "unknown remasking '{other}': expected 'low_confidence' or 'random'"
            )),
        }
    }
}

impl std::fmt::Display for Remasking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Remasking::LowConfidence => "low_confidence",
            Remasking::Random => "random",
        })
    }
}

/// Everything `predict` needs besides the logits; identical for every
/// position of a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictOptions {
    pub temperature: f64,
    pub cfg_scale: f64,
    pub remasking: Remasking,
    pub seed: u64,
    /// Set the EOS logit to -inf before anything else (LLaDA's `logits_eos_inf`).
    pub logits_eos_inf: bool,
    /// Rank EOS and EoT predictions last (LLaDA's `confidence_eos_eot_inf`).
    pub confidence_eos_eot_inf: bool,
    pub eos: u32,
    pub eot: Option<u32>,
    /// The mask token is never proposed: committing it would leave the
    /// position masked and break the schedule (the reference does not guard
    /// against this; trained models never rank it first).
    pub mask: u32,
    /// How many of the most likely tokens the head reports with their
    /// log-probabilities (`Prediction::top`), at most `MAX_TOP_LOGPROBS`;
    /// 0 (the default path) costs nothing.
    pub top_logprobs: u8,
    /// top-k / top-p of the draw (temperature > 0 only; `truncate`).
    pub truncate: Truncate,
}

impl PredictOptions {
    /// Whether the draw is truncated: top-k / top-p asked for and a
    /// positive finite temperature (greedy keeps its argmax whatever the
    /// truncation). The one test `predict`, the engine and the select use.
    pub fn truncates(&self) -> bool {
        !self.truncate.is_off() && self.temperature > 0.0 && self.temperature.is_finite()
    }
}

/// The most alternatives the head reduction reports per position.
pub const MAX_TOP_LOGPROBS: usize = 5;

/// Up to `MAX_TOP_LOGPROBS` tokens with a value each, best first (by value,
/// ties to the lower id): the largest guided logits of a vocabulary slice
/// in a `Partial`, log-probabilities in a `Prediction`. Fixed-size, so
/// that predictions stay `Copy` and nothing is allocated per position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopK {
    len: u8,
    tokens: [u32; MAX_TOP_LOGPROBS],
    values: [f64; MAX_TOP_LOGPROBS],
}

impl Default for TopK {
    fn default() -> Self {
        TopK {
            len: 0,
            tokens: [0; MAX_TOP_LOGPROBS],
            values: [f64::NEG_INFINITY; MAX_TOP_LOGPROBS],
        }
    }
}

impl TopK {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (token, value) pairs, best first.
    pub fn iter(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        (0..self.len()).map(|i| (self.tokens[i], self.values[i]))
    }

    /// The smallest value kept, once `k` are kept (a candidate must beat
    /// it); -inf before.
    pub fn bar(&self, k: usize) -> f64 {
        if self.len() >= k && k > 0 {
            self.values[k - 1]
        } else {
            f64::NEG_INFINITY
        }
    }

    /// Keeps (token, value) if it is among the `k` best so far (k at most
    /// `MAX_TOP_LOGPROBS`). -inf and NaN values are never kept: a token the
    /// rules exclude is no alternative.
    pub fn insert(&mut self, k: usize, token: u32, value: f64) {
        let k = k.min(MAX_TOP_LOGPROBS);
        if k == 0 || value.is_nan() || value == f64::NEG_INFINITY {
            return;
        }
        let n = self.len();
        let ahead = |i: usize| {
            self.values[i] > value || (self.values[i] == value && self.tokens[i] < token)
        };
        let mut at = n;
        while at > 0 && !ahead(at - 1) {
            at -= 1;
        }
        if at >= k {
            return;
        }
        let end = (n + 1).min(k);
        for i in (at + 1..end).rev() {
            self.tokens[i] = self.tokens[i - 1];
            self.values[i] = self.values[i - 1];
        }
        self.tokens[at] = token;
        self.values[at] = value;
        self.len = end as u8;
    }

    /// The same tokens with `shift` added to every value.
    fn shifted(mut self, shift: f64) -> Self {
        for v in &mut self.values[..self.len as usize] {
            *v += shift;
        }
        self
    }
}

/// The model's proposal for one masked position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub token: u32,
    pub confidence: f64,
    /// Entropy (nats) of the position's predicted distribution: the softmax
    /// of the un-noised guided logits, in f64. The entropy-bounded commit
    /// rule ranks by it; +inf ranks last (EOS / end of turn under
    /// `confidence_eos_eot_inf`).
    pub entropy: f64,
    /// The proposed token's log-probability under the model's distribution
    /// at temperature 1: `log_softmax` of the guided logits (the mask token,
    /// and EOS under `logits_eos_inf`, at -inf, as the sampler proposes
    /// from), whatever the temperature that chose it. OpenAI's and vLLM's
    /// `logprobs`. -inf for a position that is not predicted.
    pub logprob: f64,
    /// The `PredictOptions::top_logprobs` most likely tokens of the same
    /// distribution with their log-probabilities (empty unless asked for).
    pub top: TopK,
}

impl Prediction {
    /// The stand-in for a position that is not predicted (a step that
    /// commits nothing): never chosen by any rule.
    pub fn none(mask: u32) -> Self {
        Prediction {
            token: mask,
            confidence: f64::NEG_INFINITY,
            entropy: f64::INFINITY,
            logprob: f64::NEG_INFINITY,
            top: TopK::default(),
        }
    }
}

/// Predict one position from its conditional logits and, with classifier-free
/// guidance, the logits of the same position with the prompt masked.
///
/// `step` is the request's global denoising step and `position` the absolute
/// position in its canvas: together with the seed they key the random draws.
/// `scratch` avoids an allocation per call.
pub fn predict(
    cond: &[f32],
    uncond: Option<&[f32]>,
    opts: &PredictOptions,
    step: u64,
    position: u64,
    scratch: &mut Vec<f32>,
) -> Prediction {
    // The whole vocabulary is one slice: the same code serves tensor-parallel
    // heads and the GPU's fused reduction.
    let floor = if opts.truncates() {
        guided_logits(cond, uncond, 0, opts, scratch);
        truncate::threshold(&[scratch], opts)
    } else {
        0
    };
    let partial = predict_partial(cond, uncond, 0, opts, step, position, floor, scratch);
    combine(&[partial], opts, step, position)
}

/// The best candidate of one slice of the vocabulary, for tensor-parallel
/// output heads: each rank reduces its own columns, and `combine` merges the
/// ranks' partials into the same prediction `predict` makes from a full row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Partial {
    /// The (noisy, with temperature) score of the best token of the slice.
    pub score: f64,
    /// Its global vocabulary id.
    pub token: u32,
    /// Its guided logit.
    pub logit: f64,
    /// logsumexp of the slice's guided logits.
    pub lse: f64,
    /// The slice's softmax-weighted mean guided logit, `sum_i p_i l_i` with
    /// `p` the softmax over the slice alone: with `lse` it gives the
    /// entropy of the whole row (`combine`). -inf for an empty slice.
    pub mean_logit: f64,
    /// The slice's `top_logprobs` largest guided logits (empty unless asked
    /// for): the whole row's top-k is among the slices' top-k.
    pub top: TopK,
    /// The slice's largest guided logit (-inf for an empty slice): the
    /// reference of top-p's masses (`truncate`).
    pub max: f64,
}

/// The guided logits of a vocabulary slice into `out`: guidance
/// (`un + (s + 1)(cond - un)`), then the mask logit (and under
/// `logits_eos_inf` the EOS one) at -inf.
pub fn guided_logits(
    cond: &[f32],
    uncond: Option<&[f32]>,
    offset: usize,
    opts: &PredictOptions,
    out: &mut Vec<f32>,
) {
    out.clear();
    match uncond {
        Some(un) if opts.cfg_scale > 0.0 => {
            let s1 = (opts.cfg_scale + 1.0) as f32;
            out.extend(cond.iter().zip(un).map(|(&c, &u)| u + s1 * (c - u)));
        }
        _ => out.extend_from_slice(cond),
    }
    let mut kill = |id: u32| {
        if let Some(l) = (id as usize)
            .checked_sub(offset)
            .and_then(|i| out.get_mut(i))
        {
            *l = f32::NEG_INFINITY;
        }
    };
    kill(opts.mask);
    if opts.logits_eos_inf {
        kill(opts.eos);
    }
}

/// The partial of the vocabulary slice `offset..offset + cond.len()`. The
/// draw considers only the tokens whose guided logit's key is at least
/// `floor` (the truncation's threshold, `truncate::Select`; 0: all); the
/// rest (log-sum-exp, entropy, top logprobs) is over the whole slice.
#[allow(clippy::too_many_arguments)]
pub fn predict_partial(
    cond: &[f32],
    uncond: Option<&[f32]>,
    offset: usize,
    opts: &PredictOptions,
    step: u64,
    position: u64,
    floor: u32,
    scratch: &mut Vec<f32>,
) -> Partial {
    guided_logits(cond, uncond, offset, opts, scratch);
    let logits: &Vec<f32> = scratch;
    let kept = |l: f32| floor == 0 || truncate::key(l) >= floor;
    let local = if opts.temperature == 0.0 {
        first_argmax(logits.iter().map(|&l| l as f64))
    } else {
        let key = NoiseKey::new(opts.seed, Stream::Gumbel, step, position);
        let t = opts.temperature;
        first_argmax(logits.iter().enumerate().map(|(v, &l)| {
            if kept(l) {
                l as f64 - t * (-key.uniform((offset + v) as u64).ln()).ln()
            } else {
                f64::NEG_INFINITY
            }
        }))
    };
    let logit = logits.get(local).map_or(f64::NEG_INFINITY, |&l| l as f64);
    let score = if opts.temperature == 0.0 {
        logit
    } else if !logit.is_finite() || !kept(logit as f32) {
        // Nothing of this slice is kept: it cannot win the draw.
        f64::NEG_INFINITY
    } else {
        let key = NoiseKey::new(opts.seed, Stream::Gumbel, step, position);
        logit - opts.temperature * (-key.uniform((offset + local) as u64).ln()).ln()
    };
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let (lse, mean_logit) = if max.is_finite() {
        // Relative to the maximum: no overflow, and -inf logits drop out.
        let (mut sum, mut weighted) = (0.0f64, 0.0f64);
        for &l in logits.iter().filter(|l| l.is_finite()) {
            let d = l as f64 - max;
            let e = d.exp();
            sum += e;
            weighted += e * d;
        }
        (max + sum.ln(), max + weighted / sum)
    } else {
        (f64::NEG_INFINITY, f64::NEG_INFINITY)
    };
    let mut top = TopK::default();
    let k = (opts.top_logprobs as usize).min(MAX_TOP_LOGPROBS);
    if k > 0 {
        // Only when asked for: the default path makes no second pass.
        for (v, &l) in logits.iter().enumerate() {
            if l as f64 > top.bar(k) {
                top.insert(k, (offset + v) as u32, l as f64);
            }
        }
    }
    Partial {
        score,
        token: (offset + local) as u32,
        logit,
        lse,
        mean_logit,
        top,
        max,
    }
}

/// Merges the partials of all vocabulary slices (in vocabulary order) into
/// one prediction: the best score wins (ties to the lower id, as `argmax`),
/// its softmax probability is `exp(logit - logsumexp of all slices)`, and
/// the entropy is `lse - sum_s exp(lse_s - lse) mean_logit_s` (the whole
/// row's `lse - E[l]`), its log-probability `logit - lse`, and the row's
/// top-k the best k of the slices' top-k (a max-and-sum-exp reduction: the
/// same numbers one slice gives, up to the rounding of the logsumexp).
pub fn combine(
    partials: &[Partial],
    opts: &PredictOptions,
    step: u64,
    position: u64,
) -> Prediction {
    let best = partials
        .iter()
        .fold(None::<&Partial>, |b, p| match b {
            Some(b) if b.score >= p.score => Some(b),
            _ => Some(p),
        })
        .expect("at least one partial");
    let max = partials.iter().fold(f64::NEG_INFINITY, |m, p| m.max(p.lse));
    let lse = max
        + partials
            .iter()
            .map(|p| (p.lse - max).exp())
            .sum::<f64>()
            .ln();
    let mut confidence = match opts.remasking {
        Remasking::LowConfidence if lse.is_finite() => (best.logit - lse).exp(),
        Remasking::LowConfidence => 0.0,
        Remasking::Random => NoiseKey::new(opts.seed, Stream::Remask, step, position).uniform(0),
    };
    let mut entropy = if lse.is_finite() {
        let mean: f64 = partials
            .iter()
            .filter(|p| p.lse.is_finite())
            .map(|p| (p.lse - lse).exp() * p.mean_logit)
            .sum();
        // Rounding can leave a one-hot row a hair below zero.
        (lse - mean).max(0.0)
    } else {
        f64::INFINITY
    };
    if opts.confidence_eos_eot_inf && (best.token == opts.eos || Some(best.token) == opts.eot) {
        confidence = f64::NEG_INFINITY;
        entropy = f64::INFINITY;
    }
    let logprob = if lse.is_finite() {
        best.logit - lse
    } else {
        f64::NEG_INFINITY
    };
    let k = (opts.top_logprobs as usize).min(MAX_TOP_LOGPROBS);
    let mut top = TopK::default();
    if k > 0 && lse.is_finite() {
        for p in partials {
            for (token, logit) in p.top.iter() {
                top.insert(k, token, logit);
            }
        }
        top = top.shifted(-lse);
    }
    Prediction {
        token: best.token,
        confidence,
        entropy,
        logprob,
        top,
    }
}

/// Index of the first maximal value (NaN never wins), like `torch.argmax`
/// on finite input.
fn first_argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> PredictOptions {
        PredictOptions {
            temperature: 0.0,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            eos: 3,
            eot: Some(2),
            mask: 99,
            top_logprobs: 0,
            truncate: Truncate::OFF,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_its_softmax() {
        let p = predict(&[1.0, 3.0, 3.0, 0.0], None, &opts(), 0, 0, &mut Vec::new());
        assert_eq!(p.token, 1);
        let z = 1f64.exp() + 2.0 * 3f64.exp() + 1.0;
        assert!((p.confidence - 3f64.exp() / z).abs() < 1e-12);
    }

    #[test]
    fn entropy_is_that_of_the_softmax() {
        let logits = [1.0f32, 3.0, 3.0, 0.0, f32::NEG_INFINITY];
        let p = predict(&logits, None, &opts(), 0, 0, &mut Vec::new());
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let h: f64 = logits
            .iter()
            .map(|&l| (l as f64).exp() / z)
            .filter(|&q| q > 0.0)
            .map(|q| -q * q.ln())
            .sum();
        assert!((p.entropy - h).abs() < 1e-12, "{} vs {h}", p.entropy);
        // One certain token: zero entropy, never negative.
        let p = predict(&[0.0, 200.0, 0.0], None, &opts(), 0, 0, &mut Vec::new());
        assert!(p.entropy >= 0.0 && p.entropy < 1e-80);
        // Uniform over n: ln n.
        let p = predict(&[2.0; 8], None, &opts(), 0, 0, &mut Vec::new());
        assert!((p.entropy - 8f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn cfg_extrapolates_away_from_the_unconditional_logits() {
        let o = PredictOptions {
            cfg_scale: 1.0,
            ..opts()
        };
        // cond prefers 0 slightly; un prefers 1: guided = un + 2 (cond - un).
        let p = predict(&[2.0, 1.5], Some(&[0.0, 1.0]), &o, 0, 0, &mut Vec::new());
        assert_eq!(p.token, 0);
        let no_cfg = predict(
            &[2.0, 1.5],
            Some(&[0.0, 1.0]),
            &opts(),
            0,
            0,
            &mut Vec::new(),
        );
        assert!(p.confidence > no_cfg.confidence);
    }

    #[test]
    fn eos_options() {
        let logits = [0.0, 1.0, 2.0, 5.0];
        let o = PredictOptions {
            logits_eos_inf: true,
            ..opts()
        };
        assert_eq!(predict(&logits, None, &o, 0, 0, &mut Vec::new()).token, 2);
        let o = PredictOptions {
            confidence_eos_eot_inf: true,
            ..opts()
        };
        let p = predict(&logits, None, &o, 0, 0, &mut Vec::new());
        assert_eq!(p.token, 3);
        assert_eq!(p.confidence, f64::NEG_INFINITY);
    }

    #[test]
    fn split_vocabulary_gives_the_same_prediction() {
        let cond: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let un: Vec<f32> = (0..40)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.5)
            .collect();
        for (temperature, cfg_scale, remasking) in [
            (0.0, 0.0, Remasking::LowConfidence),
            (0.9, 0.0, Remasking::LowConfidence),
            (0.0, 1.5, Remasking::Random),
            (1.3, 0.7, Remasking::LowConfidence),
        ] {
            let o = PredictOptions {
                temperature,
                cfg_scale,
                remasking,
                logits_eos_inf: true,
                top_logprobs: 5,
                ..opts()
            };
            for pos in 0..20 {
                let whole = predict(&cond, Some(&un), &o, 3, pos, &mut Vec::new());
                for parts in [1, 2, 4, 5] {
                    let n = 40 / parts;
                    let partials: Vec<Partial> = (0..parts)
                        .map(|r| {
                            let s = r * n..(r + 1) * n;
                            predict_partial(
                                &cond[s.clone()],
                                Some(&un[s.clone()]),
                                s.start,
                                &o,
                                3,
                                pos,
                                0,
                                &mut Vec::new(),
                            )
                        })
                        .collect();
                    let split = combine(&partials, &o, 3, pos);
                    assert_eq!(split.token, whole.token, "{parts} parts");
                    assert!(
                        (split.confidence - whole.confidence).abs() < 1e-12,
                        "{split:?} vs {whole:?}"
                    );
                    assert!(
                        (split.entropy - whole.entropy).abs() < 1e-9,
                        "{split:?} vs {whole:?}"
                    );
                    // The max-and-sum-exp reduction: one slice's numbers.
                    assert!((split.logprob - whole.logprob).abs() < 1e-12);
                    assert_eq!(split.top.len(), 5);
                    for ((ta, la), (tb, lb)) in split.top.iter().zip(whole.top.iter()) {
                        assert_eq!(ta, tb, "{parts} parts: top tokens");
                        assert!((la - lb).abs() < 1e-12, "{la} vs {lb}");
                    }
                }
            }
        }
    }

    /// log_softmax in f64, the naive way, over the same guided logits.
    fn naive_log_softmax(logits: &[f32]) -> Vec<f64> {
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        logits.iter().map(|&l| l as f64 - z.ln()).collect()
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_top_k_its_largest() {
        let logits: Vec<f32> = (0..50)
            .map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.3)
            .collect();
        let want = naive_log_softmax(&logits);
        let mut by_value: Vec<usize> = (0..50).collect();
        by_value.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
        for k in 0..=5u8 {
            for temperature in [0.0, 0.7] {
                let o = PredictOptions {
                    temperature,
                    top_logprobs: k,
                    mask: 1000,
                    eos: 1001,
                    eot: None,
                    ..opts()
                };
                for pos in 0..10 {
                    let p = predict(&logits, None, &o, 1, pos, &mut Vec::new());
                    let chosen = want[p.token as usize];
                    assert!(
                        (p.logprob - chosen).abs() < 1e-12,
                        "{} vs {chosen}",
                        p.logprob
                    );
                    assert!(p.logprob <= 0.0);
                    assert!((p.logprob.exp() - p.confidence).abs() < 1e-12);
                    assert_eq!(p.top.len(), k as usize);
                    for (j, (t, l)) in p.top.iter().enumerate() {
                        assert_eq!(t as usize, by_value[j]);
                        assert!((l - want[t as usize]).abs() < 1e-12);
                    }
                    if temperature == 0.0 && k > 0 {
                        // Greedy: the chosen token is the top alternative.
                        let (t, l) = p.top.iter().next().unwrap();
                        assert_eq!((t, l), (p.token, p.logprob));
                    }
                }
            }
        }
        // Ties go to the lower id; excluded tokens (-inf) are no alternative.
        let o = PredictOptions {
            top_logprobs: 5,
            ..opts()
        };
        let p = predict(&[1.0, 2.0, 2.0, 5.0], None, &o, 0, 0, &mut Vec::new());
        let order: Vec<u32> = p.top.iter().map(|(t, _)| t).collect();
        assert_eq!(order, [3, 1, 2, 0]);
        let o = PredictOptions {
            logits_eos_inf: true,
            ..o
        };
        let p = predict(&[1.0, 2.0, 2.0, 5.0], None, &o, 0, 0, &mut Vec::new());
        let order: Vec<u32> = p.top.iter().map(|(t, _)| t).collect();
        assert_eq!(order, [1, 2, 0], "EOS (3) is at -inf");
    }

    #[test]
    fn temperature_sampling_is_seeded_and_follows_the_distribution() {
        let o = PredictOptions {
            temperature: 1.0,
            ..opts()
        };
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY, 0.0];
        let mut counts = [0usize; 4];
        for pos in 0..20_000 {
            let a = predict(&logits, None, &o, 5, pos, &mut Vec::new());
            let b = predict(&logits, None, &o, 5, pos, &mut Vec::new());
            assert_eq!(a, b, "same key, same draw");
            counts[a.token as usize] += 1;
        }
        // p = [0.2, 0.6, 0, 0.2]
        assert_eq!(counts[2], 0);
        let f1 = counts[1] as f64 / 20_000.0;
        assert!((f1 - 0.6).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn truncation_samples_the_renormalised_kept_tokens() {
        // p = [0.1, 0.4, 0.3, 0.2] at temperature 1.
        let logits: Vec<f32> = [0.1f32, 0.4, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let draw = |top_k: u32, top_p: f64| {
            let o = PredictOptions {
                temperature: 1.0,
                truncate: Truncate { top_k, top_p },
                ..opts()
            };
            let mut counts = [0usize; 4];
            for pos in 0..20_000 {
                let p = predict(&logits, None, &o, 2, pos, &mut Vec::new());
                counts[p.token as usize] += 1;
                // Confidence and logprob stay the model's.
                assert!((p.confidence - [0.1, 0.4, 0.3, 0.2][p.token as usize]).abs() < 1e-6);
                assert!((p.logprob.exp() - p.confidence).abs() < 1e-12);
            }
            counts.map(|c| c as f64 / 20_000.0)
        };
        let near = |got: [f64; 4], want: [f64; 4]| {
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 0.015),
                "{got:?} vs {want:?}"
            );
        };
        near(draw(0, 1.0), [0.1, 0.4, 0.3, 0.2]);
        near(draw(2, 1.0), [0.0, 4.0 / 7.0, 3.0 / 7.0, 0.0]);
        // 0.4 + 0.3 reaches 0.65: two tokens.
        near(draw(0, 0.65), [0.0, 4.0 / 7.0, 3.0 / 7.0, 0.0]);
        // 0.4 + 0.3 + 0.2 = 0.9 reaches 0.71.
        near(draw(0, 0.71), [0.0, 4.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0]);
        // top-k first, then top-p of what it kept: 0.4 / 0.7 = 0.57 >= 0.5.
        near(draw(2, 0.5), [0.0, 1.0, 0.0, 0.0]);
        near(draw(1, 1.0), [0.0, 1.0, 0.0, 0.0]);
        // Off, the draw is the untruncated one token for token.
        let o = PredictOptions {
            temperature: 0.8,
            ..opts()
        };
        let off = PredictOptions {
            truncate: Truncate {
                top_k: 4,
                top_p: 1.0,
            },
            ..o
        };
        for pos in 0..200 {
            let a = predict(&logits, None, &o, 1, pos, &mut Vec::new());
            let b = predict(&logits, None, &off, 1, pos, &mut Vec::new());
            assert_eq!(a, b);
        }
    }
}
