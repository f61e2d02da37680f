//! `/api/webhooks`: an organisation's webhooks and their deliveries, for admins. The secret is
//! shown once, in the answer to the creation. Delivery itself is [`crate::deliver::webhooks`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json as JsonBody, Router};

use super::{Admin, AppError, AppState, Json};
use crate::deliver::webhooks::{check_url, generate_id, generate_secret};
use crate::wire::{
    CreateWebhook, WEBHOOK_EVENTS, Webhook, WebhookCreated, WebhookDelivery, format_time,
};

/// Deliveries listed per webhook.
const DELIVERIES_LISTED: i64 = 100;
const MAX_URL_LEN: usize = 2048;
const MAX_SECRET_LEN: usize = 256;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/webhooks", get(list).post(create))
        .route("/api/webhooks/{id}", delete(remove))
        .route("/api/webhooks/{id}/deliveries", get(deliveries))
}

/// Creates a webhook; the answer is the only place its secret appears.
#[utoipa::path(post, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    request_body = CreateWebhook,
    responses((status = 201, body = WebhookCreated), (status = 403, body = crate::wire::ApiError),
        (status = 422, body = crate::wire::ApiError)))]
pub async fn create(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<CreateWebhook>,
) -> Result<(StatusCode, JsonBody<WebhookCreated>), AppError> {
    if req.url.len() > MAX_URL_LEN {
        return Err(AppError::validation(
            "url",
            format!("must be at most {MAX_URL_LEN} characters"),
        ));
    }
    check_url(&req.url, app.config.webhook_allow_private)
        .await
        .map_err(|why| AppError::validation("url", why))?;
    let events = valid_events(req.events)?;
    let secret = match req.secret {
        Some(s) if s.is_empty() || s.len() > MAX_SECRET_LEN => {
            return Err(AppError::validation(
                "secret",
                format!("must be 1 to {MAX_SECRET_LEN} characters"),
            ));
        }
        Some(s) => s,
        None => generate_secret(),
    };
    let id = generate_id();
    let events_json = serde_json::to_string(&events).unwrap_or_default();
    app.store
        .create_webhook(&admin.org_id, &id, &req.url, &events_json, &secret)
        .await?;
    Ok((
        StatusCode::CREATED,
        JsonBody(WebhookCreated {
            id,
            url: req.url,
            events,
            secret,
        }),
    ))
}

/// The events asked for: known alert events, each once, in the order given; all of them when
/// absent.
fn valid_events(events: Option<Vec<String>>) -> Result<Vec<String>, AppError> {
    let Some(asked) = events else {
        return Ok(WEBHOOK_EVENTS.iter().map(|e| e.to_string()).collect());
    };
    if asked.is_empty() {
        return Err(AppError::validation(
            "events",
            "must name at least one event",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for e in asked {
        if !WEBHOOK_EVENTS.contains(&e.as_str()) {
            return Err(AppError::validation(
                "events",
                format!("{e:?} is not one of {}", WEBHOOK_EVENTS.join(", ")),
            ));
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// The organisation's webhooks, oldest first (never their secrets).
#[utoipa::path(get, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = [Webhook]), (status = 403, body = crate::wire::ApiError)))]
pub async fn list(
    State(app): State<AppState>,
    Admin(admin): Admin,
) -> Result<JsonBody<Vec<Webhook>>, AppError> {
    let rows = app.store.list_webhooks(&admin.org_id).await?;
    Ok(JsonBody(
        rows.into_iter()
            .map(|r| Webhook {
                id: r.id,
                url: r.url,
                events: serde_json::from_str(&r.events).unwrap_or_default(),
                created_at: format_time(r.created_at),
            })
            .collect(),
    ))
}

/// Deletes a webhook and its deliveries (pending ones are not sent).
#[utoipa::path(delete, path = "/api/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "Webhook id")),
    responses((status = 204), (status = 404, body = crate::wire::ApiError)))]
pub async fn remove(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    if app.store.delete_webhook(&admin.org_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound(format!("no webhook {id:?}")))
    }
}

/// The webhook's last 100 deliveries, newest first.
#[utoipa::path(get, path = "/api/webhooks/{id}/deliveries", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Webhook id")),
    responses((status = 200, body = [WebhookDelivery]), (status = 404, body = crate::wire::ApiError)))]
pub async fn deliveries(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<JsonBody<Vec<WebhookDelivery>>, AppError> {
    let rows = app
        .store
        .webhook_deliveries(&admin.org_id, &id, DELIVERIES_LISTED)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no webhook {id:?}")))?;
    Ok(JsonBody(
        rows.into_iter()
            .map(|r| WebhookDelivery {
                delivery_id: r.id,
                event: r.event,
                attempts: r.attempts.into(),
                last_status: r.last_status.map(Into::into),
                last_error: r.last_error,
                next_attempt_at: r.next_attempt_at.map(format_time),
                delivered_at: r.delivered_at.map(format_time),
            })
            .collect(),
    ))
}
