//! `/api/alerts`: the history (filtered, newest first, paged by an opaque cursor), its CSV
//! export for auditors, and acknowledgement.
//!
//! Every query is scoped to the caller's organisation and, under `site_ids`, to the caller's
//! sites — in SQL, before the limit, so a restricted user gets full pages. An acknowledgement is
//! decided by storage (once, even when two nodes race) and its `alert:acknowledged` event is an
//! `event_outbox` row of the same transaction, handed to this node's monitor like the events of
//! an ingest commit (and announced by any node if this one dies first).

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::{AppError, AppState, Query, User, parse_time_param};
use crate::auth::{Role, UserClaims};
use crate::store::{Acknowledge, AlertQuery, now_ms};
use crate::wire::{AcknowledgeAlert, Alert, AlertStatus};

/// The most rows one CSV export holds; a larger range answers the newest this many with
/// `X-Export-Truncated: true` (narrow `since`/`until` to get the rest).
pub const EXPORT_MAX_ROWS: i64 = 100_000;

/// The longest acknowledgement note, in characters.
pub const NOTE_MAX_CHARS: usize = 1000;

/// The Alert fields in JSON order: the CSV header (checked against the JSON by a test).
pub const ALERT_FIELDS: [&str; 16] = [
    "alertId",
    "unitId",
    "siteId",
    "alertType",
    "severity",
    "message",
    "status",
    "triggeredAt",
    "resolvedAt",
    "value",
    "threshold",
    "acknowledgedAt",
    "acknowledgedBy",
    "note",
    "peakValue",
    "durationSeconds",
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/alerts", get(list))
        .route("/api/alerts/export.csv", get(export_csv))
        .route("/api/alerts/{id}/acknowledge", post(acknowledge))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct AlertParams {
    /// `active` or `resolved`; both when absent.
    status: Option<AlertStatus>,
    /// Only this unit's alerts.
    unit_id: Option<String>,
    /// Only this site's alerts.
    site_id: Option<String>,
    /// Earliest `triggeredAt` (RFC 3339), inclusive.
    since: Option<String>,
    /// Latest `triggeredAt` (RFC 3339), inclusive.
    until: Option<String>,
    /// Page size: 1–1000, default 100 (ignored by the CSV export).
    limit: Option<i64>,
    /// The `X-Next-Cursor` of the previous page (ignored by the CSV export).
    cursor: Option<String>,
}

impl AlertParams {
    fn query(&self, user: &UserClaims, limit: i64) -> Result<AlertQuery, AppError> {
        Ok(AlertQuery {
            status: self.status,
            unit_id: self.unit_id.clone(),
            site_id: self.site_id.clone(),
            since: parse_time_param("since", self.since.as_deref())?,
            until: parse_time_param("until", self.until.as_deref())?,
            site_ids: user.site_ids.clone(),
            after: None,
            limit,
        })
    }
}

/// The opaque cursor: base64url of `[triggeredAt, alertId]` of the last alert of a page.
fn encode_cursor(triggered_at: i64, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::json!([triggered_at, id]).to_string())
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), AppError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<(i64, String)>(&bytes).ok())
        .ok_or_else(|| AppError::validation("cursor", "is not a cursor this API returned"))
}

/// The request's query without its `cursor`, then `cursor=<next>`.
fn next_link(uri: &axum::http::Uri, cursor: &str) -> String {
    let mut parts: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
        .collect();
    let last = format!("cursor={cursor}");
    parts.push(&last);
    format!("<{}?{}>; rel=\"next\"", uri.path(), parts.join("&"))
}

/// The organisation's alerts, newest first (`triggeredAt`, then id), filtered and paged.
/// When more remain, `X-Next-Cursor` and `Link: <…&cursor=…>; rel="next"` say how to get them.
#[utoipa::path(get, path = "/api/alerts", tag = "alerts", security(("bearer" = [])),
    params(AlertParams),
    responses(
        (status = 200, body = [Alert], headers(
            ("X-Next-Cursor" = String, description = "Present when more alerts remain: pass as `cursor`"),
            ("Link" = String, description = "`<same query with cursor=…>; rel=\"next\"` when more remain"))),
        (status = 401, body = crate::wire::ApiError),
        (status = 422, body = crate::wire::ApiError)))]
