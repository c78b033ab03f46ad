//! `remask model init`: random-weight checkpoints in exactly the layout of
//! GSAI-ML/LLaDA-8B-Instruct (config.json, safetensors, tokenizer.json,
//! tokenizer_config.json with the chat template), for tests and benchmarks.
//!
//! Weights are drawn from a counter-based generator, so a tensor's values
//! depend only on (seed, tensor, index): files are streamed in parallel
//! chunks and the 16 GB `llada-8b` shape never has to fit in memory. With
//! `InitOptions::generated` (`--on-device-weights`) no weight file is written
//! at all: the loader draws the same values (`init_value`) where they are
//! used, on the GPU for the CUDA backend.

use crate::checkpoint::{
    CONFIG_FILE, DType, GENERATED_KEY, GENERATED_VALUE, INDEX_FILE, SINGLE_FILE,
};
use crate::error::{ModelError, Result};
use crate::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// LLaDA-8B-Instruct's chat template (Llama-3 style headers).
pub const CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// English prose the BPE tokenizer is trained on (public domain; see assets/NOTICE.md).
const CORPUS: &str = include_str!("../assets/corpus.txt");

/// Where the special tokens go in the vocabulary.
#[derive(Clone, Copy, Debug)]
enum SpecialLayout {
    /// Right after the BPE vocabulary, with the mask 128 ids before the end
    /// of the embedding (so it is not the last id, as in LLaDA).
    AfterVocab,
    /// LLaDA-8B's own ids.
    Llada8b,
}

/// A model shape `remask model init` can write.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_layers: usize,
    pub mlp_hidden_size: usize,
    pub embedding_size: usize,
    pub max_sequence_length: usize,
    /// Target size of the trained BPE vocabulary (the corpus may give fewer).
    pub bpe_vocab: usize,
    specials: SpecialLayout,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        d_model: 64,
        n_heads: 4,
        n_kv_heads: 2,
        n_layers: 2,
        mlp_hidden_size: 192,
        embedding_size: 576,
        max_sequence_length: 512,
        bpe_vocab: 400,
        specials: SpecialLayout::AfterVocab,
    },
    Preset {
        name: "small",
        d_model: 256,
        n_heads: 8,
        n_kv_heads: 4,
        n_layers: 4,
        mlp_hidden_size: 704,
        embedding_size: 2304,
        max_sequence_length: 1024,
        bpe_vocab: 2000,
        specials: SpecialLayout::AfterVocab,
    },
    Preset {
        name: "base",
        d_model: 768,
        n_heads: 12,
        n_kv_heads: 12,
        n_layers: 12,
        mlp_hidden_size: 2048,
        embedding_size: 32768,
        max_sequence_length: 2048,
        bpe_vocab: 8000,
        specials: SpecialLayout::AfterVocab,
    },
    Preset {
        name: "llada-8b",
        d_model: 4096,
        n_heads: 32,
        n_kv_heads: 32,
        n_layers: 32,
        mlp_hidden_size: 12288,
        embedding_size: 126464,
        max_sequence_length: 4096,
        bpe_vocab: 8000,
        specials: SpecialLayout::Llada8b,
    },
];

impl Preset {
    pub fn get(name: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.name == name)
    }

    pub fn names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.name).collect()
    }

    pub fn parameter_count(&self, weight_tying: bool) -> usize {
        tensor_specs(self, weight_tying)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

/// Options of `remask model init` beyond the preset.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub dtype: DType,
    pub seed: u64,
    pub shards: usize,
    pub rope_theta: f64,
    pub weight_tying: bool,
    /// Write no weight files: config.json says the weights are generated
    /// (`"remask_weights": "generated"`) and whoever loads the checkpoint
    /// draws them where they are used (on the GPU for the CUDA backend).
    /// Only with bf16 and one shard.
    pub generated: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            dtype: DType::BF16,
            seed: 0,
            shards: 1,
            rope_theta: 500_000.0,
            weight_tying: false,
            generated: false,
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct InitSummary {
    pub parameters: usize,
    pub bytes: usize,
    pub files: Vec<String>,
    pub tokenizer_vocab: usize,
}

/// How the values of a random tensor are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std^2).
    Normal(f32),
    /// 1 + N(0, std^2): norm weights that are not all ones, so a missing
    /// multiplication by them shows up in the reference tests.
    OnePlus(f32),
}

