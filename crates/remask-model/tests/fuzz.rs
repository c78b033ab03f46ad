//! The fuzz targets on a stable toolchain: every seed of `fuzz-corpus/`, then
//! random mutations of them (byte edits, splices, and for config.json
//! extreme values in its fields), through the same property functions the
//! cargo-fuzz targets of `fuzz/` run (`remask_model::fuzzing`). Deterministic
//! (fixed seeds) and bounded: 3000 cases per target, `REMASK_FUZZ_CASES`
//! for more, or `REMASK_FUZZ_SECONDS_EACH=N` seconds per target
//! (`fuzz_driver`).

mod fuzz_driver;

use fuzz_driver::{mutations, run, seeds};
use proptest::prelude::*;
use remask_model::fuzzing;
use std::path::Path;

#[test]
fn safetensors_header() {
    mutations("safetensors", fuzzing::safetensors);
}

#[test]
fn chat_template() {
    mutations("chat_template", fuzzing::chat_template);
}

#[test]
fn safetensors_index() {
    mutations("index", fuzzing::index);
}

#[test]
fn generation_config_json() {
    mutations("generation_config", fuzzing::generation_config);
}

#[test]
fn config_json_bytes() {
    mutations("config", fuzzing::config);
}

/// Extreme values in config.json's fields: the sizes the engine multiplies.
#[test]
fn config_json_values() {
    let seeds: Vec<serde_json::Value> = seeds("config")
        .iter()
        .map(|s| serde_json::from_slice(s).unwrap())
        .collect();
    let fields = [
        "d_model",
        "n_heads",
        "n_kv_heads",
        "n_layers",
        "mlp_hidden_size",
        "mlp_ratio",
        "vocab_size",
        "embedding_size",
        "max_sequence_length",
        "mask_token_id",
        "eos_token_id",
        "rope_theta",
        "rms_norm_eps",
    ];
    let value = prop_oneof![
        (0u32..64).prop_map(|k| serde_json::json!(1u64 << k)),
        (0u32..64).prop_map(|k| serde_json::json!((1u64 << k) - 1)),
        any::<u64>().prop_map(|v| serde_json::json!(v)),
        any::<i64>().prop_map(|v| serde_json::json!(v)),
        any::<f64>().prop_map(|v| serde_json::json!(v)),
        Just(serde_json::Value::Null),
        Just(serde_json::json!("64")),
    ];
    let strategy = (
        0..seeds.len(),
        prop::collection::vec((0..fields.len(), value), 1..6),
    );
    run("config_values", &strategy, |(seed, changes)| {
        let mut config = seeds[seed].clone();
        for (field, value) in changes {
            config[fields[field]] = value;
        }
        fuzzing::config(config.to_string().as_bytes());
    });
}

/// The corpus holds inputs that must be refused, and they are (an index
/// naming a shard `""` was accepted: the index target's finding); a template
/// of nested loops runs out of fuel instead of running for hours.
#[test]
fn bad_seeds_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus");
    for bad in ["wrong-length", "truncated", "gap", "int-dtype", "overflow"] {
        let bytes = std::fs::read(dir.join("safetensors").join(bad)).unwrap();
        assert!(
            remask_model::checkpoint::parse_header(Path::new(bad), &bytes).is_err(),
            "{bad} accepted"
        );
    }
    for good in ["two-tensors", "scalar"] {
        let bytes = std::fs::read(dir.join("safetensors").join(good)).unwrap();
        remask_model::checkpoint::parse_header(Path::new(good), &bytes).unwrap();
    }
    let index = |name: &str| {
        let text = std::fs::read_to_string(dir.join("index").join(name)).unwrap();
        remask_model::checkpoint::parse_index(Path::new(name), &text)
    };
    for bad in [
        "empty-name",
        "dot",
        "parent",
        "absolute",
        "backslash",
        "nul",
        "not-a-string",
        "empty-map",
        "no-map",
    ] {
        assert!(index(bad).is_err(), "index {bad} accepted");
    }
    assert_eq!(index("two-shards").unwrap().len(), 2);
    let text = std::fs::read_to_string(dir.join("chat_template/nested-loops")).unwrap();
    let template = text.lines().next().unwrap();
    let start = std::time::Instant::now();
    let err = remask_model::tokenizer::render_chat_template(template, &[], "", "")
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{err}"
    );
    assert!(err.contains("fuel"), "{err}");
}
