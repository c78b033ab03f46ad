//! A checkpoint directory in the Hugging Face layout: `config.json` plus
//! `model.safetensors`, or shards listed in `model.safetensors.index.json`.
//!
//! Files are memory-mapped and only the headers are parsed up front; a tensor
//! is read when it is asked for. A pipeline stage that loads a few layers
//! therefore touches only those layers' pages.
//!
//! A checkpoint written by `remask model init --on-device-weights` has no
//! weight files: its config.json says `"remask_weights": "generated"`, and
//! each tensor is described (`GeneratedTensor`: preset, seed, index,
//! distribution) for the backend to draw where it is used.

use crate::config::LladaConfig;
use crate::error::{ModelError, Result};
use crate::init::{Init, Preset, init_value, tensor_specs};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The config.json key, and its value, of a checkpoint whose weights are
/// generated where they are used instead of stored.
pub const GENERATED_KEY: &str = "remask_weights";
pub const GENERATED_VALUE: &str = "generated";

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            _ => Err(format!("unknown dtype '{s}': expected f32, bf16 or f16")),
        }
    }
}

/// A stored tensor, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    /// The values widened to f32 (bf16 exactly: `bits << 16`).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.bytes.len() / self.dtype.size()];
        self.write_f32(&mut out);
        out
    }

    /// Widens into `out`, which must hold exactly the tensor's elements.
    pub fn write_f32(&self, out: &mut [f32]) {
        let chunks = self.bytes.chunks_exact(self.dtype.size());
        assert_eq!(chunks.len(), out.len());
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(chunks) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(chunks) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(chunks) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}

/// A tensor of a generated checkpoint: element `i` (row-major over `shape`)
/// is `init_value(seed, tensor, i, init)` rounded to bf16, exactly what the
/// file `model init --dtype bf16` writes with the same seed holds.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedTensor {
    pub seed: u64,
    /// Index of the tensor in the preset's `tensor_specs`.
    pub tensor: u64,
    pub init: Init,
    pub shape: Vec<usize>,
}

impl GeneratedTensor {
    /// (rows, columns); a vector `[n]` is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape[..] {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => unreachable!("generated tensors are 1-D or 2-D"),
        }
    }

    /// Element `index` (row-major) in f32, before the rounding to bf16.
    pub fn value(&self, index: u64) -> f32 {
        init_value(self.seed, self.tensor, index, self.init)
    }

    /// The block `rows` x `cols` of the tensor (element (r, c) has index
    /// `r * columns + c`), as little-endian bf16, row-major.
    pub fn bf16_bytes(&self, rows: Range<usize>, cols: Range<usize>) -> Vec<u8> {
        let (n_rows, n_cols) = self.rows_cols();
        assert!(
            rows.end <= n_rows && cols.end <= n_cols,
            "block {rows:?} x {cols:?} outside {:?}",
            self.shape
        );
        let width = cols.len();
        let mut out = vec![0u8; rows.len() * width * 2];
        if width == 0 {
            return out;
        }
        out.par_chunks_mut(width * 2)
            .zip(rows)
            .for_each(|(row, r)| {
                for (out, c) in row.chunks_exact_mut(2).zip(cols.clone()) {
                    let v = self.value((r * n_cols + c) as u64);
                    out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            });
        out
    }
}

/// Where the values of a checkpoint tensor come from.
#[derive(Clone, Debug)]
pub enum WeightSource<'a> {
    /// Stored in a weight file.
    Stored(TensorRef<'a>),
    /// Drawn where it is used (`--on-device-weights` checkpoints).
    Generated(GeneratedTensor),
}

/// The tensors of a generated checkpoint, from its preset.
struct Generated {
    seed: u64,
    preset: &'static str,
    tensors: HashMap<String, (u64, Vec<usize>, Init)>,
}

