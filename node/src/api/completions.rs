//! `POST /v1/chat/completions` and `POST /v1/completions`, stream (SSE) and non-stream.
//!
//! A request is validated, submitted to admission, and then the handler waits for the
//! `Started` event before answering: until then a failure can still be a proper HTTP status
//! (500), and afterwards it can only be an SSE error event. Dropping the event receiver cancels
//! the request, and actix-web drops the SSE body (which owns the receiver) when the client goes
//! away.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::engine::FinishReason;
use crate::service::{GenerateEvent, PrefillRoute, Submit, Timings, TokenLogprob, Usage};

use super::error::ApiError;
use super::wire::{
    self, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatDelta, Endpoint, PrfaasExtension, RequestBounds, TextChoice, TextCompletion, UsageField,
    WireUsage,
};
use super::{ApiState, RequestId};

pub(super) async fn chat_completions(
    state: web::Data<ApiState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    serve(&state, &req, payload, Endpoint::Chat).await
}

pub(super) async fn completions(
    state: web::Data<ApiState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    serve(&state, &req, payload, Endpoint::Completions).await
}

async fn serve(
    state: &ApiState,
    http: &HttpRequest,
    payload: web::Payload,
    endpoint: Endpoint,
) -> Result<HttpResponse, ApiError> {
    let client_id = http
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(super::new_request_id);
    let body = read_body(payload, state.limits.max_body_bytes).await;
    let parsed = body
        .and_then(|body| wire::parse_body(&body))
        .and_then(|req| {
            wire::validate(
                req,
                endpoint,
                &state.info.model_id,
                RequestBounds {
                    max_context: state.info.max_context,
                    vocab_size: state.info.vocab_size,
                },
            )
        });
    let mut parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            state.count_rejected();
            return Err(e);
        }
    };
    let (stream, include_usage, logprobs) = (parsed.stream, parsed.include_usage, parsed.logprobs);
    parsed.generate.request_id = Some(client_id.clone());
    let mut rx = state
        .submit
        .send(Submit(parsed.generate))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the node's admission is not running ({e})")))?
        .map_err(ApiError::from)?;

    let (request_id, prompt_tokens, route) = match rx.recv().await {
        Some(GenerateEvent::Started {
            request_id,
            prompt_tokens,
            route,
        }) => (request_id, prompt_tokens, route),
        Some(GenerateEvent::Failed { message }) => return Err(ApiError::Internal(message)),
        Some(other) => {
            return Err(ApiError::Internal(format!(
                "internal protocol error: {other:?} before Started"
            )))
        }
        None => {
            return Err(ApiError::Internal(
                "the request ended before generation started".into(),
            ))
        }
    };
    tracing::debug!(request_id = %client_id, mesh_request = request_id, prompt_tokens, stream, "generation started");
    let ctx = Reply {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{client_id}"),
            Endpoint::Completions => format!("cmpl-{client_id}"),
        },
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        model: state.info.model_id.clone(),
        node: state.info.peer_id.clone(),
        endpoint,
        include_usage,
        logprobs,
        request_id,
        prompt_tokens,
        route,
    };
    if stream {
        Ok(HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            // Reverse proxies (nginx) would otherwise buffer the token stream.
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(sse_stream(ctx, rx, state.limits.sse_keepalive)))
    } else {
        collect(ctx, rx).await
    }
}

/// Reads the body up to `limit` bytes; refuses early on a too-large `Content-Length`.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::TooLarge { limit },
            e => ApiError::InvalidRequest {
                message: format!("could not read the request body: {e}"),
                param: None,
            },
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// What every response object of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    node: String,
    endpoint: Endpoint,
    include_usage: bool,
    /// Whether choices carry `logprobs`.
    logprobs: bool,
    request_id: u64,
    prompt_tokens: usize,
    route: PrefillRoute,
}

impl Reply {
    fn extension(&self, usage: &Usage, timings: Timings) -> PrfaasExtension {
        PrfaasExtension {
            request_id: self.request_id,
            node: self.node.clone(),
            route: self.route.clone(),
            timings,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: usage.cached_tokens,
        }
    }

