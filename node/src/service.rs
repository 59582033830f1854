//! The contract between the HTTP API (`api/`) and the serving actors (`actors/`).
//!
//! The API turns an OpenAI request into a [`GenerateRequest`] and sends it as [`Submit`] to the
//! node's admission actor; the answer is either a refusal ([`SubmitError`]: 400 / 429 / 503) or a
//! bounded channel of [`GenerateEvent`]s that ends with exactly one `Finished` or `Failed`.
//! Dropping the receiver cancels the request (its KV is released at the next decode step).

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::chat::ChatMessage;
use crate::engine::{FinishReason, SamplingParams};

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Chat messages, rendered with the model's chat template (generation prompt appended).
    Chat(Vec<ChatMessage>),
    /// Raw text (`/v1/completions`). Special-token text in it (`<|im_start|>`) becomes the special
    /// token, as llama-server tokenizes prompts: clients that apply the chat template themselves
    /// get the tokens the model was trained on.
    Text(String),
}

/// One generation request, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The client's id for this request (`X-Request-Id`), used in logs; admission makes one up
    /// when it is `None`.
    pub request_id: Option<String>,
    pub prompt: PromptInput,
    /// Generated tokens at most, the first included; `None` means whatever fits the context
    /// after the prompt. Admission writes the resolved value into `sampling.max_tokens` (the
    /// value given there is ignored).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first occurrence (not included in the output).
    pub stop: Vec<String>,
    /// Whether the client streams (only informs logging and metrics; events flow either way).
    pub stream: bool,
}

/// How the prompt got prefilled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PrefillRoute {
    /// Prefilled by this node.
    Local {
        /// Why the planner kept it here (e.g. "short prompt", "no bids", "reserve bid won").
        reason: String,
    },
    /// Prefilled by a peer that won the auction; its KV was streamed here.
    Remote {
        /// Winner's peer id.
        peer: String,
        /// Clearing price paid (second-score rule).
        price: f64,
        /// KV bytes received.
        kv_bytes: u64,
        /// From award to the trailer, seconds.
        transfer_s: f64,
    },
}

/// Token counts, as in OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from a prefix cache (local or the prefill peer's).
    pub cached_tokens: usize,
}

/// Timings of a finished request, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Admission to the first generated token.
    pub ttft_s: f64,
    /// First to last token.
    pub decode_s: f64,
    /// Generated tokens per second after the first.
    pub tokens_per_s: f64,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Prompt accepted and prefilled; generation begins.
    Started {
        /// Node-unique id (also used in logs and `/mesh`).
        request_id: u64,
        prompt_tokens: usize,
        route: PrefillRoute,
    },
    /// New text (may be empty when a token ends inside a UTF-8 sequence). `token` is the id
    /// generated at this step; `None` for a final flush of held-back text (no new token).
    Delta {
        text: String,
        token: Option<u32>,
        /// The token's log-probabilities, when the request asked for them.
        logprobs: Option<TokenLogprob>,
    },
    /// Generation ended normally.
    Finished {
        finish: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    /// Generation failed after `Started`; the stream ends here.
    Failed { message: String },
}

/// One generated token's log-probability and its most likely alternatives (OpenAI's `logprobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (lossy UTF-8 when the token is part of a character).
    pub token: String,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely tokens at this step, most likely first.
    pub top: Vec<TopLogprob>,
}

/// One alternative in [`TokenLogprob::top`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Why a request was refused before it started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// Malformed or impossible request (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// Prompt plus `max_tokens` do not fit the context (HTTP 400, OpenAI's
    /// `context_length_exceeded`).
    #[error("this model's maximum context length is {max_context} tokens; the request has {prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens")]
    ContextLength {
        max_context: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    /// Every admission slot is taken (HTTP 429).
    #[error("node is at capacity ({0} requests in flight); retry later")]
    Overloaded(usize),
    /// The node cannot serve right now, e.g. shutting down (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
}

/// Capacity of each request's event channel: deltas are small and the decode loop never waits on
/// a slow client (a full channel cancels that request rather than stalling the batch).
pub const EVENT_CHANNEL: usize = 256;

/// Submit a request to the node (actix message to the admission actor).
#[derive(Debug)]
pub struct Submit(pub GenerateRequest);

impl actix::Message for Submit {
    type Result = Result<mpsc::Receiver<GenerateEvent>, SubmitError>;
}

/// Ask the node for its live mesh view (`/mesh`), as JSON.
#[derive(Debug, Clone, Copy)]
pub struct MeshView;

impl actix::Message for MeshView {
    type Result = serde_json::Value;
}

/// Tokenize text with the node's tokenizer (`/tokenize`).
#[derive(Debug, Clone)]
pub struct Tokenize {
    pub text: String,
    /// Add the model's BOS token when it has one and its tokenizer adds it.
    pub add_special: bool,
    /// Turn special-token text (`<|im_end|>`) into the special token.
    pub parse_special: bool,
}

impl actix::Message for Tokenize {
    /// Token ids with their raw bytes.
    type Result = Result<Vec<(u32, Vec<u8>)>, SubmitError>;
}

/// Token ids back to text (`/detokenize`).
#[derive(Debug, Clone)]
pub struct Detokenize(pub Vec<u32>);

impl actix::Message for Detokenize {
    type Result = Result<String, SubmitError>;
}

/// Ask whether the node is ready to serve (`/health`).
#[derive(Debug, Clone, Copy)]
pub struct Health;

impl actix::Message for Health {
    type Result = HealthReport;
}

/// What [`Health`] answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// `ok` or `draining` (a node still loading its model does not listen yet).
    pub status: String,
    /// Whether new requests are accepted.
    pub ready: bool,
    /// Peers seen that can prefill this node's model (`None` where it does not matter: a node
    /// that accepts no requests).
    pub prefill_peers: Option<usize>,
    /// Things an operator should know (e.g. a decode node with no prefill peer).
    pub warnings: Vec<String>,
}

/// Static facts the API reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    /// Model name as listed by `/v1/models` and accepted in the `model` field.
    pub model_id: String,
    /// This node's peer id.
    pub peer_id: String,
    /// Configured roles (e.g. `["decode", "prefill"]`).
    pub roles: Vec<String>,
    /// Backend in use (`cpu` / `wgpu`).
    pub backend: String,
    /// Context length the node accepts (prompt + completion tokens).
    pub max_context: usize,
    /// Token ids are `0..vocab_size`.
    pub vocab_size: usize,
}
