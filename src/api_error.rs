//! The API's JSON errors: [`ApiError`] and its body, the conversions from engine and extractor
//! errors, and the answers the router itself gives (404 for an unknown path, 405 naming the
//! allowed methods). Every refusal the HTTP API makes is `{"error":{"code","message"}}`.
//!
//! It decides no policy: handlers choose the status and code; this module only renders them.

use axum::Json;
use axum::extract::Request;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::engine::LeaseError;

/// An API error: status, machine code, human message.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine code.
    pub code: String,
    /// Human message naming the lease, pool or agent concerned.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// The JSON error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Inside the error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine code.
    pub code: String,
    /// Human message.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> ApiError {
        let status = match &e {
            LeaseError::Unsatisfiable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            LeaseError::WaitExpired { .. } => StatusCode::REQUEST_TIMEOUT,
            LeaseError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            LeaseError::NotFound(_) => StatusCode::NOT_FOUND,
            LeaseError::Ended { .. } | LeaseError::DuplicateRequest(_) => StatusCode::CONFLICT,
            LeaseError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(r: WebSocketUpgradeRejection) -> ApiError {
        ApiError::new(
            r.status(),
            "websocket_required",
            format!("this endpoint is a WebSocket: {}", r.body_text()),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        // 422 is this API's "unsatisfiable selector"; a malformed body is a 400 (415 when the
        // content type is missing).
        let status = match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "invalid_request", r.body_text())
    }
}

/// Answer for a path no route serves.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint {} {}; see docs/API.md",
            req.method(),
            req.uri().path()
        ),
    )
}

/// Middleware: the router's own 405 (a known path, another method) becomes the JSON error,
/// naming the method, the path and the allowed methods, and keeps its `Allow` header.
pub async fn method_not_allowed(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED {
        return resp;
    }
    let allow = resp
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut out = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}; allowed: {allow}"),
    )
    .into_response();
    if let Some(v) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, v.clone());
    }
    out
}
