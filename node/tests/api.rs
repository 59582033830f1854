//! The OpenAI-compatible API against a real bound server (127.0.0.1, port 0) backed by a fake
//! admission actor, so the HTTP layer is tested without a model.
//!
//! The fake echoes the prompt (the last chat message, or the raw prompt) one character per
//! delta. Some prompts are commands: `overloaded`, `bad`, `unavailable` (refusals), `fail-before`
//! (fails before `Started`), `fail-mid` (fails after a delta), `vanish` (drops its sender without
//! finishing), `hang` (waits until the client's receiver is dropped and reports it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::ServerHandle;
use tokio::sync::mpsc;

use prfaas_node::api::client::{self, ChatParams, ClientError, SseParser};
use prfaas_node::api::wire::ErrorBody;
use prfaas_node::api::{self, ApiLimits, ApiState};
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::engine::FinishReason;
use prfaas_node::metrics::Metrics;
use prfaas_node::service::{
    Detokenize, GenerateEvent, GenerateRequest, Health, HealthReport, MeshView, NodeInfo,
    PrefillRoute, PromptInput, Submit, SubmitError, Timings, TokenLogprob, Tokenize, TopLogprob,
    Usage, EVENT_CHANNEL,
};

const MODEL: &str = "fake-model";
/// Bound on every wait in these tests (a failure, not a synchronisation).
const WAIT: Duration = Duration::from_secs(30);

struct FakeAdmission {
    seen: Arc<Mutex<Vec<GenerateRequest>>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    cancelled: mpsc::Sender<u64>,
    next_id: u64,
}

impl Actor for FakeAdmission {
    type Context = Context<Self>;
}

fn prompt_text(p: &PromptInput) -> String {
    match p {
        PromptInput::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        PromptInput::Text(t) => t.clone(),
    }
}

impl Handler<Submit> for FakeAdmission {
    type Result = Result<mpsc::Receiver<GenerateEvent>, SubmitError>;

    fn handle(&mut self, Submit(req): Submit, _: &mut Context<Self>) -> Self::Result {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(req.clone());
        }
        let text = prompt_text(&req.prompt);
        match text.as_str() {
            "overloaded" => return Err(SubmitError::Overloaded(3)),
            "bad" => return Err(SubmitError::BadRequest("prompt too long".into())),
            "unavailable" => return Err(SubmitError::Unavailable("shutting down".into())),
            "too-long" => {
                return Err(SubmitError::ContextLength {
                    max_context: 2048,
                    prompt_tokens: 2000,
                    max_tokens: 100,
                })
            }
            _ => {}
        }
        self.next_id += 1;
        let request_id = self.next_id;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let cancelled = self.cancelled.clone();
        actix::spawn(async move {
            let started = GenerateEvent::Started {
                request_id,
                prompt_tokens: text.chars().count(),
                route: PrefillRoute::Remote {
                    peer: "peer-b".into(),
                    price: 0.5,
                    kv_bytes: 1234,
                    transfer_s: 0.01,
                },
            };
            let with_logprobs = req.sampling.logprobs;
            let delta = |t: &str| GenerateEvent::Delta {
                text: t.into(),
                token: Some(1),
                // A made-up distribution: each character's own logprob and `k` alternatives.
                logprobs: with_logprobs
                    .filter(|_| !t.is_empty())
                    .map(|k| TokenLogprob {
                        token: t.into(),
                        bytes: t.as_bytes().to_vec(),
                        logprob: -0.25,
                        top: (0..k)
                            .map(|i| TopLogprob {
                                token: format!("alt{i}"),
                                bytes: format!("alt{i}").into_bytes(),
                                logprob: -1.0 - i as f32,
                            })
                            .collect(),
                    }),
            };
            let failed = |m: &str| GenerateEvent::Failed { message: m.into() };
            // A send fails only when the API dropped the receiver; the script just ends then.
            match text.as_str() {
                "fail-before" => {
                    let _ = tx.send(failed("engine exploded")).await;
                }
                "fail-mid" => {
                    for e in [started, delta("partial"), failed("engine exploded")] {
                        let _ = tx.send(e).await;
                    }
                }
                "vanish" => {
                    for e in [started, delta("partial")] {
                        let _ = tx.send(e).await;
                    }
                }
                "hang" => {
                    for e in [started, delta("x")] {
                        let _ = tx.send(e).await;
                    }
                    if tokio::time::timeout(WAIT, tx.closed()).await.is_ok() {
                        let _ = cancelled.send(request_id).await;
                    }
                }
                _ => {
                    let _ = tx.send(started).await;
                    let (out, finish) = echo(&text, &req);
                    // An empty delta (a token inside a UTF-8 sequence) must not become a chunk.
                    let _ = tx.send(delta("")).await;
                    for c in out.chars() {
                        let _ = tx.send(delta(&c.to_string())).await;
                    }
                    let n = out.chars().count();
                    let _ = tx
                        .send(GenerateEvent::Finished {
                            finish,
                            usage: Usage {
                                prompt_tokens: text.chars().count(),
                                completion_tokens: n,
                                cached_tokens: 1,
                            },
                            timings: Timings {
                                ttft_s: 0.125,
                                decode_s: 0.5,
                                tokens_per_s: 8.0,
                            },
                        })
                        .await;
                }
            }
        });
        Ok(rx)
    }
}

