//! HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! OpenAI clients turn the status into an exception class (`BadRequestError`, `RateLimitError`…)
//! and show `message`, so every refusal goes through here, including unknown routes.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

use crate::service::SubmitError;

use super::wire::{ErrorBody, ErrorDetail};

/// Seconds a client is told to wait after a 429 (`Retry-After`). Requests on this node last
/// seconds, so one second is enough for a slot to free up without clients hammering the node.
pub const RETRY_AFTER_S: u64 = 1;

/// Why an API request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or impossible request (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// Prompt and completion do not fit the context (400, `context_length_exceeded`).
    #[error("{0}")]
    ContextLengthExceeded(String),
    /// `model` names a model this node does not serve (404).
    #[error("The model `{0}` does not exist on this node")]
    ModelNotFound(String),
    /// Unknown route (404).
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    /// Known route, wrong method (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// Body over the configured limit (413).
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// Every admission slot is taken (429).
    #[error("{0}")]
    Overloaded(String),
    /// The node cannot serve now (503).
    #[error("{0}")]
    Unavailable(String),
    /// Generation failed before any byte of the response was sent (500).
    #[error("{0}")]
    Internal(String),
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::BadRequest(_) => ApiError::InvalidRequest {
                message,
                param: None,
            },
            SubmitError::ContextLength { .. } => ApiError::ContextLengthExceeded(message),
            SubmitError::Overloaded(_) => ApiError::Overloaded(message),
            SubmitError::Unavailable(_) => ApiError::Unavailable(message),
        }
    }
}

impl ApiError {
    /// The OpenAI error body for this error.
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param) = match self {
            ApiError::InvalidRequest { param, .. } => {
                ("invalid_request_error", None, param.clone())
            }
            ApiError::ContextLengthExceeded(_) => (
                "invalid_request_error",
                Some("context_length_exceeded"),
                Some("messages".to_owned()),
            ),
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_owned()),
            ),
            ApiError::NoRoute { .. } => ("invalid_request_error", Some("not_found"), None),
            ApiError::MethodNotAllowed { .. } => {
                ("invalid_request_error", Some("method_not_allowed"), None)
            }
            ApiError::TooLarge { .. } => ("invalid_request_error", Some("request_too_large"), None),
            ApiError::Overloaded(_) => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            ApiError::Unavailable(_) => ("server_error", Some("service_unavailable"), None),
            ApiError::Internal(_) => ("server_error", Some("internal_error"), None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.to_owned(),
                param,
                code: code.map(str::to_owned),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::ContextLengthExceeded(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::ModelNotFound(_) | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Overloaded(_)) {
            res.insert_header((header::RETRY_AFTER, RETRY_AFTER_S.to_string()));
        }
        res.json(self.body())
    }
}
