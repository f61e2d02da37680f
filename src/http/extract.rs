//! Extractors that speak our error shape: the authenticated [`Caller`] and a JSON body whose
//! rejections become contract errors instead of axum's plain-text ones.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, request::Parts};
use serde::de::DeserializeOwned;

use super::{AppError, AppState};
use crate::auth::{Caller, KeyIdentity, Role, UserClaims, apikey};
use crate::wire::KeyScope;

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, AppError> {
        let bearer = crate::auth::bearer(&parts.headers);
        let api_key = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let credential = api_key.or(bearer).map(str::trim).unwrap_or_default();
        if credential.is_empty() {
            return Err(AppError::Unauthorized(
                "missing credentials: send Authorization: Bearer <token> or X-API-Key".into(),
            ));
        }
        if apikey::looks_like_key(credential) {
            let row = app
                .store
                .find_api_key(&apikey::hash(credential))
                .await?
                .ok_or_else(|| AppError::Unauthorized("invalid or revoked API key".into()))?;
            let scopes = row
                .scopes
                .split(',')
                .filter_map(|s| s.parse::<KeyScope>().ok())
                .collect();
            tracing::Span::current().record("org", row.org_id.as_str());
            return Ok(Caller::Key(KeyIdentity {
                id: row.id,
                org_id: row.org_id,
                scopes,
            }));
        }
        app.jwt
            .verify(credential)
            .inspect(|c| {
                tracing::Span::current().record("org", c.org_id.as_str());
            })
            .map(Caller::User)
            .map_err(|e| AppError::Unauthorized(e.to_string()))
    }
}

/// A signed-in user (not an API key).
pub struct User(pub UserClaims);

impl FromRequestParts<AppState> for User {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, AppError> {
        match Caller::from_request_parts(parts, app).await? {
            Caller::User(claims) => Ok(User(claims)),
            Caller::Key(_) => Err(AppError::Forbidden(
                "API keys may only ingest or publish; reads need a user token".into(),
            )),
        }
    }
}

/// A user with the `admin` role.
pub struct Admin(pub UserClaims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, AppError> {
        let User(claims) = User::from_request_parts(parts, app).await?;
        if claims.role != Role::Admin {
            return Err(AppError::Forbidden("this needs the admin role".into()));
        }
        Ok(Admin(claims))
    }
}

/// `axum::Json` with our rejections: 400 for malformed JSON or a missing
/// `Content-Type: application/json`, 413 for an oversized body, 422 for JSON of the wrong shape.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `axum::extract::Query` with the contract's error: `?limit=abc` or `?status=x` is a 422
/// `validation_failed` (like `?since=yesterday`, and like JSON of the wrong shape), not axum's
/// plain-text 400.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, AppError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|r| AppError::Validation {
                message: r.body_text(),
                details: vec![],
            })
    }
}

fn json_rejection(r: JsonRejection) -> AppError {
    match r {
        JsonRejection::JsonDataError(e) => AppError::Validation {
            message: e.body_text(),
            details: vec![],
        },
        JsonRejection::JsonSyntaxError(e) => {
            AppError::BadRequest(format!("malformed JSON: {}", e.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => {
            AppError::BadRequest("expected Content-Type: application/json".into())
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            AppError::PayloadTooLarge("request body is too large".into())
        }
        other => AppError::BadRequest(other.body_text()),
    }
}