/// What the fake "generates": the prompt, cut at a stop string or at `max_tokens` characters.
fn echo(text: &str, req: &GenerateRequest) -> (String, FinishReason) {
    let mut out = text.to_owned();
    if let Some(cut) = req.stop.iter().filter_map(|s| out.find(s.as_str())).min() {
        out.truncate(cut);
    }
    let max_tokens = req.max_tokens.unwrap_or(usize::MAX);
    if out.chars().count() > max_tokens {
        (out.chars().take(max_tokens).collect(), FinishReason::Length)
    } else {
        (out, FinishReason::Stop)
    }
}

impl Handler<Tokenize> for FakeAdmission {
    type Result = Result<Vec<(u32, Vec<u8>)>, SubmitError>;

    /// One token per byte; `<s>` is a special token (id 300) when `parse_special`.
    fn handle(&mut self, t: Tokenize, _: &mut Context<Self>) -> Self::Result {
        let mut out = Vec::new();
        if t.add_special {
            out.push((299, b"<bos>".to_vec()));
        }
        let mut rest = t.text.as_str();
        while !rest.is_empty() {
            if t.parse_special && rest.starts_with("<s>") {
                out.push((300, b"<s>".to_vec()));
                rest = &rest[3..];
            } else {
                out.push((u32::from(rest.as_bytes()[0]), vec![rest.as_bytes()[0]]));
                rest = &rest[1..];
            }
        }
        Ok(out)
    }
}

impl Handler<Detokenize> for FakeAdmission {
    type Result = Result<String, SubmitError>;

    fn handle(&mut self, Detokenize(ids): Detokenize, _: &mut Context<Self>) -> Self::Result {
        ids.into_iter()
            .map(|id| {
                u8::try_from(id)
                    .map(char::from)
                    .map_err(|_| SubmitError::BadRequest(format!("token {id} is unknown")))
            })
            .collect()
    }
}

impl Handler<Health> for FakeAdmission {
    type Result = MessageResult<Health>;

    fn handle(&mut self, _: Health, _: &mut Context<Self>) -> Self::Result {
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        MessageResult(HealthReport {
            status: if draining { "draining" } else { "ok" }.into(),
            ready: !draining,
            prefill_peers: Some(0),
            warnings: vec!["no prefill-capable peer".into()],
        })
    }
}

impl Handler<MeshView> for FakeAdmission {
    type Result = MessageResult<MeshView>;

    fn handle(&mut self, _: MeshView, _: &mut Context<Self>) -> Self::Result {
        MessageResult(serde_json::json!({
            "peers": [{"peer": "peer-b", "bandwidth_bps": 1.0e9}],
            "auctions": [],
        }))
    }
}

struct Harness {
    base: String,
    draining: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Vec<GenerateRequest>>>,
    cancelled: mpsc::Receiver<u64>,
    metrics: Arc<Metrics>,
    server: ServerHandle,
}

