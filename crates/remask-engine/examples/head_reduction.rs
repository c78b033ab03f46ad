//! Times the host head reduction (`partial_queries`, what the CPU backend
//! runs on each queried row's logits) with and without top-k logprobs, and
//! at temperature 1 with a truncated draw (top-k 50, top-p 0.95: the
//! select's rounds and the second reduction, as `Engine::forward` runs
//! them): `cargo run --release -p remask-engine --example head_reduction --
//! [rows] [vocab] [iters]` (default 256 rows, LLaDA-8B's 126464 tokens, 20).

use remask_engine::{Query, histogram_queries, partial_queries, run_selects, selects};
use remask_sampler::{PredictOptions, Remasking, Truncate};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let rows = args.first().copied().unwrap_or(256);
    let vocab = args.get(1).copied().unwrap_or(126_464);
    let iters = args.get(2).copied().unwrap_or(20);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) % 10_007) as f32 * 1e-3 - 5.0)
        .collect();
    let time = |f: &dyn Fn()| {
        let mut ms: Vec<f64> = (0..iters + 2)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(2)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    };
    let rounds_run = std::cell::Cell::new(0usize);
    for temperature in [0.0, 1.0] {
        let mut medians = Vec::new();
        for (k, truncate) in [
            (0u8, Truncate::OFF),
            (5, Truncate::OFF),
            (
                0,
                Truncate {
                    top_k: 50,
                    top_p: 0.95,
                },
            ),
        ] {
            let query = Query {
                cond_base: 0,
                uncond_base: None,
                first: 0,
                positions: (0..rows).collect(),
                step: 0,
                options: PredictOptions {
                    temperature,
                    cfg_scale: 0.0,
                    remasking: Remasking::LowConfidence,
                    seed: 1,
                    logits_eos_inf: false,
                    confidence_eos_eot_inf: false,
                    eos: 1,
                    eot: None,
                    mask: 2,
                    top_logprobs: k,
                    truncate,
                },
            };
            let queries = [query];
            medians.push(time(&|| {
                let partials = vec![partial_queries(&logits, 0..vocab, &queries, &[])];
                if truncate.is_off() || temperature == 0.0 {
                    std::hint::black_box(partials);
                    return;
                }
                let mut n = 0;
                let floors = run_selects(selects(&partials, &queries), |rounds| {
                    n += 1;
                    vec![histogram_queries(&logits, 0..vocab, &queries, rounds)]
                });
                rounds_run.set(n);
                std::hint::black_box(partial_queries(&logits, 0..vocab, &queries, &floors));
            }));
        }
        println!(
            "temperature {temperature}: {rows} rows x {vocab}: k=0 {:.2} ms, k=5 {:.2} ms (ratio {:.3}), top-k 50 + top-p 0.95 {:.2} ms (ratio {:.3}, {} select rounds)",
            medians[0],
            medians[1],
            medians[1] / medians[0],
            medians[2],
            medians[2] / medians[0],
            rounds_run.get()
        );
    }
}
