//! `config.json` of a LLaDA checkpoint, with the field names the Hugging Face
//! release uses (OLMo-style: `d_model`, `n_heads`, `mlp_hidden_size`, ...).

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LladaConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// `None` means as many KV heads as query heads.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    pub n_layers: usize,
    #[serde(default)]
    pub mlp_hidden_size: Option<usize>,
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    pub vocab_size: usize,
    /// Rows of the embedding and output head; `None` means `vocab_size`.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub max_sequence_length: usize,
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub weight_tying: bool,
    #[serde(default)]
    pub include_bias: bool,
    #[serde(default)]
    pub include_qkv_bias: Option<bool>,
    #[serde(default = "default_activation")]
    pub activation_type: String,
    #[serde(default = "default_block_type")]
    pub block_type: String,
    #[serde(default = "default_layer_norm")]
    pub layer_norm_type: String,
    #[serde(default)]
    pub rope: Option<bool>,
    #[serde(default)]
    pub alibi: Option<bool>,
    #[serde(default)]
    pub scale_logits: Option<bool>,
    #[serde(default)]
    pub multi_query_attention: Option<bool>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Every other field, kept so a config round-trips unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Upper bounds of config.json's sizes (see `validate`).
pub const MAX_D_MODEL: usize = 1 << 16;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_MLP_HIDDEN: usize = 1 << 20;
pub const MAX_MLP_RATIO: f64 = 64.0;
pub const MAX_VOCAB: usize = 1 << 24;
pub const MAX_SEQUENCE_LENGTH: usize = 1 << 20;
/// max_sequence_length x head_dim: the RoPE cos and sin tables (f32, half a
/// head each) take 4 bytes x this, 256 MiB at most (LLaDA-8B: 4096 x 128, 2 MiB).
pub const MAX_ROPE_TABLE: usize = 1 << 26;
/// Elements of the largest tensor (the embedding): 64 GiB in f32.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 34;

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "silu".into()
}
fn default_block_type() -> String {
    "llama".into()
}
fn default_layer_norm() -> String {
    "rms".into()
}

