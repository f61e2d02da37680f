//! The wire contract as Rust types: every payload that crosses the wire, in either direction.
//!
//! These types are the single source of `proto/`: the TypeScript typings (ts-rs), the JSON Schemas
//! and the OpenAPI document (utoipa) are generated from them by `sensorwire proto`, and a test fails
//! when the committed files are stale. Field names follow CONTRACT.md exactly (camelCase on the wire).
//! Many fields carry the same attributes (`#[schema(required = true)]` on a nullable field, the
//! format of a time): each struct spells out its own contract shape, on purpose, so that the
//! generated schema of every payload can be read and checked field by field.
//! Times are RFC 3339 UTC strings with millisecond precision, built with [`format_time`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use ts_rs::TS;
use utoipa::ToSchema;

/// Checks a caller-supplied site or unit id: 1–64 chars of `[A-Za-z0-9_.:-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Formats epoch milliseconds the way the contract wants times: `2026-01-02T03:04:05.678Z`.
pub fn format_time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One stored reading, as pushed live (`sensor:reading`) and in batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SensorReading {
    /// The stored id (a string, opaque to clients).
    pub id: String,
    pub unit_id: String,
    #[schema(required = true)]
    pub device_id: Option<String>,
    pub temperature: f64,
    #[schema(required = true)]
    pub humidity: Option<f64>,
    #[schema(required = true)]
    pub battery: Option<f64>,
    #[schema(required = true)]
    pub signal_strength: Option<f64>,
    /// RFC 3339 UTC, millisecond precision.
    #[schema(format = DateTime)]
    pub recorded_at: String,
    /// Where the reading came from; `"api"` when the sender gave none.
    pub source: String,
}

/// A site: a group of units (a store, a warehouse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Site {
    pub id: String,
    pub name: String,
}

// The enums' strings outside JSON (database columns, metric labels, API key scopes) come from
// strum's derives, the same snake_case names serde gives them: `.as_ref()`/`.into()`, `.parse()`.

/// A unit's status: `unknown` until its first reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::AsRefStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum UnitStatus {
    Unknown,
    Ok,
    Excursion,
    Offline,
}

/// A fridge or freezer with its safe range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Unit {
    pub id: String,
    pub site_id: String,
    pub name: String,
    #[schema(required = true)]
    pub temp_min: Option<f64>,
    #[schema(required = true)]
    pub temp_max: Option<f64>,
    #[ts(type = "number")]
    pub offline_after_seconds: i64,
    pub status: UnitStatus,
    #[schema(required = true, format = DateTime)]
    pub last_reading_at: Option<String>,
    #[schema(required = true)]
    pub last_temperature: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::AsRefStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum AlertType {
    TempHigh,
    TempLow,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::AsRefStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::AsRefStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum AlertStatus {
    Active,
    Resolved,
}

/// A stored alert, as listed by `GET /api/alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub alert_id: String,
    pub unit_id: String,
    pub site_id: String,
    pub alert_type: AlertType,
    pub severity: Severity,
    pub message: String,
    pub status: AlertStatus,
    #[schema(format = DateTime)]
    pub triggered_at: String,
    #[schema(required = true, format = DateTime)]
    pub resolved_at: Option<String>,
    #[schema(required = true)]
    pub value: Option<f64>,
    #[schema(required = true)]
    pub threshold: Option<f64>,
    /// When it was acknowledged (`POST /api/alerts/{alertId}/acknowledge`), or `null`.
    #[schema(required = true, format = DateTime)]
    pub acknowledged_at: Option<String>,
    /// The `sub` of the user who acknowledged it, or `null`.
    #[schema(required = true)]
    pub acknowledged_by: Option<String>,
    /// The acknowledgement's note, or `null`.
    #[schema(required = true)]
    pub note: Option<String>,
    /// The most extreme out-of-range reading of the excursion so far: the highest for
    /// `temp_high`, the lowest for `temp_low`; `null` for `offline`.
    #[schema(required = true)]
    pub peak_value: Option<f64>,
    /// `resolvedAt − triggeredAt` in seconds (millisecond precision); `null` while active.
    #[schema(required = true)]
    pub duration_seconds: Option<f64>,
}