    /// `usage` of a chunk that is not the usage chunk.
    fn chunk_usage(&self) -> UsageField {
        if self.include_usage {
            UsageField::Null(())
        } else {
            UsageField::Absent
        }
    }

    /// `logprobs` of a choice holding `tokens`, the first at character `offset` of the text.
    fn logprobs(&self, tokens: &[TokenLogprob], offset: usize) -> Option<serde_json::Value> {
        self.logprobs
            .then(|| wire::logprobs_value(self.endpoint, tokens, offset))
    }

    /// One chunk (chat or text) as an SSE event; `choice` is `None` for the usage-only chunk.
    fn chunk(
        &self,
        choice: Option<ChunkChoice>,
        usage: UsageField,
        prfaas: Option<PrfaasExtension>,
    ) -> Bytes {
        let json = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: choice
                    .map(|c| ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: c.role.then(|| "assistant".to_owned()),
                            content: c.text,
                        },
                        logprobs: c.logprobs,
                        finish_reason: c.finish.map(|f| wire::finish_str(f).to_owned()),
                    })
                    .into_iter()
                    .collect(),
                usage,
                prfaas,
            }),
            Endpoint::Completions => serde_json::to_vec(&TextCompletion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: choice
                    .map(|c| TextChoice {
                        index: 0,
                        text: c.text.unwrap_or_default(),
                        logprobs: c.logprobs,
                        finish_reason: c.finish.map(|f| wire::finish_str(f).to_owned()),
                    })
                    .into_iter()
                    .collect(),
                usage,
                prfaas,
            }),
        };
        // Serialising these plain structs cannot fail; an empty event would still be valid SSE.
        sse_data(&json.unwrap_or_default())
    }
}

/// What one stream chunk's choice carries.
#[derive(Default)]
struct ChunkChoice {
    text: Option<String>,
    /// Chat: the first chunk names the role.
    role: bool,
    finish: Option<FinishReason>,
    logprobs: Option<serde_json::Value>,
}

/// `data: {payload}\n\n`.
fn sse_data(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// A failure after the stream began: an `error` event with OpenAI's error body (the `openai`
/// Python client raises `APIError` on it), after which the stream ends without `[DONE]`.
fn sse_error(message: String) -> Bytes {
    let body = ApiError::Internal(message).body();
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut b = BytesMut::with_capacity(json.len() + 24);
    b.extend_from_slice(b"event: error\n");
    b.extend_from_slice(&sse_data(&json));
    b.freeze()
}

struct SseState {
    reply: Reply,
    rx: mpsc::Receiver<GenerateEvent>,
    opened: bool,
    keepalive: Duration,
    /// Characters of text sent so far (completions' `text_offset`).
    chars_sent: usize,
}

/// The SSE body: a role chunk (chat), one chunk per non-empty delta, the finish chunk carrying the
/// `prfaas` extension, the usage chunk if asked for, then `[DONE]`.
fn sse_stream(
    reply: Reply,
    rx: mpsc::Receiver<GenerateEvent>,
    keepalive: Duration,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    let state = SseState {
        reply,
        rx,
        opened: false,
        keepalive,
        chars_sent: 0,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        if !st.opened {
            st.opened = true;
            if st.reply.endpoint == Endpoint::Chat {
                let usage = st.reply.chunk_usage();
                let first = ChunkChoice {
                    text: Some(String::new()),
                    role: true,
                    ..Default::default()
                };
                let b = st.reply.chunk(Some(first), usage, None);
                return Some((Ok(b), Some(st)));
            }
        }
        loop {
            let event = match tokio::time::timeout(st.keepalive, st.rx.recv()).await {
                Ok(event) => event,
                // A comment: clients ignore it, and a dead connection fails the write.
                Err(_) => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), Some(st))),
            };
            let out = match event {
                Some(GenerateEvent::Delta { text, logprobs, .. }) => {
                    let tokens: Vec<TokenLogprob> = logprobs.into_iter().collect();
                    if text.is_empty() && (tokens.is_empty() || !st.reply.logprobs) {
                        continue;
                    }
                    let choice = ChunkChoice {
                        logprobs: st.reply.logprobs(&tokens, st.chars_sent),
                        text: Some(text),
                        ..Default::default()
                    };
                    st.chars_sent += choice.text.as_deref().map_or(0, |t| t.chars().count());
                    let usage = st.reply.chunk_usage();
                    let b = st.reply.chunk(Some(choice), usage, None);
                    return Some((Ok(b), Some(st)));
                }
                // Only one Started is expected; a repeat carries nothing new for the client.
                Some(GenerateEvent::Started { .. }) => continue,
                Some(GenerateEvent::Finished {
                    finish,
                    usage,
                    timings,
                }) => {
                    let r = &st.reply;
                    let mut b = BytesMut::new();
                    let text = match r.endpoint {
                        Endpoint::Chat => None,
                        Endpoint::Completions => Some(String::new()),
                    };
                    let last = ChunkChoice {
                        text,
                        finish: Some(finish),
                        ..Default::default()
                    };
                    b.extend_from_slice(&r.chunk(
                        Some(last),
                        r.chunk_usage(),
                        Some(r.extension(&usage, timings)),
                    ));
                    if r.include_usage {
                        b.extend_from_slice(&r.chunk(
                            None,
                            UsageField::Counts(WireUsage::from(usage)),
                            None,
                        ));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    tracing::debug!(request_id = r.request_id, "stream finished");
                    b.freeze()
                }
                Some(GenerateEvent::Failed { message }) => {
                    tracing::warn!(request_id = st.reply.request_id, %message, "generation failed mid-stream");
                    sse_error(message)
                }
                None => sse_error("generation ended without finishing".into()),
            };
            // Terminal: the state (and the receiver) is dropped after this item.
            return Some((Ok(out), None));
        }
    })
}

