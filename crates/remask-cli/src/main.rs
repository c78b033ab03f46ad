//! `remask`: generate text with a masked diffusion language model, make
//! random-weight checkpoints, and measure the forward pass.
//!
//! Every flag can also be set through an environment variable named
//! `REMASK_<FLAG>` (for example `REMASK_MODEL`, `REMASK_GEN_LENGTH`).

mod addr;
mod bench;
mod cluster_cmd;
mod default_model;
mod defaults;
mod device;
mod display;
mod eval;
mod forward;
mod generate;
mod hub;
mod model_cmd;
mod npy;
mod remote;
mod telemetry;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "remask",
    version,
    about = "Serve masked diffusion language models (LLaDA)"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true, env = "REMASK_THREADS")]
    threads: Option<usize>,
    /// Where the embedded default model is created on first use
    /// (default: the user's cache directory, e.g. ~/.cache/remask).
    #[arg(long, global = true, env = "REMASK_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Log lines on stderr as text or as one JSON object each (level via REMASK_LOG).
    #[arg(long, global = true, env = "REMASK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Export tracing spans (requests, denoising steps) to this OTLP/gRPC
    /// collector, e.g. http://otel-collector:4317.
    #[arg(long, global = true, env = "REMASK_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text by iterative unmasking (LLaDA's sampler).
    Generate(generate::GenerateArgs),
    /// Checkpoint tools.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Time the forward pass and one denoising step.
    Bench(bench::BenchArgs),
    /// Write the logits of token sequences to a .npy file.
    Forward(forward::ForwardArgs),
    /// Score a checkpoint on held-out data (masked tokens, answers, infill).
    Eval(eval::EvalArgs),
    /// Serve the gRPC API with an in-process worker holding the whole model.
    Serve(cluster_cmd::ServeArgs),
    /// Serve the gRPC API for a cluster of workers (found in etcd or listed).
    Coordinator(cluster_cmd::CoordinatorArgs),
    /// Hold a shard of layers for a coordinator.
    Worker(cluster_cmd::WorkerArgs),
}

/// A failure and the exit code it maps to: 2 for anything the user can fix
/// (bad flags, a bad request, a missing or corrupt model), 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] remask_model::ModelError),
    #[error("invalid request: {0}")]
    Request(#[from] remask_sampler::InvalidRequest),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Internal(_) => 1,
            _ => 2,
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

pub struct Globals {
    pub cache_dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(
        cli.command,
        Command::Serve(_) | Command::Coordinator(_) | Command::Worker(_)
    );
    let default_level = if server {
        "warn,remask_cluster=info,remask_cli=info"
    } else {
        "warn"
    };
    let json = cli.log_format == "json";
    let _telemetry = match telemetry::init(json, cli.otlp_endpoint.as_deref(), default_level) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("the global thread pool is configured once, first");
    }
    let globals = Globals {
        cache_dir: cli.cache_dir,
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args, &globals),
        Command::Model { command } => model_cmd::run(command),
        Command::Bench(args) => bench::run(args, &globals),
        Command::Forward(args) => forward::run(args, &globals),
        Command::Eval(args) => eval::run(args, &globals),
        Command::Serve(args) => cluster_cmd::serve(args, &globals),
        Command::Coordinator(args) => cluster_cmd::coordinator(args),
        Command::Worker(args) => cluster_cmd::worker(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
