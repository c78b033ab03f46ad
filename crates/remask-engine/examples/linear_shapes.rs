//! Times `Backend::linear` on the matrix shapes of one forward pass, to see
//! where CPU time goes: `cargo run --release --example linear_shapes -- 320 768 2048 32768`.

use remask_engine::{Backend, CpuBackend, Heads, Matrix, Packing};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (m, d, f, v) = match a[..] {
        [m, d, f, v] => (m, d, f, v),
        _ => (320, 768, 2048, 32768),
    };
    let be = CpuBackend::default();
    let mat = |r: usize, c: usize| Matrix {
        data: (0..r * c)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect(),
        rows: r,
        cols: c,
    };
    for (name, x, w) in [
        ("d x d", mat(m, d), mat(d, d)),
        ("d -> mlp", mat(m, d), mat(f, d)),
        ("mlp -> d", mat(m, f), mat(d, f)),
        ("head", mat(m, d), mat(v, d)),
    ] {
        be.linear(&x, &w);
        let iters = 5;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(be.linear(&x, &w));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let gflops = 2.0 * (m * w.rows * w.cols) as f64 / ms / 1e6;
        println!(
            "{name:10} [{m}x{}] x [{}x{}]^T: {ms:8.2} ms  {gflops:6.1} GFLOP/s",
            x.cols, w.rows, w.cols
        );
    }
    // The other kernels of one layer, at 64-wide heads.
    let heads = Heads {
        n_heads: d / 64,
        n_kv_heads: d / 64,
        head_dim: 64,
    };
    let (q, k, vv) = (mat(m, d), mat(m, d), mat(m, d));
    let packing = Packing::new([m]);
    let norm = mat(1, d);
    let (g, u) = (mat(m, f), mat(m, f));
    let time = |name: &str, f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        println!("{name:10} {:8.2} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
    };
    time("attention", &mut || {
        drop(be.attention(&q, &k, &vv, heads, &packing, &packing))
    });
    time("rms_norm", &mut || drop(be.rms_norm(&q, &norm, 1e-5)));
    time("silu_mul", &mut || drop(be.silu_mul(&g, &u)));
}