pub async fn list(
    State(app): State<AppState>,
    User(user): User,
    OriginalUri(uri): OriginalUri,
    Query(p): Query<AlertParams>,
) -> Result<Response, AppError> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AppError::validation("limit", "must be between 1 and 1000"));
    }
    let mut q = p.query(&user, limit + 1)?;
    q.after = p.cursor.as_deref().map(decode_cursor).transpose()?;
    let mut rows = app.store.alert_history(&user.org_id, &q).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|r| encode_cursor(r.triggered_at, &r.id)))
        .flatten();
    let alerts: Vec<Alert> = rows.into_iter().map(Alert::from).collect();
    let mut response = JsonBody(alerts).into_response();
    if let Some(cursor) = next {
        let headers = response.headers_mut();
        if let (Ok(c), Ok(l)) = (
            HeaderValue::from_str(&cursor),
            HeaderValue::from_str(&next_link(&uri, &cursor)),
        ) {
            headers.insert("x-next-cursor", c);
            headers.insert(header::LINK, l);
        }
    }
    Ok(response)
}

/// The same filters as `GET /api/alerts`, as CSV (RFC 4180) for auditors: a header row naming
/// every Alert field as in JSON, then one row per alert, newest first; `null` is an empty
/// field. At most [`EXPORT_MAX_ROWS`] rows (`X-Export-Truncated: true` when there were more).
#[utoipa::path(get, path = "/api/alerts/export.csv", tag = "alerts", security(("bearer" = [])),
    params(AlertParams),
    responses(
        (status = 200, content_type = "text/csv", body = String,
         description = "Header row of the Alert field names (camelCase, JSON order), one row per alert",
         headers(("X-Export-Truncated" = String, description = "`true` when the range held more than 100,000 alerts"))),
        (status = 401, body = crate::wire::ApiError),
        (status = 422, body = crate::wire::ApiError)))]
pub async fn export_csv(
    State(app): State<AppState>,
    User(user): User,
    Query(p): Query<AlertParams>,
) -> Result<Response, AppError> {
    let q = p.query(&user, EXPORT_MAX_ROWS + 1)?;
    let mut rows = app.store.alert_history(&user.org_id, &q).await?;
    let truncated = rows.len() as i64 > EXPORT_MAX_ROWS;
    rows.truncate(EXPORT_MAX_ROWS as usize);
    let alerts: Vec<Alert> = rows.into_iter().map(Alert::from).collect();
    let body = to_csv(&alerts).map_err(|e| AppError::Internal(format!("csv: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"alerts.csv\""),
    );
    if truncated {
        headers.insert("x-export-truncated", HeaderValue::from_static("true"));
    }
    Ok((headers, body).into_response())
}

/// Alerts as CSV: the header row always (an empty range is just the header), then the rows,
/// serialised by serde from the same struct as the JSON.
pub fn to_csv(alerts: &[Alert]) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    w.write_record(ALERT_FIELDS)?;
    for a in alerts {
        w.serialize(a)?;
    }
    w.into_inner().map_err(|e| e.into_error().into())
}

/// Acknowledges an alert (operator or admin, once). 200 with the Alert; every dashboard of the
/// organisation that may see its unit receives `alert:acknowledged`.
#[utoipa::path(post, path = "/api/alerts/{id}/acknowledge", tag = "alerts",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Alert id")),
    request_body(content = AcknowledgeAlert, description = "Optional `{ note }` (at most 1000 characters); an empty body is no note"),
    responses(
        (status = 200, body = Alert),
        (status = 401, body = crate::wire::ApiError),
        (status = 403, body = crate::wire::ApiError, description = "An API key, or a viewer"),
        (status = 404, body = crate::wire::ApiError),
        (status = 409, body = crate::wire::ApiError, description = "Already acknowledged"),
        (status = 422, body = crate::wire::ApiError)))]