impl LladaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(ModelError::io(path))?;
        let config = Self::from_json(&text).map_err(|e| match e {
            ModelError::Json { source, .. } => ModelError::Json {
                path: path.to_path_buf(),
                source,
            },
            ModelError::ConfigValue { reason, .. } => ModelError::ConfigValue {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses config.json's text (not validated). Text that is not JSON is
    /// a `Json` error; JSON with a wrong value is a `ConfigValue` error that
    /// names the field (`"d_model": invalid type: string "x", expected usize`).
    pub fn from_json(text: &str) -> Result<Self> {
        let path = std::path::PathBuf::from("config.json");
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed: std::result::Result<LladaConfig, _> = serde_path_to_error::deserialize(&mut de);
        let config = match parsed {
            Ok(config) => config,
            Err(e) if e.inner().is_data() => {
                let field = e.path().to_string();
                let inner = e.into_inner();
                let reason = if field == "." {
                    // A missing field: serde's message names it.
                    format!("{inner}")
                } else {
                    format!("\"{field}\": {inner}")
                };
                return Err(ModelError::ConfigValue { path, reason });
            }
            Err(e) => return Err(ModelError::json(path)(e.into_inner())),
        };
        de.end().map_err(ModelError::json("config.json"))?;
        Ok(config)
    }

    pub fn n_kv_heads(&self) -> usize {
        if self.multi_query_attention == Some(true) {
            1
        } else {
            self.n_kv_heads.unwrap_or(self.n_heads)
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        self.mlp_hidden_size.unwrap_or_else(|| {
            (self.mlp_ratio.unwrap_or(4.0) * self.d_model as f64).round() as usize
        })
    }

    pub fn embedding_size(&self) -> usize {
        self.embedding_size.unwrap_or(self.vocab_size)
    }

    /// Refuses every setting the engine does not implement, instead of
    /// silently computing something else.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: String| Err(ModelError::Unsupported(what));
        if self.block_type != "llama" {
            return unsupported(format!(
                "block_type '{}' (only 'llama' is implemented)",
                self.block_type
            ));
        }
        if !matches!(self.layer_norm_type.as_str(), "rms" | "rms_norm") {
            return unsupported(format!(
                "layer_norm_type '{}' (only 'rms' is implemented)",
                self.layer_norm_type
            ));
        }
        if !matches!(self.activation_type.as_str(), "silu" | "swiglu") {
            return unsupported(format!(
                "activation_type '{}' (only 'silu' is implemented)",
                self.activation_type
            ));
        }
        if self.include_bias || self.include_qkv_bias == Some(true) {
            return unsupported("biases (include_bias / include_qkv_bias must be false)".into());
        }
        if self.alibi == Some(true) || self.rope == Some(false) {
            return unsupported("position encodings other than RoPE (alibi / rope=false)".into());
        }
        if self.scale_logits == Some(true) {
            return unsupported("scale_logits=true".into());
        }
        let invalid = |what: String| Err(ModelError::InvalidConfig(what));
        for (name, v) in [
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("vocab_size", self.vocab_size),
            ("max_sequence_length", self.max_sequence_length),
            ("n_kv_heads", self.n_kv_heads()),
            ("mlp_hidden_size", self.mlp_hidden()),
        ] {
            if v == 0 {
                return invalid(format!("{name} must be positive"));
            }
        }
        if let Some(ratio) = self.mlp_ratio
            && self.mlp_hidden_size.is_none()
            && !(ratio.is_finite() && ratio > 0.0 && ratio <= MAX_MLP_RATIO)
        {
            return invalid(format!(
                "mlp_ratio {ratio} must be a number in (0, {MAX_MLP_RATIO}]"
            ));
        }
        // Upper bounds: sizes come from a file, and the engine allocates from
        // them (the RoPE tables from max_sequence_length alone). Far above
        // any real model; they keep every product below from overflowing.
        for (name, v, max) in [
            ("d_model", self.d_model, MAX_D_MODEL),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("n_kv_heads", self.n_kv_heads(), MAX_HEADS),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("mlp_hidden_size", self.mlp_hidden(), MAX_MLP_HIDDEN),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("embedding_size", self.embedding_size(), MAX_VOCAB),
            (
                "max_sequence_length",
                self.max_sequence_length,
                MAX_SEQUENCE_LENGTH,
            ),
        ] {
            if v > max {
                return invalid(format!("{name} {v} is over the limit of {max}"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return invalid(format!(
                "d_model {} is not divisible by n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return invalid(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let rope = self.max_sequence_length * self.head_dim();
        if rope > MAX_ROPE_TABLE {
            return invalid(format!(
                "max_sequence_length {} x head_dim {} = {rope} RoPE table entries is over the limit of {MAX_ROPE_TABLE}",
                self.max_sequence_length,
                self.head_dim()
            ));
        }
        let embedding = self.embedding_size() * self.d_model;
        if embedding > MAX_TENSOR_ELEMENTS {
            return invalid(format!(
                "embedding_size {} x d_model {} = {embedding} elements is over the limit of {MAX_TENSOR_ELEMENTS} for one tensor",
                self.embedding_size(),
                self.d_model
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads()) {
            return invalid(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads,
                self.n_kv_heads()
            ));
        }
        if self.embedding_size() < self.vocab_size {
            return invalid(format!(
                "embedding_size {} is smaller than vocab_size {}",
                self.embedding_size(),
                self.vocab_size
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return invalid(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return invalid(format!("rms_norm_eps {} must be >= 0", self.rms_norm_eps));
        }
        for (name, id) in [
            ("mask_token_id", self.mask_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id
                && id as usize >= self.embedding_size()
            {
                return invalid(format!(
                    "{name} {id} is outside the embedding ({})",
                    self.embedding_size()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
            "mlp_hidden_size": 128, "vocab_size": 300, "embedding_size": 320,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 256,
            "mask_token_id": 290, "eos_token_id": 257, "block_type": "llama",
            "activation_type": "silu", "layer_norm_type": "rms", "some_other_field": [1, 2]
        })
    }

    fn parse(v: serde_json::Value) -> Result<LladaConfig> {
        let c: LladaConfig = serde_json::from_value(v).unwrap();
        c.validate().map(|_| c)
    }

    #[test]
    fn parses_and_keeps_unknown_fields() {
        let c = parse(base()).unwrap();
        assert_eq!(
            (c.head_dim(), c.n_kv_heads(), c.embedding_size()),
            (16, 2, 320)
        );
        assert!(c.extra.contains_key("some_other_field"));
        let round: LladaConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn refuses_what_is_not_implemented() {
        for (field, value, needle) in [
            (
                "block_type",
                serde_json::json!("sequential"),
                "block_type 'sequential'",
            ),
            ("include_bias", serde_json::json!(true), "biases"),
            ("alibi", serde_json::json!(true), "alibi"),
            ("n_kv_heads", serde_json::json!(3), "multiple of n_kv_heads"),
            (
                "mask_token_id",
                serde_json::json!(320),
                "outside the embedding",
            ),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    /// Absurd sizes (a 64 TB RoPE table, products past 64 bits) are refused
    /// with the field's name instead of aborting the process.
    #[test]
    fn absurd_sizes_are_refused_by_name() {
        for (field, value, needle) in [
            (
                "max_sequence_length",
                serde_json::json!(1u64 << 40),
                "max_sequence_length 1099511627776 is over the limit of 1048576",
            ),
            ("d_model", serde_json::json!(1u64 << 40), "d_model"),
            (
                "n_layers",
                serde_json::json!(1u64 << 20),
                "n_layers 1048576",
            ),
            ("vocab_size", serde_json::json!(1u64 << 30), "vocab_size"),
            (
                "embedding_size",
                serde_json::json!(1u64 << 30),
                "embedding_size",
            ),
            (
                "mlp_hidden_size",
                serde_json::json!(1u64 << 40),
                "mlp_hidden_size",
            ),
            ("n_heads", serde_json::json!(1u64 << 12), "n_heads"),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(needle), "{field}: {err}");
        }
        // Each within its bound, the product over: the RoPE table.
        let mut v = base();
        v["d_model"] = serde_json::json!(16384);
        v["n_heads"] = serde_json::json!(4);
        v["n_kv_heads"] = serde_json::json!(4);
        v["max_sequence_length"] = serde_json::json!(1 << 20);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("RoPE table"), "{err}");
        let mut v = base();
        v["mlp_hidden_size"] = serde_json::Value::Null;
        v["mlp_ratio"] = serde_json::json!(1e300);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("mlp_ratio"), "{err}");
    }

    /// Valid JSON with a wrong value names the field and is not called
    /// invalid JSON; text that is not JSON is.
    #[test]
    fn value_errors_name_the_field() {
        let mut v = base();
        v["d_model"] = serde_json::json!("big");
        let err = LladaConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"d_model\"") && !err.contains("not valid JSON"),
            "{err}"
        );
        let mut v = base();
        v["max_sequence_length"] = serde_json::json!(-5);
        let err = LladaConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"max_sequence_length\""), "{err}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("n_layers");
        let err = LladaConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_layers"), "{err}");
        let err = LladaConfig::from_json("{\"d_model\": 64,")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
