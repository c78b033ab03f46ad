//! Text in and out: `tokenizer.json` through the `tokenizers` crate, and the
//! `chat_template` of `tokenizer_config.json` rendered with minijinja the way
//! transformers' `apply_chat_template(add_generation_prompt=True)` does.

use crate::config::LladaConfig;
use crate::error::{ModelError, Result};
use serde::Serialize;
use std::path::Path;
use tokenizers::Tokenizer;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// One chat message, as the template sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The ids the sampler and the chat format need, read from the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub mask: u32,
    pub eos: u32,
    pub bos: Option<u32>,
    /// End of turn (`<|eot_id|>`), when the tokenizer has it.
    pub eot: Option<u32>,
}

pub struct TextCodec {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The most input bytes one token can stand for, when the tokenizer
    /// keeps every input byte (no normalizer; byte-level or no
    /// pre-tokenizer); see `max_token_bytes`.
    max_token_bytes: Option<usize>,
    /// The special tokens' texts (`<|eot_id|>`, `<|start_header_id|>`, ...),
    /// longest first.
    special_texts: Vec<String>,
    /// Whether chat content may hold them (`allow_special_tokens_in_chat`).
    special_in_chat: bool,
}

impl TextCodec {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(ModelError::Tokenizer {
                path,
                reason: "file not found".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: serde_json::Value = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(ModelError::io(&config_path))?;
            serde_json::from_str(&text).map_err(ModelError::json(&config_path))?
        } else {
            serde_json::Value::Null
        };
        // A token in tokenizer_config.json is a string or an AddedToken object.
        let token = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        let max_token_bytes = bytes_per_token_bound(&tokenizer);
        let mut special_texts: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        special_texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
        special_texts.dedup();
        Ok(TextCodec {
            max_token_bytes,
            special_texts,
            special_in_chat: false,
            tokenizer,
            chat_template: config
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(String::from),
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// Lets chat content hold special tokens as text, which the template then
    /// turns into real control tokens (Hugging Face's default, and vLLM's).
    /// Off by default: content holding `<|eot_id|><|start_header_id|>system`
    /// would forge a turn of another role, so it is refused with a message.
    pub fn allow_special_tokens_in_chat(mut self, allow: bool) -> Self {
        self.special_in_chat = allow;
        self
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Mask and EOS from config.json when present (that is where LLaDA puts
    /// them), else from the tokenizer; BOS and EoT from the tokenizer.
    pub fn special_tokens(&self, config: &LladaConfig) -> Result<SpecialTokens> {
        let mask = config
            .mask_token_id
            .or_else(|| self.token_id("<|mdm_mask|>"))
            .ok_or(ModelError::MissingSpecialToken("mask (mask_token_id)"))?;
        let eos = config
            .eos_token_id
            .or_else(|| self.eos_token.as_deref().and_then(|t| self.token_id(t)))
            .ok_or(ModelError::MissingSpecialToken("eos (eos_token_id)"))?;
        Ok(SpecialTokens {
            mask,
            eos,
            bos: self.bos_token.as_deref().and_then(|t| self.token_id(t)),
            eot: self.token_id("<|eot_id|>"),
        })
    }

    /// Plain text, with the tokenizer's own post-processing (e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Text that continues a sequence (an infill suffix): no BOS or other
    /// post-processing.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: TOKENIZER_FILE.into(),
                reason: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The chat template with a generation prompt, then tokenized without
    /// adding special tokens again (the template already has them).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        if !self.special_in_chat {
            for (index, m) in messages.iter().enumerate() {
                if let Some(token) = self.special_texts.iter().find(|t| m.content.contains(&**t)) {
                    return Err(ModelError::SpecialTokenInChat {
                        index,
                        role: m.role.clone(),
                        token: token.clone(),
                    });
                }
            }
        }
        let text = self.render_chat(messages)?;
        self.encode_with(&text, false)
    }

    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Template(format!(
                "{TOKENIZER_CONFIG_FILE} has no chat_template; use a plain prompt instead"
            ))
        })?;
        render_chat_template(
            template,
            messages,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }

    /// Decodes ids; with `skip_special` the special tokens (mask, EOS, chat
    /// headers) are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer {
                path: TOKENIZER_FILE.into(),
                reason: e.to_string(),
            })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The bytes of text one token stands for (OpenAI's `bytes` of a
    /// logprob): under a byte-level decoder the token's own bytes, so that
    /// a token holding part of a character has just that part and the
    /// answer's tokens' bytes join to its text; otherwise (and for added
    /// tokens) the token decoded alone.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let byte_level = matches!(
            self.tokenizer.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let added = self.tokenizer.get_added_tokens_decoder().contains_key(&id);
        if byte_level
            && !added
            && let Some(piece) = self.tokenizer.id_to_token(id)
            && let Some(bytes) = piece
                .chars()
                .map(byte_level_byte)
                .collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
        self.decode(&[id], false).unwrap_or_default().into_bytes()
    }

    /// The most bytes of text one token can cover, when that is certain:
    /// then text longer than `tokens * max_token_bytes` bytes is certainly
    /// more than `tokens` tokens, and a server can refuse it without
    /// tokenizing it. `None` for tokenizers that may drop input (a
    /// normalizer, a pre-tokenizer that removes whitespace).
    pub fn max_token_bytes(&self) -> Option<usize> {
        self.max_token_bytes
    }
}

/// `TextCodec::max_token_bytes`: the longest vocabulary entry, counted in
/// characters (a byte-level token has one character per byte) or UTF-8
/// bytes, whichever is more.
fn bytes_per_token_bound(tokenizer: &Tokenizer) -> Option<usize> {
    use tokenizers::PreTokenizerWrapper;
    let keeps_bytes = tokenizer.get_normalizer().is_none()
        && matches!(
            tokenizer.get_pre_tokenizer(),
            None | Some(PreTokenizerWrapper::ByteLevel(_))
        );
    keeps_bytes.then(|| {
        tokenizer
            .get_vocab(true)
            .keys()
            .map(|t| t.len().max(t.chars().count()))
            .max()
            .unwrap_or(1)
            .max(1)
    })
}

/// Instructions a chat template may execute per rendering: a template comes
/// with the model files, and one with nested loops must fail, not hang the
/// server. Real templates use a few hundred per message.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// `template` rendered over `messages` the way transformers'
/// `apply_chat_template(add_generation_prompt=True)` does.
/// The byte a character of a byte-level (GPT-2) token stands for: the
/// printable bytes as themselves, the others as U+0100 onwards in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let u = c as u32;
    if u < 256 {
        return printable(u).then_some(u as u8);
    }
    (0..256u32)
        .filter(|&b| !printable(b))
        .nth((u - 256) as usize)
        .map(|b| b as u8)
}

pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| ModelError::Template(e.to_string()))?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| ModelError::Template(e.to_string()))
}

#[cfg(test)]
mod token_bytes_tests {
    use super::*;

    /// A byte-level tokenizer's tokens give back the text's bytes, also
    /// where a token holds only part of a character.
    #[test]
    fn token_bytes_join_to_the_text() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/remask-demo");
        let codec = TextCodec::load(&dir).unwrap();
        let text = " naïve café, ✓ 日本語 and the evening";
        let ids = codec.encode_continuation(text).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| codec.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        // Some token there is part of a character: alone it decodes to U+FFFD.
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(&codec.token_bytes(id)).is_err())
        );
        // Every byte has its character, once.
        let all: std::collections::HashSet<u8> = (0..=0x143u32)
            .filter_map(char::from_u32)
            .filter_map(byte_level_byte)
            .collect();
        assert_eq!(all.len(), 256);
    }
}
