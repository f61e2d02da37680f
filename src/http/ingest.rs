//! `POST /api/readings/ingest`: validate everything, store everything, then answer.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};

use super::{AppError, AppState};
use crate::auth::{Caller, Role};
use crate::ingest::{Invalid, SubmitError, validate};
use crate::store::now_ms;
use crate::wire::{FieldError, IngestRequest, IngestResponse, KeyScope};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/readings/ingest", post(ingest))
}

/// Stores readings and answers only once they are durable. All or nothing.
#[utoipa::path(post, path = "/api/readings/ingest", tag = "ingest",
    security(("bearer" = []), ("apiKey" = [])),
    request_body = IngestRequest,
    responses(
        (status = 200, body = IngestResponse, description = "Every reading is stored"),
        (status = 400, body = crate::wire::ApiError, description = "Malformed JSON"),
        (status = 401, body = crate::wire::ApiError), (status = 403, body = crate::wire::ApiError),
        (status = 413, body = crate::wire::ApiError, description = "Body over the size or reading cap"),
        (status = 422, body = crate::wire::ApiError, description = "Invalid readings, with `details`"),
        (status = 503, body = crate::wire::ApiError, description = "Storage or buffers unavailable; see Retry-After"),
    ))]
pub async fn ingest(
    State(app): State<AppState>,
    caller: Result<Caller, AppError>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestResponse>, AppError> {
    let result = match caller {
        Ok(caller) => accept(app, caller, body).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(Json(r)) => {
            crate::observe::ingest_request(200);
            crate::observe::readings(r.accepted, r.duplicates);
        }
        Err(e) => crate::observe::ingest_request(e.status().as_u16()),
    }
    result
}

async fn accept(
    app: AppState,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestResponse>, AppError> {
    match &caller {
        Caller::User(u) if u.role >= Role::Operator => {}
        Caller::User(_) => {
            return Err(AppError::Forbidden(
                "ingest needs the operator or admin role".into(),
            ));
        }
        Caller::Key(k) if k.scopes.contains(&KeyScope::Ingest) => {}
        Caller::Key(_) => {
            return Err(AppError::Forbidden(
                "this API key lacks the ingest scope".into(),
            ));
        }
    }
    let limited = match &caller {
        Caller::Key(k) => !app.rate_limits.ingest_key(&k.id),
        Caller::User(_) => false,
    } || !app.rate_limits.ingest_org(caller.org_id());
    if limited {
        return Err(AppError::RateLimited {
            message: "too many ingest requests; slow down and retry".into(),
            retry_after: 1,
        });
    }
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge(format!(
            "request body is over {} bytes",
            app.config.limits.max_body_bytes
        )),
        _ => AppError::BadRequest(r.body_text()),
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| AppError::BadRequest(format!("malformed JSON: {e}")))?;
    let readings = validate(&value, app.config.limits.max_readings_per_request, now_ms()).map_err(
        |invalid| match invalid {
            Invalid::TooMany { count, max } => AppError::PayloadTooLarge(format!(
                "{count} readings in one request; the limit is {max}"
            )),
            Invalid::Fields(details) => AppError::Validation {
                message: format!("{} invalid field(s); nothing was stored", details.len()),
                details,
            },
        },
    )?;

    // Every unit must exist in the caller's organisation (and, for a site-restricted user, in
    // one of its sites); other organisations' units are simply unknown.
    let org = caller.org_id().to_string();
    let mut sites: HashMap<&str, Option<String>> = HashMap::new();
    for r in &readings {
        if !sites.contains_key(r.unit_id.as_str()) {
            let info = app.units.get(&org, &r.unit_id).await?;
            let site = info.map(|i| i.site_id).filter(|s| caller.can_see_site(s));
            sites.insert(&r.unit_id, site);
        }
    }
    let unknown: Vec<FieldError> = readings
        .iter()
        .enumerate()
        .filter(|(_, r)| sites[r.unit_id.as_str()].is_none())
        .map(|(i, r)| FieldError {
            index: Some(i),
            field: "unitId".into(),
            message: format!("unknown unit {:?}", r.unit_id),
        })
        .collect();
    if !unknown.is_empty() {
        return Err(AppError::Validation {
            message: format!(
                "{} reading(s) name an unknown unit; nothing was stored",
                unknown.len()
            ),
            details: unknown,
        });
    }
    let site_ids: Vec<String> = readings
        .iter()
        .map(|r| sites[r.unit_id.as_str()].clone().unwrap_or_default())
        .collect();

    let outcomes = app
        .ingest
        .submit(org, readings, site_ids)
        .await
        .map_err(|e| {
            // The storage cause was logged by the writer; the client learns only what to do.
            let (what, retry_after) = match e {
                SubmitError::UnknownUnits(units) => return deleted_units(units),
                SubmitError::Storage(_) => ("storage is unavailable", 5),
                SubmitError::QueueFull => ("the ingest queue is full", 1),
                SubmitError::BuffersFull => ("too many readings are waiting for delivery", 1),
                SubmitError::Closed => ("the gateway is shutting down", 1),
            };
            AppError::Unavailable {
                message: format!("{what}; nothing was stored, retry later"),
                retry_after,
            }
        })?;
    let accepted = outcomes.iter().filter(|(_, new)| *new).count();
    Ok(Json(IngestResponse {
        accepted,
        duplicates: outcomes.len() - accepted,
        ids: outcomes.iter().map(|(id, _)| id.to_string()).collect(),
    }))
}

/// Units deleted between validation and commit: the request is refused like any other naming
/// an unknown unit.
fn deleted_units(readings: Vec<(usize, String)>) -> AppError {
    let details: Vec<FieldError> = readings
        .into_iter()
        .map(|(i, u)| FieldError {
            index: Some(i),
            field: "unitId".into(),
            message: format!("unknown unit {u:?}"),
        })
        .collect();
    AppError::Validation {
        message: format!(
            "{} reading(s) name an unknown unit; nothing was stored",
            details.len()
        ),
        details,
    }
}
