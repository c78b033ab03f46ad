//! `remask model ...`: checkpoint tools.

use crate::{CliError, CliResult};
use remask_model::{DType, InitOptions, Preset, init_checkpoint};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Write a random-weight checkpoint in the Hugging Face LLaDA layout.
    Init(InitArgs),
    /// Write the embedded default model (remask-demo, the trained one that
    /// `generate` and `serve` use without --model) to a directory, e.g. a
    /// volume that a coordinator and its workers share.
    Default(DefaultArgs),
}

#[derive(clap::Args)]
pub struct DefaultArgs {
    /// Output directory (created if missing).
    #[arg(long, env = "REMASK_OUT")]
    pub out: PathBuf,
    /// Overwrite a directory that already holds a checkpoint.
    #[arg(long, env = "REMASK_FORCE")]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// Model shape: tiny, small, base (~136M parameters) or llada-8b (the real shape).
    #[arg(long, env = "REMASK_PRESET")]
    pub preset: String,
    /// Output directory (created if missing).
    #[arg(long, env = "REMASK_OUT")]
    pub out: PathBuf,
    /// Stored dtype of the weights: f32, bf16 or f16.
    #[arg(long, env = "REMASK_DTYPE", default_value = "bf16")]
    pub dtype: DType,
    /// Seed of the random weights.
    #[arg(long, env = "REMASK_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Number of safetensors shards (with model.safetensors.index.json when > 1).
    #[arg(long, env = "REMASK_SHARDS", default_value_t = 1)]
    pub shards: usize,
    /// RoPE base written to config.json.
    #[arg(
        long,
        env = "REMASK_ROPE_THETA",
        default_value_t = 500_000.0,
        allow_negative_numbers = true
    )]
    pub rope_theta: f64,
    /// Tie the output head to the embedding (no separate ff_out tensor).
    #[arg(long, env = "REMASK_TIE_WEIGHTS")]
    pub tie_weights: bool,
    /// Overwrite a directory that already holds a checkpoint.
    #[arg(long, env = "REMASK_FORCE")]
    pub force: bool,
    /// Write no weight files: config.json records the preset and seed, and
    /// the weights (bf16) are drawn where the model is loaded, on the GPU
    /// with --backend cuda. Same values as the bf16 files of the same seed;
    /// seconds instead of minutes (and no 16 GB) for llada-8b.
    #[arg(long, env = "REMASK_ON_DEVICE_WEIGHTS")]
    pub on_device_weights: bool,
}

pub fn run(command: ModelCommand) -> CliResult {
    match command {
        ModelCommand::Init(args) => init(args),
        ModelCommand::Default(args) => {
            if args.out.join("config.json").exists() && !args.force {
                return Err(CliError::Usage(format!(
                    "{} already holds a checkpoint: pass --force to overwrite it",
                    args.out.display()
                )));
            }
            crate::default_model::write_to(&args.out)?;
            eprintln!(
                "remask: wrote {} (the embedded default model, remask-demo)",
                args.out.display()
            );
            Ok(())
        }
    }
}

fn init(args: InitArgs) -> CliResult {
    let preset = Preset::get(&args.preset).ok_or_else(|| {
        CliError::Usage(format!(
            "unknown preset '{}': expected one of {}",
            args.preset,
            Preset::names().join(", ")
        ))
    })?;
    if args.shards == 0 {
        return Err(CliError::Usage("--shards must be at least 1".into()));
    }
    if !(args.rope_theta.is_finite() && args.rope_theta > 0.0) {
        return Err(CliError::Usage(format!(
            "--rope-theta must be positive, got {}",
            args.rope_theta
        )));
    }
    if args.on_device_weights && (args.dtype != DType::BF16 || args.shards != 1) {
        return Err(CliError::Usage(
            "--on-device-weights draws bf16 weights and writes no weight files: it takes neither --dtype other than bf16 nor --shards".into(),
        ));
    }
    if args.out.join("config.json").exists() && !args.force {
        return Err(CliError::Usage(format!(
            "{} already holds a checkpoint: pass --force to overwrite it",
            args.out.display()
        )));
    }
    let opts = InitOptions {
        dtype: args.dtype,
        seed: args.seed,
        shards: args.shards,
        rope_theta: args.rope_theta,
        weight_tying: args.tie_weights,
        generated: args.on_device_weights,
    };
    let summary = init_checkpoint(preset, &opts, &args.out)?;
    if args.on_device_weights {
        eprintln!(
            "remask: wrote {} ({} preset, {:.1}M parameters, {} BPE tokens, random bf16 weights generated where the model is loaded, no weight files, seed {})",
            args.out.display(),
            preset.name,
            summary.parameters as f64 / 1e6,
            summary.tokenizer_vocab,
            args.seed,
        );
        return Ok(());
    }
    eprintln!(
        "remask: wrote {} ({} preset, {:.1}M parameters, {:.1} MB in {} file(s), {} BPE tokens, random weights, seed {})",
        args.out.display(),
        preset.name,
        summary.parameters as f64 / 1e6,
        summary.bytes as f64 / 1e6,
        summary.files.len(),
        summary.tokenizer_vocab,
        args.seed,
    );
    Ok(())
}
