//! The OpenAI wire format: request bodies, responses, stream chunks, and the translation of a
//! request into the node's [`GenerateRequest`].
//!
//! Sans-IO on purpose: the handlers and the typed client both use these types, and validation is
//! tested without a server. Field names and shapes follow OpenAI's API reference. Fields that would
//! change the answer and are not implemented (`tools`, `response_format` other than text, `echo`,
//! `suffix`, `best_of` > 1, audio, …) are refused with 400 and their `param`, never silently
//! ignored; fields that do not change the answer (`user`, `metadata`, `store`, `service_tier`,
//! `parallel_tool_calls`) and unknown ones are ignored.

use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};

use crate::engine::chat::ChatMessage;
use crate::engine::{FinishReason, SamplingParams};
use crate::service::{GenerateRequest, PrefillRoute, PromptInput, Timings, TokenLogprob, Usage};

use super::error::ApiError;

/// At most this many stop strings, as OpenAI allows.
pub const MAX_STOP_STRINGS: usize = 4;

/// Body of `/v1/chat/completions` and `/v1/completions` (one type: they share every field except
/// `messages` / `prompt`, and the handler checks that the right one is present).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<WireMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Newer name of `max_tokens` for chat; wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Extension (vLLM and llama.cpp accept it too); `0` or `-1` mean no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Chat: `true` / `false`; completions: how many alternatives to list (0–20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token (0–20), requires `logprobs: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Extension (vLLM, llama.cpp): `1` = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Extension (vLLM, llama.cpp): `0` = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Token id (as a string) → bias in [-100, 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Fields that change the answer and are not implemented: refused unless they hold their
    /// neutral value (see [`unsupported`]).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Most `logit_bias` entries accepted (OpenAI's own limit is 300; a bound keeps one request's
/// per-token work small).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Most alternatives per token for `logprobs` / `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The first field in `other` that asks for something this server does not do, with why.
///
/// Each field is accepted at its neutral value, so clients that always send defaults (e.g.
/// `"tools": []`, `"response_format": {"type": "text"}`, `"echo": false`) keep working.
pub fn unsupported(
    other: &serde_json::Map<String, serde_json::Value>,
) -> Option<(&'static str, &'static str)> {
    use serde_json::Value;
    let neutral = |v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    };
    const FIELDS: [(&str, &str); 12] = [
        ("tools", "tool calling is not supported"),
        ("functions", "function calling is not supported"),
        ("tool_choice", "tool calling is not supported"),
        ("function_call", "function calling is not supported"),
        (
            "response_format",
            "only `{\"type\": \"text\"}` is supported",
        ),
        ("echo", "`echo` is not supported"),
        ("suffix", "`suffix` (insertion) is not supported"),
        ("best_of", "only `best_of` = 1 is supported"),
        ("audio", "audio output is not supported"),
        ("modalities", "only the `text` modality is supported"),
        ("prediction", "predicted outputs are not supported"),
        ("web_search_options", "web search is not supported"),
    ];
    FIELDS
        .into_iter()
        .find(|(name, _)| {
            let Some(v) = other.get(*name) else {
                return false;
            };
            let ok = match *name {
                "tool_choice" => neutral(v) || v == "none" || v == "auto",
                "function_call" => neutral(v) || v == "none" || v == "auto",
                "response_format" => {
                    neutral(v) || v.get("type").and_then(Value::as_str) == Some("text")
                }
                "best_of" => neutral(v) || v.as_u64() == Some(1),
                "modalities" => neutral(v) || *v == serde_json::json!(["text"]),
                _ => neutral(v),
            };
            !ok
        })
        .or_else(|| {
            other
                .contains_key("reasoning_effort")
                .then_some(("reasoning_effort", "this model has no reasoning mode"))
        })
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// One chat message as sent by clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    pub role: String,
    /// `null` is allowed by OpenAI for assistant messages that only carried tool calls.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// `content`: a string or an array of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of an array `content`; only `{"type":"text","text":…}` is supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// `prompt`: a string, or an array holding exactly one string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Batch(Vec<serde_json::Value>),
}

