//! The node's OpenAI-compatible HTTP API (actix-web).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (stream and non-stream),
//! `GET /v1/models`, `GET /health` (readiness: 200 when accepting requests, 503 when draining),
//! `GET /healthz` (liveness), `POST /tokenize` and `POST /detokenize` (llama-server's shapes),
//! `GET /metrics` (OpenMetrics), `GET /mesh` (the live mesh view as JSON) and `GET /` (a
//! self-contained HTML dashboard). Every response carries `X-Request-Id`: the client's, when it
//! sent a usable one, else a fresh one; completions use it as their id and in the node's logs.
//! The API only translates: requests go to the admission actor as [`Submit`], and the mesh view
//! comes from whoever answers [`MeshView`].
//! The wire format lives in [`wire`], the error shape in [`error`], a typed client in [`client`].

pub mod client;
mod completions;
pub mod error;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use serde::Deserialize;

use crate::metrics::{Metrics, RequestLabels};
use crate::service::{Detokenize, Health, MeshView, NodeInfo, Submit, Tokenize};

pub use error::ApiError;

/// Bounds the API applies before anything reaches admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest accepted request body; chat histories are text, so 4 MiB is generous while keeping
    /// one request from holding much memory.
    pub max_body_bytes: usize,
    /// An SSE comment is sent after this long without an event. actix-web notices a client that
    /// went away only when a write fails, so without it a request waiting on a slow prefill (or
    /// a stalled peer) would hold its KV until it finished; it also keeps proxies from timing
    /// the stream out.
    pub sse_keepalive: std::time::Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            sse_keepalive: std::time::Duration::from_secs(5),
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The admission actor.
    pub submit: actix::Recipient<Submit>,
    /// Whoever owns the mesh view (the mesh bridge).
    pub mesh: actix::Recipient<MeshView>,
    /// The tokenizer's owner (admission), for `/tokenize` and `/detokenize`.
    pub tokenize: actix::Recipient<Tokenize>,
    pub detokenize: actix::Recipient<Detokenize>,
    /// Whoever knows whether the node accepts requests (admission), for `/health`.
    pub health: actix::Recipient<Health>,
    pub info: NodeInfo,
    pub metrics: Arc<Metrics>,
    pub limits: ApiLimits,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("info", &self.info)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// State with the default [`ApiLimits`]; `admission` answers requests, tokenization and
    /// health.
    pub fn new<A>(
        admission: actix::Addr<A>,
        mesh: actix::Recipient<MeshView>,
        info: NodeInfo,
        metrics: Arc<Metrics>,
    ) -> Self
    where
        A: actix::Actor<Context = actix::Context<A>>
            + actix::Handler<Submit>
            + actix::Handler<Tokenize>
            + actix::Handler<Detokenize>
            + actix::Handler<Health>,
    {
        Self {
            submit: admission.clone().recipient(),
            tokenize: admission.clone().recipient(),
            detokenize: admission.clone().recipient(),
            health: admission.recipient(),
            mesh,
            info,
            metrics,
            limits: ApiLimits::default(),
        }
    }

    /// Counts a request the API refused before it reached admission (malformed, wrong model):
    /// admission never sees those, so nobody else could count them. Refusals by admission itself
    /// (429 and its own 400s) are counted there.
    fn count_rejected(&self) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "none".into(),
                outcome: "rejected".into(),
            })
            .inc();
    }
}

/// Content type of `/metrics` (what Prometheus negotiates for `prometheus-client`'s encoder).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` (port 0 picks a free port) and builds the server.
///
/// Returns the server, not yet polled: the caller spawns it inside its actix `System` (or awaits
/// it) and stops it gracefully with `server.handle().stop(true)`. Signals are left to the caller.
/// `workers` is the number of HTTP worker threads (at least one).
pub fn start(
    listen: SocketAddr,
    state: ApiState,
    workers: usize,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(from_fn(request_id))
            .configure(routes)
    })
    .workers(workers.max(1))
    .disable_signals()
    // In-flight streams get this long to finish on a graceful stop.
    .shutdown_timeout(10)
    .bind(listen)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("the HTTP server bound no address"))?;
    Ok((server.run(), addr))
}

