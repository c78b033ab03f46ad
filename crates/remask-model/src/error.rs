use std::path::PathBuf;

/// Why a checkpoint could not be used. Every variant names the file or
/// tensor at fault and what was expected, so the fix is obvious.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    ConfigValue { path: PathBuf, reason: String },
    #[error("unsupported config.json: {0}")]
    Unsupported(String),
    #[error("invalid config.json: {0}")]
    InvalidConfig(String),
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error(
        "{path}: file is truncated: tensor '{tensor}' ends at byte {needed} of the data section but only {available} bytes are present"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: usize,
        available: usize,
    },
    #[error("{path}: bad index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("tensor '{0}' is missing from the checkpoint")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor '{name}': {dir} holds generated weights ({preset} preset, `model init --on-device-weights`), not stored tensors; load the model through a backend, or write the weights with `remask model init` without --on-device-weights"
    )]
    NotStored {
        name: String,
        dir: PathBuf,
        preset: &'static str,
    },
    #[error(
        "tensor '{name}' holds a non-finite value ({value}) at element {index}: the checkpoint is corrupt, refusing to load it"
    )]
    NonFinite {
        name: String,
        index: usize,
        value: String,
    },
    #[error("tensor '{name}' has dtype {dtype}; supported are F32, BF16 and F16")]
    DType { name: String, dtype: String },
    #[error("{path}: tokenizer error: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error(
        "chat message {index} ({role}) contains the special token {token:?}: the template would \
         make it a real control token (a user could end their turn and write one for another \
         role); remove it, or start the server with --allow-special-tokens-in-chat"
    )]
    SpecialTokenInChat {
        index: usize,
        role: String,
        token: String,
    },
    #[error("special token {0} not found: set it in config.json or add it to tokenizer.json")]
    MissingSpecialToken(&'static str),
    #[error("no checkpoint at {0}: expected a directory with config.json")]
    NotADirectory(PathBuf),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
        let path = path.into();
        move |source| ModelError::Io { path, source }
    }
    pub(crate) fn json(path: impl Into<PathBuf>) -> impl FnOnce(serde_json::Error) -> ModelError {
        let path = path.into();
        move |source| ModelError::Json { path, source }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
