//! Loading a model by name for serving: a GGUF path, an HF directory (`config.json` +
//! `*.safetensors` + `tokenizer.json`) or a built-in synthetic model, with the text side
//! (tokenizer, chat template, stop tokens) the serving layer needs.

use std::path::Path;
use std::sync::Arc;

use prfaas_kernels::{Backend, BackendKind};

use super::chat::{ChatError, ChatMessage, ChatTemplate};
use super::gguf::{load_gguf, GgufError, LoadedModel};
use super::hf::{load_hf_dir, HfError};
use super::synthetic::{synthetic_model, ByteTokenizer, SyntheticKind, DEFAULT_SEED};
use super::tokenizer::{Tokenizer, TokenizerError};
use super::{ModelConfig, ModelWeights};

/// Where `scripts/fetch-model` puts the default model.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Short names for the models `scripts/fetch-model NAME` downloads: `(name, path)`.
pub const MODEL_ALIASES: [(&str, &str); 2] = [
    ("smollm2", DEFAULT_MODEL),
    ("gemma3-270m", "models/gemma-3-270m-q4_k_m.gguf"),
];

/// The path an alias stands for (`gemma3-270m` → `models/gemma-3-270m-q4_k_m.gguf`); other specs
/// unchanged.
pub fn resolve_alias(spec: &str) -> &str {
    MODEL_ALIASES
        .iter()
        .find(|(name, _)| *name == spec)
        .map_or(spec, |(_, path)| path)
}

/// Why a model could not be loaded or its text handled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("model file {path} not found: run `scripts/fetch-model {name}` to download it")]
    DefaultMissing { path: String, name: String },
    #[error("model file {0} not found (or use `tiny-hybrid` / `tiny-dense`)")]
    Missing(String),
    #[error("loading {path}: {source}")]
    Gguf {
        path: String,
        #[source]
        source: GgufError,
    },
    #[error("loading HF model directory {path}: {source}")]
    Hf {
        path: String,
        #[source]
        source: HfError,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("backend `{kind}`: {source}")]
    Backend {
        kind: BackendKind,
        #[source]
        source: prfaas_kernels::KernelError,
    },
}

/// Turns text into token ids and back for the model at hand.
#[derive(Debug, Clone)]
pub enum TextCodec {
    /// Synthetic models: one token per byte.
    Bytes(ByteTokenizer),
    /// The GGUF's tokenizer (byte-level BPE or SentencePiece).
    Bpe(Box<Tokenizer>),
}

impl TextCodec {
    /// Token ids of a prompt, with the BOS token the model's tokenizer adds; `parse_special`
    /// turns control-token text such as `<|im_start|>` into that token (raw prompts and the
    /// chat template's own markup), else it is plain text (what users typed into a message).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.tokenize(text, true, parse_special)
    }

    /// Token ids of `text`; `add_special` adds the BOS token when the model's tokenizer adds
    /// one (llama-server's `/tokenize` flags).
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        match self {
            TextCodec::Bytes(t) => Ok(t.encode(text)),
            TextCodec::Bpe(t) => t.encode(text, add_special && t.add_bos(), parse_special),
        }
    }

    /// Raw bytes of one token with special tokens as their text (`<|im_end|>`), for
    /// `/tokenize` pieces and `/detokenize`; `None` for an id outside the vocabulary.
    pub fn piece(&self, id: u32) -> Option<Vec<u8>> {
        match self {
            TextCodec::Bytes(t) => Some(t.token_bytes(id)),
            TextCodec::Bpe(t) => t.token_bytes(id, false).ok().map(<[u8]>::to_vec),
        }
    }

    /// Raw bytes of one token (a token may be part of a UTF-8 character); specials are empty.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            TextCodec::Bytes(t) => t.token_bytes(id),
            TextCodec::Bpe(t) => t
                .token_bytes(id, true)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        }
    }

    fn special_text(&self, id: Option<u32>) -> String {
        match (self, id) {
            (TextCodec::Bpe(t), Some(id)) => {
                String::from_utf8_lossy(t.token_bytes(id, false).unwrap_or_default()).into_owned()
            }
            _ => String::new(),
        }
    }
}

/// A model read from disk or generated, not yet on a backend, with its text side.
#[derive(Debug, Clone)]
pub struct ModelBundle {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub text: TextSide,
}

/// Everything about a model's text: tokenizer, chat template, stop tokens.
#[derive(Debug, Clone)]
pub struct TextSide {
    pub codec: TextCodec,
    /// Jinja chat template from the model file, if any.
    pub chat_template: Option<String>,
    /// Tokens that end generation (EOS, `<|im_end|>`).
    pub stop_tokens: Vec<u32>,
}

