//! The OpenAI wire format: request bodies, responses, stream chunks, and the translation of a
//! request into the node's [`GenerateRequest`].
//!
//! Sans-IO on purpose: the handlers and the typed client both use these types, and validation is
//! tested without a server. Field names and shapes follow OpenAI's API reference; unknown request
//! fields are ignored (clients send many we do not implement, e.g. `tools`, `user`).

use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};

use crate::engine::chat::ChatMessage;
use crate::engine::{FinishReason, SamplingParams};
use crate::service::{GenerateRequest, PrefillRoute, PromptInput, Timings, Usage};

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

/// Defaults and bounds the translation applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestBounds {
    /// Context length (prompt + completion); `max_tokens` above it is refused.
    pub max_context: usize,
    /// `max_tokens` when the client sends none (clamped to `max_context`).
    pub default_max_tokens: usize,
}

/// A validated request: what to submit, plus what the response needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
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

    let max_context = bounds.max_context.max(1);
    let (max_tokens, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, Some(m)) => (Some(m), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        None => bounds.default_max_tokens.clamp(1, max_context),
        Some(0) => return Err(invalid(format!("`{param}` must be at least 1"), param)),
        Some(m) if m > max_context as u64 => {
            return Err(invalid(
                format!(
                    "`{param}` is {m}, more than this model's context length ({max_context} tokens)"
                ),
                param,
            ))
        }
        Some(m) => m as usize,
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

    let stream = req.stream.unwrap_or(false);
    let include_usage = stream && req.stream_options.is_some_and(|o| o.include_usage);
    Ok(ParsedRequest {
        generate: GenerateRequest {
            prompt,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
                // The admission actor adds the model's end-of-turn tokens.
                stop_tokens: Vec::new(),
                max_tokens,
            },
            stop,
            stream,
        },
        stream,
        include_usage,
    })
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
        default_max_tokens: 256,
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
        assert_eq!(
            (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed),
            (7, 0.5, 0.9, 40, u64::MAX)
        );
        assert_eq!(p.generate.stop, vec!["a".to_owned(), "b".to_owned()]);
        assert!(p.stream && p.include_usage && p.generate.stream);
    }

    #[test]
    fn defaults_follow_openai() {
        let p = chat(serde_json::json!({"messages": [{"role": "user", "content": "x"}]}))
            .expect("valid");
        let s = &p.generate.sampling;
        assert_eq!(
            (s.max_tokens, s.temperature, s.top_p, s.top_k),
            (256, 1.0, 1.0, 0)
        );
        assert!(!p.stream && !p.include_usage);
        // include_usage only applies to streams.
        let p = chat(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": true}}),
        )
        .expect("valid");
        assert!(!p.include_usage);
        // The default never exceeds the context.
        let req = parse_body(br#"{"prompt":"x"}"#).expect("json");
        let p = validate(
            req,
            Endpoint::Completions,
            "m",
            RequestBounds {
                max_context: 100,
                default_max_tokens: 256,
            },
        )
        .expect("valid");
        assert_eq!(p.generate.sampling.max_tokens, 100);
        assert_eq!(p.generate.prompt, PromptInput::Text("x".into()));
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
