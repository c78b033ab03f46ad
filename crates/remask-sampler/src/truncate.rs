//! top-k and top-p (nucleus) truncation of the draw at temperature > 0,
//! exact over a vocabulary split across tensor-parallel ranks.
//!
//! The kept set is every token whose guided logit is at least a threshold:
//! top-k's is the k-th largest guided logit (ties with it all kept, as
//! Hugging Face's and vLLM's warpers keep them); top-p's is the largest
//! value whose tokens, among top-k's, hold at least `top_p` of the tempered
//! probability mass `softmax(l / T)`. top-k applies first, then top-p over
//! what it kept (vLLM's and Hugging Face's order). The draw is the
//! Gumbel-max over the kept tokens only, each with its own noise unchanged:
//! a sample of `softmax(l / T)` renormalised over them, and with truncation
//! off bit for bit the untruncated draw. Confidence, entropy and logprobs
//! stay those of the model's own distribution (LLaDA ranks by the model's
//! probability; vLLM returns raw logprobs).
//!
//! A threshold needs the whole row and no rank holds it, so it is found by a
//! radix select over the logits' ordered 32-bit keys, 8 bits a round, at
//! most four rounds per threshold: each rank histograms its slice for the
//! round (`Round::histogram`), the histograms are summed, and
//! `Select::update` picks the next digit. Counts and masses are integers
//! (mass in units of 2^-40 of the largest token's, truncated), so their sum
//! is the same whatever the split: every topology finds the same threshold.

use crate::predict::PredictOptions;

/// What a request truncates the draw to; `OFF` keeps every token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truncate {
    /// Keep the `top_k` most likely tokens (ties at the k-th kept); 0: off.
    pub top_k: u32,
    /// Keep the most likely tokens holding at least `top_p` of the tempered
    /// mass, in (0, 1]; 1: off.
    pub top_p: f64,
}

impl Truncate {
    pub const OFF: Truncate = Truncate {
        top_k: 0,
        top_p: 1.0,
    };

    pub fn is_off(&self) -> bool {
        self.top_k == 0 && self.top_p >= 1.0
    }
}

impl Default for Truncate {
    fn default() -> Self {
        Truncate::OFF
    }
}

/// The ordered key of a logit: `key(a) < key(b)` exactly when `a < b`
/// (for non-NaN values; -0.0 sorts just below +0.0).
pub fn key(logit: f32) -> u32 {
    let bits = logit.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Bins of one round: one per value of an 8-bit digit.
pub const BINS: usize = 256;

/// The unit of the integer masses: the largest token weighs `2^40`.
pub const MASS_UNIT: f64 = (1u64 << 40) as f64;

/// What a rank computes for one position in one round of the select.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Round {
    /// Only keys at least this count (top-p counts among top-k's tokens).
    pub floor: u32,
    /// The digits decided so far, in place (the bits below them zero).
    pub prefix: u32,
    /// How many 8-bit digits are decided (0 to 3): keys that share them are
    /// binned by the next one.
    pub level: u32,
    /// With `temperature` > 0 the bins also weigh their tokens,
    /// `exp((l - max) / temperature)` in units of `MASS_UNIT`; 0: counts only.
    pub temperature: f64,
    /// The largest guided logit of the whole row.
    pub max: f64,
}

/// One round's histogram of one position (summed over the ranks).
#[derive(Clone, Debug, PartialEq)]
pub struct Bins {
    pub count: [u64; BINS],
    pub mass: [u64; BINS],
}

impl Default for Bins {
    fn default() -> Self {
        Bins {
            count: [0; BINS],
            mass: [0; BINS],
        }
    }
}

impl Bins {
    /// Adds another slice's bins (integers: the order does not matter).
    pub fn add(&mut self, other: &Bins) {
        for (a, b) in self.count.iter_mut().zip(&other.count) {
            *a += b;
        }
        for (a, b) in self.mass.iter_mut().zip(&other.mass) {
            *a += b;
        }
    }
}

impl Round {
    /// The bin of a key, or `None` when the round does not count it.
    pub fn bin(&self, key: u32) -> Option<usize> {
        let shift = 24 - 8 * self.level;
        if key < self.floor || (self.level > 0 && key >> (shift + 8) != self.prefix >> (shift + 8))
        {
            return None;
        }
        Some((key >> shift) as usize & 0xFF)
    }

    /// A token's integer mass (0 when only counting).
    pub fn weight(&self, logit: f32) -> u64 {
        if self.temperature > 0.0 {
            // `as` truncates, as the kernel's conversion does; a weight is at
            // most MASS_UNIT (logit <= max), so a row of 2^23 tokens cannot
            // overflow. The `min` only guards a round that lies about max.
            ((((logit as f64 - self.max) / self.temperature).exp() * MASS_UNIT).min(MASS_UNIT))
                as u64
        } else {
            0
        }
    }

    /// Adds a slice's guided logits to `bins`; -inf and NaN (tokens the
    /// rules exclude) never count.
    pub fn histogram(&self, guided: &[f32], bins: &mut Bins) {
        for &l in guided.iter().filter(|l| l.is_finite()) {
            if let Some(b) = self.bin(key(l)) {
                bins.count[b] += 1;
                bins.mass[b] += self.weight(l);
            }
        }
    }
}

