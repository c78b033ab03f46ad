//! `remask bench`: median time of one full forward pass (all logits, as a
//! PyTorch reference computes them), of one denoising step (forward with
//! the head on the block's positions only, plus prediction), and of one
//! cached step of each K/V cache mode (after the block's first, storing,
//! forward), side by side in one run. `--temperature` with `--top-k` /
//! `--top-p` has the steps sample and truncate their draw (what the select's
//! rounds cost).

use crate::{CliError, CliResult, Globals, default_model};
use remask_engine::{Engine, KvError, Packing, StepBatch, cache_ids};
use remask_model::{Checkpoint, TextCodec};
use remask_sampler::{BatchStep, CacheMode, Canvas, Prediction, SamplerConfig, Truncate};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory, or a Hugging Face Hub model ORG/NAME[@REVISION] (default: the embedded default model).
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
    /// Generated span at the end of each sequence (default: one block); the
    /// steps are timed in its first block, so that a prefix-cache step feeds
    /// the whole span and a dual-cache step the block only.
    #[arg(long, env = "REMASK_GEN_LENGTH")]
    pub gen_length: Option<usize>,
    /// Alternatives per position the denoising step's head reduction also
    /// returns with their log-probabilities (0 to 5; unset: no logprobs,
    /// the default path), to measure what `logprobs` / `top_logprobs` cost.
    #[arg(long, env = "REMASK_BENCH_TOP_LOGPROBS", value_parser = clap::value_parser!(u8).range(0..=5))]
    pub top_logprobs: Option<u8>,
    /// Temperature of the denoising steps' draw (0: greedy, the default);
    /// above 0, Gumbel-max sampling, which --top-k / --top-p truncate.
    #[arg(
        long,
        env = "REMASK_BENCH_TEMPERATURE",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub temperature: f64,
    /// With --temperature > 0: the steps draw among the K most likely
    /// tokens (0: off), to measure what top-k's select costs.
    #[arg(long, env = "REMASK_BENCH_TOP_K", default_value_t = 0)]
    pub top_k: u32,
    /// With --temperature > 0: the steps draw among the most likely tokens
    /// holding this much of the tempered probability, in (0, 1] (1: off).
    #[arg(
        long,
        env = "REMASK_BENCH_TOP_P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub top_p: f64,
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
    let gen_length = args.gen_length.unwrap_or(block_length);
    if gen_length >= args.seq_len || !gen_length.is_multiple_of(block_length) {
        return Err(CliError::Usage(
            "--gen-length must be a multiple of --block-length below --seq-len".into(),
        ));
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(CliError::Usage(format!(
            "--temperature must be a finite number >= 0, got {}",
            args.temperature
        )));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(CliError::Usage(format!(
            "--top-p must be in (0, 1], got {}",
            args.top_p
        )));
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
                        let lengths = packing.sequences().map(|s| s.len());
                        let mut feed = remask_engine::kv::Feed::plain(lengths);
                        let x = m.layers(b, m.embed(b, ids), &mut feed);
                        std::hint::black_box(m.head_logits(b, &x, None));
                        b.synchronize();
                    });
                },
                &|batch| {
                    let p = gpus.run(batch);
                    gpus.on_ranks(|b, _| b.synchronize());
                    p
                },
                &|ids| gpus.release(ids),
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
        &|batch| engine.run(batch),
        &|ids| engine.release(ids),
    )
}

type StepResult = Result<Vec<Vec<Prediction>>, KvError>;