/// The body of `POST /api/alerts/{alertId}/acknowledge`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcknowledgeAlert {
    /// What was done, for the record (at most 1000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub note: Option<String>,
}

/// The JSON body of every HTTP error.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct ApiError {
    /// A stable machine-readable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `conflict`, `payload_too_large`, `validation_failed`, `rate_limited`,
    /// `unavailable`, `internal`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub details: Option<Vec<FieldError>>,
}

/// One invalid field of a request, by index (for lists) and field name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct FieldError {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

// ---- Admin requests -------------------------------------------------------------------------

/// `POST /api/sites`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSite {
    /// Optional caller-chosen id (1–64 chars of `[A-Za-z0-9_.:-]`); generated when absent.
    #[serde(default)]
    #[ts(optional)]
    pub id: Option<String>,
    pub name: String,
}

/// `POST /api/units`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUnit {
    #[serde(default)]
    #[ts(optional)]
    pub id: Option<String>,
    pub site_id: String,
    pub name: String,
    #[serde(default)]
    #[ts(optional)]
    pub temp_min: Option<f64>,
    #[serde(default)]
    #[ts(optional)]
    pub temp_max: Option<f64>,
    /// Seconds of silence before an `offline` alert (default 300, minimum 1).
    #[serde(default)]
    #[ts(optional)]
    #[ts(type = "number")]
    pub offline_after_seconds: Option<i64>,
}

/// `PATCH /api/units/{id}`: absent fields are left alone; `null` clears a threshold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateUnit {
    #[serde(default)]
    #[ts(optional)]
    pub name: Option<String>,
    #[serde(default, with = "double_option")]
    #[ts(optional, type = "number | null")]
    #[schema(value_type = Option<f64>)]
    pub temp_min: Option<Option<f64>>,
    #[serde(default, with = "double_option")]
    #[ts(optional, type = "number | null")]
    #[schema(value_type = Option<f64>)]
    pub temp_max: Option<Option<f64>>,
    #[serde(default)]
    #[ts(optional)]
    #[ts(type = "number")]
    pub offline_after_seconds: Option<i64>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Option<f64>>, s: S) -> Result<S::Ok, S::Error> {
        v.flatten().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
        Option::<f64>::deserialize(d).map(Some)
    }
}

/// A scope of a device API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::AsRefStr, strum::EnumString, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum KeyScope {
    Ingest,
    Publish,
}

/// `POST /api/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    /// Defaults to `["ingest"]`.
    #[serde(default)]
    #[ts(optional)]
    pub scopes: Option<Vec<KeyScope>>,
}

/// The answer to `POST /api/keys`: the only time the key itself is shown.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct ApiKeyCreated {
    pub id: String,
    pub key: String,
    pub scopes: Vec<KeyScope>,
}

// ---- Webhooks -------------------------------------------------------------------------------

/// The alert events a webhook can ask for; also its default subscription.
pub const WEBHOOK_EVENTS: [&str; 3] = ["alert:triggered", "alert:resolved", "alert:acknowledged"];

/// `POST /api/webhooks` (admin).
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http(s)` URL; private, loopback and link-local addresses are refused unless
    /// `WEBHOOK_ALLOW_PRIVATE=true`.
    pub url: String,
    /// Defaults to `["alert:triggered","alert:resolved","alert:acknowledged"]`.
    #[serde(default)]
    #[ts(optional)]
    pub events: Option<Vec<String>>,
    /// The HMAC-SHA256 key; generated (32 random bytes, hex) when absent.
    #[serde(default)]
    #[ts(optional)]
    pub secret: Option<String>,
}

/// The answer to `POST /api/webhooks`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct WebhookCreated {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
}

/// A webhook as listed by `GET /api/webhooks` (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: String,
}

/// One event's delivery to one webhook (`GET /api/webhooks/{id}/deliveries`).
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// Also the `X-Sensorwire-Delivery` header and the body's `deliveryId`, the same on every
    /// attempt.
    pub delivery_id: String,
    pub event: String,
    /// Attempts made so far (0 before the first).
    pub attempts: i64,
    /// The HTTP status of the last attempt; null before the first or when no answer came.
    #[schema(required = true)]
    pub last_status: Option<i64>,
    /// Why the last attempt failed; null before the first and after a success.
    #[schema(required = true)]
    pub last_error: Option<String>,
    /// When the next attempt is due; null once delivered or given up.
    #[schema(required = true)]
    pub next_attempt_at: Option<String>,
    #[schema(required = true)]
    pub delivered_at: Option<String>,
}

/// The body POSTed to a webhook. `data` is the event's payload as dashboards receive it
/// (without the socket `offset`).
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    pub event: String,
    #[ts(type = "unknown")]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub org_id: String,
    pub delivery_id: String,
    pub sent_at: String,
}

// ---- Socket.io payloads ---------------------------------------------------------------------

/// Why a subscription was refused. `forbidden` covers sites and units that do not exist, belong
/// to another organisation or lie outside the token's `site_ids` alike; `not_found` is for
/// malformed ids; `unavailable` when storage cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeError {
    Forbidden,
    NotFound,
    RateLimited,
    Unavailable,
}

/// Ack of `subscribe:*` / `unsubscribe:*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct SubscribeAck {
    pub ok: bool,
    /// Present when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub error: Option<SubscribeError>,
}