/// The select of one position's threshold, round by round: top-k's key
/// first (if asked), then top-p's among the tokens at or above it.
#[derive(Clone, Debug, PartialEq)]
pub struct Select {
    top_k: u32,
    top_p: f64,
    temperature: f64,
    max: f64,
    phase: Phase,
    /// top-k's threshold key once found (0: every token).
    floor: u32,
    prefix: u32,
    level: u32,
    /// Count (top-k) or mass (top-p) of the tokens above the current prefix.
    above: u64,
    /// top-p's mass to reach; 0 until the first top-p round gives the total.
    target: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    TopK,
    TopP,
    Done,
}

impl Select {
    /// The select for a position whose row's largest guided logit is `max`;
    /// `None` when nothing is truncated (greedy decoding keeps its argmax
    /// whatever the truncation, and a row without a finite logit draws
    /// nothing).
    pub fn new(opts: &PredictOptions, max: f64) -> Option<Select> {
        let t = opts.truncate;
        if !opts.truncates() || !max.is_finite() {
            return None;
        }
        Some(Select {
            top_k: t.top_k,
            top_p: t.top_p,
            temperature: opts.temperature,
            max,
            phase: if t.top_k > 0 {
                Phase::TopK
            } else {
                Phase::TopP
            },
            floor: 0,
            prefix: 0,
            level: 0,
            above: 0,
            target: 0,
        })
    }

    /// The next round, or `None` once the threshold is known.
    pub fn round(&self) -> Option<Round> {
        let round = |temperature| Round {
            floor: self.floor,
            prefix: self.prefix,
            level: self.level,
            temperature,
            max: self.max,
        };
        match self.phase {
            Phase::TopK => Some(Round {
                floor: 0,
                ..round(0.0)
            }),
            Phase::TopP => Some(round(self.temperature)),
            Phase::Done => None,
        }
    }

    /// The threshold key once found: the draw keeps the keys at least it.
    pub fn threshold(&self) -> Option<u32> {
        (self.phase == Phase::Done).then_some(self.floor)
    }

    /// Takes the round's bins, summed over every slice of the row.
    pub fn update(&mut self, bins: &Bins) {
        let shift = 24 - 8 * self.level;
        match self.phase {
            Phase::TopK => {
                let k = self.top_k as u64;
                let chosen = (0..BINS).rev().find(|&d| {
                    let reached = self.above + bins.count[d] >= k;
                    if !reached {
                        self.above += bins.count[d];
                    }
                    reached
                });
                match chosen {
                    // Fewer than k tokens: top-k keeps them all.
                    None => self.top_k_found(0),
                    Some(d) => {
                        let lower = self.prefix | (d as u32) << shift;
                        // The whole bin is kept: its lower bound keeps the same set.
                        if self.above + bins.count[d] == k || self.level == 3 {
                            self.top_k_found(lower);
                        } else {
                            self.prefix = lower;
                            self.level += 1;
                        }
                    }
                }
            }
            Phase::TopP => {
                if self.target == 0 {
                    let total: u64 = bins.mass.iter().sum();
                    self.target =
                        ((self.top_p * total as f64).ceil() as u64).clamp(1, total.max(1));
                }
                let target = self.target;
                let chosen = (0..BINS).rev().find(|&d| {
                    let reached = self.above + bins.mass[d] >= target;
                    if !reached {
                        self.above += bins.mass[d];
                    }
                    reached
                });
                match chosen {
                    // Nothing weighs anything (cannot happen with a finite
                    // maximum): keep top-k's set.
                    None => self.phase = Phase::Done,
                    Some(d) => {
                        let lower = self.prefix | (d as u32) << shift;
                        if bins.count[d] == 1 || self.level == 3 {
                            self.floor = self.floor.max(lower);
                            self.phase = Phase::Done;
                        } else {
                            self.prefix = lower;
                            self.level += 1;
                        }
                    }
                }
            }
            Phase::Done => {}
        }
    }

    fn top_k_found(&mut self, threshold: u32) {
        self.floor = threshold;
        if self.top_p < 1.0 {
            self.phase = Phase::TopP;
            self.prefix = 0;
            self.level = 0;
            self.above = 0;
        } else {
            self.phase = Phase::Done;
        }
    }
}

