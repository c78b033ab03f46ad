//! A vectorisable `exp` for the CPU backend's softmax and SiLU. The libm call
//! (`f32::exp`) is scalar and was a fifth of the non-GEMM time; this
//! polynomial has a relative error below 3e-7 and compiles to SIMD (AVX-512
//! or AVX2 when the CPU has them, chosen at run time).

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to the nearest integer, branch-free.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const LANES: usize = 16;

/// Reduces with one accumulator per lane, so the loop vectorises (a single
/// f32 accumulator would force sequential adds).
#[inline(always)]
fn reduce(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = f(acc[i], c[i]);
        }
    }
    tail.iter()
        .fold(acc.into_iter().fold(init, &f), |a, &x| f(a, x))
}

#[inline(always)]
fn softmax_scaled_body(row: &mut [f32], scale: f32) {
    let max = reduce(row, f32::NEG_INFINITY, |a, b| if b > a { b } else { a }) * scale;
    for s in row.iter_mut() {
        *s = exp(*s * scale - max);
    }
    let inv = 1.0 / reduce(row, 0.0, |a, b| a + b);
    row.iter_mut().for_each(|s| *s *= inv);
}

#[inline(always)]
fn silu_mul_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { $body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the feature was detected at run time.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(softmax_scaled, softmax_scaled_body, (row: &mut [f32], scale: f32));
dispatch!(silu_mul, silu_mul_body, (out: &mut [f32], gate: &[f32], up: &[f32]));

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((super::exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.01;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 10.0).collect();
        super::softmax_scaled(&mut row, 0.5);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }
}