pub async fn acknowledge(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<JsonBody<Alert>, AppError> {
    if user.role < Role::Operator {
        return Err(AppError::Forbidden(
            "acknowledging an alert needs the operator or admin role".into(),
        ));
    }
    let req = parse_body(&body)?;
    if req
        .note
        .as_ref()
        .is_some_and(|n| n.chars().count() > NOTE_MAX_CHARS)
    {
        return Err(AppError::validation(
            "note",
            format!("must be at most {NOTE_MAX_CHARS} characters"),
        ));
    }
    let outcome = app
        .store
        .acknowledge_alert(
            &user.org_id,
            &id,
            user.site_ids.as_ref(),
            &user.sub,
            req.note.as_deref(),
            now_ms(),
        )
        .await?;
    match outcome {
        Acknowledge::Done(row, event) => {
            // Announced at once by this node's monitor; if it is shutting down the row stays in
            // the outbox and its lease runs out, then any node (or this one restarted) sends it.
            if let Some(monitor) = app.announce.upgrade() {
                let handover = crate::ingest::Handover {
                    events: vec![event],
                    pending: None,
                };
                monitor.send(handover).await.ok();
            }
            Ok(JsonBody(Alert::from(*row)))
        }
        Acknowledge::NotFound => Err(AppError::NotFound(format!("no alert {id:?}"))),
        Acknowledge::Already => Err(AppError::Conflict(format!(
            "alert {id:?} is already acknowledged"
        ))),
    }
}

/// The body is optional: empty means no note; otherwise JSON `{ note? }` (400 malformed,
/// 422 of the wrong shape, as with every JSON body).
fn parse_body(body: &[u8]) -> Result<AcknowledgeAlert, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(AcknowledgeAlert::default());
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => AppError::Validation {
            message: e.to_string(),
            details: vec![],
        },
        _ => AppError::BadRequest(format!("malformed JSON: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AlertType, Severity};

    fn alert() -> Alert {
        Alert {
            alert_id: "al-1".into(),
            unit_id: "u".into(),
            site_id: "s".into(),
            alert_type: AlertType::TempHigh,
            severity: Severity::Critical,
            message: "Fridge: 9 °C is above the maximum of 5 °C, \"door\"".into(),
            status: AlertStatus::Resolved,
            triggered_at: "2026-01-01T00:00:00.000Z".into(),
            resolved_at: Some("2026-01-01T00:00:12.345Z".into()),
            value: Some(9.0),
            threshold: Some(5.0),
            acknowledged_at: None,
            acknowledged_by: Some("alice".into()),
            note: Some("door open,\nclosed it".into()),
            peak_value: Some(11.5),
            duration_seconds: Some(12.345),
        }
    }

    /// The CSV header is every JSON field, in the JSON order.
    #[test]
    fn csv_header_is_the_json_fields_in_order() {
        let json = serde_json::to_string(&alert()).unwrap();
        let fields: Vec<&str> = ALERT_FIELDS.to_vec();
        let positions: Vec<usize> = fields
            .iter()
            .map(|f| json.find(&format!("\"{f}\":")).expect(f))
            .collect();
        let sorted = {
            let mut p = positions.clone();
            p.sort_unstable();
            p
        };
        assert_eq!(
            positions, sorted,
            "header order differs from the JSON order"
        );
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value.as_object().unwrap().len(), fields.len());
        let bytes = to_csv(&[alert()]).unwrap();
        let mut r = csv::Reader::from_reader(&bytes[..]);
        assert_eq!(r.headers().unwrap().iter().collect::<Vec<_>>(), fields);
        let row = r.records().next().unwrap().unwrap();
        assert_eq!(&row[5], alert().message.as_str());
        assert_eq!(&row[11], "");
        assert_eq!(&row[13], "door open,\nclosed it");
        assert_eq!(&row[15], "12.345");
        assert_eq!(row.len(), fields.len());
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = encode_cursor(1_700_000_000_123, "al-ff");
        assert_eq!(
            decode_cursor(&c).unwrap(),
            (1_700_000_000_123, "al-ff".into())
        );
        assert!(decode_cursor("nope!").is_err());
        let uri: axum::http::Uri = "/api/alerts?status=active&cursor=old&limit=2"
            .parse()
            .unwrap();
        assert_eq!(
            next_link(&uri, "NEW"),
            "</api/alerts?status=active&limit=2&cursor=NEW>; rel=\"next\""
        );
    }
}
