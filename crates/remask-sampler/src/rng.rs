//! A counter-based random number generator.
//!
//! Every random number the sampler draws is a pure function of
//! `(seed, stream, step, position, index)`. No generator state is carried
//! from one draw to the next, so the result of a request does not depend on
//! which other requests share its batch, on which worker evaluates a
//! position, or on the order in which positions are visited. The Python
//! reference under `tests/reference` implements the same function, which is
//! what lets temperature sampling and random remasking be compared token for
//! token.
//!
//! The mixing function is SplitMix64's finaliser; `absorb` folds one more
//! 64-bit word into the running hash.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Which family of draws a number belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// One uniform per vocabulary entry, turned into Gumbel noise.
    Gumbel = 1,
    /// One uniform per position: the confidence of random remasking.
    Remask = 2,
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn absorb(h: u64, v: u64) -> u64 {
    mix64(h ^ v.wrapping_add(GOLDEN))
}

/// The key of one position at one denoising step of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseKey(u64);

impl NoiseKey {
    pub fn new(seed: u64, stream: Stream, step: u64, position: u64) -> Self {
        let h = absorb(
            absorb(absorb(absorb(0, seed), stream as u64), step),
            position,
        );
        NoiseKey(h)
    }

    /// The key's 64 bits (to hand to a GPU kernel that draws the same numbers).
    pub fn raw(self) -> u64 {
        self.0
    }

    /// The `index`-th uniform number of this key, in the open interval (0, 1):
    /// 52 random bits plus one half is exact in an f64, so neither end is reached.
    pub fn uniform(self, index: u64) -> f64 {
        ((absorb(self.0, index) >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_inside_the_open_interval_and_spread() {
        let key = NoiseKey::new(7, Stream::Gumbel, 3, 11);
        let mut sum = 0.0;
        for i in 0..10_000 {
            let u = key.uniform(i);
            assert!(u > 0.0 && u < 1.0);
            sum += u;
        }
        let mean = sum / 10_000.0;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn keys_differ_in_every_coordinate() {
        let base = NoiseKey::new(1, Stream::Gumbel, 2, 3);
        assert_ne!(base, NoiseKey::new(0, Stream::Gumbel, 2, 3));
        assert_ne!(base, NoiseKey::new(1, Stream::Remask, 2, 3));
        assert_ne!(base, NoiseKey::new(1, Stream::Gumbel, 0, 3));
        assert_ne!(base, NoiseKey::new(1, Stream::Gumbel, 2, 0));
        assert_eq!(base, NoiseKey::new(1, Stream::Gumbel, 2, 3));
    }

    /// Pinned values: the Python reference asserts the same numbers.
    #[test]
    fn pinned_values() {
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161D_100B_05E5);
        let extreme = |bits: u64| (bits as f64 + 0.5) * (1.0 / (1u64 << 52) as f64);
        assert!(extreme(0) > 0.0 && extreme((1 << 52) - 1) < 1.0);
    }
}
