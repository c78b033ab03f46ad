//! `remask forward`: logits of token sequences, for comparing with other
//! implementations (the Python reference under tests/reference uses it).

use crate::{CliError, CliResult, Globals, default_model, npy};
use remask_engine::{Engine, Packing};
use remask_model::Checkpoint;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// Checkpoint directory, or a Hugging Face Hub model ORG/NAME[@REVISION] (default: the embedded default model).
    #[arg(long, env = "REMASK_MODEL")]
    pub model: Option<PathBuf>,
    /// One sequence of token ids, comma-separated; repeat for a batch (equal lengths).
    #[arg(long = "ids", required = true, action = clap::ArgAction::Append)]
    pub ids: Vec<String>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    /// Output file: float32 logits of shape [batch, length, embedding_size].
    #[arg(long, env = "REMASK_OUT")]
    pub out: PathBuf,
}

pub fn run(args: ForwardArgs, globals: &Globals) -> CliResult {
    let dir = default_model::resolve(args.model, globals)?;
    let ckpt = Checkpoint::open(&dir)?;
    let batch = parse_batch(&args.ids)?;
    let len = batch[0].len();
    let vocab = ckpt.config.embedding_size();
    if let Some(bad) = batch.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(CliError::Usage(format!(
            "token id {bad} is outside the embedding (size {vocab})"
        )));
    }
    if len > ckpt.config.max_sequence_length {
        return Err(CliError::Usage(format!(
            "sequence length {len} exceeds max_sequence_length {}",
            ckpt.config.max_sequence_length
        )));
    }
    let ids: Vec<u32> = batch.concat();
    let packing = Packing::new(batch.iter().map(|s| s.len()));
    let logits = if args.device.is_cuda()? {
        #[cfg(feature = "cuda")]
        {
            // Each GPU's vocabulary slice, side by side.
            args.device
                .cuda_engine(&ckpt, 1)?
                .logits(&ids, &packing, None)
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("is_cuda() is false without the feature")
    } else {
        Engine::load(&ckpt, 1)?.logits(&ids, &packing, None)
    };
    npy::write_f32(&args.out, &[batch.len(), len, vocab], &logits)
        .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", args.out.display())))
}

/// `--ids 1,2,3 --ids 4,5,6`: one sequence per occurrence, all the same length.
fn parse_batch(values: &[String]) -> CliResult<Vec<Vec<u32>>> {
    let batch = values
        .iter()
        .map(|v| {
            v.split(',')
                .map(|t| {
                    t.trim().parse::<u32>().map_err(|_| {
                        CliError::Usage(format!("--ids: '{t}' is not a token id (in '{v}')"))
                    })
                })
                .collect::<CliResult<Vec<u32>>>()
        })
        .collect::<CliResult<Vec<_>>>()?;
    if batch.iter().any(|s| s.len() != batch[0].len()) {
        return Err(CliError::Usage(
            "--ids: all sequences must have the same length".into(),
        ));
    }
    Ok(batch)
}
