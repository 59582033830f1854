//! Tokenizers built from GGUF metadata or an HF `tokenizer.json`: byte-level BPE (GPT-2 family:
//! SmolLM2, Llama 3, Qwen2) and, from GGUF, SentencePiece-style vocabularies with scores and byte
//! fallback (`llama` tokenizer model: Gemma 3; see [`super::spm`]).
//!
//! The BPE merge loop and the pre-tokenizer regexes come from the `tokenizers` crate. This module adds
//! what llama.cpp does around it and `tokenizers` does not expose the same way:
//! * special tokens (`<|im_start|>` …) are cut out of the text first, only when the caller asks for it
//!   (control tokens) — user-defined tokens are always cut out, as llama.cpp does;
//! * decoding works on bytes, so a token stream can be turned into text incrementally without ever
//!   emitting half of a UTF-8 character ([`StreamDecoder`]).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::PreTokenizerWrapper;

use super::gguf::GgufFile;
use super::spm::{self, Spm};

/// Token id in the model's vocabulary.
pub type TokenId = u32;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer model {0:?} is not supported (byte-level BPE \"gpt2\" or SentencePiece \"llama\")")]
    UnsupportedModel(String),
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("tokenizer backend: {0}")]
    Backend(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    UnknownId { id: TokenId, vocab: usize },
    /// The text holds a character one of whose bytes has no token in this byte-level
    /// vocabulary: encoding it would silently drop that byte.
    #[error("the text contains {ch:?} (U+{:04X}), which this model's vocabulary cannot represent (byte 0x{byte:02X} has no token)", u32::from(*ch))]
    Unrepresentable { ch: char, byte: u8 },
}

/// llama.cpp's token types (GGUF `tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    /// Special tokens such as `<|im_start|>`: parsed from text only on request, skipped when decoding
    /// with `skip_special`.
    Control,
    /// Added tokens that are always matched literally in the text.
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_gguf(v: i64) -> Self {
        match v {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// How plain text (special tokens already cut out) becomes tokens.
#[derive(Clone)]
enum Segmenter {
    /// BPE + pre-tokenizer only; it knows no special tokens (we split those out ourselves).
    /// `missing[b]`: byte `b` has no token of its own, so BPE would drop it (some vocabularies
    /// lack rare control bytes); text containing it is refused rather than silently altered.
    Bpe {
        bpe: Box<tokenizers::Tokenizer>,
        missing: Box<[bool; 256]>,
    },
    Spm(Spm),
}

/// A tokenizer (byte-level BPE or SentencePiece) with special-token handling.
#[derive(Clone)]
pub struct Tokenizer {
    seg: Segmenter,
    /// Decoded bytes of every token.
    pieces: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    /// Control/user-defined tokens, longest text first (the order llama.cpp matches them in).
    specials: Vec<(String, TokenId, TokenKind)>,
    bos: Option<TokenId>,
    eos: Option<TokenId>,
    /// Extra end-of-generation tokens (e.g. `<|im_end|>`, `<|endoftext|>`).
    eog: Vec<TokenId>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    // The vocabulary is large; a log line needs only its size and the special ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("specials", &self.specials.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// How the text is split before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2 regex only.
    Gpt2,
    /// Every digit is its own word, then the GPT-2 regex (llama.cpp pre types smollm, codeshell, …).
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// Map llama.cpp's `tokenizer.ggml.pre` names we can reproduce exactly.
    pub fn from_gguf_pre(pre: &str) -> Option<Self> {
        match pre {
            "default" | "gpt2" | "gpt-2" => Some(PreTokenizer::Gpt2),
            "smollm" | "codeshell" | "exaone" | "minerva-7b" => Some(PreTokenizer::DigitsThenGpt2),
            _ => None,
        }
    }
}

/// GPT-2's byte ↔ printable-char table: the char that stands for byte `b` in vocab strings.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    table
}

/// Bytes a byte-level vocab string stands for; `None` if it uses a char outside the table.
/// Bytes `b` for which no normal token decodes to exactly `[b]`: BPE starts from one symbol per
/// byte, and a symbol without a token is dropped.
fn missing_bytes(pieces: &[Vec<u8>], kinds: &[TokenKind]) -> Box<[bool; 256]> {
    let mut missing = Box::new([true; 256]);
    for (p, k) in pieces.iter().zip(kinds) {
        if let ([b], TokenKind::Normal | TokenKind::Byte) = (p.as_slice(), k) {
            missing[usize::from(*b)] = false;
        }
    }
    missing
}

/// The character of `s` that holds byte `i`.
fn char_at(s: &str, i: usize) -> char {
    let start = (0..=i.min(s.len()))
        .rev()
        .find(|&j| s.is_char_boundary(j))
        .unwrap_or(0);
    s[start..]
        .chars()
        .next()
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn piece_bytes(token: &str, char_to_byte: &HashMap<char, u8>) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| char_to_byte.get(&c).copied())
        .collect()
}

