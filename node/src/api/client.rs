//! A small typed OpenAI client over `awc`, for the demo and the integration tests.
//!
//! It speaks exactly the subset the node serves and additionally reads the `prfaas` extension;
//! client-side TTFT and chunk counts let the demo show what a user would experience. `awc` is
//! single-threaded (`!Send`): call these from inside an actix `System` / `LocalSet`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::engine::chat::ChatMessage;

use super::wire::{
    ChatCompletion, ChatCompletionChunk, ErrorBody, PrfaasExtension, TextCompletion, WireUsage,
};

/// Largest non-stream body or single SSE event accepted (answers are text; this bounds memory
/// if a server misbehaves).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Sampling and transport options; `None` leaves the server's default.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatParams {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Vec<String>,
    /// Streams only: ask for the final usage chunk.
    pub include_usage: bool,
    /// Whole-request limit (headers and body); generation on a busy CPU node can take minutes.
    pub timeout: Duration,
}

impl Default for ChatParams {
    fn default() -> Self {
        Self {
            model: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            include_usage: true,
            timeout: Duration::from_secs(600),
        }
    }
}

impl ChatParams {
    /// Greedy decoding of at most `max_tokens` tokens (reproducible outputs).
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Self::default()
        }
    }
}

/// A finished completion, as the client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResult {
    /// Response id (`chatcmpl-…` / `cmpl-…`).
    pub id: String,
    /// The whole generated text.
    pub text: String,
    /// `"stop"` or `"length"`.
    pub finish_reason: Option<String>,
    /// Token counts (streams: only with `include_usage`).
    pub usage: Option<WireUsage>,
    /// How the node served it (route, timings, request id).
    pub prfaas: Option<PrfaasExtension>,
    /// Streams: request sent → first chunk with text. `None` for non-stream calls or empty answers.
    pub ttft: Option<Duration>,
    /// Request sent → response complete.
    pub total: Duration,
    /// Streams: request sent → each chunk that carried text (the first is `ttft`); their gaps
    /// are the inter-token latencies. Empty for non-stream calls.
    pub token_times: Vec<Duration>,
    /// SSE data events received, `[DONE]` excluded (0 for non-stream calls).
    pub chunks: usize,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending, or waiting for the response head failed (includes timeouts).
    #[error("request to {url} failed: {message}")]
    Send { url: String, message: String },
    /// The server answered with an error status.
    #[error("HTTP {status} from {url}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        /// OpenAI error body, when the server sent one.
        error: Option<Box<ErrorBody>>,
        /// `Retry-After` seconds (429).
        retry_after: Option<u64>,
    },
    /// Reading the body failed (connection closed, timeout, too large).
    #[error("reading the response from {url} failed: {message}")]
    Body { url: String, message: String },
    /// The body was not what the API promises.
    #[error("malformed response from {url}: {message}")]
    Decode { url: String, message: String },
    /// The server sent an error event after the stream began.
    #[error("the server reported an error mid-stream: {}", .0.error.message)]
    Stream(Box<ErrorBody>),
    /// The stream ended before `[DONE]`.
    #[error("the stream from {url} ended before [DONE]")]
    Truncated { url: String },
}

fn client(timeout: Duration) -> awc::Client {
    awc::Client::builder().timeout(timeout).finish()
}

fn join(base_url: &str, path: &str) -> String {
    format!("{}{path}", base_url.trim_end_matches('/'))
}

/// `POST {base_url}/v1/chat/completions`. `base_url` is the node's root (`http://host:port`),
/// with or without a trailing `/v1` left off.
pub async fn chat(
    base_url: &str,
    messages: &[ChatMessage],
    params: &ChatParams,
    stream: bool,
) -> Result<ChatResult, ClientError> {
    let mut body = request_body(params, stream);
    body["messages"] = serde_json::to_value(messages).unwrap_or_default();
    call(
        &join(base_url, "/v1/chat/completions"),
        body,
        params,
        stream,
    )
    .await
}

/// `POST {base_url}/v1/completions` with a raw text prompt.
pub async fn complete(
    base_url: &str,
    prompt: &str,
    params: &ChatParams,
    stream: bool,
) -> Result<ChatResult, ClientError> {
    let mut body = request_body(params, stream);
    body["prompt"] = serde_json::Value::String(prompt.to_owned());
    call(&join(base_url, "/v1/completions"), body, params, stream).await
}