fn start(limits: ApiLimits) -> Harness {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (cancel_tx, cancelled) = mpsc::channel(16);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fake = FakeAdmission {
        seen: seen.clone(),
        draining: draining.clone(),
        cancelled: cancel_tx,
        next_id: 0,
    }
    .start();
    let metrics = Arc::new(Metrics::new());
    let mut state = ApiState::new(
        fake.clone(),
        fake.recipient(),
        NodeInfo {
            model_id: MODEL.into(),
            peer_id: "peer-a".into(),
            roles: vec!["decode".into(), "prefill".into()],
            backend: "cpu".into(),
            max_context: 2048,
            vocab_size: 512,
        },
        metrics.clone(),
    );
    state.limits = limits;
    let (server, addr) =
        api::start("127.0.0.1:0".parse().expect("addr"), state, 1).expect("bind port 0");
    assert_ne!(addr.port(), 0);
    let handle = server.handle();
    actix_rt::spawn(server);
    Harness {
        base: format!("http://{addr}"),
        draining,
        seen,
        cancelled,
        metrics,
        server: handle,
    }
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You echo."),
        ChatMessage::new("user", text),
    ]
}

/// Raw POST: status, headers of interest, body text.
async fn post(url: &str, body: &[u8]) -> (u16, Option<String>, Option<String>, String) {
    let mut res = awc::Client::builder()
        .timeout(WAIT)
        .finish()
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_vec())
        .await
        .expect("request");
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (ct, retry) = (header("content-type"), header("retry-after"));
    let bytes = res.body().limit(1 << 20).await.expect("body");
    (
        res.status().as_u16(),
        ct,
        retry,
        String::from_utf8(bytes.to_vec()).expect("utf-8"),
    )
}

fn sse_events(body: &str) -> Vec<client::SseEvent> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line"
    );
    SseParser::default()
        .push(body.as_bytes())
        .expect("valid SSE")
}

#[actix_rt::test]
async fn chat_stream_through_the_client() {
    let h = start(ApiLimits::default());
    let params = ChatParams {
        model: Some(MODEL.into()),
        ..ChatParams::greedy(64)
    };
    let r = client::chat(&h.base, &user("hello"), &params, true)
        .await
        .expect("chat");
    assert_eq!(r.text, "hello");
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    let u = r.usage.expect("include_usage gives usage");
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (5, 5, 10)
    );
    // Role chunk, five deltas (the empty one skipped), finish chunk, usage chunk.
    assert_eq!(r.chunks, 8);
    assert!(r.ttft.is_some_and(|t| t <= r.total));
    assert!(r.id.starts_with("chatcmpl-"), "{}", r.id);
    let x = r.prfaas.expect("prfaas extension");
    assert_eq!(x.node, "peer-a");
    assert_eq!(x.cached_tokens, 1);
    assert_eq!(x.timings.ttft_s, 0.125);
    assert!(
        matches!(x.route, PrefillRoute::Remote { ref peer, kv_bytes: 1234, .. } if peer == "peer-b")
    );
    // The API submitted what the client asked for.
    let seen = h.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].prompt, PromptInput::Chat(user("hello")));
    assert_eq!(seen[0].sampling.temperature, 0.0);
    assert_eq!(seen[0].max_tokens, Some(64));
    assert!(seen[0].stream);
}

#[actix_rt::test]
async fn chat_non_stream_reports_length_and_usage() {
    let h = start(ApiLimits::default());
    let r = client::chat(&h.base, &user("hello"), &ChatParams::greedy(3), false)
        .await
        .expect("chat");
    assert_eq!(r.text, "hel");
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!(r.chunks, 0);
    let u = r.usage.expect("usage");
    assert_eq!((u.prompt_tokens, u.completion_tokens), (5, 3));
    assert_eq!(r.prfaas.map(|x| x.prompt_tokens), Some(5));

    // The raw body has OpenAI's shape.
    let (status, ct, _, body) = post(
        &format!("{}/v1/chat/completions", h.base),
        br#"{"messages":[{"role":"user","content":"abc"}],"max_tokens":8,"unknown_field":{"x":1}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(ct.is_some_and(|c| c.starts_with("application/json")));
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "abc");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["total_tokens"], 6);
    assert_eq!(v["prfaas"]["route"]["kind"], "remote");
    assert!(v["prfaas"]["request_id"].is_u64());
}

