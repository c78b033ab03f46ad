//! LLaDA checkpoints as Hugging Face ships them: `config.json`, safetensors
//! weights (one file or shards with an index), `tokenizer.json` and the chat
//! template of `tokenizer_config.json`. Also writes random-weight checkpoints
//! of the same layout (`init`).

pub mod checkpoint;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod generation_config;
pub mod init;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, DType, GeneratedTensor, TensorRef, WeightSource};
pub use config::LladaConfig;
pub use error::{ModelError, Result};
pub use generation_config::GenerationConfig;
pub use init::{Init, InitOptions, InitSummary, Preset, init_checkpoint, init_value};
pub use tokenizer::{Message, SpecialTokens, TextCodec};