impl Tokenizer {
    /// Build from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let meta = |e: super::gguf::GgufError| TokenizerError::Metadata(e.to_string());
        let model = file.get_str("tokenizer.ggml.model").map_err(meta)?;
        if model != "gpt2" && model != "llama" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre_name = file
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let pre = PreTokenizer::from_gguf_pre(pre_name).unwrap_or_else(|| {
            tracing::warn!(
                pre = pre_name,
                "unknown GGUF pre-tokenizer; falling back to the GPT-2 regex"
            );
            PreTokenizer::Gpt2
        });
        let tokens = file.get_str_array("tokenizer.ggml.tokens").map_err(meta)?;
        let types = match file.get("tokenizer.ggml.token_type") {
            Some(_) => file
                .get_i64_array("tokenizer.ggml.token_type")
                .map_err(meta)?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Metadata(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let kinds: Vec<TokenKind> = types.iter().map(|&t| TokenKind::from_gguf(t)).collect();
        let id = |key: &str| -> Option<TokenId> {
            file.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let flag =
            |key: &str, default: bool| file.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let add_bos = flag("tokenizer.ggml.add_bos_token", false);
        let mut eog: Vec<TokenId> = [
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        // llama.cpp also treats these well-known control tokens as end of generation.
        for (i, t) in tokens.iter().enumerate() {
            if matches!(
                *t,
                "<|im_end|>" | "<|endoftext|>" | "<|eot_id|>" | "<|end|>" | "<end_of_turn>"
            ) && kinds[i] == TokenKind::Control
            {
                eog.push(i as TokenId);
            }
        }
        let tokens: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        if model == "llama" {
            let scores = file
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().map(|v| v.as_f32()).collect::<Option<Vec<f32>>>())
                .filter(|s| s.len() == tokens.len())
                .ok_or_else(|| {
                    TokenizerError::Metadata(format!(
                        "tokenizer.ggml.scores: expected {} numbers",
                        tokens.len()
                    ))
                })?;
            Self::check_ids(&tokens, bos, eos)?;
            // llama.cpp's default for SPM vocabularies is to add the space prefix.
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
            let unk = id("tokenizer.ggml.unknown_token_id");
            let pieces = Self::spm_pieces(&tokens, &kinds);
            let specials = Self::specials(&tokens, &kinds);
            return Ok(Self {
                seg: Segmenter::Spm(Spm::new(&tokens, scores, unk, add_space_prefix)),
                pieces,
                kinds,
                specials,
                bos,
                eos,
                eog,
                add_bos,
            });
        }
        let merges = file.get_str_array("tokenizer.ggml.merges").map_err(meta)?;
        let merges = merges
            .iter()
            .map(|m| {
                // llama.cpp splits at the first space after the first character.
                let pos = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(i, _)| i);
                match pos {
                    Some(p) => Ok((m[..p].to_string(), m[p + 1..].to_string())),
                    None => Err(TokenizerError::Metadata(format!(
                        "merge {m:?} has no space"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(tokens, kinds, merges, pre, bos, eos, eog, add_bos)
    }

    /// Build from an HF `tokenizer.json` (byte-level BPE models: Llama 3, Qwen2/3, SmolLM; and
    /// SentencePiece-style BPE with byte fallback: Gemma).
    ///
    /// Normalizer, pre-tokenizer (regexes, digit splitting) and BPE model are taken from the file by
    /// `tokenizers`; added tokens are split out by us, exactly as for GGUF.
    pub fn from_hf_file(path: &Path) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TokenizerError::Metadata(format!("tokenizer.json: {e}")))?;
        // Added tokens are cut out by us (see module docs), so the backend must not know them.
        let added = json
            .as_object_mut()
            .and_then(|o| o.remove("added_tokens"))
            .unwrap_or(serde_json::Value::Array(vec![]));
        if let Some(o) = json.as_object_mut() {
            // Post-processors (BOS insertion) are ours to decide as well.
            o.insert("post_processor".into(), serde_json::Value::Null);
        }
        // SentencePiece-style BPE (Gemma, Llama 2): `▁` for spaces and `<0xNN>` byte-fallback
        // tokens instead of GPT-2's byte-to-char table.
        let spm_style = json
            .pointer("/model/byte_fallback")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let bpe = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        let vocab = bpe.get_vocab(false);
        let mut size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut added_list = Vec::new();
        for a in added.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            let (Some(id), Some(content)) = (
                a.get("id").and_then(|v| v.as_u64()),
                a.get("content").and_then(|v| v.as_str()),
            ) else {
                return Err(TokenizerError::Metadata(
                    "added_tokens entry without id/content".into(),
                ));
            };
            let id = u32::try_from(id)
                .map_err(|_| TokenizerError::Metadata(format!("added token id {id}")))?;
            let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
            size = size.max(id as usize + 1);
            added_list.push((id, content.to_string(), special));
        }
        if size > 10_000_000 {
            return Err(TokenizerError::Metadata(format!(
                "vocabulary of {size} tokens is absurd"
            )));
        }
        let mut tokens = vec![String::new(); size];
        let mut kinds = vec![TokenKind::Unused; size];
        for (t, &i) in &vocab {
            tokens[i as usize] = t.clone();
            kinds[i as usize] = if spm_style && Spm::byte_piece(t).is_some() {
                TokenKind::Byte
            } else {
                TokenKind::Normal
            };
        }
        for (id, content, special) in &added_list {
            tokens[*id as usize] = content.clone();
            kinds[*id as usize] = if *special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
        }
        let find = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as TokenId);
        let eos = find("<|im_end|>")
            .or_else(|| find("<|endoftext|>"))
            .or_else(|| find("<|eot_id|>"))
            .or_else(|| find("<eos>"));
        let bos = find("<|begin_of_text|>")
            .or_else(|| find("<|im_start|>"))
            .or_else(|| find("<bos>"));
        let eog = [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<eos>",
            "<end_of_turn>",
        ]
        .iter()
        .filter_map(|s| find(s))
        .collect();
        let pieces = if spm_style {
            Self::spm_pieces(&tokens, &kinds)
        } else {
            Self::pieces(&tokens, &kinds)?
        };
        let specials = Self::specials(&tokens, &kinds);
        Ok(Self {
            seg: Segmenter::Bpe {
                bpe: Box::new(bpe),
                missing: missing_bytes(&pieces, &kinds),
            },
            pieces,
            kinds,
            specials,
            bos,
            eos,
            eog,
            add_bos: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        tokens: Vec<String>,
        kinds: Vec<TokenKind>,
        merges: Vec<(String, String)>,
        pre: PreTokenizer,
        bos: Option<TokenId>,
        eos: Option<TokenId>,
        eog: Vec<TokenId>,
        add_bos: bool,
    ) -> Result<Self, TokenizerError> {
        Self::check_ids(&tokens, bos, eos)?;
        // Like llama.cpp's token_to_id map, a duplicated token string resolves to its last id.
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        let mut bpe = tokenizers::Tokenizer::new(model);
        let byte_level = ByteLevel::new(false, false, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            PreTokenizer::Gpt2 => byte_level.into(),
            PreTokenizer::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
        };
        bpe.with_pre_tokenizer(Some(pre_tok));
        let pieces = Self::pieces(&tokens, &kinds)?;
        let specials = Self::specials(&tokens, &kinds);
        Ok(Self {
            seg: Segmenter::Bpe {
                bpe: Box::new(bpe),
                missing: missing_bytes(&pieces, &kinds),
            },
            pieces,
            kinds,
            specials,
            bos,
            eos,
            eog,
            add_bos,
        })
    }

    fn check_ids(
        tokens: &[String],
        bos: Option<TokenId>,
        eos: Option<TokenId>,
    ) -> Result<(), TokenizerError> {
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::Metadata(format!(
                "vocabulary of {} tokens",
                tokens.len()
            )));
        }
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id.filter(|&i| i as usize >= tokens.len()) {
                return Err(TokenizerError::Metadata(format!(
                    "{name} id {id} outside the vocabulary"
                )));
            }
        }
        Ok(())
    }

    fn pieces(tokens: &[String], kinds: &[TokenKind]) -> Result<Vec<Vec<u8>>, TokenizerError> {
        let table = byte_to_char_table();
        let char_to_byte: HashMap<char, u8> = table
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        tokens
            .iter()
            .zip(kinds)
            .map(|(t, k)| match k {
                // Specials and added tokens are literal text, not byte-level encoded.
                TokenKind::Control
                | TokenKind::UserDefined
                | TokenKind::Unused
                | TokenKind::Unknown => Ok(t.as_bytes().to_vec()),
                _ => piece_bytes(t, &char_to_byte).ok_or_else(|| {
                    TokenizerError::UnsupportedModel(format!("token {t:?} is not byte-level BPE"))
                }),
            })
            .collect()
    }

    /// The bytes a SentencePiece token stands for: `▁` is a space, `<0xNN>` one byte.
    fn spm_piece(t: &str, kind: TokenKind) -> Vec<u8> {
        match kind {
            TokenKind::Normal => t.replace(spm::SPACE, " ").into_bytes(),
            TokenKind::Byte => Spm::byte_piece(t)
                .map(|b| vec![b])
                .unwrap_or_else(|| t.as_bytes().to_vec()),
            _ => t.as_bytes().to_vec(),
        }
    }

    fn spm_pieces(tokens: &[String], kinds: &[TokenKind]) -> Vec<Vec<u8>> {
        tokens
            .iter()
            .zip(kinds)
            .map(|(t, k)| Self::spm_piece(t, *k))
            .collect()
    }

    /// The same tokenizer, adding BOS in front of prompts or not (HF `tokenizer_config.json`'s
    /// `add_bos_token`; `tokenizer.json` leaves it to a post-processor this type replaces).
    pub fn with_add_bos(mut self, add_bos: bool) -> Self {
        self.add_bos = add_bos && self.bos.is_some();
        self
    }

    fn specials(tokens: &[String], kinds: &[TokenKind]) -> Vec<(String, TokenId, TokenKind)> {
        let mut v: Vec<_> = tokens
            .iter()
            .zip(kinds)
            .enumerate()
            .filter(|(_, (t, k))| {
                !t.is_empty() && matches!(k, TokenKind::Control | TokenKind::UserDefined)
            })
            .map(|(i, (t, k))| (t.clone(), i as TokenId, *k))
            .collect();
        // Longest first, stable for equal lengths, as llama.cpp sorts its special-token cache.
        v.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        v
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }
    pub fn bos(&self) -> Option<TokenId> {
        self.bos
    }
    pub fn eos(&self) -> Option<TokenId> {
        self.eos
    }
    /// Whether the model wants a BOS token in front of every prompt (GGUF `add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    /// True for tokens that end a generation (eos, `<|im_end|>`, …).
    pub fn is_eog(&self, id: TokenId) -> bool {
        Some(id) == self.eos || self.eog.contains(&id)
    }
    /// The vocabulary string of a token (byte-level encoded for normal tokens).
    pub fn kind(&self, id: TokenId) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }
    /// Id of a special token by its text, e.g. `"<|im_end|>"`.
    pub fn special_id(&self, text: &str) -> Option<TokenId> {
        self.specials
            .iter()
            .find(|(t, _, _)| t == text)
            .map(|&(_, id, _)| id)
    }

    /// Encode `text`. With `parse_special`, control tokens written in the text (e.g. `<|im_start|>`)
    /// become their ids; otherwise they are tokenized as plain text. BOS is prepended when
    /// `add_bos` is set and the model has one.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<TokenId>, TokenizerError> {
        self.encode_with(text, add_bos, parse_special, None)
    }