#[actix_rt::test]
async fn completions_stream_and_non_stream() {
    let h = start(ApiLimits::default());
    let params = ChatParams {
        stop: vec!["lo".into()],
        ..ChatParams::greedy(16)
    };
    for stream in [true, false] {
        let r = client::complete(&h.base, "hello world", &params, stream)
            .await
            .expect("complete");
        assert_eq!(r.text, "hel", "stream={stream}");
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert!(r.id.starts_with("cmpl-"));
        assert_eq!(r.usage.map(|u| u.completion_tokens), Some(3));
        assert!(r.prfaas.is_some());
        // Three deltas, the finish chunk and the usage chunk; no role chunk for completions.
        assert_eq!(r.chunks, if stream { 5 } else { 0 });
    }
    let seen = h.seen.lock().expect("lock").clone();
    assert_eq!(seen[0].prompt, PromptInput::Text("hello world".into()));
    assert_eq!(seen[0].stop, vec!["lo".to_owned()]);
}

#[actix_rt::test]
async fn sse_framing_matches_openai() {
    let h = start(ApiLimits::default());
    let url = format!("{}/v1/chat/completions", h.base);
    let body = serde_json::json!({
        "model": MODEL, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 7,
    });
    let (status, ct, _, text) = post(&url, body.to_string().as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some("text/event-stream"));
    for frame in text.split_terminator("\n\n") {
        assert!(
            frame.starts_with("data: ") && !frame.contains('\n'),
            "{frame:?}"
        );
    }
    let events = sse_events(&text);
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("chunk json"))
        .collect();
    // role, "h", "i", finish, usage
    assert_eq!(chunks.len(), 5);
    let id = &chunks[0]["id"];
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(&c["id"], id);
        assert_eq!(c["model"], MODEL);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "h");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    assert_eq!(
        chunks[1]["choices"][0]["finish_reason"],
        serde_json::Value::Null
    );
    let fin = &chunks[3];
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    assert_eq!(fin["choices"][0]["delta"], serde_json::json!({}));
    assert_eq!(fin["prfaas"]["node"], "peer-a");
    // include_usage: `usage: null` everywhere but the last chunk, which has no choices.
    for c in &chunks[..4] {
        assert_eq!(c.get("usage"), Some(&serde_json::Value::Null));
    }
    assert_eq!(chunks[4]["choices"], serde_json::json!([]));
    assert_eq!(chunks[4]["usage"]["prompt_tokens"], 2);
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 2);
    let s = h.seen.lock().expect("lock")[0].sampling.clone();
    assert_eq!((s.temperature, s.top_p, s.top_k, s.seed), (0.7, 0.9, 5, 7));

    // Without include_usage: no usage key and no usage chunk.
    let body = serde_json::json!({"stream": true, "prompt": "ab"});
    let (_, _, _, text) = post(
        &format!("{}/v1/completions", h.base),
        body.to_string().as_bytes(),
    )
    .await;
    let events = sse_events(&text);
    assert_eq!(events.len(), 4, "a, b, finish, [DONE]: {text}");
    for e in &events[..3] {
        let c: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none());
    }
}

