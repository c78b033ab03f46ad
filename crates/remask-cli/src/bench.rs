//! `remask bench`: median time of one full forward pass (all logits, as a
//! PyTorch reference computes them) and of one denoising step (forward with
//! the head on the block's positions only, plus prediction).

use crate::{CliError, CliResult, Globals, default_model};
use remask_engine::{Engine, Packing};
use remask_model::{Checkpoint, TextCodec};
use remask_sampler::{Canvas, SamplerConfig};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory (default: the embedded default model).
    #[arg(long, env = "REMASK_MODEL")]
    pub model: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, env = "REMASK_BATCH", default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, env = "REMASK_SEQ_LEN", default_value_t = 320)]
    pub seq_len: usize,
    /// Timed iterations (after the warm-up).
    #[arg(long, env = "REMASK_ITERS", default_value_t = 5)]
    pub iters: usize,
    /// Untimed iterations first.
    #[arg(long, env = "REMASK_WARMUP", default_value_t = 1)]
    pub warmup: usize,
    /// Masked block of the denoising-step measurement (default: 32, or half
    /// of a shorter --seq-len).
    #[arg(long, env = "REMASK_BLOCK_LENGTH")]
    pub block_length: Option<usize>,
    /// Print one JSON object.
    #[arg(long, env = "REMASK_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn time(iters: usize, warmup: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

pub fn run(args: BenchArgs, globals: &Globals) -> CliResult {
    if args.batch == 0 || args.seq_len == 0 || args.iters == 0 {
        return Err(CliError::Usage(
            "--batch, --seq-len and --iters must be at least 1".into(),
        ));
    }
    const MAX_BATCH: usize = 4096;
    if args.batch > MAX_BATCH {
        return Err(CliError::Usage(format!(
            "--batch {} is over the limit of {MAX_BATCH}",
            args.batch
        )));
    }
    let block_length = args.block_length.unwrap_or((args.seq_len / 2).clamp(1, 32));
    if block_length == 0 || block_length >= args.seq_len {
        return Err(CliError::Usage(
            "--block-length must be between 1 and --seq-len - 1".into(),
        ));
    }
    let dir = default_model::resolve(args.model.clone(), globals)?;
    let ckpt = Checkpoint::open(&dir)?;
    let c = &ckpt.config;
    if args.seq_len > c.max_sequence_length {
        return Err(CliError::Usage(format!(
            "--seq-len {} exceeds max_sequence_length {}",
            args.seq_len, c.max_sequence_length
        )));
    }
    let special = TextCodec::load(&dir)?.special_tokens(c)?;
    if args.device.is_cuda()? {
        #[cfg(feature = "cuda")]
        {
            // The listed GPUs as one tensor-parallel group (one GPU: a group
            // of one). Every rank waits for its queued work before the clock
            // stops; the step's head is reduced on the GPUs.
            let gpus = args.device.cuda_engine(&ckpt, 1)?;
            return measure(
                &args,
                &dir,
                &ckpt,
                special,
                &|ids, packing| {
                    // Every position's logits, left on the devices.
                    gpus.on_ranks(|b, m| {
                        let x = m.layers(b, m.embed(b, ids), packing);
                        std::hint::black_box(m.head_logits(b, &x, None));
                        b.synchronize();
                    });
                },
                &|batch| {
                    std::hint::black_box(gpus.run(batch));
                    gpus.on_ranks(|b, _| b.synchronize());
                },
            );
        }
    }
    let engine = Engine::load(&ckpt, 1)?;
    measure(
        &args,
        &dir,
        &ckpt,
        special,
        // Every position's logits, copied out as a PyTorch reference does.
        &|ids, packing| {
            std::hint::black_box(engine.logits(ids, packing, None));
        },
        &|batch| {
            std::hint::black_box(engine.run(batch));
        },
    )
}

/// Times `forward` (a full forward pass of token ids) and `step` (one
/// denoising step); each returns once its work is done, on every device.
fn measure(
    args: &BenchArgs,
    dir: &std::path::Path,
    ckpt: &Checkpoint,
    special: remask_model::SpecialTokens,
    forward: &dyn Fn(&[u32], &Packing),
    step: &dyn Fn(&remask_engine::StepBatch),
) -> CliResult {
    let c = &ckpt.config;
    let block_length = args.block_length.unwrap_or((args.seq_len / 2).clamp(1, 32));

    // Deterministic ids, never the mask.
    let ids: Vec<u32> = (0..args.batch * args.seq_len)
        .map(|i| ((i as u64 * 2_654_435_761 + 17) % c.vocab_size as u64) as u32)
        .map(|t| if t == special.mask { t - 1 } else { t })
        .collect();
    let packing = Packing::new(vec![args.seq_len; args.batch]);
    let mut forward = time(args.iters, args.warmup, || forward(&ids, &packing));

    // One denoising step: B canvases, the prompt then one masked block.
    let config = SamplerConfig {
        gen_length: block_length,
        steps: block_length,
        block_length,
        ..SamplerConfig::default()
    };
    let space = remask_engine::token_space(c, &special);
    let prompt_len = args.seq_len - block_length;
    let canvases = ids
        .chunks(args.seq_len)
        .map(|s| Canvas::new(&s[..prompt_len], config, space))
        .collect::<Result<Vec<_>, _>>()?;
    let plans: Vec<_> = canvases.iter().map(|c| c.plan()).collect();
    let requests: Vec<_> = canvases.iter().zip(&plans).collect();
    let batch = remask_engine::StepBatch::new(&requests);
    let mut step = time(args.iters, args.warmup, || step(&batch));

    let threads = rayon::current_num_threads();
    let gpus = args.device.gpus(1)?;
    let all = forward.clone();
    let (fwd, stp) = (median(&mut forward), median(&mut step));
    if args.json {
        let out = serde_json::json!({
            "impl": "remask",
            "backend": args.device.backend,
            "devices": gpus,
            "ms_per_forward_median": fwd,
            "ms_per_step_median": stp,
            "ms_all": all,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "block_length": block_length,
            "threads": threads,
            "model": dir,
        });
        println!("{out}");
    } else {
        let on = if gpus.is_empty() {
            format!("threads {threads}")
        } else {
            format!("GPUs {}", crate::device::list(&gpus))
        };
        println!(
            "remask {}: batch {} seq_len {} {on}: forward {fwd:.2} ms (median of {}), denoising step {stp:.2} ms",
            args.device.backend, args.batch, args.seq_len, args.iters
        );
    }
    Ok(())
}
