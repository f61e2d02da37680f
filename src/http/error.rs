//! The one error type of the HTTP surface.
//!
//! Each variant maps to a status and the contract's body `{ error, message, details? }`. Internal
//! causes are logged here and never returned to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;
use crate::wire::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    Validation {
        message: String,
        details: Vec<FieldError>,
    },
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    #[error("{message}")]
    Unavailable { message: String, retry_after: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        AppError::Validation {
            message: format!("{field}: {message}"),
            details: vec![FieldError {
                index: None,
                field: field.into(),
                message,
            }],
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AppError::Validation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            AppError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => AppError::Conflict(format!("already exists ({what})")),
            StoreError::Unavailable(cause) => {
                crate::observe::storage_error();
                tracing::warn!(error = %cause, "storage unavailable");
                AppError::Unavailable {
                    message: "storage is unavailable, retry later".into(),
                    retry_after: 5,
                }
            }
            other => {
                crate::observe::storage_error();
                AppError::Internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let (message, details, retry_after) = match self {
            AppError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                ("internal error".to_string(), None, None)
            }
            AppError::Validation { message, details } => (message, Some(details), None),
            AppError::RateLimited {
                message,
                retry_after,
            }
            | AppError::Unavailable {
                message,
                retry_after,
            } => (message, None, Some(retry_after)),
            other => (other.to_string(), None, None),
        };
        let body = ApiError {
            error: code.into(),
            message,
            details,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
