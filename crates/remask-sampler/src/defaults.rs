//! What a request leaves unset. The CLI, gRPC and HTTP resolve a request's
//! settings through the same `Defaults`, so the same request gives the same
//! answer through all three. A server builds its `Defaults` from the
//! built-in values, its flags (`--rule`, `--cache`), and the checkpoint's
//! generation_config.json where that says (the model's authors know best).

use crate::canvas::{CacheMode, CommitRule, SamplerConfig};
use crate::predict::Remasking;
use crate::truncate::Truncate;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    /// Tokens to generate (128, LLaDA's reference).
    pub gen_length: usize,
    /// Block length when it divides the generation's length; otherwise the
    /// whole generation is one block (32, LLaDA's instruct setting).
    pub block_length: usize,
    pub remasking: Remasking,
    /// The commit rule of requests that name none (the fixed schedule).
    pub rule: CommitRule,
    /// 0: greedy.
    pub temperature: f64,
    pub cache: CacheMode,
    /// top-k / top-p (off unless the checkpoint's generation_config.json
    /// sets them).
    pub truncate: Truncate,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            gen_length: 128,
            block_length: 32,
            remasking: Remasking::LowConfidence,
            rule: CommitRule::Fixed,
            temperature: 0.0,
            cache: CacheMode::None,
            truncate: Truncate::OFF,
        }
    }
}

/// A request's settings as given: `None` where it names none.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Settings {
    pub gen_length: Option<usize>,
    pub steps: Option<usize>,
    pub block_length: Option<usize>,
    pub remasking: Option<Remasking>,
    pub rule: Option<CommitRule>,
    pub temperature: Option<f64>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub early_stop: bool,
    pub logits_eos_inf: bool,
    pub confidence_eos_eot_inf: bool,
    pub cache: Option<CacheMode>,
    /// `SamplerConfig::logprobs` (no server default: off unless asked for).
    pub logprobs: Option<usize>,
    /// 0: off.
    pub top_k: Option<u32>,
    /// 1: off.
    pub top_p: Option<f64>,
}

impl Defaults {
    /// The sampler settings of a request. Unset steps under the fixed
    /// schedule are one per token (the reference's exact setting); the
    /// adaptive rules take none.
    pub fn resolve(&self, s: &Settings) -> SamplerConfig {
        let gen_length = s.gen_length.unwrap_or(self.gen_length);
        let block_length = s.block_length.unwrap_or(
            if self.block_length > 0 && gen_length.is_multiple_of(self.block_length) {
                self.block_length
            } else {
                gen_length
            },
        );
        let rule = s.rule.unwrap_or(self.rule);
        let steps = s
            .steps
            .unwrap_or(if rule.is_adaptive() { 0 } else { gen_length });
        SamplerConfig {
            gen_length,
            steps,
            block_length,
            remasking: s.remasking.unwrap_or(self.remasking),
            rule,
            early_stop: s.early_stop,
            temperature: s.temperature.unwrap_or(self.temperature),
            cfg_scale: s.cfg_scale,
            seed: s.seed,
            logits_eos_inf: s.logits_eos_inf,
            confidence_eos_eot_inf: s.confidence_eos_eot_inf,
            cache: s.cache.unwrap_or(self.cache),
            logprobs: s.logprobs,
            truncate: Truncate {
                top_k: s.top_k.unwrap_or(self.truncate.top_k),
                top_p: s.top_p.unwrap_or(self.truncate.top_p),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_settings_follow_the_length() {
        let d = Defaults::default();
        let c = d.resolve(&Settings::default());
        assert_eq!((c.gen_length, c.steps, c.block_length), (128, 128, 32));
        let c = d.resolve(&Settings {
            gen_length: Some(48),
            ..Settings::default()
        });
        // 32 does not divide 48: one block; a step per token
        assert_eq!((c.gen_length, c.steps, c.block_length), (48, 48, 48));
        let adaptive = Defaults {
            rule: CommitRule::Threshold(0.9),
            ..d
        };
        assert_eq!(adaptive.resolve(&Settings::default()).steps, 0);
        let given = d.resolve(&Settings {
            steps: Some(64),
            block_length: Some(64),
            temperature: Some(0.5),
            ..Settings::default()
        });
        assert_eq!(
            (given.steps, given.block_length, given.temperature),
            (64, 64, 0.5)
        );
    }
}