/// Times `forward` (a full forward pass of token ids) and `step` (one
/// denoising step); each returns once its work is done, on every device.
fn measure(
    args: &BenchArgs,
    dir: &std::path::Path,
    ckpt: &Checkpoint,
    special: remask_model::SpecialTokens,
    forward: &dyn Fn(&[u32], &Packing),
    step: &dyn Fn(&StepBatch) -> StepResult,
    release: &dyn Fn(&[u64]) -> usize,
) -> CliResult {
    let c = &ckpt.config;
    let block_length = args.block_length.unwrap_or((args.seq_len / 2).clamp(1, 32));
    let gen_length = args.gen_length.unwrap_or(block_length);
    let failed = |e: KvError| CliError::Internal(e.into());

    // Deterministic ids, never the mask.
    let ids: Vec<u32> = (0..args.batch * args.seq_len)
        .map(|i| ((i as u64 * 2_654_435_761 + 17) % c.vocab_size as u64) as u32)
        .map(|t| if t == special.mask { t - 1 } else { t })
        .collect();
    let packing = Packing::new(vec![args.seq_len; args.batch]);
    let mut forward = time(args.iters, args.warmup, || forward(&ids, &packing));

    // One denoising step: B canvases, the prompt then the masked span.
    let space = remask_engine::token_space(c, &special);
    let prompt_len = args.seq_len - gen_length;
    let canvases = |cache| {
        let config = SamplerConfig {
            gen_length,
            steps: gen_length,
            block_length,
            cache,
            logprobs: args.top_logprobs.map(usize::from),
            temperature: args.temperature,
            truncate: Truncate {
                top_k: args.top_k,
                top_p: args.top_p,
            },
            ..SamplerConfig::default()
        };
        ids.chunks(args.seq_len)
            .map(|s| Canvas::new(&s[..prompt_len], config, space))
            .collect::<Result<Vec<Canvas>, _>>()
    };
    let batch_of = |canvases: &[Canvas]| {
        let plans: Vec<_> = canvases.iter().map(|c| c.plan()).collect();
        let requests: Vec<_> = (0..canvases.len())
            .map(|i| (i as u64, &canvases[i], &plans[i]))
            .collect();
        StepBatch::new(&requests)
    };
    let full = batch_of(&canvases(CacheMode::None)?);
    let mut step_ms = time(args.iters, args.warmup, || {
        std::hint::black_box(step(&full).expect("no store is read"));
    });
    // A cached step: the block's first forward stores, its commits are
    // applied, and the next (reading) step is timed.
    let mut cached = Vec::new();
    for mode in [CacheMode::Prefix, CacheMode::Dual] {
        let mut canvases = canvases(mode)?;
        let first = BatchStep::new(&canvases);
        let predictions = step(&batch_of(&canvases)).map_err(failed)?;
        first.commit(&mut canvases, predictions);
        let batch = batch_of(&canvases);
        let fed = batch.ids.len() / args.batch;
        let mut err = None;
        let mut ms = time(args.iters, args.warmup, || {
            if let Err(e) = step(&batch) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(failed(e));
        }
        let ids: Vec<u64> = (0..args.batch as u64).flat_map(cache_ids).collect();
        release(&ids);
        cached.push((mode, fed, median(&mut ms)));
    }

    let threads = rayon::current_num_threads();
    let gpus = args.device.gpus(1)?;
    let all = forward.clone();
    let (fwd, stp) = (median(&mut forward), median(&mut step_ms));
    let cached_json: serde_json::Map<String, serde_json::Value> = cached
        .iter()
        .map(|(mode, fed, ms)| {
            let v = serde_json::json!({
                "ms_per_step_median": ms,
                "fed_positions": fed,
                "ratio_to_full_step": ms / stp,
            });
            (mode.as_str().to_string(), v)
        })
        .collect();
    if args.json {
        let out = serde_json::json!({
            "impl": "remask",
            "backend": args.device.backend,
            "devices": gpus,
            "ms_per_forward_median": fwd,
            "ms_per_step_median": stp,
            "cached_step": cached_json,
            "ms_all": all,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "block_length": block_length,
            "gen_length": gen_length,
            "top_logprobs": args.top_logprobs,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
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
        let cached: Vec<String> = cached
            .iter()
            .map(|(mode, fed, ms)| {
                format!("{mode} {ms:.2} ms ({:.2}x, {fed} positions fed)", ms / stp)
            })
            .collect();
        println!(
            "remask {}: batch {} seq_len {} {on}: forward {fwd:.2} ms (median of {}), denoising step {stp:.2} ms; cached step: {}",
            args.device.backend,
            args.batch,
            args.seq_len,
            args.iters,
            cached.join(", ")
        );
    }
    Ok(())
}
