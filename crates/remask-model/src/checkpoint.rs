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

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file (header included).
    start: usize,
    end: usize,
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
        Ok(TensorRef {
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.maps[e.file][e.start..e.end],
        })
    }
}

/// The weight files and, for a sharded checkpoint, the tensors each must hold.
#[allow(clippy::type_complexity)]
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(ModelError::io(&index_path))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(ModelError::json(&index_path))?;
        let bad = |reason: String| ModelError::BadIndex {
            path: index_path.clone(),
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
            if file.contains('/') || file.contains("..") {
                return Err(bad(format!("file name '{file}' must be a plain name")));
            }
            by_file
                .entry(file.to_string())
                .or_default()
                .push(tensor.clone());
        }
        if by_file.is_empty() {
            return Err(bad("\"weight_map\" is empty".into()));
        }
        Ok(by_file
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

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(ModelError::io(path))?;
    // SAFETY: the map is read-only; a checkpoint modified while it is being
    // served is outside what any inference server can guard against.
    unsafe { Mmap::map(&file) }.map_err(ModelError::io(path))
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
                    },
                ));
            }
            Ok(out)
        }
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            // Find the tensor that runs past the end, for a useful message.
            let header: serde_json::Value = serde_json::from_slice(&map[8..data_start])
                .map_err(|e| bad(format!("header is not JSON: {e}")))?;
            let available = map.len() - data_start;
            let last = header
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(name, v)| {
                    let end = v.get("data_offsets")?.get(1)?.as_u64()? as usize;
                    Some((name.clone(), end))
                })
                .max_by_key(|(_, end)| *end);
            match last {
                Some((tensor, needed)) if needed > available => Err(ModelError::Truncated {
                    path: path.to_path_buf(),
                    tensor,
                    needed,
                    available,
                }),
                _ => Err(bad(format!(
                    "{available} data bytes, but the header accounts for a different amount"
                ))),
            }
        }
        Err(e) => Err(bad(format!("{e:?}"))),
    }
}
