//! The embedded default model: `models/remask-demo`, a small LLaDA trained by
//! `training/` (README "Training"), compiled into the binary and unpacked on
//! first use into the user's cache directory, so `remask generate` and
//! `remask serve` work with no download and no flags.
//!
//! The directory name carries a hash of the embedded files, so a binary with
//! a retrained model never reuses an older unpacked copy.

use crate::{CliError, CliResult, Globals};
use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// The name the servers give the embedded model.
pub const NAME: &str = "remask-demo";

/// The checkpoint's files, as committed under `models/remask-demo`.
const FILES: [(&str, &[u8]); 4] = [
    (
        "config.json",
        include_bytes!("../../../models/remask-demo/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../models/remask-demo/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../models/remask-demo/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../models/remask-demo/tokenizer_config.json"),
    ),
];

/// The model directory to use: `--model` (a directory, or a Hugging Face Hub
/// id `org/name[@revision]` found in or downloaded into the Hub's cache:
/// `crate::hub`), or the embedded default.
pub fn resolve(model: Option<PathBuf>, globals: &Globals) -> CliResult<PathBuf> {
    match model {
        Some(dir) => crate::hub::resolve_path(dir),
        None => ensure_default(globals),
    }
}

/// A short content hash of the embedded files (SipHash; ~10 ms for 17 MB).
fn fingerprint() -> String {
    let mut h = std::hash::DefaultHasher::new();
    for (name, bytes) in FILES {
        h.write(name.as_bytes());
        h.write(bytes);
    }
    format!("{:016x}", h.finish())
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
    let name = format!("remask-demo-{}", &fingerprint()[..12]);
    let dir = cache.join(&name);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "remask: unpacking the embedded default model (remask-demo) into {}",
        dir.display()
    );
    // Write next to the target and rename, so a concurrent first run never
    // sees a half-written checkpoint.
    let tmp = cache.join(format!(".{name}.{}", std::process::id()));
    let result = unpack(&tmp).and_then(|_| match std::fs::rename(&tmp, &dir) {
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

/// Writes the embedded model's files into `dir` (`remask model default`).
pub fn write_to(dir: &Path) -> CliResult {
    unpack(dir)
}

fn unpack(dir: &Path) -> CliResult {
    let io = |what: &Path, e: std::io::Error| {
        CliError::Usage(format!(
            "cannot write the default model to {}: {e} (set --cache-dir or REMASK_CACHE_DIR to a writable directory, or pass --model)",
            what.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
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
