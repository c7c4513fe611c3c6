//! The one error type of the HTTP API and how it renders (native `{"error":{"code","message"}}`, OIP `{"error":"..."}`).
//!
//! When to use which variant:
//! - [`ApiError::BadRequest`]: the client sent something malformed (undecodable image, bad tensor, bad query).
//! - [`ApiError::NotFound`]: an unknown task/model or route.
//! - [`ApiError::Unavailable`]: a known expert that cannot serve (disabled at load) or a server not ready yet.
//! - [`ApiError::PayloadTooLarge`], [`ApiError::UnsupportedMediaType`], [`ApiError::ImageTooLarge`]: limits and
//!   content types, each with its own status so clients can react without parsing messages. An image format or
//!   DICOM transfer syntax / photometric interpretation we do not decode is `UnsupportedMediaType` (415, naming it).
//! - [`ApiError::Unprocessable`]: well-formed input that is not something to classify (a DICOM RT dose grid,
//!   segmentation, an object without pixel data): 422 with its own code.
//! - [`ApiError::Overloaded`]: the inference queue is full; answered with `Retry-After` before decoding.
//! - [`ApiError::MemoryBusy`]: the request-memory budget is spent right now (bodies, decoding, assembly);
//!   `Retry-After`, nothing grows. Use it for server-wide memory, never for one request that is too big
//!   (that is [`ApiError::PayloadTooLarge`], [`ApiError::TooManyImages`] or [`ApiError::ImageTooLarge`]).
//! - [`ApiError::TooManyImages`]: more images in one request than `LORKD_MAX_CLIENT_BATCH_SIZE` (413).
//! - [`ApiError::BodyTimeout`]: the client did not send its body within `LORKD_BODY_TIMEOUT_MS` (408).
//! - [`ApiError::Unauthorized`]: missing or unknown API key (401 with `WWW-Authenticate: Bearer`).
//! - [`ApiError::Forbidden`]: a valid key without the scope the route needs (admin API), or the admin API is off.
//! - [`ApiError::InvalidExpert`]: an uploaded expert that does not fit the package (422); nothing changed.
//! - [`ApiError::Conflict`]: the change cannot be applied to the running server (409), e.g. a reload that
//!   would swap the shared student model, which needs a restart.
//! - [`ApiError::Timeout`]: the request ran past `LORKD_REQUEST_TIMEOUT_MS`.
//! - [`ApiError::Internal`]: our fault. The detail is logged (once, here) and never sent to the client.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("request carries {images} images; at most {limit} are accepted per request")]
    TooManyImages { images: usize, limit: u32 },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error(
        "server is at capacity ({capacity} requests in flight); retry after {retry_after_s} s"
    )]
    Overloaded { capacity: u32, retry_after_s: u32 },
    #[error("request did not finish within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the server's request memory is in use; retry after {retry_after_s} s")]
    MemoryBusy { retry_after_s: u32 },
    #[error("request body was not received within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    InvalidExpert(String),
    #[error("{0}")]
    Conflict(String),
    /// The string is logged, never returned.
    #[error("internal error")]
    Internal(String),
}

/// Which wire form an error takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorForm {
    /// `{"error": {"code": "...", "message": "..."}}`
    Native,
    /// KServe Open Inference Protocol v2: `{"error": "..."}`
    Oip,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::ImageTooLarge(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::MemoryBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::InvalidExpert(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code of the native form.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Unavailable(_) => "unavailable",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::ImageTooLarge(_) => "image_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::Unprocessable { code, .. } => code,
            Self::Overloaded { .. } => "overloaded",
            Self::Timeout { .. } => "timeout",
            Self::MemoryBusy { .. } => "memory_busy",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::InvalidExpert(_) => "invalid_expert",
            Self::Conflict(_) => "conflict",
            Self::Internal(_) => "internal",
        }
    }

    /// Renders in the given form and logs the error once (detail of 500s only goes to the log).
    pub fn into_response_with(self, form: ErrorForm) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(detail) => {
                tracing::error!(code = self.code(), detail = %detail, "request failed")
            }
            Self::Overloaded { .. }
            | Self::Timeout { .. }
            | Self::Unavailable(_)
            | Self::MemoryBusy { .. }
            | Self::BodyTimeout { .. } => {
                tracing::warn!(status = status.as_u16(), code = self.code(), message = %self, "request rejected")
            }
            _ => {
                tracing::info!(status = status.as_u16(), code = self.code(), message = %self, "request rejected")
            }
        }
        let message = self.to_string();
        let body = match form {
            ErrorForm::Native => json!({"error": {"code": self.code(), "message": message}}),
            ErrorForm::Oip => json!({"error": message}),
        };
        let mut response = (status, Json(body)).into_response();
        match self {
            Self::Overloaded { retry_after_s, .. } | Self::MemoryBusy { retry_after_s } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            Self::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"lorkd\""),
                );
            }
            Self::BodyTimeout { .. } => {
                // The rest of a stalled body is never read: the connection cannot be reused.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with(ErrorForm::Native)
    }
}

/// An [`ApiError`] rendered in the Open Inference Protocol's form.
#[derive(Debug)]
pub struct OipError(pub ApiError);

impl From<ApiError> for OipError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        self.0.into_response_with(ErrorForm::Oip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn internal_errors_never_leak_detail() {
        let response = ApiError::internal("ort: /secret/path failed").into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_json(response).await;
        assert_eq!(
            body,
            json!({"error": {"code": "internal", "message": "internal error"}})
        );
    }

    #[tokio::test]
    async fn overload_sets_retry_after_and_oip_form_is_a_string() {
        let response = OipError(ApiError::Overloaded {
            capacity: 4,
            retry_after_s: 1,
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = body_json(response).await;
        assert!(body["error"].as_str().unwrap().contains("capacity"));
    }
}