/// One tensor of a preset: its name, shape and distribution. Its index in
/// `tensor_specs` is the `tensor` argument of `init_value`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Every tensor of `p`, in the order their values are drawn.
pub fn tensor_specs(p: &Preset, weight_tying: bool) -> Vec<TensorSpec> {
    let (d, hd) = (p.d_model, p.d_model / p.n_heads);
    let kv = p.n_kv_heads * hd;
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    // Residual branches scaled down with depth to keep activations bounded.
    let resid = 1.0 / (2.0 * p.n_layers as f32).sqrt();
    let t = |name: String, shape: Vec<usize>, init| TensorSpec { name, shape, init };
    let mut specs = vec![t(
        "model.transformer.wte.weight".into(),
        vec![p.embedding_size, d],
        Init::Normal(1.0),
    )];
    for i in 0..p.n_layers {
        let b = |n: &str| format!("model.transformer.blocks.{i}.{n}.weight");
        specs.extend([
            t(b("attn_norm"), vec![d], Init::OnePlus(0.1)),
            t(b("q_proj"), vec![d, d], Init::Normal(fan_in(d))),
            t(b("k_proj"), vec![kv, d], Init::Normal(fan_in(d))),
            t(b("v_proj"), vec![kv, d], Init::Normal(fan_in(d))),
            t(b("attn_out"), vec![d, d], Init::Normal(fan_in(d) * resid)),
            t(b("ff_norm"), vec![d], Init::OnePlus(0.1)),
            t(
                b("ff_proj"),
                vec![p.mlp_hidden_size, d],
                Init::Normal(fan_in(d)),
            ),
            t(
                b("up_proj"),
                vec![p.mlp_hidden_size, d],
                Init::Normal(fan_in(d)),
            ),
            t(
                b("ff_out"),
                vec![d, p.mlp_hidden_size],
                Init::Normal(fan_in(p.mlp_hidden_size) * resid),
            ),
        ]);
    }
    specs.push(t(
        "model.transformer.ln_f.weight".into(),
        vec![d],
        Init::OnePlus(0.1),
    ));
    if !weight_tying {
        // Logits with a standard deviation of about 4: random weights that
        // still make confident, well-separated predictions.
        specs.push(t(
            "model.transformer.ff_out.weight".into(),
            vec![p.embedding_size, d],
            Init::Normal(4.0 * fan_in(d)),
        ));
    }
    specs
}