/// `stop`: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Bounds the translation applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestBounds {
    /// Context length (prompt + completion); `max_tokens` above it is refused. Without
    /// `max_tokens` a request may generate until the context is full (admission works out how
    /// much that is once the prompt is tokenized).
    pub max_context: usize,
    /// Token ids are `0..vocab_size` (`logit_bias` keys).
    pub vocab_size: usize,
}

/// A validated request: what to submit, plus what the response needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Whether the response carries `logprobs`.
    pub logprobs: bool,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// Parses a body into a [`CompletionRequest`], with serde's message (line/column) on failure.
pub fn parse_body(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    if body.is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "request body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("invalid JSON body: {e}"),
        param: None,
    })
}

/// Validates `req` for `endpoint` and builds the [`GenerateRequest`].
///
/// `model_id` is the only model this node serves; an absent `model` means that one (clients such
/// as curl one-liners often leave it out). The sampling seed is random when none is given, so two
/// identical sampled requests differ as they would with OpenAI.
pub fn validate(
    req: CompletionRequest,
    endpoint: Endpoint,
    model_id: &str,
    bounds: RequestBounds,
) -> Result<ParsedRequest, ApiError> {
    if let Some(model) = &req.model {
        if model != model_id {
            return Err(ApiError::ModelNotFound(model.clone()));
        }
    }
    let prompt = match endpoint {
        Endpoint::Chat => {
            let messages = req
                .messages
                .ok_or_else(|| invalid("`messages` is required", "messages"))?;
            PromptInput::Chat(convert_messages(messages)?)
        }
        Endpoint::Completions => {
            let prompt = req
                .prompt
                .ok_or_else(|| invalid("`prompt` is required", "prompt"))?;
            PromptInput::Text(convert_prompt(prompt)?)
        }
    };

    if let Some(n) = req.n {
        if n != 1 {
            return Err(invalid("only `n` = 1 is supported", "n"));
        }
    }
    if let Some((param, why)) = unsupported(&req.other) {
        return Err(invalid(why, param));
    }

    let max_context = bounds.max_context.max(1);
    let (max_tokens, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, Some(m)) => (Some(m), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(0) => return Err(invalid(format!("`{param}` must be at least 1"), param)),
        Some(m) if m > max_context as u64 => {
            return Err(invalid(
                format!(
                    "`{param}` is {m}, more than this model's context length ({max_context} tokens)"
                ),
                param,
            ))
        }
        Some(m) => Some(m as usize),
    };

    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            format!("`temperature` must be between 0 and 2, got {temperature}"),
            "temperature",
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            format!("`top_p` must be in (0, 1], got {top_p}"),
            "top_p",
        ));
    }
    let top_k = match req.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(invalid(
                format!("`top_k` must be -1, 0 or positive, got {k}"),
                "top_k",
            ))
        }
    };
    // Negative seeds are valid in OpenAI's API; reinterpret the bits so each maps to one seed.
    let seed = match req.seed {
        Some(s) => s as u64,
        None => random_seed(),
    };

    let stop = match req.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stop.len()
            ),
            "stop",
        ));
    }
    // An empty stop string would end every generation before its first token.
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();

    let penalty = |v: Option<f32>, name: &str| match v {
        None => Ok(0.0),
        Some(p) if (-2.0..=2.0).contains(&p) => Ok(p),
        Some(p) => Err(invalid(
            format!("`{name}` must be between -2 and 2, got {p}"),
            name,
        )),
    };
    let presence_penalty = penalty(req.presence_penalty, "presence_penalty")?;
    let frequency_penalty = penalty(req.frequency_penalty, "frequency_penalty")?;
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(invalid(
            format!("`repetition_penalty` must be in (0, 10], got {repetition_penalty}"),
            "repetition_penalty",
        ));
    }
    let min_p = req.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid(
            format!("`min_p` must be between 0 and 1, got {min_p}"),
            "min_p",
        ));
    }
    let logit_bias = convert_logit_bias(req.logit_bias.unwrap_or_default(), bounds.vocab_size)?;
    let logprobs = convert_logprobs(req.logprobs, req.top_logprobs, endpoint)?;

    let stream = req.stream.unwrap_or(false);
    let include_usage = stream && req.stream_options.is_some_and(|o| o.include_usage);
    Ok(ParsedRequest {
        generate: GenerateRequest {
            // The handler sets it from `X-Request-Id`.
            request_id: None,
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
                // The admission actor adds the model's end-of-turn tokens.
                stop_tokens: Vec::new(),
                // The admission actor resolves `max_tokens` against the prompt.
                max_tokens: 0,
                min_p,
                presence_penalty,
                frequency_penalty,
                repetition_penalty,
                logit_bias,
                logprobs,
            },
            stop,
            stream,
        },
        stream,
        include_usage,
        logprobs: logprobs.is_some(),
    })
}