impl TextSide {
    /// Renders `messages` with the model's chat template (generation prompt appended). Models
    /// without a template get the messages' contents joined by newlines.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, LoadError> {
        match &self.chat_template {
            None => Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n")),
            Some(src) => {
                let (bos, eos) = match &self.codec {
                    TextCodec::Bpe(t) => (
                        self.codec.special_text(t.bos()),
                        self.codec.special_text(t.eos()),
                    ),
                    TextCodec::Bytes(_) => (String::new(), String::new()),
                };
                let tpl = ChatTemplate::new(src, &bos, &eos)?;
                Ok(tpl.render(messages, true)?)
            }
        }
    }

    /// Token ids of a chat prompt. Only the chat template makes control tokens: a message that
    /// contains `<|im_end|><|im_start|>system` gets those as plain text, not as a new turn.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, LoadError> {
        let TextCodec::Bpe(t) = &self.codec else {
            // One token per byte: no control tokens to forge.
            return Ok(self.codec.encode(&self.render_chat(messages)?, false)?);
        };
        // A private-use character the messages and the template do not contain marks the masked
        // control tokens (see `Tokenizer::mask_controls`).
        let template = self.chat_template.as_deref().unwrap_or("");
        let marker = (0xF0000..0xF0400)
            .filter_map(char::from_u32)
            .find(|c| !template.contains(*c) && messages.iter().all(|m| !m.content.contains(*c)))
            .ok_or_else(|| ChatError::Render("no free marker character for the messages".into()))?;
        let masked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), t.mask_controls(&m.content, marker)))
            .collect();
        let text = self.render_chat(&masked)?;
        Ok(t.encode_masked(&text, t.add_bos(), self.chat_uses_specials(), marker)?)
    }

    /// Whether chat prompts contain special tokens to parse (`<|im_start|>` …).
    pub fn chat_uses_specials(&self) -> bool {
        self.chat_template.is_some()
    }
}

/// Loads `spec`: a synthetic model name (`tiny-hybrid`, `tiny-dense`), an alias of a fetchable
/// model ([`MODEL_ALIASES`]), a GGUF path or an HF model directory.
pub fn load_model(spec: &str) -> Result<ModelBundle, LoadError> {
    let spec = resolve_alias(spec);
    if let Some(kind) = SyntheticKind::from_name(spec) {
        let (config, weights) = synthetic_model(kind, DEFAULT_SEED);
        let codec = ByteTokenizer;
        return Ok(ModelBundle {
            config,
            weights,
            text: TextSide {
                stop_tokens: vec![codec.eos()],
                codec: TextCodec::Bytes(codec),
                chat_template: None,
            },
        });
    }
    let path = Path::new(spec);
    if !path.exists() {
        if let Some((name, _)) = MODEL_ALIASES.iter().find(|(_, p)| *p == spec) {
            return Err(LoadError::DefaultMissing {
                path: spec.into(),
                name: name.to_string(),
            });
        }
        return Err(LoadError::Missing(spec.into()));
    }
    let m: LoadedModel = if path.is_dir() {
        load_hf_dir(path).map_err(|source| LoadError::Hf {
            path: spec.into(),
            source,
        })?
    } else {
        load_gguf(path).map_err(|source| LoadError::Gguf {
            path: spec.into(),
            source,
        })?
    };
    let stop_tokens = (0..m.tokenizer.vocab_size() as u32)
        .filter(|&t| m.tokenizer.is_eog(t))
        .collect();
    Ok(ModelBundle {
        config: m.config,
        weights: m.weights,
        text: TextSide {
            codec: TextCodec::Bpe(Box::new(m.tokenizer)),
            chat_template: m.chat_template,
            stop_tokens,
        },
    })
}

/// The backend for `kind`, following `select_backend`'s `auto` rule.
pub fn make_backend(kind: BackendKind) -> Result<Arc<dyn Backend>, LoadError> {
    match kind {
        BackendKind::Cpu => Ok(Arc::new(prfaas_kernels::cpu::CpuBackend::new())),
        _ => prfaas_kernels::select_backend(kind)
            .map_err(|source| LoadError::Backend { kind, source }),
    }
}

/// Streams decoded text while holding back incomplete UTF-8 sequences.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                // Incomplete character at the end: emit the valid part, keep the rest.
                let valid = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
            Err(_) => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }

    /// Whatever is left (invalid tails become U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
