//! A checkpoint directory in the Hugging Face layout: `config.json` plus
//! `model.safetensors`, or shards listed in `model.safetensors.index.json`.
//!
//! Files are memory-mapped and only the headers are parsed up front; a tensor
//! is read when it is asked for. A pipeline stage that loads a few layers
//! therefore touches only those layers' pages.

use crate::config::LladaConfig;
use crate::error::{ModelError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

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
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.maps.len())
            .field("tensors", &self.tensors.len())
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
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored tensor `name`, checked against `expected` shape.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<TensorRef<'_>> {
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