fn convert_logit_bias(
    bias: std::collections::BTreeMap<String, f32>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(invalid(
            format!(
                "`logit_bias` has {} entries, more than {MAX_LOGIT_BIAS}",
                bias.len()
            ),
            "logit_bias",
        ));
    }
    bias.into_iter()
        .map(|(k, v)| {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    invalid(
                        format!(
                            "`logit_bias` keys must be token ids below {vocab_size}, got `{k}`"
                        ),
                        "logit_bias",
                    )
                })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(invalid(
                    format!("`logit_bias` values must be between -100 and 100, got {v}"),
                    "logit_bias",
                ));
            }
            Ok((id, v))
        })
        .collect()
}

/// `logprobs` / `top_logprobs` → how many alternatives to report (`None` = no logprobs).
fn convert_logprobs(
    logprobs: Option<serde_json::Value>,
    top: Option<i64>,
    endpoint: Endpoint,
) -> Result<Option<usize>, ApiError> {
    use serde_json::Value;
    let count = |v: i64, param: &str| {
        usize::try_from(v)
            .ok()
            .filter(|&k| k <= MAX_TOP_LOGPROBS)
            .ok_or_else(|| {
                invalid(
                    format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, got {v}"),
                    param,
                )
            })
    };
    match endpoint {
        Endpoint::Chat => {
            let on = match logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err(invalid("`logprobs` must be a boolean", "logprobs")),
            };
            match (on, top) {
                (false, Some(_)) => Err(invalid(
                    "`top_logprobs` requires `logprobs` to be true",
                    "top_logprobs",
                )),
                (false, None) => Ok(None),
                (true, k) => count(k.unwrap_or(0), "top_logprobs").map(Some),
            }
        }
        Endpoint::Completions => {
            if top.is_some() {
                return Err(invalid(
                    "`top_logprobs` is a chat parameter; completions take `logprobs: N`",
                    "top_logprobs",
                ));
            }
            match logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => count(n.as_i64().unwrap_or(-1), "logprobs").map(Some),
                Some(_) => Err(invalid("`logprobs` must be an integer", "logprobs")),
            }
        }
    }
}