/// Non-stream: gathers the whole answer.
///
/// Known limit: actix-web does not drop a handler future when its client disconnects (it only
/// notices on a failed write, and nothing is written until the answer is complete), so an
/// abandoned non-stream request runs to `max_tokens` or its stop before its KV is released.
/// Streams do not have this problem (see `ApiLimits::sse_keepalive`).
async fn collect(
    reply: Reply,
    mut rx: mpsc::Receiver<GenerateEvent>,
) -> Result<HttpResponse, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            Some(GenerateEvent::Delta {
                text: t, logprobs, ..
            }) => {
                text.push_str(&t);
                tokens.extend(logprobs);
            }
            Some(GenerateEvent::Started { .. }) => {}
            Some(GenerateEvent::Failed { message }) => return Err(ApiError::Internal(message)),
            None => {
                return Err(ApiError::Internal(
                    "generation ended without finishing".into(),
                ))
            }
            Some(GenerateEvent::Finished {
                finish,
                usage,
                timings,
            }) => {
                let finish_reason = Some(wire::finish_str(finish).to_owned());
                let prfaas = Some(reply.extension(&usage, timings));
                let logprobs = reply.logprobs(&tokens, 0);
                let usage = WireUsage::from(usage);
                let res = match reply.endpoint {
                    Endpoint::Chat => HttpResponse::Ok().json(ChatCompletion {
                        id: reply.id,
                        object: "chat.completion".into(),
                        created: reply.created,
                        model: reply.model,
                        choices: vec![ChatChoice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant".into(),
                                content: text,
                            },
                            logprobs,
                            finish_reason,
                        }],
                        usage,
                        prfaas,
                    }),
                    Endpoint::Completions => HttpResponse::Ok().json(TextCompletion {
                        id: reply.id,
                        object: "text_completion".into(),
                        created: reply.created,
                        model: reply.model,
                        choices: vec![TextChoice {
                            index: 0,
                            text,
                            logprobs,
                            finish_reason,
                        }],
                        usage: UsageField::Counts(usage),
                        prfaas,
                    }),
                };
                return Ok(res);
            }
        }
    }
}