/// Writes a complete random-weight checkpoint for `preset` into `out` (with
/// `opts.generated`, everything but the weights).
pub fn init_checkpoint(preset: &Preset, opts: &InitOptions, out: &Path) -> Result<InitSummary> {
    if opts.shards == 0 {
        return Err(ModelError::InvalidConfig(
            "--shards must be at least 1".into(),
        ));
    }
    if opts.generated && (opts.dtype != DType::BF16 || opts.shards != 1) {
        return Err(ModelError::InvalidConfig(
            "generated weights are bf16 and have no files: use --dtype bf16 and one shard".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(ModelError::io(out))?;
    let (tokenizer_json, specials, tokenizer_vocab) = build_tokenizer(preset)?;
    write_file(&out.join(TOKENIZER_FILE), tokenizer_json.as_bytes())?;
    write_json(&out.join(TOKENIZER_CONFIG_FILE), &tokenizer_config(preset))?;
    write_json(
        &out.join(CONFIG_FILE),
        &config_json(preset, opts, &specials),
    )?;

    if opts.generated {
        return Ok(InitSummary {
            parameters: preset.parameter_count(opts.weight_tying),
            bytes: 0,
            files: Vec::new(),
            tokenizer_vocab,
        });
    }
    let specs = tensor_specs(preset, opts.weight_tying);
    let groups = shard_groups(&specs, opts.dtype, opts.shards);
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (k, group) in groups.iter().enumerate() {
        let name = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        total += write_safetensors(&out.join(&name), &specs, group, opts)?;
        for &i in group {
            weight_map.insert(specs[i].name.clone(), name.clone().into());
        }
        files.push(name);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_json(&out.join(INDEX_FILE), &index)?;
    }
    Ok(InitSummary {
        parameters: preset.parameter_count(opts.weight_tying),
        bytes: total,
        files,
        tokenizer_vocab,
    })
}

/// Contiguous groups of tensors of about equal bytes, exactly `shards` of
/// them when there are enough tensors.
fn shard_groups(specs: &[TensorSpec], dtype: DType, shards: usize) -> Vec<Vec<usize>> {
    let bytes: Vec<usize> = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() * dtype.size())
        .collect();
    let shards = shards.min(specs.len());
    let total: usize = bytes.iter().sum();
    let mut groups = vec![Vec::new()];
    let mut current = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let left_tensors = specs.len() - i;
        let left_shards = shards - groups.len();
        let must = left_shards > 0 && left_tensors == left_shards;
        let want = left_shards > 0 && current + b / 2 > total * groups.len() / shards;
        if !groups.last().unwrap().is_empty() && (must || want) {
            groups.push(Vec::new());
        }
        current += b;
        groups.last_mut().unwrap().push(i);
    }
    groups
}

fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    group: &[usize],
    opts: &InitOptions,
) -> Result<usize> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0;
    for &i in group {
        let s = &specs[i];
        let len = s.shape.iter().product::<usize>() * opts.dtype.size();
        header.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": opts.dtype.safetensors_name(),
                "shape": s.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_string(&header).expect("header serialises");
    // Pad so the data section starts 8-byte aligned, as the Python writer does.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let file = std::fs::File::create(path).map_err(ModelError::io(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = ModelError::io(path);
    let result = (|| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        const CHUNK: usize = 1 << 22;
        let mut buf = Vec::new();
        for &i in group {
            let s = &specs[i];
            let n: usize = s.shape.iter().product();
            for start in (0..n).step_by(CHUNK) {
                let len = CHUNK.min(n - start);
                buf.resize(len * opts.dtype.size(), 0);
                fill(
                    &mut buf,
                    opts.dtype,
                    s.init,
                    opts.seed,
                    i as u64,
                    start as u64,
                );
                w.write_all(&buf)?;
            }
        }
        w.flush()
    })();
    result.map_err(io)?;
    Ok(offset)
}