impl Generated {
    /// `Some` when config.json says the weights are generated.
    fn from_config(path: &Path, config: &LladaConfig) -> Result<Option<Self>> {
        let Some(kind) = config.extra.get(GENERATED_KEY) else {
            return Ok(None);
        };
        let bad = |reason: String| {
            Err(ModelError::InvalidConfig(format!(
                "{}: {reason}",
                path.display()
            )))
        };
        if kind.as_str() != Some(GENERATED_VALUE) {
            return bad(format!(
                "\"{GENERATED_KEY}\" is {kind}; the only value is \"{GENERATED_VALUE}\" (weights generated when loaded)"
            ));
        }
        let preset = config.extra.get("remask_preset").and_then(|v| v.as_str());
        let Some(preset) = preset.and_then(Preset::get) else {
            return bad(format!(
                "generated weights need \"remask_preset\" naming one of {}, found {:?}",
                Preset::names().join(", "),
                config.extra.get("remask_preset")
            ));
        };
        let Some(seed) = config.extra.get("remask_seed").and_then(|v| v.as_u64()) else {
            return bad(format!(
                "generated weights need \"remask_seed\", an unsigned integer, found {:?}",
                config.extra.get("remask_seed")
            ));
        };
        let tensors = tensor_specs(preset, config.weight_tying)
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s.name, (i as u64, s.shape, s.init)))
            .collect();
        Ok(Some(Generated {
            seed,
            preset: preset.name,
            tensors,
        }))
    }
}

/// A tensor listed in a safetensors header.
pub struct Entry {
    file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range in the file (header included).
    pub start: usize,
    pub end: usize,
    /// The first non-finite value (element, value), once scanned: a tensor
    /// is scanned the first time it is asked for, once for all ranks.
    non_finite: std::sync::OnceLock<Option<(usize, String)>>,
}