#[actix_rt::test]
async fn errors_have_openai_shape_and_status() {
    let h = start(ApiLimits {
        max_body_bytes: 4096,
        ..ApiLimits::default()
    });
    let chat = format!("{}/v1/chat/completions", h.base);
    let msg =
        |t: &str| serde_json::json!({"messages": [{"role": "user", "content": t}]}).to_string();
    let big = msg(&"x".repeat(5000));
    let cases: Vec<(String, String, u16, &str, Option<&str>)> = vec![
        (
            chat.clone(),
            "{oops".into(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat.clone(),
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#.into(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat.clone(),
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        (
            chat.clone(),
            big,
            413,
            "invalid_request_error",
            Some("request_too_large"),
        ),
        (
            chat.clone(),
            msg("overloaded"),
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        (chat.clone(), msg("bad"), 400, "invalid_request_error", None),
        (
            chat.clone(),
            msg("unavailable"),
            503,
            "server_error",
            Some("service_unavailable"),
        ),
        (
            chat.clone(),
            msg("fail-before"),
            500,
            "server_error",
            Some("internal_error"),
        ),
        (
            format!("{}/v1/nope", h.base),
            "{}".into(),
            404,
            "invalid_request_error",
            Some("not_found"),
        ),
    ];
    for (url, body, status, kind, code) in cases {
        let (got, ct, retry, text) = post(&url, body.as_bytes()).await;
        assert_eq!(got, status, "{url} {text}");
        assert!(
            ct.is_some_and(|c| c.starts_with("application/json")),
            "{text}"
        );
        let e: ErrorBody = serde_json::from_str(&text).expect("OpenAI error body");
        assert_eq!(e.error.kind, kind, "{text}");
        assert_eq!(e.error.code.as_deref(), code, "{text}");
        assert!(!e.error.message.is_empty());
        assert_eq!(retry.is_some(), status == 429, "Retry-After only on 429");
    }
    // A known route with the wrong method: 405 in the same shape.
    let err = client::get_json(&chat).await.expect_err("405");
    assert!(
        matches!(err, ClientError::Status { status: 405, error: Some(ref b), .. }
            if b.error.code.as_deref() == Some("method_not_allowed")),
        "{err:?}"
    );
    // The client surfaces status, message and Retry-After.
    let err = client::chat(&h.base, &user("overloaded"), &ChatParams::default(), true)
        .await
        .expect_err("429");
    assert!(
        matches!(
            err,
            ClientError::Status {
                status: 429,
                retry_after: Some(1),
                ..
            }
        ),
        "{err:?}"
    );
    // Refusals made by the API itself are counted; admission's own are left to admission.
    let m = h.metrics.render();
    assert!(
        m.contains("prfaas_requests_total{route=\"none\",outcome=\"rejected\"} 4"),
        "{m}"
    );
}

#[actix_rt::test]
async fn failure_after_start_is_an_sse_error_event() {
    let h = start(ApiLimits::default());
    let url = format!("{}/v1/chat/completions", h.base);
    for (prompt, message) in [
        ("fail-mid", "engine exploded"),
        ("vanish", "generation ended without finishing"),
    ] {
        let body =
            serde_json::json!({"stream": true, "messages": [{"role": "user", "content": prompt}]});
        let (status, _, _, text) = post(&url, body.to_string().as_bytes()).await;
        assert_eq!(status, 200, "headers were already sent");
        let events = sse_events(&text);
        assert_eq!(events.len(), 3, "role, partial, error: {text}");
        let last = &events[2];
        assert_eq!(last.event.as_deref(), Some("error"));
        let e: ErrorBody = serde_json::from_str(&last.data).expect("error body");
        assert_eq!(e.error.message, message);
        assert!(!text.contains("[DONE]"));

        let err = client::chat(&h.base, &user(prompt), &ChatParams::default(), true)
            .await
            .expect_err("mid-stream failure");
        assert!(
            matches!(err, ClientError::Stream(ref b) if b.error.message == message),
            "{err:?}"
        );
        // Non-stream: nothing was sent yet, so it is a 500.
        let err = client::chat(&h.base, &user(prompt), &ChatParams::default(), false)
            .await
            .expect_err("500");
        assert!(
            matches!(err, ClientError::Status { status: 500, .. }),
            "{err:?}"
        );
    }
}

#[actix_rt::test]
async fn info_endpoints() {
    let h = start(ApiLimits::default());
    let models = client::get_json(&format!("{}/v1/models", h.base))
        .await
        .expect("models");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    let one = client::get_json(&format!("{}/v1/models/{MODEL}", h.base))
        .await
        .expect("model");
    assert_eq!(one["id"], MODEL);

    let health = client::get_json(&format!("{}/healthz", h.base))
        .await
        .expect("healthz");
    assert_eq!(health["ok"], true);
    assert_eq!(health["peer_id"], "peer-a");
    assert_eq!(health["model"], MODEL);
    assert_eq!(health["backend"], "cpu");
    assert_eq!(health["roles"], serde_json::json!(["decode", "prefill"]));

    let mesh = client::get_json(&format!("{}/mesh", h.base))
        .await
        .expect("mesh");
    assert_eq!(mesh["peers"][0]["peer"], "peer-b");

    Metrics::inc(&h.metrics.auctions, "won");
    let mut res = awc::Client::new()
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .expect("metrics");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some(api::OPENMETRICS_CONTENT_TYPE)
    );
    let text = String::from_utf8(res.body().await.expect("body").to_vec()).expect("utf-8");
    assert!(
        text.contains("prfaas_auctions_total{kind=\"won\"} 1"),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );

    let html = client::get_text(&format!("{}/", h.base))
        .await
        .expect("dashboard");
    assert!(html.contains("<html") && html.contains("/mesh") && html.contains("/health"));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external assets"
    );
}

#[actix_rt::test]
async fn client_disconnect_cancels_the_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The server notices a closed connection on its next write; keep-alives provide writes
    // while the fake sends nothing.
    let mut h = start(ApiLimits {
        sse_keepalive: Duration::from_millis(50),
        ..ApiLimits::default()
    });
    let body =
        serde_json::json!({"stream": true, "messages": [{"role": "user", "content": "hang"}]})
            .to_string();
    // A raw socket, so that "the client went away" is exactly a closed TCP connection.
    let addr = h.base.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.expect("write head");
    sock.write_all(body.as_bytes()).await.expect("write body");
    // Read until the delta has arrived: the request is live and waiting on the fake.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"content\":\"x\"") {
        let n = tokio::time::timeout(WAIT, sock.read(&mut buf))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(
            n > 0,
            "server closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(
        h.cancelled.try_recv().is_err(),
        "not cancelled while connected"
    );
    drop(sock);
    let id = tokio::time::timeout(WAIT, h.cancelled.recv())
        .await
        .expect("the fake saw its sender closed after the client went away");
    assert_eq!(id, Some(1));
}

