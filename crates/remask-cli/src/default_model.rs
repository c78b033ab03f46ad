//! The embedded default model: a checkpoint made on first use from a built-in
//! preset and kept in the user's cache directory, so `remask generate` works
//! with no download and no flags.
//!
//! It has random weights until a trained model ships: its output is noise,
//! and every command that uses it says so.

use crate::{CliError, CliResult, Globals};
use remask_model::{DType, InitOptions, Preset, init_checkpoint};
use std::path::{Path, PathBuf};

const PRESET: &str = "small";
/// Bump when the preset or the writer changes, so old caches are not reused.
const VERSION: u32 = 1;

/// The model directory to use: `--model`, or the embedded default.
pub fn resolve(model: Option<PathBuf>, globals: &Globals) -> CliResult<PathBuf> {
    match model {
        Some(dir) => Ok(dir),
        None => ensure_default(globals),
    }
}

fn ensure_default(globals: &Globals) -> CliResult<PathBuf> {
    let cache = match &globals.cache_dir {
        Some(dir) => dir.clone(),
        None => dirs::cache_dir()
            .ok_or_else(|| {
                CliError::Usage(
                    "no cache directory is known for this user: set --cache-dir or REMASK_CACHE_DIR, or pass --model".into(),
                )
            })?
            .join("remask"),
    };
    let dir = cache.join(format!("default-{PRESET}-v{VERSION}"));
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "remask: creating the embedded default model ({PRESET} preset, random weights) in {}",
        dir.display()
    );
    // Build next to the target and rename, so a concurrent first run never
    // sees a half-written checkpoint.
    let tmp = cache.join(format!(
        ".default-{PRESET}-v{VERSION}.{}",
        std::process::id()
    ));
    let result = create(&tmp).and_then(|_| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another process won the race: use its copy.
        Err(_) if dir.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(CliError::Internal(anyhow::anyhow!(
            "cannot move {} to {}: {e}",
            tmp.display(),
            dir.display()
        ))),
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dir)
}

fn create(dir: &Path) -> CliResult {
    let opts = InitOptions {
        dtype: DType::BF16,
        seed: 0,
        ..InitOptions::default()
    };
    init_checkpoint(Preset::get(PRESET).expect("built-in preset"), &opts, dir)?;
    Ok(())
}

/// Whether a checkpoint says it holds random weights (written by `model init`).
pub fn is_random(config: &remask_model::LladaConfig) -> bool {
    config
        .extra
        .get("remask_random_weights")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}
