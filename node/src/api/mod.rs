//! The node's OpenAI-compatible HTTP API (actix-web).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (stream and non-stream),
//! `GET /v1/models`, `GET /healthz`, `GET /metrics` (OpenMetrics), `GET /mesh` (the live mesh view
//! as JSON) and `GET /` (a self-contained HTML dashboard). The API only translates: requests go to
//! the admission actor as [`Submit`], and the mesh view comes from whoever answers [`MeshView`].
//! The wire format lives in [`wire`], the error shape in [`error`], a typed client in [`client`].

pub mod client;
mod completions;
pub mod error;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::metrics::{Metrics, RequestLabels};
use crate::service::{MeshView, NodeInfo, Submit};

pub use error::ApiError;

/// Bounds the API applies before anything reaches admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest accepted request body; chat histories are text, so 4 MiB is generous while keeping
    /// one request from holding much memory.
    pub max_body_bytes: usize,
    /// `max_tokens` when the client sends none (OpenAI's own default is "until the context
    /// ends", which would let one careless request occupy a decode slot for minutes).
    pub default_max_tokens: usize,
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
            default_max_tokens: 256,
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
    /// State with the default [`ApiLimits`].
    pub fn new(
        submit: actix::Recipient<Submit>,
        mesh: actix::Recipient<MeshView>,
        info: NodeInfo,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            submit,
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
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(routes))
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