#[actix_rt::test]
async fn graceful_stop_closes_the_listener() {
    let h = start(ApiLimits::default());
    client::get_json(&format!("{}/healthz", h.base))
        .await
        .expect("up");
    tokio::time::timeout(WAIT, h.server.stop(true))
        .await
        .expect("stops");
    let err = client::get_json(&format!("{}/healthz", h.base))
        .await
        .expect_err("down");
    assert!(matches!(err, ClientError::Send { .. }), "{err:?}");
}

/// The official `openai` Python package against this server (`tests/python/openai_stream.py`).
#[actix_rt::test]
async fn official_openai_python_client_streams() {
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_openai {
        assert!(
            std::env::var("PRFAAS_REQUIRE_OPENAI").as_deref() != Ok("1"),
            "PRFAAS_REQUIRE_OPENAI=1 but `python3 -c 'import openai'` fails"
        );
        eprintln!("SKIP official_openai_python_client_streams: python3 has no `openai` package (pip install openai)");
        return;
    }
    let h = start(ApiLimits::default());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/openai_stream.py"
    );
    let base = h.base.clone();
    // The server's handlers and the fake actor live on this thread: run Python off it.
    let out = actix_rt::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, base.as_str(), MODEL])
            .output()
    })
    .await
    .expect("join")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    // The fake echoes the script's prompt, so the streamed text is known.
    assert!(stdout.contains("finish_reason=stop"), "{stdout}");
    let seen = h.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "one stream and one non-stream call");
    assert!(seen[0].stream && !seen[1].stream);
}

