//! `POST /api/events`: a backend service emits its own event to a room of its organisation.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json as JsonBody, Router};

use super::{AppError, AppState, Json};
use crate::auth::{Caller, Role, valid_id};
use crate::config::Limits;
use crate::rate_limit::quota;
use crate::rooms;
use crate::wire::{KeyScope, PublishRequest, PublishResponse};

/// Largest `data`, serialised.
pub const MAX_DATA_BYTES: usize = 64 * 1024;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/events", post(publish))
}

/// Event names a publisher may not use: the gateway's own, and socket.io's reserved ones.
pub fn reserved(event: &str) -> bool {
    ["sensor:", "alert:", "unit:", "auth:", "sync:"]
        .iter()
        .any(|p| event.starts_with(p))
        || matches!(
            event,
            "error"
                | "connect"
                | "connect_error"
                | "disconnect"
                | "disconnecting"
                | "newListener"
                | "removeListener"
        )
}

/// Rate limits by caller (API key, user or organisation): `governor`'s keyed token buckets, each
/// of the configured rate with a burst of twice that.
pub struct KeyedLimits {
    publish: Keyed,
    ingest_key: Keyed,
    ingest_org: Keyed,
}

impl KeyedLimits {
    pub fn new(limits: &Limits) -> Self {
        let keyed = |per_second: u32| Keyed {
            buckets: governor::RateLimiter::keyed(quota(per_second, per_second.saturating_mul(2))),
            prune_at: AtomicUsize::new(PRUNE_AT),
        };
        KeyedLimits {
            publish: keyed(limits.publish_per_second),
            ingest_key: keyed(limits.ingest_per_second_per_key),
            ingest_org: keyed(limits.ingest_per_second_per_org),
        }
    }

    /// `POST /api/events` by one publisher (an API key or an admin).
    pub fn publish(&self, who: &str) -> bool {
        self.publish.check(who)
    }

    /// Ingest by one API key.
    pub fn ingest_key(&self, key_id: &str) -> bool {
        self.ingest_key.check(key_id)
    }

    /// Ingest by one organisation, all its callers together.
    pub fn ingest_org(&self, org: &str) -> bool {
        self.ingest_org.check(org)
    }
}

/// Callers remembered before the idle ones are forgotten.
const PRUNE_AT: usize = 10_000;

struct Keyed {
    buckets: governor::DefaultKeyedRateLimiter<String>,
    /// Bounded memory: past this many callers, those whose bucket is full again are dropped
    /// (forgetting a full bucket changes nothing). The mark then rises to twice the callers
    /// still active, so a crowd of active callers costs one sweep per doubling, not one per call.
    prune_at: AtomicUsize,
}

impl Keyed {
    fn check(&self, who: &str) -> bool {
        let allowed = self.buckets.check_key(&who.to_string()).is_ok();
        if self.buckets.len() > self.prune_at.load(Ordering::Relaxed) {
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
            let mark = (self.buckets.len() * 2).max(PRUNE_AT);
            self.prune_at.store(mark, Ordering::Relaxed);
        }
        allowed
    }
}

#[utoipa::path(post, path = "/api/events", tag = "events",
    security(("bearer" = []), ("apiKey" = [])),
    request_body = PublishRequest,
    responses(
        (status = 202, body = PublishResponse, description = "Emitted to the room"),
        (status = 401, body = crate::wire::ApiError),
        (status = 403, body = crate::wire::ApiError, description = "Not admin / no publish scope, or a site or unit the organisation does not have"),
        (status = 413, body = crate::wire::ApiError), (status = 422, body = crate::wire::ApiError),
        (status = 429, body = crate::wire::ApiError, description = "Too many publishes; see Retry-After"),
    ))]
pub async fn publish(
    State(app): State<AppState>,
    caller: Caller,
    Json(req): Json<PublishRequest>,
) -> Result<(StatusCode, JsonBody<PublishResponse>), AppError> {
    let who = match &caller {
        Caller::User(u) if u.role == Role::Admin => format!("publish:user:{}:{}", u.org_id, u.sub),
        Caller::User(_) => {
            return Err(AppError::Forbidden(
                "publishing needs the admin role".into(),
            ));
        }
        Caller::Key(k) if k.scopes.contains(&KeyScope::Publish) => format!("publish:key:{}", k.id),
        Caller::Key(_) => {
            return Err(AppError::Forbidden(
                "this API key lacks the publish scope".into(),
            ));
        }
    };
    if req.event.is_empty() || req.event.len() > 64 || req.event.chars().any(char::is_control) {
        return Err(AppError::validation(
            "event",
            "must be 1-64 printable characters",
        ));
    }
    if reserved(&req.event) {
        return Err(AppError::validation(
            "event",
            format!(
                "{:?} is reserved (sensor:*, alert:*, unit:*, auth:*, sync:*, error)",
                req.event
            ),
        ));
    }
    let size = serde_json::to_vec(&req.data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DATA_BYTES {
        return Err(AppError::PayloadTooLarge(format!(
            "data is over {MAX_DATA_BYTES} bytes"
        )));
    }
    if !app.rate_limits.publish(&who) {
        return Err(AppError::RateLimited {
            message: "too many published events; slow down".into(),
            retry_after: 1,
        });
    }
    let org = caller.org_id();
    let room = match req.room.split_once(':') {
        None if req.room == "org" => rooms::org(org),
        Some(("site", id)) if valid_id(id) => {
            let known = caller.can_see_site(id) && app.store.get_site(org, id).await?.is_some();
            if !known {
                return Err(AppError::Forbidden(format!(
                    "no site {id:?} in your organisation"
                )));
            }
            rooms::site(org, id)
        }
        Some(("unit", id)) if valid_id(id) => {
            let known = app
                .units
                .get(org, id)
                .await?
                .is_some_and(|u| caller.can_see_site(&u.site_id));
            if !known {
                return Err(AppError::Forbidden(format!(
                    "no unit {id:?} in your organisation"
                )));
            }
            rooms::unit(org, id)
        }
        Some(("user", sub)) if !sub.is_empty() && sub.len() <= 256 => rooms::user(org, sub),
        _ => {
            return Err(AppError::validation(
                "room",
                "must be org, site:{id}, unit:{id} or user:{sub}",
            ));
        }
    };
    // Through the outbox, after anything the pipeline queued before it.
    app.outbox
        .send_dynamic(org, vec![room], req.event, &req.data)
        .await;
    Ok((
        StatusCode::ACCEPTED,
        JsonBody(PublishResponse { delivered: true }),
    ))
}