pub struct Checkpoint {
    dir: PathBuf,
    pub config: LladaConfig,
    maps: Vec<Mmap>,
    tensors: HashMap<String, Entry>,
    /// Set for a checkpoint whose weights are generated (no weight files).
    generated: Option<Generated>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.maps.len())
            .field("tensors", &self.tensors.len())
            .field("generated", &self.generated.as_ref().map(|g| g.preset))
            .finish()
    }
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(CONFIG_FILE).is_file() {
            return Err(ModelError::NotADirectory(dir));
        }
        let config = LladaConfig::from_file(&dir.join(CONFIG_FILE))?;
        if let Some(generated) = Generated::from_config(&dir.join(CONFIG_FILE), &config)? {
            // Weight files left in the directory are not read: config.json
            // says what the checkpoint is.
            return Ok(Checkpoint {
                dir,
                config,
                maps: Vec::new(),
                tensors: HashMap::new(),
                generated: Some(generated),
            });
        }
        let files = weight_files(&dir)?;
        let mut maps = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (file_index, (path, expected)) in files.iter().enumerate() {
            let map = map_file(path)?;
            for (name, entry) in read_header(path, &map, file_index)? {
                if let Some(expected) = expected
                    && !expected.contains(&name)
                {
                    // Tensors the index does not list are ignored, as transformers does.
                    continue;
                }
                tensors.insert(name, entry);
            }
            if let Some(expected) = expected
                && let Some(missing) = expected.iter().find(|n| !tensors.contains_key(*n))
            {
                return Err(ModelError::BadIndex {
                    path: dir.join(INDEX_FILE),
                    reason: format!(
                        "tensor '{missing}' is mapped to {} but that file does not contain it",
                        path.display()
                    ),
                });
            }
            maps.push(map);
        }
        Ok(Checkpoint {
            dir,
            config,
            maps,
            tensors,
            generated: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.generated {
            Some(g) => g.tensors.contains_key(name),
            None => self.tensors.contains_key(name),
        }
    }

    /// Whether the weights are generated when loaded (`model init
    /// --on-device-weights`) rather than stored in files.
    pub fn is_generated(&self) -> bool {
        self.generated.is_some()
    }

    /// The tensor `name`, checked against `expected` shape: the stored bytes,
    /// or for a generated checkpoint the description of its values. What a
    /// model loader asks for.
    pub fn weight(&self, name: &str, expected: &[usize]) -> Result<WeightSource<'_>> {
        let Some(g) = &self.generated else {
            return self.tensor(name, expected).map(WeightSource::Stored);
        };
        let (tensor, shape, init) = g
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if shape != expected {
            return Err(ModelError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
        Ok(WeightSource::Generated(GeneratedTensor {
            seed: g.seed,
            tensor: *tensor,
            init: *init,
            shape: shape.clone(),
        }))
    }

    /// The stored tensor `name`, checked against `expected` shape. A
    /// generated checkpoint stores none: an error that says so (use `weight`).
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<TensorRef<'_>> {
        if let Some(g) = &self.generated {
            return Err(ModelError::NotStored {
                name: name.to_string(),
                dir: self.dir.clone(),
                preset: g.preset,
            });
        }
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if e.shape != expected {
            return Err(ModelError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        let bytes = &self.maps[e.file][e.start..e.end];
        // NaN or infinite weights compute NaN logits, which decode as token
        // 0 over and over: refused here, with the tensor's name.
        if let Some((index, value)) = e
            .non_finite
            .get_or_init(|| first_non_finite(e.dtype, bytes))
        {
            return Err(ModelError::NonFinite {
                name: name.to_string(),
                index: *index,
                value: value.clone(),
            });
        }
        Ok(TensorRef {
            dtype: e.dtype,
            shape: &e.shape,
            bytes,
        })
    }
}

/// The first element of `bytes` (little-endian `dtype` values) that is NaN
/// or infinite, and how it prints: a test of the exponent bits, over
/// 1 MiB chunks in parallel. Each chunk is first tested without an early
/// exit (a loop the compiler vectorises); only a chunk that fails is
/// searched for the element.
fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<(usize, String)> {
    const CHUNK: usize = 1 << 20;
    let size = dtype.size();
    let bad = move |c: &[u8]| match dtype {
        DType::F32 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000,
        DType::BF16 => u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80,
        DType::F16 => u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00,
    };
    let found = bytes
        .par_chunks(CHUNK)
        .enumerate()
        .find_map_first(|(chunk, data)| {
            let any = match dtype {
                DType::F32 => data.chunks_exact(4).fold(false, |a, c| a | bad(c)),
                DType::BF16 | DType::F16 => data.chunks_exact(2).fold(false, |a, c| a | bad(c)),
            };
            if !any {
                return None;
            }
            let at = data.chunks_exact(size).position(bad)?;
            Some(chunk * CHUNK / size + at)
        })?;
    let value = TensorRef {
        dtype,
        shape: &[],
        bytes: &bytes[found * size..(found + 1) * size],
    }
    .to_f32()[0];
    Some((found, value.to_string()))
}

/// The weight files and, for a sharded checkpoint, the tensors each must hold.
#[allow(clippy::type_complexity)]
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(ModelError::io(&index_path))?;
        Ok(parse_index(&index_path, &text)?
            .into_iter()
            .map(|(file, tensors)| (dir.join(file), Some(tensors)))
            .collect())
    } else if dir.join(SINGLE_FILE).is_file() {
        Ok(vec![(dir.join(SINGLE_FILE), None)])
    } else {
        Err(ModelError::Io {
            path: dir.join(SINGLE_FILE),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
            ),
        })
    }
}

/// The shards `model.safetensors.index.json` (the text of `index_path`)
/// names, each with the tensors it must hold, by file name (what the fuzz
/// target `index` exercises).
pub fn parse_index(index_path: &Path, text: &str) -> Result<Vec<(String, Vec<String>)>> {
    let index: serde_json::Value =
        serde_json::from_str(text).map_err(ModelError::json(index_path))?;
    let bad = |reason: String| ModelError::BadIndex {
        path: index_path.to_path_buf(),
        reason,
    };
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("the file of '{tensor}' is not a string")))?;
        // A shard is a file of this directory: an empty name (the
        // directory itself, found by fuzzing), `.`/`..` or anything with
        // a separator would name something else.
        let plain = !file.is_empty()
            && file != "."
            && !file.contains("..")
            && !file.contains(['/', '\\', ':', '\0']);
        if !plain {
            return Err(bad(format!("file name {file:?} must be a plain file name")));
        }
        by_file
            .entry(file.to_string())
            .or_default()
            .push(tensor.clone());
    }
    if by_file.is_empty() {
        return Err(bad("\"weight_map\" is empty".into()));
    }
    Ok(by_file.into_iter().collect())
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(ModelError::io(path))?;
    // SAFETY: the map is read-only; a checkpoint modified while it is being
    // served is outside what any inference server can guard against.
    unsafe { Mmap::map(&file) }.map_err(ModelError::io(path))
}