/// Encodes elements `first..` of tensor `tensor` into `buf`.
fn fill(buf: &mut [u8], dtype: DType, init: Init, seed: u64, tensor: u64, first: u64) {
    let size = dtype.size();
    buf.par_chunks_mut(size * 4096)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, out) in chunk.chunks_exact_mut(size).enumerate() {
                let v = init_value(seed, tensor, first + (c * 4096 + j) as u64, init);
                match dtype {
                    DType::F32 => out.copy_from_slice(&v.to_le_bytes()),
                    DType::BF16 => out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    DType::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
}

/// Element `index` (row-major) of tensor `tensor` (its index in
/// `tensor_specs`) of the checkpoint drawn with `seed`, in f32 before the
/// rounding to the stored dtype. The one definition of the random weights:
/// the files `model init` writes, the generated tensors of
/// `--on-device-weights` checkpoints (`checkpoint::GeneratedTensor`) and the
/// CUDA kernel `init_normal_bf16` (which computes the same, bit for bit).
pub fn init_value(seed: u64, tensor: u64, index: u64, init: Init) -> f32 {
    let z = normal(seed, tensor, index);
    match init {
        Init::Normal(std) => z * std,
        Init::OnePlus(std) => 1.0 + z * std,
    }
}

/// A standard normal number from (seed, tensor, index) by Box-Muller.
fn normal(seed: u64, tensor: u64, index: u64) -> f32 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let h = mix(mix(mix(seed) ^ tensor) ^ index);
    let u1 = ((h >> 40) as f64 + 0.5) / (1u64 << 24) as f64;
    let u2 = ((h & 0xFF_FFFF) as f64) / (1u64 << 24) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

struct SpecialIds {
    bos: u32,
    eos: u32,
    mask: u32,
    start_header: u32,
    end_header: u32,
    eot: u32,
}

impl SpecialIds {
    fn tokens(&self) -> [(&'static str, u32); 6] {
        [
            ("<|startoftext|>", self.bos),
            ("<|endoftext|>", self.eos),
            ("<|mdm_mask|>", self.mask),
            ("<|start_header_id|>", self.start_header),
            ("<|end_header_id|>", self.end_header),
            ("<|eot_id|>", self.eot),
        ]
    }
}

/// Trains a byte-level BPE on the corpus, then places LLaDA's special tokens
/// at their ids. Returns the tokenizer.json text, the ids, and the number of
/// BPE tokens.
fn build_tokenizer(p: &Preset) -> Result<(String, SpecialIds, usize)> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let err = |e: tokenizers::Error| ModelError::Tokenizer {
        path: TOKENIZER_FILE.into(),
        reason: e.to_string(),
    };
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(p.bpe_vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer
        .train(
            &mut trainer,
            CORPUS.split("\n\n").filter(|s| !s.trim().is_empty()),
        )
        .map_err(err)?;
    let bpe_vocab = tokenizer.get_vocab_size(false);

    let ids = match p.specials {
        SpecialLayout::AfterVocab => {
            let v = bpe_vocab as u32;
            SpecialIds {
                bos: v,
                eos: v + 1,
                start_header: v + 2,
                end_header: v + 3,
                eot: v + 4,
                mask: p.embedding_size as u32 - 128,
            }
        }
        SpecialLayout::Llada8b => SpecialIds {
            bos: 126080,
            eos: 126081,
            mask: 126336,
            start_header: 126346,
            end_header: 126347,
            eot: 126348,
        },
    };
    // Specials never collide with BPE tokens or each other, fit the
    // embedding, and the mask is not its last id (LLaDA-8B's eot is above
    // its mask, so no order among them is assumed).
    let special: Vec<usize> = ids.tokens().iter().map(|(_, id)| *id as usize).collect();
    assert!(
        special
            .iter()
            .all(|&id| bpe_vocab <= id && id < p.embedding_size)
            && (1..special.len()).all(|i| !special[..i].contains(&special[i]))
            && (ids.mask as usize) < p.embedding_size - 1,
        "special ids {special:?} of preset {}",
        p.name
    );

    let mut json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(err)?).expect("valid JSON");
    let vocab = json["model"]["vocab"].as_object_mut().expect("BPE vocab");
    let mut added = Vec::new();
    for (token, id) in ids.tokens() {
        vocab.insert(token.into(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    }
    json["added_tokens"] = added.into();
    // Plain prompts start with BOS, as with LLaDA's tokenizer.
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}
        ],
        "pair": [
            {"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}}
        ],
        "special_tokens": {
            "<|startoftext|>": {"id": "<|startoftext|>", "ids": [ids.bos], "tokens": ["<|startoftext|>"]}
        }
    });
    let text = serde_json::to_string_pretty(&json).expect("serialises");
    // Check it loads back with every special token where we put it.
    let check: tokenizers::Tokenizer = text.parse().map_err(err)?;
    for (token, id) in ids.tokens() {
        assert_eq!(check.token_to_id(token), Some(id), "{token}");
    }
    Ok((text, ids, bpe_vocab))
}