fn convert_messages(messages: Vec<WireMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(invalid("`messages` must not be empty", "messages"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" => m.role.clone(),
                // OpenAI's newer name for system instructions.
                "developer" => "system".to_owned(),
                other => {
                    return Err(invalid(
                        format!(
                            "unsupported role `{other}` in messages[{i}]; expected system, user or assistant"
                        ),
                        &format!("messages[{i}].role"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(invalid(
                                    format!(
                                        "unsupported content part of type `{kind}` in messages[{i}]; only text parts with a `text` field are supported"
                                    ),
                                    &format!("messages[{i}].content[{j}]"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn convert_prompt(prompt: PromptField) -> Result<String, ApiError> {
    match prompt {
        PromptField::Text(t) => Ok(t),
        PromptField::Batch(mut items) if items.len() == 1 => match items.pop() {
            Some(serde_json::Value::String(t)) => Ok(t),
            _ => Err(invalid(
                "`prompt` must be a string (token arrays are not supported)",
                "prompt",
            )),
        },
        PromptField::Batch(_) => Err(invalid(
            "`prompt` must be a single string (batches are not supported)",
            "prompt",
        )),
    }
}

/// A fresh random seed from the process's hash keys (std only; no RNG dependency for one number).
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default(),
    );
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Responses.

/// OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            }),
        }
    }
}

/// The `prfaas` extension object on the final response / final chunk: how this request was
/// served (the demo prints it; OpenAI clients ignore unknown fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrfaasExtension {
    /// Node-unique request id (as in the node's logs and `/mesh`).
    pub request_id: u64,
    /// Peer id of the node that served the request (its home).
    pub node: String,
    pub route: PrefillRoute,
    pub timings: Timings,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

/// Chat `logprobs` of a choice or chunk: `{"content": [...], "refusal": null}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<String>,
}

/// One token in [`ChatLogprobs`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative in [`ChatTokenLogprob`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    pub fn new(tokens: &[TokenLogprob]) -> Self {
        Self {
            content: tokens
                .iter()
                .map(|t| ChatTokenLogprob {
                    token: t.token.clone(),
                    logprob: t.logprob,
                    bytes: t.bytes.clone(),
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|a| ChatTopLogprob {
                            token: a.token.clone(),
                            logprob: a.logprob,
                            bytes: a.bytes.clone(),
                        })
                        .collect(),
                })
                .collect(),
            refusal: None,
        }
    }
}

/// Completions `logprobs` (the legacy shape): parallel arrays, alternatives as maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Character offset of each token in the completion's text.
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// `tokens`, the first starting at character `offset` of the completion.
    pub fn new(tokens: &[TokenLogprob], mut offset: usize) -> Self {
        let mut out = Self {
            tokens: Vec::with_capacity(tokens.len()),
            token_logprobs: Vec::with_capacity(tokens.len()),
            top_logprobs: Vec::with_capacity(tokens.len()),
            text_offset: Vec::with_capacity(tokens.len()),
        };
        for t in tokens {
            out.text_offset.push(offset);
            offset += t.token.chars().count();
            out.tokens.push(t.token.clone());
            out.token_logprobs.push(t.logprob);
            out.top_logprobs
                .push(t.top.iter().map(|a| (a.token.clone(), a.logprob)).collect());
        }
        out
    }
}

/// `logprobs` of a choice for `endpoint` (a JSON value, as the choice types hold it).
pub fn logprobs_value(
    endpoint: Endpoint,
    tokens: &[TokenLogprob],
    offset: usize,
) -> serde_json::Value {
    match endpoint {
        Endpoint::Chat => serde_json::to_value(ChatLogprobs::new(tokens)),
        Endpoint::Completions => serde_json::to_value(TextLogprobs::new(tokens, offset)),
    }
    .unwrap_or_default()
}

/// `"stop"` / `"length"`.
pub fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// An assistant message in a non-stream chat response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

/// One choice of a `chat.completion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<String>,
}

/// `chat.completion` (non-stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: WireUsage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prfaas: Option<PrfaasExtension>,
}

/// `delta` of a chat chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a `chat.completion.chunk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<String>,
}

/// `chat.completion.chunk`. With `include_usage`, `usage` is `null` on every chunk but the last,
/// which has no choices (OpenAI's shape); without it the field is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prfaas: Option<PrfaasExtension>,
}

/// One choice of a `text_completion` (also used for its stream chunks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<String>,
}

/// `text_completion`, whole or as a stream chunk (OpenAI uses the same object for both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(default, skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prfaas: Option<PrfaasExtension>,
}