/// Ack of `auth:refresh`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct RefreshAck {
    pub ok: bool,
    /// The new token's `exp` (seconds since the epoch) when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    #[ts(type = "number | undefined")]
    pub exp: Option<i64>,
    /// `invalid_token`, `token_expired` or `forbidden` (another user or organisation).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub error: Option<String>,
}

/// The `error` event, for a failed request that carried no ack callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct ErrorEvent {
    pub code: String,
    pub message: String,
}

/// The `auth:expired` event: always `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthExpired {}

// ---- Pipeline events ------------------------------------------------------------------------

/// `sensor:readings:batch`: one unit's readings of one flush window, in `recordedAt` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadingsBatch {
    pub unit_id: String,
    pub readings: Vec<SensorReading>,
    /// `readings.length`.
    pub count: usize,
    /// Position in the organisation's event log (see "Missed events after a reconnect"); set
    /// when the event is sent, so the pipeline leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// `alert:triggered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertTriggered {
    pub alert_id: String,
    pub unit_id: String,
    pub site_id: String,
    pub alert_type: AlertType,
    pub severity: Severity,
    pub message: String,
    #[schema(format = DateTime)]
    pub triggered_at: String,
    /// The temperature that caused it (`null` for `offline`).
    #[schema(required = true)]
    pub value: Option<f64>,
    /// The limit it crossed (`null` for `offline`).
    #[schema(required = true)]
    pub threshold: Option<f64>,
    /// Position in the organisation's event log (see "Missed events after a reconnect"); set
    /// when the event is sent, so the pipeline leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// `alert:resolved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertResolved {
    pub alert_id: String,
    pub unit_id: String,
    #[schema(format = DateTime)]
    pub resolved_at: String,
    /// Position in the organisation's event log (see "Missed events after a reconnect"); set
    /// when the event is sent, so the pipeline leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// `alert:acknowledged`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertAcknowledged {
    pub alert_id: String,
    pub unit_id: String,
    #[schema(format = DateTime)]
    pub acknowledged_at: String,
    /// The `sub` of the user who acknowledged it.
    pub acknowledged_by: String,
    #[schema(required = true)]
    pub note: Option<String>,
    /// Position in the organisation's event log (see "Missed events after a reconnect"); set
    /// when the event is sent, so the pipeline leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// `unit:status`, sent on change only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatusChanged {
    pub unit_id: String,
    pub status: UnitStatus,
    #[schema(format = DateTime)]
    pub since: String,
    /// Position in the organisation's event log (see "Missed events after a reconnect"); set
    /// when the event is sent, so the pipeline leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

// ---- Missed events after a reconnect -------------------------------------------------------

/// `sync:complete`: the replay after a reconnect with `auth.offset` is done. `recovered: false`
/// means the offset was unknown or older than the retention window: refetch through REST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct SyncComplete {
    pub recovered: bool,
    /// The newest offset the socket has now seen (when recovered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// The `sync` event's argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct SyncRequest {
    pub offset: String,
}

