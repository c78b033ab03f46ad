//! The properties the fuzz targets check, shared by both drivers: cargo-fuzz
//! (`fuzz/`, libFuzzer on a nightly toolchain) and the stable `cargo test`
//! run over the seed corpus and its random mutations (`tests/fuzz.rs`).
//! Each function takes arbitrary bytes and panics only when a property is
//! broken; errors for bad input are the expected outcome.

use crate::checkpoint::{DType, parse_header, parse_index};
use crate::config::LladaConfig;
use crate::generation_config::GenerationConfig;
use crate::tokenizer::{Message, render_chat_template};

/// A safetensors file: refused with an error, or every tensor it lists lies
/// within the file and its byte length is its shape's, so reading it cannot
/// slice out of bounds.
pub fn safetensors(data: &[u8]) {
    let Ok(tensors) = parse_header(std::path::Path::new("fuzz.safetensors"), data) else {
        return;
    };
    for (name, t) in tensors {
        assert!(
            t.start <= t.end && t.end <= data.len(),
            "tensor '{name}': bytes {}..{} outside a file of {}",
            t.start,
            t.end,
            data.len()
        );
        let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let size = match t.dtype {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        };
        assert_eq!(
            elements.and_then(|n| n.checked_mul(size)),
            Some(t.end - t.start),
            "tensor '{name}': shape {:?} does not match its bytes",
            t.shape
        );
    }
}

/// model.safetensors.index.json: refused with an error, or every shard it
/// names is a plain file name, so joined to the checkpoint's directory it
/// names a file of that directory (never the directory itself, a parent or
/// another tree), and every tensor of its `weight_map` is in exactly one
/// shard.
pub fn index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(shards) = parse_index(std::path::Path::new("fuzz.index.json"), text) else {
        return;
    };
    assert!(!shards.is_empty(), "an index without shards accepted");
    let dir = std::path::Path::new("/checkpoint");
    let mut tensors = 0;
    for (file, names) in &shards {
        let path = dir.join(file);
        let mut parts = std::path::Path::new(file).components();
        assert!(
            matches!(parts.next(), Some(std::path::Component::Normal(n)) if n == file.as_str())
                && parts.next().is_none()
                && path.parent() == Some(dir),
            "shard {file:?} is not a plain file name ({})",
            path.display()
        );
        assert!(!names.is_empty(), "shard {file:?} holds no tensor");
        tensors += names.len();
    }
    let map = serde_json::from_str::<serde_json::Value>(text).unwrap()["weight_map"]
        .as_object()
        .map_or(0, |m| m.len());
    assert_eq!(tensors, map, "tensors lost or doubled between shards");
}

/// config.json: refused with an error, or every size the engine derives
/// from an accepted config is computed without overflow.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = LladaConfig::from_json(text) else {
        return;
    };
    if c.validate().is_err() {
        return;
    }
    let (d, e, hd) = (c.d_model, c.embedding_size(), c.head_dim());
    let mlp = c.mlp_hidden();
    assert!(
        hd > 0 && hd.is_multiple_of(2) && c.n_kv_heads() > 0,
        "{c:?}"
    );
    for (what, a, b) in [
        ("embedding", e, d),
        ("mlp", mlp, d),
        ("rope", c.max_sequence_length, hd),
        ("kv", c.n_kv_heads() * hd, d),
        ("layers x mlp", c.n_layers, mlp * d),
    ] {
        assert!(
            a.checked_mul(b).is_some(),
            "{what}: {a} x {b} overflows: {c:?}"
        );
    }
}

/// generation_config.json: refused with an error, or every value it gives
/// is within the bounds the sampler accepts (lengths from 1, finite
/// temperature at least 0, a threshold and a top_p in (0, 1]).
pub fn generation_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(g) = GenerationConfig::parse(text) else {
        return;
    };
    for n in [g.max_new_tokens, g.block_length].into_iter().flatten() {
        assert!((1..=1 << 24).contains(&n), "{g:?}");
    }
    assert!(
        g.temperature.is_none_or(|t| t.is_finite() && t >= 0.0),
        "{g:?}"
    );
    assert!(g.threshold.is_none_or(|t| t > 0.0 && t <= 1.0), "{g:?}");
    assert!(g.top_p.is_none_or(|p| p > 0.0 && p <= 1.0), "{g:?}");
}

/// A chat template (tokenizer_config.json's `chat_template`) over a few
/// messages: renders or fails with an error, in bounded time (minijinja's
/// fuel) and without a panic. The first line of `data` is the template's,
/// the lines after are the messages' contents.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let template = lines.next().unwrap_or_default().replace("\\n", "\n");
    let messages: Vec<Message> = lines
        .take(8)
        .enumerate()
        .map(|(i, content)| Message {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: content.into(),
        })
        .collect();
    let _ = render_chat_template(&template, &messages, "<s>", "</s>");
}