/// Registers every route; public so a caller can embed the API in its own `App`
/// (the state must then be registered as `web::Data<ApiState>`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    // Each resource answers a wrong method with a JSON 405 instead of actix's empty one.
    let resource = |path: &str, route: actix_web::Route| {
        web::resource(path)
            .route(route)
            .default_service(web::to(method_not_allowed))
    };
    cfg.service(resource(
        "/v1/chat/completions",
        web::post().to(completions::chat_completions),
    ))
    .service(resource(
        "/v1/completions",
        web::post().to(completions::completions),
    ))
    .service(resource("/v1/models", web::get().to(models)))
    .service(resource("/v1/models/{id}", web::get().to(model)))
    .service(resource("/healthz", web::get().to(healthz)))
    .service(resource("/health", web::get().to(health)))
    .service(resource("/tokenize", web::post().to(tokenize)))
    .service(resource("/detokenize", web::post().to(detokenize)))
    .service(resource("/metrics", web::get().to(metrics)))
    .service(resource("/mesh", web::get().to(mesh)))
    .service(resource("/", web::get().to(dashboard)))
    .default_service(web::to(not_found));
}

fn model_card(state: &ApiState) -> wire::ModelCard {
    wire::ModelCard {
        id: state.info.model_id.clone(),
        object: "model".into(),
        created: 0,
        owned_by: "prfaas".into(),
    }
}

async fn models(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(wire::ModelList {
        object: "list".into(),
        data: vec![model_card(&state)],
    })
}

async fn model(
    state: web::Data<ApiState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if *id == state.info.model_id {
        Ok(HttpResponse::Ok().json(model_card(&state)))
    } else {
        Err(ApiError::ModelNotFound(id.into_inner()))
    }
}

async fn healthz(state: web::Data<ApiState>) -> HttpResponse {
    let i = &state.info;
    HttpResponse::Ok().json(serde_json::json!({
        "ok": true,
        "peer_id": i.peer_id,
        "model": i.model_id,
        "backend": i.backend,
        "roles": i.roles,
        "max_context": i.max_context,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The request's id, as the [`request_id`] middleware settled it (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Longest client-chosen `X-Request-Id` kept; longer or non-printable ones are replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// A fresh request id: 16 random hex digits.
pub fn new_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", h.finish())
}

/// Reads `X-Request-Id` (or makes one up), keeps it for the handler and echoes it.
async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let name = HeaderName::from_static("x-request-id");
    let id = req
        .headers()
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut res = next.call(req).await?;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(name, v);
    }
    Ok(res)
}

/// Readiness, in llama-server's shape plus details: 200 `{"status": "ok", …}` while requests
/// are accepted, 503 with an `error` object while draining.
async fn health(state: web::Data<ApiState>) -> HttpResponse {
    match state.health.send(Health).await {
        Ok(report) if report.ready => HttpResponse::Ok().json(report),
        Ok(report) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": report.status,
            "ready": false,
            "prefill_peers": report.prefill_peers,
            "warnings": report.warnings,
            "error": {"code": 503, "message": "the node is draining", "type": "unavailable_error"},
        })),
        Err(e) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "unavailable",
            "ready": false,
            "error": {"code": 503, "message": format!("admission is not running ({e})"), "type": "unavailable_error"},
        })),
    }
}

/// `POST /tokenize` body (llama-server's).
#[derive(Debug, Deserialize)]
struct TokenizeBody {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

fn yes() -> bool {
    true
}

/// `POST /detokenize` body.
#[derive(Debug, Deserialize)]
struct DetokenizeBody {
    tokens: Vec<u32>,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("invalid JSON body: {e}"),
        param: None,
    })
}

async fn tokenize(state: web::Data<ApiState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let b: TokenizeBody = json_body(&body)?;
    let with_pieces = b.with_pieces;
    let tokens = state
        .tokenize
        .send(Tokenize {
            text: b.content,
            add_special: b.add_special,
            parse_special: b.parse_special,
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("the tokenizer is not available ({e})")))?
        .map_err(ApiError::from)?;
    let tokens: Vec<serde_json::Value> = tokens
        .into_iter()
        .map(|(id, bytes)| {
            if !with_pieces {
                return id.into();
            }
            // As llama-server: the piece as a string when it is valid UTF-8, else its bytes.
            let piece = match String::from_utf8(bytes) {
                Ok(s) => serde_json::Value::from(s),
                Err(e) => serde_json::Value::from(e.into_bytes()),
            };
            serde_json::json!({"id": id, "piece": piece})
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tokens": tokens })))
}

async fn detokenize(
    state: web::Data<ApiState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let b: DetokenizeBody = json_body(&body)?;
    let content = state
        .detokenize
        .send(Detokenize(b.tokens))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the tokenizer is not available ({e})")))?
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "content": content })))
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE))
        .body(state.metrics.render())
}

async fn mesh(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let view = state
        .mesh
        .send(MeshView)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the mesh view is not available ({e})")))?;
    Ok(HttpResponse::Ok().json(view))
}

async fn dashboard() -> HttpResponse {
    HttpResponse::build(StatusCode::OK)
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .body(include_str!("dashboard.html"))
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.path().to_owned(),
    })
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute {
        method: req.method().to_string(),
        path: req.path().to_owned(),
    })
}