/// `usage` on a stream chunk: absent, `null`, or the counts. A plain `Option` cannot tell absent
/// from `null`, and OpenAI clients look for the explicit `null` when `include_usage` is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UsageField {
    Counts(WireUsage),
    #[default]
    #[serde(skip)]
    Absent,
    Null(()),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }

    /// The counts, if this field carries them.
    pub fn counts(&self) -> Option<WireUsage> {
        match self {
            UsageField::Counts(u) => Some(*u),
            _ => None,
        }
    }
}

/// OpenAI's error body `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

/// `/v1/models` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: RequestBounds = RequestBounds {
        max_context: 2048,
        vocab_size: 1000,
    };

    fn chat(json: serde_json::Value) -> Result<ParsedRequest, ApiError> {
        let req = parse_body(json.to_string().as_bytes())?;
        validate(req, Endpoint::Chat, "m", BOUNDS)
    }

    fn status(r: Result<ParsedRequest, ApiError>) -> u16 {
        use actix_web::ResponseError;
        r.err().map(|e| e.status_code().as_u16()).unwrap_or(200)
    }

    #[test]
    fn chat_request_maps_every_field() {
        let p = chat(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null},
            ],
            "max_completion_tokens": 7, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
            "top_k": 40, "seed": -1, "stop": ["a", "", "b"], "n": 1, "stream": true,
            "stream_options": {"include_usage": true}, "tools": [], "user": "x"
        }))
        .expect("valid");
        assert_eq!(
            p.generate.prompt,
            PromptInput::Chat(vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi there"),
                ChatMessage::new("assistant", ""),
            ])
        );
        let s = &p.generate.sampling;
        assert_eq!(p.generate.max_tokens, Some(7));
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.seed),
            (0.5, 0.9, 40, u64::MAX)
        );
        assert_eq!(p.generate.stop, vec!["a".to_owned(), "b".to_owned()]);
        assert!(p.stream && p.include_usage && p.generate.stream);
    }

    #[test]
    fn defaults_follow_openai() {
        let p = chat(serde_json::json!({"messages": [{"role": "user", "content": "x"}]}))
            .expect("valid");
        let s = &p.generate.sampling;
        // No `max_tokens`: whatever fits after the prompt (admission resolves it).
        assert_eq!(p.generate.max_tokens, None);
        assert_eq!(
            (
                s.temperature,
                s.top_p,
                s.top_k,
                s.min_p,
                s.repetition_penalty
            ),
            (1.0, 1.0, 0, 0.0, 1.0)
        );
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.0, 0.0));
        assert!(s.logit_bias.is_empty() && s.logprobs.is_none() && !p.logprobs);
        assert!(!p.stream && !p.include_usage);
        // include_usage only applies to streams.
        let p = chat(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": true}}),
        )
        .expect("valid");
        assert!(!p.include_usage);
        let req = parse_body(br#"{"prompt":"x"}"#).expect("json");
        let p = validate(req, Endpoint::Completions, "m", BOUNDS).expect("valid");
        assert_eq!(p.generate.prompt, PromptInput::Text("x".into()));
    }

    #[test]
    fn sampler_parameters_and_logprobs_map() {
        let p = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}],
            "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.1,
            "min_p": 0.05, "logit_bias": {"7": -100, "3": 2.5},
            "logprobs": true, "top_logprobs": 3,
            "tools": [], "response_format": {"type": "text"}, "tool_choice": "none",
            "user": "u", "metadata": {"a": "b"}, "store": false
        }))
        .expect("valid");
        let s = &p.generate.sampling;
        assert_eq!(
            (
                s.presence_penalty,
                s.frequency_penalty,
                s.repetition_penalty,
                s.min_p
            ),
            (0.5, -0.25, 1.1, 0.05)
        );
        assert_eq!(s.logit_bias, vec![(3, 2.5), (7, -100.0)]);
        assert_eq!(s.logprobs, Some(3));
        assert!(p.logprobs);
        // Chat `logprobs: true` alone lists no alternatives; completions take a count.
        let p = chat(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
        )
        .expect("valid");
        assert_eq!(p.generate.sampling.logprobs, Some(0));
        let req = parse_body(br#"{"prompt":"x","logprobs":2}"#).expect("json");
        let p = validate(req, Endpoint::Completions, "m", BOUNDS).expect("valid");
        assert_eq!(p.generate.sampling.logprobs, Some(2));
    }

    #[test]
    fn unsupported_parameters_are_refused_with_their_param() {
        let msgs = serde_json::json!([{"role": "user", "content": "x"}]);
        let param = |r: Result<ParsedRequest, ApiError>| match r {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        };
        for (field, value) in [
            (
                "tools",
                serde_json::json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", serde_json::json!("required")),
            ("functions", serde_json::json!([{"name": "f"}])),
            ("function_call", serde_json::json!({"name": "f"})),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("echo", serde_json::json!(true)),
            ("suffix", serde_json::json!("end")),
            ("best_of", serde_json::json!(2)),
            (
                "audio",
                serde_json::json!({"voice": "alloy", "format": "wav"}),
            ),
            ("modalities", serde_json::json!(["text", "audio"])),
            (
                "prediction",
                serde_json::json!({"type": "content", "content": "x"}),
            ),
            ("web_search_options", serde_json::json!({})),
            ("reasoning_effort", serde_json::json!("low")),
            ("presence_penalty", serde_json::json!(2.5)),
            ("frequency_penalty", serde_json::json!(-3)),
            ("repetition_penalty", serde_json::json!(0)),
            ("min_p", serde_json::json!(1.5)),
            ("logit_bias", serde_json::json!({"abc": 1})),
            ("logit_bias", serde_json::json!({"1": 101})),
            ("logit_bias", serde_json::json!({"1000": 1})),
            ("logprobs", serde_json::json!(3)),
            ("top_logprobs", serde_json::json!(21)),
        ] {
            let mut body = serde_json::json!({"messages": msgs, "logprobs": true});
            if field != "top_logprobs" {
                body = serde_json::json!({"messages": msgs});
            }
            body[field] = value.clone();
            assert_eq!(
                param(chat(body)).as_deref(),
                Some(field),
                "{field} = {value}"
            );
        }
        // top_logprobs without logprobs; a chat-only field on completions.
        let body = serde_json::json!({"messages": msgs, "top_logprobs": 2});
        assert_eq!(param(chat(body)).as_deref(), Some("top_logprobs"));
        let req = parse_body(br#"{"prompt":"x","logprobs":true}"#).expect("json");
        assert_eq!(
            param(validate(req, Endpoint::Completions, "m", BOUNDS)).as_deref(),
            Some("logprobs")
        );
    }

    #[test]
    fn logprobs_shapes_follow_openai() {
        use crate::service::{TokenLogprob, TopLogprob};
        let tok = |t: &str, lp: f32| TokenLogprob {
            token: t.into(),
            bytes: t.as_bytes().to_vec(),
            logprob: lp,
            top: vec![TopLogprob {
                token: "z".into(),
                bytes: b"z".to_vec(),
                logprob: -0.5,
            }],
        };
        let toks = [tok("Hé", -0.1), tok("llo", -0.2)];
        let chat = logprobs_value(Endpoint::Chat, &toks, 0);
        assert_eq!(chat["content"][0]["token"], "Hé");
        assert_eq!(
            chat["content"][0]["bytes"],
            serde_json::json!([72, 195, 169])
        );
        assert_eq!(chat["content"][1]["top_logprobs"][0]["token"], "z");
        assert!(chat["refusal"].is_null());
        let text = logprobs_value(Endpoint::Completions, &toks, 5);
        assert_eq!(text["tokens"], serde_json::json!(["Hé", "llo"]));
        assert_eq!(text["text_offset"], serde_json::json!([5, 7]));
        assert_eq!(text["top_logprobs"][1]["z"], -0.5);
    }

    #[test]
    fn rejects_bad_requests_with_the_right_status() {
        let msgs = serde_json::json!([{"role": "user", "content": "x"}]);
        let cases = [
            (serde_json::json!({"messages": msgs, "model": "other"}), 404),
            (serde_json::json!({"messages": []}), 400),
            (serde_json::json!({}), 400),
            (
                serde_json::json!({"messages": [{"role": "tool", "content": "x"}]}),
                400,
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                400,
            ),
            (
                serde_json::json!({"messages": msgs, "temperature": 2.5}),
                400,
            ),
            (
                serde_json::json!({"messages": msgs, "temperature": -0.1}),
                400,
            ),
            (serde_json::json!({"messages": msgs, "top_p": 0.0}), 400),
            (serde_json::json!({"messages": msgs, "top_k": -2}), 400),
            (serde_json::json!({"messages": msgs, "n": 2}), 400),
            (serde_json::json!({"messages": msgs, "max_tokens": 0}), 400),
            (
                serde_json::json!({"messages": msgs, "max_tokens": 2049}),
                400,
            ),
            (
                serde_json::json!({"messages": msgs, "max_tokens": 2048}),
                200,
            ),
            (
                serde_json::json!({"messages": msgs, "stop": ["1", "2", "3", "4", "5"]}),
                400,
            ),
            (
                serde_json::json!({"messages": msgs, "temperature": "hot"}),
                400,
            ),
            (serde_json::json!({"messages": "hello"}), 400),
        ];
        for (body, want) in cases {
            assert_eq!(status(chat(body.clone())), want, "{body}");
        }
        assert_eq!(
            status(parse_body(b"{not json").map(|_| unreachable!())),
            400
        );
        assert_eq!(status(parse_body(b"").map(|_| unreachable!())), 400);
        for (prompt, want) in [
            (serde_json::json!(["one"]), 200),
            (serde_json::json!(["one", "two"]), 400),
            (serde_json::json!([[1, 2]]), 400),
        ] {
            let req = parse_body(
                serde_json::json!({ "prompt": prompt })
                    .to_string()
                    .as_bytes(),
            )
            .expect("json");
            assert_eq!(
                status(validate(req, Endpoint::Completions, "m", BOUNDS)),
                want,
                "{prompt}"
            );
        }
        // A chat body on the completions endpoint lacks `prompt`.
        let req = parse_body(br#"{"messages":[{"role":"user","content":"x"}]}"#).expect("json");
        assert_eq!(
            status(validate(req, Endpoint::Completions, "m", BOUNDS)),
            400
        );
    }

    #[test]
    fn usage_field_serialises_absent_null_and_counts() {
        let chunk = |usage| ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk".into(),
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
            prfaas: None,
        };
        let absent = serde_json::to_value(chunk(UsageField::Absent)).expect("ser");
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(chunk(UsageField::Null(()))).expect("ser");
        assert_eq!(null.get("usage"), Some(&serde_json::Value::Null));
        let counts = serde_json::to_value(chunk(UsageField::Counts(WireUsage::from(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 1,
        }))))
        .expect("ser");
        assert_eq!(counts["usage"]["total_tokens"], 7);
        assert_eq!(counts["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        // And back: the client reads all three.
        let back: ChatCompletionChunk = serde_json::from_value(counts).expect("de");
        assert_eq!(back.usage.counts().map(|u| u.total_tokens), Some(7));
        let back: ChatCompletionChunk = serde_json::from_value(null).expect("de");
        assert_eq!(back.usage.counts(), None);
        let back: ChatCompletionChunk = serde_json::from_value(absent).expect("de");
        assert_eq!(back.usage, UsageField::Absent);
    }
}