/// `logprobs` in both endpoints' shapes, streamed and not; `X-Request-Id` echoed (also on
/// errors) and used as the id; `context_length_exceeded`; `/health`, `/tokenize`,
/// `/detokenize` in llama-server's shapes.
#[actix_rt::test]
async fn logprobs_request_ids_and_operator_endpoints() {
    let h = start(ApiLimits::default());
    let http = awc::Client::builder().timeout(WAIT).finish();
    let send = |path: &str, id: Option<&str>, body: serde_json::Value| {
        let mut req = http.post(format!("{}{path}", h.base));
        if let Some(id) = id {
            req = req.insert_header(("x-request-id", id));
        }
        async move {
            let mut res = req.send_json(&body).await.expect("request");
            let id = res
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = res.body().limit(1 << 20).await.expect("body");
            let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
            (res.status().as_u16(), id, text)
        }
    };

    // Chat, non-stream: one entry per character, 2 alternatives each; the client's id is used.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "hé"}],
        "logprobs": true, "top_logprobs": 2});
    let (status, id, text) = send("/v1/chat/completions", Some("abc-1"), body.clone()).await;
    assert_eq!((status, id.as_deref()), (200, Some("abc-1")), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["id"], "chatcmpl-abc-1");
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(content[1]["token"], "é");
    assert_eq!(content[1]["bytes"], serde_json::json!([195, 169]));
    assert_eq!(content[1]["logprob"], -0.25);
    assert_eq!(content[0]["top_logprobs"][1]["token"], "alt1");
    let seen = h.seen.lock().expect("lock").last().cloned().expect("seen");
    assert_eq!(seen.request_id.as_deref(), Some("abc-1"));
    assert_eq!(seen.sampling.logprobs, Some(2));
    // Without logprobs the field is null.
    let (_, _, text) = send(
        "/v1/chat/completions",
        None,
        serde_json::json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");

    // Streamed: each content chunk carries its token's entry.
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let (_, id, text) = send("/v1/chat/completions", None, streamed).await;
    let id = id.expect("a made-up id is echoed");
    assert!(!id.is_empty() && id.len() <= api::MAX_REQUEST_ID);
    let tokens: Vec<String> = sse_events(&text)
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.data).ok())
        .inspect(|c| assert_eq!(c["id"], format!("chatcmpl-{id}")))
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"][0]["token"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(tokens, vec!["h".to_owned(), "é".to_owned()]);

    // Completions: the legacy parallel arrays, offsets in characters.
    let (_, _, text) = send(
        "/v1/completions",
        None,
        serde_json::json!({"prompt": "héy", "logprobs": 1}),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], serde_json::json!(["h", "é", "y"]), "{v}");
    assert_eq!(lp["text_offset"], serde_json::json!([0, 1, 2]));
    assert_eq!(lp["top_logprobs"][0], serde_json::json!({"alt0": -1.0}));

    // Errors carry the id too; unsupported parameters name themselves.
    let (status, id, text) = send(
        "/v1/chat/completions",
        Some("abc-2"),
        serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema"}}),
    )
    .await;
    assert_eq!((status, id.as_deref()), (400, Some("abc-2")));
    let e: ErrorBody = serde_json::from_str(&text).expect("error body");
    assert_eq!(e.error.param.as_deref(), Some("response_format"));
    let (status, _, text) = send(
        "/v1/completions",
        None,
        serde_json::json!({"prompt": "too-long"}),
    )
    .await;
    assert_eq!(status, 400);
    let e: ErrorBody = serde_json::from_str(&text).expect("error body");
    assert_eq!(e.error.code.as_deref(), Some("context_length_exceeded"));
    // An unusable client id (too long) is replaced.
    let long = "x".repeat(api::MAX_REQUEST_ID + 1);
    let (_, id, _) = send("/tokenize", Some(&long), serde_json::json!({"content": ""})).await;
    assert!(id.is_some_and(|id| id != long));

    // /tokenize and /detokenize.
    let (status, _, text) = send("/tokenize", None, serde_json::json!({"content": "a<s>"})).await;
    assert_eq!((status, text.as_str()), (200, r#"{"tokens":[97,300]}"#));
    let (_, _, text) = send(
        "/tokenize",
        None,
        serde_json::json!({"content": "a<s>", "parse_special": false, "add_special": true,
            "with_pieces": true}),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        v["tokens"][0],
        serde_json::json!({"id": 299, "piece": "<bos>"})
    );
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(5));
    let (status, _, text) = send(
        "/detokenize",
        None,
        serde_json::json!({"tokens": [104, 105]}),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, r#"{"content":"hi"}"#));
    let (status, _, _) = send("/detokenize", None, serde_json::json!({"tokens": [999]})).await;
    assert_eq!(status, 400);
    let (status, _, _) = send("/tokenize", None, serde_json::json!({"text": "x"})).await;
    assert_eq!(status, 400, "`content` is required");

    // /health: 200 when ready (with warnings), 503 when draining.
    let health = client::get_json(&format!("{}/health", h.base))
        .await
        .expect("health");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["prefill_peers"], 0);
    h.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    match client::get_json(&format!("{}/health", h.base)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 503),
        other => panic!("draining must be 503: {other:?}"),
    }
}