/// The threshold key of one position from its slices' guided logits (all
/// in one place: tests, and `predict` on a whole row).
pub fn threshold(slices: &[&[f32]], opts: &PredictOptions) -> u32 {
    let max = slices
        .iter()
        .flat_map(|s| s.iter())
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let Some(mut select) = Select::new(opts, max) else {
        return 0;
    };
    while let Some(round) = select.round() {
        let mut bins = Bins::default();
        for s in slices {
            let mut mine = Bins::default();
            round.histogram(s, &mut mine);
            bins.add(&mine);
        }
        select.update(&bins);
    }
    select.threshold().expect("the select ended")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::Remasking;

    fn opts(top_k: u32, top_p: f64, temperature: f64) -> PredictOptions {
        PredictOptions {
            temperature,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            eos: 0,
            eot: None,
            mask: u32::MAX,
            top_logprobs: 0,
            truncate: Truncate { top_k, top_p },
        }
    }

    #[test]
    fn keys_are_ordered_like_the_logits() {
        let mut values = vec![
            f32::NEG_INFINITY,
            -1e30,
            -3.5,
            -1.0,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.5,
            7.25,
            1e30,
            f32::INFINITY,
        ];
        let keys: Vec<u32> = values.iter().map(|&v| key(v)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:x?}");
        values.reverse();
        assert!(values.windows(2).all(|w| key(w[0]) > key(w[1])));
    }

    /// The kept set the naive way: sort by logit, take top-k (with ties),
    /// then the shortest prefix (whole tie groups) holding `top_p` of the
    /// integer masses.
    fn naive_threshold(logits: &[f32], o: &PredictOptions) -> u32 {
        let t = o.truncate;
        let mut sorted: Vec<f32> = logits.iter().copied().filter(|l| l.is_finite()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let mut floor = 0;
        if t.top_k > 0 && sorted.len() > t.top_k as usize {
            floor = key(sorted[t.top_k as usize - 1]);
        }
        if t.top_p < 1.0 {
            let max = sorted[0] as f64;
            let round = Round {
                floor,
                prefix: 0,
                level: 0,
                temperature: o.temperature,
                max,
            };
            let kept: Vec<f32> = sorted
                .iter()
                .copied()
                .filter(|&l| key(l) >= floor)
                .collect();
            let total: u64 = kept.iter().map(|&l| round.weight(l)).sum();
            let target = ((t.top_p * total as f64).ceil() as u64).clamp(1, total);
            let mut sum = 0;
            for (i, &l) in kept.iter().enumerate() {
                sum += round.weight(l);
                let last_of_ties = kept.get(i + 1) != Some(&l);
                if sum >= target && last_of_ties {
                    return floor.max(key(l));
                }
            }
        }
        floor
    }

    fn row(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000;
                (h as f32 / 1000.0 - 0.5) * 12.0
            })
            .collect()
    }

    #[test]
    fn the_select_finds_the_naive_threshold_on_any_split() {
        let mut logits = row(600, 7);
        // Ties, excluded tokens and a clear winner.
        logits[10] = logits[11];
        logits[12] = logits[11];
        logits[20] = f32::NEG_INFINITY;
        logits[21] = f32::NAN;
        logits[30] = 9.0;
        for (k, p, t) in [
            (1, 1.0, 1.0),
            (3, 1.0, 0.7),
            (50, 1.0, 1.0),
            (599, 1.0, 1.0),
            (5000, 1.0, 1.0),
            (0, 0.9, 1.0),
            (0, 0.5, 0.3),
            (0, 1e-9, 1.0),
            (0, 0.999, 2.0),
            (40, 0.8, 1.0),
            (3, 0.1, 1.5),
        ] {
            let o = opts(k, p, t);
            // Thresholds are compared by the sets they keep (a select that
            // ends on a whole bin gives the bin's lower bound).
            let kept_by = |th: u32| -> Vec<usize> {
                (0..logits.len())
                    .filter(|&i| logits[i].is_finite() && key(logits[i]) >= th)
                    .collect()
            };
            let want = kept_by(naive_threshold(&logits, &o));
            for parts in [1, 2, 3, 8] {
                let n = logits.len().div_ceil(parts);
                let slices: Vec<&[f32]> = logits.chunks(n).collect();
                let got = kept_by(threshold(&slices, &o));
                assert_eq!(got, want, "k {k} p {p} t {t}: {parts} parts");
            }
            let kept = want.len();
            if k > 0 && p == 1.0 {
                assert!(kept >= (k as usize).min(598), "k {k}: {kept} kept");
            }
            assert!(kept >= 1);
        }
        // top-k of 1 keeps the maximum only; top-k of 3 keeps the three ties.
        let th = threshold(&[&logits], &opts(1, 1.0, 1.0));
        assert!(
            th <= key(9.0)
                && logits
                    .iter()
                    .all(|&l| l == 9.0 || l.is_nan() || key(l) < th)
        );
        let mut ties = vec![0.0f32; 10];
        ties[4] = 2.0;
        ties[5] = 1.0;
        ties[6] = 1.0;
        let th = threshold(&[&ties], &opts(2, 1.0, 1.0));
        let kept: Vec<usize> = (0..10).filter(|&i| key(ties[i]) >= th).collect();
        assert_eq!(
            kept,
            [4, 5, 6],
            "both tokens tied at the second place are kept"
        );
    }

    #[test]
    fn off_and_greedy_keep_everything() {
        let logits = row(100, 3);
        assert_eq!(threshold(&[&logits], &opts(0, 1.0, 1.0)), 0);
        assert_eq!(threshold(&[&logits], &opts(5, 0.5, 0.0)), 0);
        assert_eq!(threshold(&[&[f32::NEG_INFINITY; 4]], &opts(5, 0.5, 1.0)), 0);
    }
}