    /// Writes every control token's text in `s` (untrusted text, e.g. a chat message's content)
    /// as `marker`, its index, `marker`, so that a template can be rendered around it and the
    /// result encoded with [`Tokenizer::encode_masked`]: the template's control tokens become
    /// ids, the user's stay plain text. `marker` must not occur in `s`.
    pub fn mask_controls(&self, s: &str, marker: char) -> String {
        let controls: Vec<(usize, &str)> = self
            .specials
            .iter()
            .enumerate()
            .filter(|(_, (_, _, k))| *k == TokenKind::Control)
            .map(|(i, (t, _, _))| (i, t.as_str()))
            .collect();
        let mut first = [false; 256];
        for (_, t) in &controls {
            first[usize::from(t.as_bytes()[0])] = true; // `specials` holds no empty text
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        'scan: while let Some(c) = rest.chars().next() {
            // Longest first (`specials` is sorted so), as the splitter in `encode` matches.
            let candidates = if first[usize::from(rest.as_bytes()[0])] {
                controls.as_slice()
            } else {
                &[]
            };
            for (i, t) in candidates {
                if rest.starts_with(t) {
                    out.push(marker);
                    out.push_str(&i.to_string());
                    out.push(marker);
                    rest = &rest[t.len()..];
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// [`Tokenizer::encode`] of a text made with [`Tokenizer::mask_controls`]: control tokens
    /// written in the text itself are parsed when `parse_special`; masked ones become their
    /// literal text again and are tokenized as plain text, exactly as if never masked.
    pub fn encode_masked(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
        marker: char,
    ) -> Result<Vec<TokenId>, TokenizerError> {
        self.encode_with(text, add_bos, parse_special, Some(marker))
    }

    /// Undoes [`Tokenizer::mask_controls`] in one text fragment.
    fn unmask<'a>(&self, raw: &'a str, marker: char) -> std::borrow::Cow<'a, str> {
        if !raw.contains(marker) {
            return raw.into();
        }
        let mut out = String::with_capacity(raw.len());
        let mut parts = raw.split(marker);
        if let Some(first) = parts.next() {
            out.push_str(first);
        }
        // Parts alternate: index, text, index, text …
        while let Some(index) = parts.next() {
            let special = index
                .parse::<usize>()
                .ok()
                .and_then(|i| self.specials.get(i));
            match special {
                Some((t, _, _)) => out.push_str(t),
                None => {
                    // Not ours (cannot happen when `marker` was absent from the input): keep it.
                    out.push(marker);
                    out.push_str(index);
                    out.push(marker);
                }
            }
            if let Some(text) = parts.next() {
                out.push_str(text);
            }
        }
        out.into()
    }

    fn encode_with(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
        unmask: Option<char>,
    ) -> Result<Vec<TokenId>, TokenizerError> {
        let mut out = Vec::new();
        if add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        // Fragments: Ok(text to BPE) or Err(special id), split like llama.cpp's tokenizer_st_partition.
        let mut frags: Vec<Result<&str, TokenId>> = vec![Ok(text)];
        for (special, id, kind) in &self.specials {
            if *kind == TokenKind::Control && !parse_special {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Ok(mut raw) => {
                        while let Some(pos) = raw.find(special.as_str()) {
                            if pos > 0 {
                                next.push(Ok(&raw[..pos]));
                            }
                            next.push(Err(*id));
                            raw = &raw[pos + special.len()..];
                        }
                        if !raw.is_empty() {
                            next.push(Ok(raw));
                        }
                    }
                    Err(id) => next.push(Err(id)),
                }
            }
            frags = next;
        }
        let mut after_special = true;
        for f in frags {
            match (f, &self.seg) {
                (Err(id), _) => {
                    out.push(id);
                    after_special = true;
                }
                (Ok(raw), seg) => {
                    // Masked control-token text (chat content) is restored before segmenting.
                    let raw = match unmask {
                        Some(m) => self.unmask(raw, m),
                        None => raw.into(),
                    };
                    match seg {
                        Segmenter::Bpe { bpe, missing } => {
                            if let Some(i) = raw.bytes().position(|b| missing[usize::from(b)]) {
                                return Err(TokenizerError::Unrepresentable {
                                    ch: char_at(raw.as_ref(), i),
                                    byte: raw.as_bytes()[i],
                                });
                            }
                            let enc = bpe
                                .encode(raw.as_ref(), false)
                                .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                            out.extend_from_slice(enc.get_ids());
                        }
                        Segmenter::Spm(spm) => {
                            spm.encode(raw.as_ref(), after_special, &mut out);
                            after_special = false;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes of one token (control tokens give their literal text unless `skip_special`).
    pub fn token_bytes(&self, id: TokenId, skip_special: bool) -> Result<&[u8], TokenizerError> {
        let piece = self
            .pieces
            .get(id as usize)
            .ok_or(TokenizerError::UnknownId {
                id,
                vocab: self.pieces.len(),
            })?;
        if skip_special && self.kinds[id as usize] == TokenKind::Control {
            return Ok(&[]);
        }
        Ok(piece)
    }

    /// Decode a whole sequence (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id, skip_special)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A decoder for a stream of generated tokens.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            pending: Vec::new(),
            skip_special,
        }
    }
}

/// Turns tokens into text as they arrive, holding back bytes of an incomplete UTF-8 character.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder<'_> {
    /// Feed one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: TokenId) -> Result<String, TokenizerError> {
        self.pending
            .extend_from_slice(self.tok.token_bytes(id, self.skip_special)?);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is valid UTF-8, so this copies it unchanged.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        // Bytes that can never become valid: replace them and continue.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Flush what is left at the end of the stream (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn text_with_a_byte_the_vocabulary_lacks_is_refused_not_altered() {
        let table = byte_to_char_table();
        // A byte-level vocabulary without tokens for 0x06 and 0xA9 (the last byte of 'é').
        let tokens: Vec<String> = (0..=255u8)
            .filter(|b| ![0x06, 0xA9].contains(b))
            .map(|b| table[usize::from(b)].to_string())
            .collect();
        let kinds = vec![TokenKind::Normal; tokens.len()];
        let tok = Tokenizer::build(
            tokens,
            kinds,
            vec![],
            PreTokenizer::Gpt2,
            None,
            None,
            vec![],
            false,
        )
        .expect("tokenizer");
        for (text, ch, byte) in [("a\u{6}b", '\u{6}', 0x06), ("café au lait", 'é', 0xA9)] {
            match tok.encode(text, false, false) {
                Err(TokenizerError::Unrepresentable { ch: c, byte: b }) => {
                    assert_eq!((c, b), (ch, byte), "{text:?}")
                }
                other => panic!("{text:?} encoded as {other:?}"),
            }
        }
        let text = "plain text, digits 123 and ü";
        let ids = tok.encode(text, false, false).expect("encodes");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), text);
    }
}