/// The tensors a safetensors file lists, checked as `Checkpoint::open`
/// checks them (what the fuzz target `safetensors` exercises).
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Entry)>> {
    read_header(path, bytes, 0)
}

fn read_header(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |reason: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    if map.len() < 8 {
        return Err(bad(format!("only {} bytes, no header", map.len())));
    }
    let header_len = u64::from_le_bytes(map[..8].try_into().unwrap()) as usize;
    let data_start = 8usize
        .checked_add(header_len)
        .filter(|&s| s <= map.len())
        .ok_or_else(|| {
            bad(format!(
                "header length {header_len} exceeds the file size {}",
                map.len()
            ))
        })?;
    match SafeTensors::read_metadata(map) {
        Ok((_, metadata)) => {
            let mut out = Vec::new();
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => DType::F32,
                    Dtype::BF16 => DType::BF16,
                    Dtype::F16 => DType::F16,
                    other => {
                        return Err(ModelError::DType {
                            name,
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                out.push((
                    name,
                    Entry {
                        file,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + info.data_offsets.0,
                        end: data_start + info.data_offsets.1,
                        non_finite: std::sync::OnceLock::new(),
                    },
                ));
            }
            Ok(out)
        }
        Err(e) => Err(diagnose(
            path,
            &map[8..data_start],
            map.len() - data_start,
            &e,
        )),
    }
}

/// Why the safetensors library refused a header (`header`: its JSON;
/// `available`: the bytes of the data section), naming the tensor at fault
/// with its dtype, shape and offsets. The library's own errors name none.
fn diagnose(
    path: &Path,
    header: &[u8],
    available: usize,
    error: &safetensors::SafeTensorError,
) -> ModelError {
    let bad = |reason: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let text = match std::str::from_utf8(header) {
        Ok(text) => text,
        Err(e) => return bad(format!("the header is not UTF-8: {e}")),
    };
    let header: serde_json::Value = match serde_json::from_str(text.trim_end_matches(' ')) {
        Ok(v) => v,
        Err(e) => return bad(format!("the header is not JSON: {e}")),
    };
    let Some(entries) = header.as_object() else {
        return bad(format!("the header is not a JSON object: {header}"));
    };
    let mut spans = Vec::new();
    for (name, v) in entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str());
        let shape: Option<Vec<u64>> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        let offsets: Option<Vec<u64>> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        let (Some(dtype), Some(shape), Some([begin, end])) = (
            dtype,
            shape,
            offsets
                .as_deref()
                .and_then(|o| <[u64; 2]>::try_from(o).ok()),
        ) else {
            return bad(format!(
                "tensor '{name}': expected {{\"dtype\": string, \"shape\": [unsigned integers], \"data_offsets\": [begin, end]}}, found {v}"
            ));
        };
        let Some(size) = dtype_bytes(dtype) else {
            return bad(format!("tensor '{name}': unknown dtype \"{dtype}\""));
        };
        let needed = shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
        let Some(needed) = needed else {
            return bad(format!(
                "tensor '{name}': shape {shape:?} of {dtype} overflows 64 bits"
            ));
        };
        if end < begin || end - begin != needed {
            return bad(format!(
                "tensor '{name}': shape {shape:?} of {dtype} takes {needed} bytes, but its data_offsets [{begin}, {end}] span {}",
                end as i128 - begin as i128
            ));
        }
        spans.push((begin, end, name.as_str()));
    }
    spans.sort();
    let mut at = 0u64;
    let mut previous = None;
    for &(begin, end, name) in &spans {
        if begin != at {
            let after = previous.map_or("the start of the data section".to_string(), |p| {
                format!("the end of tensor '{p}'")
            });
            return bad(format!(
                "tensor '{name}' begins at byte {begin} of the data section, but {after} is at byte {at}: tensors must follow each other without gaps or overlaps"
            ));
        }
        at = end;
        previous = Some(name);
    }
    if at > available as u64 {
        return ModelError::Truncated {
            path: path.to_path_buf(),
            tensor: previous.unwrap_or_default().to_string(),
            needed: at as usize,
            available,
        };
    }
    if at < available as u64 {
        return bad(format!(
            "the tensors end at byte {at} of the data section, but it has {available} bytes"
        ));
    }
    bad(error.to_string())
}

