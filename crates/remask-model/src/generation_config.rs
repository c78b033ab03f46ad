//! `generation_config.json`: the generation defaults a checkpoint's authors
//! ship. remask reads the keys that mean something to a diffusion sampler
//! and leaves the rest (token ids, `repetition_penalty`, ... : those it
//! cannot honour are named once in the log by the caller).
//!
//! Read: `max_new_tokens` (tokens to generate), `temperature` and
//! `do_sample` (false: greedy), `top_k` (0 or less: off) and `top_p` (in
//! (0, 1]; 1: off), which truncate the draw whenever a request samples
//! (as vLLM takes them with `--generation-config auto`: only the keys the
//! file has), and LLaDA's own `block_length`, `remasking` (`low_confidence`
//! or `random`) and `threshold` (the confidence-threshold commit rule, in
//! (0, 1]).

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

pub const FILE: &str = "generation_config.json";

/// The keys remask uses; `None` where the file says nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub block_length: Option<usize>,
    pub remasking: Option<String>,
    pub threshold: Option<f64>,
    /// 0: off (the file's 0 or less).
    pub top_k: Option<u32>,
    /// In (0, 1]; 1: off.
    pub top_p: Option<f64>,
    /// Keys of sampling methods remask does not implement
    /// (`repetition_penalty`) that ask for something.
    pub ignored: Vec<String>,
}

/// Larger than any canvas a checkpoint can hold.
const MAX_TOKENS: u64 = 1 << 24;

impl GenerationConfig {
    /// The checkpoint's generation_config.json, or the empty config when it
    /// has none.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        Self::parse(&text).map_err(|reason| ModelError::ConfigValue { path, reason })
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(map) = value else {
            return Err("expected a JSON object".into());
        };
        let count = |key: &str| -> std::result::Result<Option<usize>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=MAX_TOKENS).contains(&n) => Ok(Some(n as usize)),
                    _ => Err(format!(
                        "'{key}' must be a whole number from 1 to {MAX_TOKENS}, got {v}"
                    )),
                },
            }
        };
        let number = |key: &str| -> std::result::Result<Option<f64>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x)),
                    _ => Err(format!("'{key}' must be a number, got {v}")),
                },
            }
        };
        let do_sample = match map.get("do_sample") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => return Err(format!("'do_sample' must be true or false, got {v}")),
        };
        let mut temperature = number("temperature")?;
        if temperature.is_some_and(|t| t < 0.0) {
            return Err("'temperature' must be at least 0".into());
        }
        // Hugging Face samples only with do_sample; without it, greedy.
        if do_sample == Some(false) {
            temperature = Some(0.0);
        }
        let threshold = number("threshold")?;
        if threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return Err("'threshold' must be in (0, 1]".into());
        }
        let remasking = match map.get("remasking") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "low_confidence" || s == "random" => Some(s.clone()),
            Some(v) => {
                return Err(format!(
                    "'remasking' must be \"low_confidence\" or \"random\", got {v}"
                ));
            }
        };
        // Hugging Face's and vLLM's top_k: 0 (vLLM: -1 too) keeps every
        // token; a k beyond the vocabulary keeps every token as well.
        let top_k = match map.get("top_k") {
            None | Some(Value::Null) => None,
            Some(v) => match (v.as_i64(), v.as_u64()) {
                (Some(k), _) if k <= 0 => Some(0),
                (_, Some(k)) => Some(k.min(u32::MAX as u64) as u32),
                _ => return Err(format!("'top_k' must be a whole number, got {v}")),
            },
        };
        let top_p = number("top_p")?;
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err("'top_p' must be in (0, 1]".into());
        }
        let asks = |key: &str, off: f64| {
            map.get(key)
                .and_then(Value::as_f64)
                .is_some_and(|v| v != off)
        };
        let ignored = [("repetition_penalty", 1.0)]
            .into_iter()
            .filter(|&(k, off)| do_sample != Some(false) && asks(k, off))
            .map(|(k, _)| k.to_string())
            .collect();
        Ok(GenerationConfig {
            max_new_tokens: count("max_new_tokens")?,
            temperature,
            block_length: count("block_length")?,
            remasking,
            threshold,
            top_k,
            top_p,
            ignored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_sampler_can_use() {
        let g = GenerationConfig::parse(
            r#"{"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 64, "temperature": 0.7,
                "do_sample": true, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
                "block_length": 16, "remasking": "random", "threshold": 0.9}"#,
        )
        .unwrap();
        assert_eq!(g.max_new_tokens, Some(64));
        assert_eq!(g.temperature, Some(0.7));
        assert_eq!(g.block_length, Some(16));
        assert_eq!(g.remasking.as_deref(), Some("random"));
        assert_eq!(g.threshold, Some(0.9));
        assert_eq!((g.top_k, g.top_p), (Some(40), Some(0.9)));
        assert_eq!(g.ignored, vec!["repetition_penalty".to_string()]);
        // do_sample false: greedy, so the truncation changes nothing by
        // default; it stays the default of requests that sample.
        let greedy = GenerationConfig::parse(
            r#"{"temperature": 0.7, "do_sample": false, "top_p": 0.5, "repetition_penalty": 1.2}"#,
        )
        .unwrap();
        assert_eq!((greedy.temperature, greedy.ignored.len()), (Some(0.0), 0));
        assert_eq!(greedy.top_p, Some(0.5));
        assert_eq!(
            GenerationConfig::parse("{}").unwrap(),
            GenerationConfig::default()
        );
    }

    #[test]
    fn top_k_and_top_p_off_and_bounds() {
        for (text, k) in [
            (r#"{"top_k": 0}"#, 0),
            (r#"{"top_k": -1}"#, 0),
            (r#"{"top_k": 1}"#, 1),
            (r#"{"top_k": 50}"#, 50),
            (r#"{"top_k": 10000000000}"#, u32::MAX),
        ] {
            assert_eq!(
                GenerationConfig::parse(text).unwrap().top_k,
                Some(k),
                "{text}"
            );
        }
        for (text, p) in [(r#"{"top_p": 1}"#, 1.0), (r#"{"top_p": 0.05}"#, 0.05)] {
            assert_eq!(
                GenerationConfig::parse(text).unwrap().top_p,
                Some(p),
                "{text}"
            );
        }
        let unset = GenerationConfig::parse(r#"{"top_k": null, "top_p": null}"#).unwrap();
        assert_eq!((unset.top_k, unset.top_p), (None, None));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            (r#"{"max_new_tokens": 0}"#, "max_new_tokens"),
            (r#"{"max_new_tokens": "many"}"#, "max_new_tokens"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"threshold": 2}"#, "threshold"),
            (r#"{"remasking": "sideways"}"#, "remasking"),
            (r#"{"do_sample": 1}"#, "do_sample"),
            (r#"{"block_length": 1e30}"#, "block_length"),
            (r#"{"top_k": 1.5}"#, "top_k"),
            (r#"{"top_k": "many"}"#, "top_k"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_p": -0.1}"#, "top_p"),
            (r#"{"top_p": "x"}"#, "top_p"),
        ] {
            let e = GenerationConfig::parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(GenerationConfig::parse("[1]").is_err());
    }

    #[test]
    fn a_missing_file_is_no_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            GenerationConfig::load(dir.path()).unwrap(),
            GenerationConfig::default()
        );
        std::fs::write(dir.path().join(FILE), "{").unwrap();
        let e = GenerationConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(FILE) && e.contains("JSON"), "{e}");
    }
}