/// `GET url` and parse JSON (e.g. `/mesh`, `/healthz`).
pub async fn get_json(url: &str) -> Result<serde_json::Value, ClientError> {
    let text = get_text(url).await?;
    serde_json::from_str(&text).map_err(|e| ClientError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

/// `POST url` with a JSON body and parse the JSON answer (e.g. `/tokenize`).
pub async fn post_json(
    url: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let sent = client(Duration::from_secs(300)).post(url).send_json(body);
    let bytes = success_body(url, sent).await?;
    decode(url, &bytes)
}

/// `GET url` as text (e.g. `/metrics`).
pub async fn get_text(url: &str) -> Result<String, ClientError> {
    let sent = client(Duration::from_secs(30)).get(url).send();
    let body = success_body(url, sent).await?;
    String::from_utf8(body.to_vec()).map_err(|e| ClientError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

/// The body of a response that must succeed (an error status becomes [`ClientError::Status`]).
async fn success_body(
    url: &str,
    sent: awc::SendClientRequest,
) -> Result<actix_web::web::Bytes, ClientError> {
    let mut res = sent.await.map_err(|e| ClientError::Send {
        url: url.to_owned(),
        message: e.to_string(),
    })?;
    let body = res
        .body()
        .limit(MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| ClientError::Body {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
    if !res.status().is_success() {
        return Err(status_error(url, res.status().as_u16(), &body, None));
    }
    Ok(body)
}

fn request_body(p: &ChatParams, stream: bool) -> serde_json::Value {
    let mut b = serde_json::json!({ "stream": stream });
    if let Some(m) = &p.model {
        b["model"] = m.clone().into();
    }
    if let Some(m) = p.max_tokens {
        b["max_tokens"] = m.into();
    }
    if let Some(t) = p.temperature {
        b["temperature"] = t.into();
    }
    if let Some(t) = p.top_p {
        b["top_p"] = t.into();
    }
    if let Some(k) = p.top_k {
        b["top_k"] = k.into();
    }
    if let Some(s) = p.seed {
        b["seed"] = s.into();
    }
    if !p.stop.is_empty() {
        b["stop"] = p.stop.clone().into();
    }
    if stream && p.include_usage {
        b["stream_options"] = serde_json::json!({ "include_usage": true });
    }
    b
}

fn status_error(url: &str, status: u16, body: &[u8], retry_after: Option<u64>) -> ClientError {
    let error: Option<Box<ErrorBody>> =
        serde_json::from_slice::<ErrorBody>(body).ok().map(Box::new);
    let message = match &error {
        Some(e) => e.error.message.clone(),
        None => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    };
    ClientError::Status {
        url: url.to_owned(),
        status,
        message,
        error,
        retry_after,
    }
}

fn decode<T: DeserializeOwned>(url: &str, bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

async fn call(
    url: &str,
    body: serde_json::Value,
    params: &ChatParams,
    stream: bool,
) -> Result<ChatResult, ClientError> {
    let chat = url.ends_with("/chat/completions");
    let t0 = Instant::now();
    let mut res = client(params.timeout)
        .post(url)
        .send_json(&body)
        .await
        .map_err(|e| ClientError::Send {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
    let body_err = |e: &dyn std::fmt::Display| ClientError::Body {
        url: url.to_owned(),
        message: e.to_string(),
    };
    if !res.status().is_success() {
        let retry_after = res
            .headers()
            .get(actix_web::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = res
            .body()
            .limit(MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| body_err(&e))?;
        return Err(status_error(
            url,
            res.status().as_u16(),
            &bytes,
            retry_after,
        ));
    }

    if !stream {
        let bytes = res
            .body()
            .limit(MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| body_err(&e))?;
        let total = t0.elapsed();
        return if chat {
            let c: ChatCompletion = decode(url, &bytes)?;
            let choice = c.choices.into_iter().next();
            Ok(ChatResult {
                id: c.id,
                text: choice
                    .as_ref()
                    .map(|c| c.message.content.clone())
                    .unwrap_or_default(),
                finish_reason: choice.and_then(|c| c.finish_reason),
                usage: Some(c.usage),
                prfaas: c.prfaas,
                ttft: None,
                total,
                token_times: Vec::new(),
                chunks: 0,
            })
        } else {
            let c: TextCompletion = decode(url, &bytes)?;
            let usage = c.usage.counts();
            let choice = c.choices.into_iter().next();
            Ok(ChatResult {
                id: c.id,
                text: choice.as_ref().map(|c| c.text.clone()).unwrap_or_default(),
                finish_reason: choice.and_then(|c| c.finish_reason),
                usage,
                prfaas: c.prfaas,
                ttft: None,
                total,
                token_times: Vec::new(),
                chunks: 0,
            })
        };
    }

    let mut out = ChatResult {
        id: String::new(),
        text: String::new(),
        finish_reason: None,
        usage: None,
        prfaas: None,
        ttft: None,
        total: Duration::ZERO,
        token_times: Vec::new(),
        chunks: 0,
    };
    let mut parser = SseParser::default();
    while let Some(bytes) = res.next().await {
        let bytes = bytes.map_err(|e| body_err(&e))?;
        for event in parser.push(&bytes).map_err(|message| ClientError::Decode {
            url: url.to_owned(),
            message,
        })? {
            if event.data == "[DONE]" {
                out.total = t0.elapsed();
                return Ok(out);
            }
            if event.event.as_deref() == Some("error") || event.data.starts_with("{\"error\"") {
                return Err(ClientError::Stream(Box::new(decode(
                    url,
                    event.data.as_bytes(),
                )?)));
            }
            out.chunks += 1;
            let (id, text, finish, usage, prfaas) = if chat {
                let c: ChatCompletionChunk = decode(url, event.data.as_bytes())?;
                let usage = c.usage.counts();
                let choice = c.choices.into_iter().next();
                let text = choice.as_ref().and_then(|c| c.delta.content.clone());
                (
                    c.id,
                    text,
                    choice.and_then(|c| c.finish_reason),
                    usage,
                    c.prfaas,
                )
            } else {
                let c: TextCompletion = decode(url, event.data.as_bytes())?;
                let usage = c.usage.counts();
                let choice = c.choices.into_iter().next();
                let text = choice.as_ref().map(|c| c.text.clone());
                (
                    c.id,
                    text,
                    choice.and_then(|c| c.finish_reason),
                    usage,
                    c.prfaas,
                )
            };
            out.id = id;
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                let now = t0.elapsed();
                out.ttft.get_or_insert(now);
                out.token_times.push(now);
                out.text.push_str(&t);
            }
            if finish.is_some() {
                out.finish_reason = finish;
            }
            if usage.is_some() {
                out.usage = usage;
            }
            if prfaas.is_some() {
                out.prfaas = prfaas;
            }
        }
    }
    Err(ClientError::Truncated {
        url: url.to_owned(),
    })
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser (the subset servers send: `event:`, `data:`, comments; `\n` or `\r\n`).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feeds bytes; returns the events completed by them. Errors on an event over
    /// [`MAX_RESPONSE_BYTES`] or on invalid UTF-8.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let raw = String::from_utf8(raw).map_err(|e| format!("SSE event is not UTF-8: {e}"))?;
            let mut event = None;
            let mut data: Option<String> = None;
            for line in raw.lines() {
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "event" => event = Some(value.to_owned()),
                    "data" => match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(value);
                        }
                        None => data = Some(value.to_owned()),
                    },
                    // Comments (`: keep-alive`), `id:`, `retry:` carry nothing we use.
                    _ => {}
                }
            }
            if let Some(data) = data {
                events.push(SseEvent { event, data });
            }
        }
        if self.buf.len() > MAX_RESPONSE_BYTES {
            return Err(format!("SSE event larger than {MAX_RESPONSE_BYTES} bytes"));
        }
        Ok(events)
    }
}

/// Position of the first blank line (end of an event) and the separator's length.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_any_split() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: error\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let want = vec![
            SseEvent {
                event: None,
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: Some("error".into()),
                data: "x\ny".into(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".into(),
            },
        ];
        for step in [1, 2, 3, 7, stream.len()] {
            let mut p = SseParser::default();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                got.extend(p.push(piece).expect("valid"));
            }
            assert_eq!(got, want, "split every {step} bytes");
        }
    }

    #[test]
    fn request_body_carries_only_given_params() {
        let b = request_body(&ChatParams::greedy(5), true);
        assert_eq!(
            b,
            serde_json::json!({"stream": true, "max_tokens": 5, "temperature": 0.0,
                "stream_options": {"include_usage": true}})
        );
        let b = request_body(
            &ChatParams {
                include_usage: true,
                ..ChatParams::default()
            },
            false,
        );
        assert_eq!(b, serde_json::json!({"stream": false}));
    }
}