/// One missed event in a `sync` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct MissedEvent {
    pub event: String,
    #[ts(type = "unknown")]
    pub data: serde_json::Value,
}

/// The `sync` ack: the events after the offset that the socket may see, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct SyncAck {
    pub recovered: bool,
    pub events: Vec<MissedEvent>,
    /// The newest offset now covered (absent when not recovered and nothing was logged yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub offset: Option<String>,
}

/// One reading of `POST /api/readings/ingest`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestReading {
    pub unit_id: String,
    pub temperature: f64,
    /// RFC 3339; at most 5 minutes in the future.
    #[schema(format = DateTime)]
    pub recorded_at: String,
    #[serde(default)]
    #[ts(optional)]
    pub humidity: Option<f64>,
    #[serde(default)]
    #[ts(optional)]
    pub battery: Option<f64>,
    #[serde(default)]
    #[ts(optional)]
    pub signal_strength: Option<f64>,
    /// Defaults to `"api"`.
    #[serde(default)]
    #[ts(optional)]
    pub source: Option<String>,
    #[serde(default)]
    #[ts(optional)]
    pub device_id: Option<String>,
}

/// The body of `POST /api/readings/ingest`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct IngestRequest {
    pub readings: Vec<IngestReading>,
}

/// The answer to an ingest, sent only once every reading is durably stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct IngestResponse {
    /// Readings stored by this request.
    pub accepted: usize,
    /// Readings that were already stored (same unit, time, device and source).
    pub duplicates: usize,
    /// `ids[i]` is the stored id of `readings[i]`.
    pub ids: Vec<String>,
}

// ---- Plain WebSocket (`GET /api/v2/ws?token=`) ----------------------------------------------

/// A channel of the plain WebSocket protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WsChannel {
    Alerts,
    Device,
    Unit,
}

/// Client → server: `{"action":"subscribe","type":"alerts"}`, `{"action":"subscribe","type":"device",
/// "device_id":"…"}`, `{"action":"subscribe","type":"unit","unit_id":"…"}`, the same with
/// `"unsubscribe"`, and `{"type":"ping"}`.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct WsClientMessage {
    /// `subscribe` or `unsubscribe`; absent for `ping`.
    #[serde(default)]
    #[ts(optional)]
    pub action: Option<String>,
    /// `alerts`, `device`, `unit`, or `ping`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    #[ts(optional)]
    pub device_id: Option<String>,
    #[serde(default)]
    #[ts(optional)]
    pub unit_id: Option<String>,
}

/// The metrics of one reading, as plain WebSocket telemetry carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct TelemetryMetrics {
    pub temperature: f64,
    #[schema(required = true)]
    pub humidity: Option<f64>,
    #[schema(required = true)]
    pub battery: Option<f64>,
    #[schema(required = true)]
    pub signal_strength: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
pub struct TelemetryData {
    /// The reading's `recordedAt`.
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub metrics: TelemetryMetrics,
}

/// Server → client messages of the plain WebSocket protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsServerMessage {
    Subscribed {
        channel: WsChannel,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        device_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        unit_id: Option<String>,
    },
    Unsubscribed {
        channel: WsChannel,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        device_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        unit_id: Option<String>,
    },
    /// The organisation's open alerts: on subscribe and after every change.
    Alerts {
        alerts: Vec<Alert>,
    },
    /// One reading of a subscribed device or unit.
    Telemetry {
        #[schema(required = true)]
        device_id: Option<String>,
        unit_id: String,
        data: TelemetryData,
    },
    Pong,
    /// A request that could not be served; the connection stays open.
    Error {
        message: String,
    },
}

// ---- HTTP publish (`POST /api/events`) ------------------------------------------------------

/// `POST /api/events`: a backend service emits its own event to a room of its organisation.
#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The event name; `sensor:*`, `alert:*`, `unit:*`, `auth:*`, `sync:*` and `error` are reserved.
    pub event: String,
    /// Any JSON value (an object gets the event's `offset` added).
    #[ts(type = "unknown")]
    pub data: serde_json::Value,
    /// `org`, `site:{id}`, `unit:{id}` or `user:{sub}`.
    pub room: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS, ToSchema)]
pub struct PublishResponse {
    pub delivered: bool,
}
