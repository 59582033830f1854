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
    /// Raw text, tokenized as is (`/v1/completions`).
    Text(String),
}

/// One generation request, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: PromptInput,
    /// Sampling; `max_tokens` counts every generated token, the first included.
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
    /// New text (may be empty when a token ends inside a UTF-8 sequence).
    Delta { text: String, token: u32 },
    /// Generation ended normally.
    Finished {
        finish: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    /// Generation failed after `Started`; the stream ends here.
    Failed { message: String },
}

/// Why a request was refused before it started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// Malformed or impossible request (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
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
}