fn tokenizer_config(p: &Preset) -> serde_json::Value {
    serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.max_sequence_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn config_json(p: &Preset, opts: &InitOptions, ids: &SpecialIds) -> serde_json::Value {
    let mut config = serde_json::json!({
        "activation_type": "silu",
        "alibi": false,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "block_type": "llama",
        "d_model": p.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": p.embedding_size,
        "eos_token_id": ids.eos,
        "flash_attention": false,
        "include_bias": false,
        "include_qkv_bias": false,
        "init_std": 0.02,
        "layer_norm_type": "rms",
        "mask_token_id": ids.mask,
        "max_sequence_length": p.max_sequence_length,
        "mlp_hidden_size": p.mlp_hidden_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "n_heads": p.n_heads,
        "n_kv_heads": p.n_kv_heads,
        "n_layers": p.n_layers,
        "pad_token_id": ids.eos,
        "precision": match opts.dtype { DType::F32 => "fp32", DType::BF16 => "amp_bf16", DType::F16 => "amp_fp16" },
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": true,
        "rope_full_precision": true,
        "rope_theta": opts.rope_theta,
        "scale_logits": false,
        "use_cache": false,
        "vocab_size": p.embedding_size,
        "weight_tying": opts.weight_tying,
        "remask_preset": p.name,
        "remask_random_weights": true,
        "remask_seed": opts.seed,
    });
    if opts.generated {
        config[GENERATED_KEY] = GENERATED_VALUE.into();
    }
    config
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("serialises");
    text.push('\n');
    write_file(path, text.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(ModelError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::tokenizer::{Message, TextCodec};

    #[test]
    fn llada_8b_preset_has_the_real_shape() {
        let p = Preset::get("llada-8b").unwrap();
        // 8.02B parameters: 16,031,162,368 bytes of bf16 in the real release
        // (that figure includes the safetensors headers).
        let params = p.parameter_count(false);
        assert!((8_015_000_000..8_016_000_000).contains(&params), "{params}");
        let base = Preset::get("base").unwrap().parameter_count(false);
        assert!((100_000_000..250_000_000).contains(&base), "{base}");
    }

    #[test]
    fn sharding_covers_every_tensor_once() {
        let specs = tensor_specs(Preset::get("tiny").unwrap(), false);
        for shards in 1..6 {
            let groups = shard_groups(&specs, DType::F32, shards);
            assert_eq!(groups.len(), shards);
            let flat: Vec<usize> = groups.concat();
            assert_eq!(flat, (0..specs.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn writes_a_loadable_checkpoint_with_its_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            shards: 3,
            ..InitOptions::default()
        };
        let summary = init_checkpoint(Preset::get("tiny").unwrap(), &opts, dir.path()).unwrap();
        assert_eq!(summary.files.len(), 3);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let codec = TextCodec::load(dir.path()).unwrap();
        let sp = codec.special_tokens(&ckpt.config).unwrap();
        assert_eq!(sp.mask as usize, ckpt.config.embedding_size() - 128);
        let ids = codec.encode("In the beginning").unwrap();
        assert_eq!(ids[0], sp.bos.unwrap());
        assert_eq!(codec.decode(&ids, true).unwrap(), "In the beginning");
        let chat = codec
            .render_chat(&[Message {
                role: "user".into(),
                content: " Hi ".into(),
            }])
            .unwrap();
        assert_eq!(
            chat,
            "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let t = ckpt
            .tensor("model.transformer.blocks.1.k_proj.weight", &[32, 64])
            .unwrap();
        assert_eq!(t.dtype, DType::BF16);
        let err = ckpt
            .tensor("model.transformer.blocks.1.k_proj.weight", &[64, 64])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[32, 64]") && err.contains("[64, 64]"),
            "{err}"
        );
    }

    #[test]
    fn truncated_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            dtype: DType::F32,
            ..InitOptions::default()
        };
        init_checkpoint(Preset::get("tiny").unwrap(), &opts, dir.path()).unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, b"garbage!garbage!").unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
    }

    /// The generated tensors of an `--on-device-weights` checkpoint hold
    /// exactly the bf16 values the files of the same seed hold, whole and
    /// by blocks (tensor-parallel slices).
    #[test]
    fn generated_tensors_equal_the_written_files() {
        use crate::checkpoint::WeightSource;
        let preset = Preset::get("tiny").unwrap();
        let (files, generated) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let opts = InitOptions {
            seed: 11,
            shards: 2,
            ..InitOptions::default()
        };
        init_checkpoint(preset, &opts, files.path()).unwrap();
        let summary = init_checkpoint(
            preset,
            &InitOptions {
                generated: true,
                shards: 1,
                ..opts.clone()
            },
            generated.path(),
        )
        .unwrap();
        assert!(summary.files.is_empty() && summary.bytes == 0);
        for entry in std::fs::read_dir(generated.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains("safetensors"), "{name} written");
        }
        // Same config and tokenizer but for the one key.
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(
            read(files.path(), "tokenizer.json"),
            read(generated.path(), "tokenizer.json")
        );
        let mut config: serde_json::Value =
            serde_json::from_str(&read(generated.path(), CONFIG_FILE)).unwrap();
        assert_eq!(config[GENERATED_KEY], GENERATED_VALUE);
        config.as_object_mut().unwrap().remove(GENERATED_KEY);
        let want: serde_json::Value =
            serde_json::from_str(&read(files.path(), CONFIG_FILE)).unwrap();
        assert_eq!(config, want);

        let stored = Checkpoint::open(files.path()).unwrap();
        let gen_ckpt = Checkpoint::open(generated.path()).unwrap();
        assert!(gen_ckpt.is_generated() && !stored.is_generated());
        let specs = tensor_specs(preset, false);
        for (i, spec) in specs.iter().enumerate() {
            assert!(gen_ckpt.contains(&spec.name));
            let file = stored.tensor(&spec.name, &spec.shape).unwrap();
            let WeightSource::Generated(g) = gen_ckpt.weight(&spec.name, &spec.shape).unwrap()
            else {
                panic!("{} is not generated", spec.name)
            };
            assert_eq!((g.seed, g.tensor, g.init), (11, i as u64, spec.init));
            let (r, c) = g.rows_cols();
            assert_eq!(g.bf16_bytes(0..r, 0..c), file.bytes, "{}", spec.name);
            // A block: the same elements of the file.
            let (rows, cols) = (r / 2..r, c / 4..c / 2);
            let mut block = Vec::new();
            for row in rows.clone() {
                block.extend_from_slice(
                    &file.bytes[(row * c + cols.start) * 2..(row * c + cols.end) * 2],
                );
            }
            assert_eq!(g.bf16_bytes(rows, cols), block, "{}", spec.name);
            assert!(matches!(
                stored.weight(&spec.name, &spec.shape).unwrap(),
                WeightSource::Stored(_)
            ));
        }
        // The same errors as for files; raw bytes are refused with a reason.
        let k = "model.transformer.blocks.1.k_proj.weight";
        for ckpt in [&stored, &gen_ckpt] {
            let err = ckpt.weight(k, &[64, 64]).unwrap_err().to_string();
            assert!(
                err.contains("[32, 64]") && err.contains("[64, 64]"),
                "{err}"
            );
            let err = ckpt.weight("model.nothing", &[1]).unwrap_err().to_string();
            assert!(err.contains("'model.nothing' is missing"), "{err}");
        }
        let err = gen_ckpt.tensor(k, &[32, 64]).unwrap_err().to_string();
        assert!(err.contains(k) && err.contains("generated"), "{err}");
    }

    /// The llada-8b preset with generated weights: written in seconds, the
    /// real shape and special ids, every tensor described.
    #[test]
    fn llada_8b_with_generated_weights() {
        let dir = tempfile::tempdir().unwrap();
        let preset = Preset::get("llada-8b").unwrap();
        let opts = InitOptions {
            generated: true,
            ..InitOptions::default()
        };
        init_checkpoint(preset, &opts, dir.path()).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.config.mask_token_id, Some(126336));
        let codec = TextCodec::load(dir.path()).unwrap();
        let sp = codec.special_tokens(&ckpt.config).unwrap();
        assert_eq!((sp.mask, sp.bos), (126336, Some(126080)));
        for spec in tensor_specs(preset, false) {
            ckpt.weight(&spec.name, &spec.shape).unwrap();
        }
    }

    #[test]
    fn generated_checkpoints_need_bf16_a_preset_and_a_seed() {
        let preset = Preset::get("tiny").unwrap();
        let dir = tempfile::tempdir().unwrap();
        for opts in [
            InitOptions {
                generated: true,
                dtype: DType::F32,
                ..InitOptions::default()
            },
            InitOptions {
                generated: true,
                shards: 2,
                ..InitOptions::default()
            },
        ] {
            let err = init_checkpoint(preset, &opts, dir.path()).unwrap_err();
            assert!(err.to_string().contains("bf16"), "{err}");
        }
        let opts = InitOptions {
            generated: true,
            ..InitOptions::default()
        };
        init_checkpoint(preset, &opts, dir.path()).unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let original = std::fs::read_to_string(&path).unwrap();
        for (key, value, says) in [
            ("remask_preset", serde_json::json!("huge"), "remask_preset"),
            ("remask_seed", serde_json::json!(-1), "remask_seed"),
            (GENERATED_KEY, serde_json::json!("somewhere"), "somewhere"),
        ] {
            let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
            config[key] = value;
            std::fs::write(&path, config.to_string()).unwrap();
            let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("config.json"), "{err}");
        }
    }
}
