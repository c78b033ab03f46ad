//! The generation defaults of a checkpoint, shared by `generate`, `serve`
//! and `coordinator` so that a request leaving a setting unset gets the same
//! value through the CLI, gRPC and HTTP: remask's built-in values, then the
//! checkpoint's generation_config.json where it says, then the flags an
//! operator gives explicitly (`--rule`, `--cache`).

use crate::{CliError, CliResult};
use remask_model::GenerationConfig;
use remask_sampler::{CacheMode, CommitRule, Defaults, Remasking};
use std::path::Path;

pub fn load(dir: &Path, rule: Option<CommitRule>, cache: Option<CacheMode>) -> CliResult<Defaults> {
    let g = GenerationConfig::load(dir)?;
    if !g.ignored.is_empty() {
        tracing::warn!(
            keys = ?g.ignored,
            "generation_config.json asks for sampling remask does not implement; ignored"
        );
    }
    let mut d = Defaults::default();
    if let Some(n) = g.max_new_tokens {
        d.gen_length = n;
    }
    if let Some(n) = g.block_length {
        d.block_length = n;
    }
    if let Some(t) = g.temperature {
        d.temperature = t;
    }
    if let Some(r) = &g.remasking {
        d.remasking = r.parse::<Remasking>().map_err(CliError::Usage)?;
    }
    if let Some(t) = g.threshold {
        d.rule = CommitRule::Threshold(t);
    }
    if let Some(k) = g.top_k {
        d.truncate.top_k = k;
    }
    if let Some(p) = g.top_p {
        d.truncate.top_p = p;
    }
    if let Some(rule) = rule {
        d.rule = rule;
    }
    if let Some(cache) = cache {
        d.cache = cache;
    }
    Ok(d)
}