/// Bytes per element of a safetensors dtype name.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{InitOptions, init_checkpoint};

    /// A safetensors file: the 8-byte length, `header`, `data` bytes of zeros.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    fn header_error(header: &str, data: usize) -> String {
        read_header(Path::new("m.safetensors"), &file(header, data), 0)
            .err()
            .expect("refused")
            .to_string()
    }

    /// An index may name only plain files of the checkpoint's directory.
    #[test]
    fn index_shard_names_are_plain_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", ".", "..", "../x", "a/b", "a\\b", "c:x", "a\u{0}b"] {
            let index = serde_json::json!({"weight_map": {"w": name}});
            std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
            let err = weight_files(dir.path()).expect_err(name).to_string();
            assert!(err.contains("plain file name"), "{name:?}: {err}");
        }
        let index = serde_json::json!({"weight_map": {"w": "model-00001-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        assert_eq!(weight_files(dir.path()).unwrap().len(), 1);
    }

    /// The library's errors (TensorInvalidInfo, InvalidOffset(...)) become
    /// messages that name the tensor, its dtype, shape and offsets.
    #[test]
    fn header_errors_name_the_tensor_and_its_offsets() {
        let err = header_error(
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
            20,
        );
        assert!(
            err.contains("tensor 'w'")
                && err.contains("[2, 3] of F32 takes 24 bytes")
                && err.contains("[0, 20] span 20"),
            "{err}"
        );
        let err = header_error(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
            16,
        );
        assert!(
            err.contains("tensor 'b' begins at byte 12")
                && err.contains("end of tensor 'a' is at byte 8"),
            "{err}"
        );
        let err = header_error(
            r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(err.contains("tensor 'w': unknown dtype \"Q4\""), "{err}");
        let err = header_error(r#"{"w":{"dtype":"F32","shape":[2]}}"#, 8);
        assert!(err.contains("tensor 'w': expected"), "{err}");
        let err = header_error(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            4,
        );
        assert!(err.contains("truncated") && err.contains("'w'"), "{err}");
    }

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        let f32s: Vec<u8> = [1.0f32, 2.0, f32::NAN, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(DType::F32, &f32s),
            Some((2, "NaN".to_string()))
        );
        let bf16s: Vec<u8> = [0x3f80u16, 0x7f80, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(DType::BF16, &bf16s),
            Some((1, "inf".to_string()))
        );
        let f16s: Vec<u8> = [0x3c00u16, 0x3c00, 0xfc00]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(DType::F16, &f16s),
            Some((2, "-inf".to_string()))
        );
        // Past the first parallel chunk: the index counts from the start.
        let mut big = vec![0u8; (1 << 21) + 8];
        big[(1 << 21) + 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            first_non_finite(DType::F32, &big),
            Some(((1 << 19) + 1, "NaN".to_string()))
        );
        assert_eq!(first_non_finite(DType::F32, &f32s[..8]), None);
    }

    /// A checkpoint with one NaN weight: asking for that tensor fails with a
    /// message naming it and the element; the other tensors still load.
    #[test]
    fn a_nan_weight_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            dtype: DType::F32,
            ..InitOptions::default()
        };
        init_checkpoint(Preset::get("tiny").unwrap(), &opts, dir.path()).unwrap();
        let name = "model.transformer.blocks.1.q_proj.weight";
        let start = Checkpoint::open(dir.path()).unwrap().tensors[name].start;
        let path = dir.path().join(SINGLE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[start + 4 * 5..start + 4 * 6].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let err = ckpt.tensor(name, &[64, 64]).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("NaN") && err.contains("element 5"),
            "{err}"
        );
        ckpt.tensor("model.transformer.blocks.0.q_proj.weight", &[64, 64])
            .unwrap();
    }
}
