//! The fuzz targets on a stable toolchain: every seed of `fuzz-corpus/`, then
//! random mutations of them (byte edits, splices, and for config.json
//! extreme values in its fields), through the same property functions the
//! cargo-fuzz targets of `fuzz/` run (`remask_model::fuzzing`). Deterministic
//! (a fixed seed) and bounded: a few seconds. `REMASK_FUZZ_CASES` raises the
//! number of cases for a longer run.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use remask_model::fuzzing;
use std::path::Path;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn cases() -> u32 {
    std::env::var("REMASK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn runner() -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    )
}

/// One edit of a byte string: overwrite, insert, delete, or copy a span
/// from elsewhere in it (positions taken modulo the length).
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<usize>(), 0..32usize).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = data.len().max(1);
        match *e {
            Edit::Set(i, b) if !data.is_empty() => data[i % n] = b,
            Edit::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Edit::Delete(i) if !data.is_empty() => {
                data.remove(i % n);
            }
            Edit::Splice(from, to, len) if !data.is_empty() => {
                let from = from % n;
                let span: Vec<u8> = data[from..(from + len).min(data.len())].to_vec();
                let to = to % (data.len() + 1);
                data.splice(to..to, span);
            }
            _ => {}
        }
    }
    data
}

fn mutations(target: &str, check: fn(&[u8])) {
    let seeds = seeds(target);
    for s in &seeds {
        check(s);
    }
    let strategy = (0..seeds.len(), prop::collection::vec(edit(), 1..8));
    runner()
        .run(&strategy, |(seed, edits)| {
            check(&apply(seeds[seed].clone(), &edits));
            Ok(())
        })
        .unwrap();
}

#[test]
fn safetensors_header() {
    mutations("safetensors", fuzzing::safetensors);
}

#[test]
fn chat_template() {
    mutations("chat_template", fuzzing::chat_template);
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
    runner()
        .run(&strategy, |(seed, changes)| {
            let mut config = seeds[seed].clone();
            for (field, value) in changes {
                config[fields[field]] = value;
            }
            fuzzing::config(config.to_string().as_bytes());
            Ok(())
        })
        .unwrap();
}

/// The corpus holds inputs that must be refused, and they are; a template
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
