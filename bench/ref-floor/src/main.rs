//! `sensorwire-ref-floor`: the minimal Rust floor of the load harness (`bench/load.sh`).
//!
//! It answers "what does the cheapest server that still does the job cost for this traffic?":
//! the same HTTP routes as sensorwire for what the load generator does (admin API, API keys,
//! ingest), readings buffered per unit in memory, and every `FLUSH_INTERVAL_MS` each unit's
//! window sent as one JSON text frame, shaped like sensorwire's `sensor:readings:batch`
//! payload, to every WebSocket of its organisation. No socket.io, no storage, no thresholds, no
//! replay log, no rooms but one per organisation. Each batch is serialised once and the same
//! buffer is queued to every socket.
//!
//! Per socket: one bounded queue and one task that writes what is queued (every frame fed, one
//! flush per burst). A socket whose queue is full is dropped.
//!
//! Env: `HOST` (127.0.0.1), `PORT` (0: ephemeral), `JWT_SECRET` (HS256, required),
//! `FLUSH_INTERVAL_MS` (1000), `WS_READ_BUFFER_SIZE` (each socket's first read buffer, 1024, as sensorwire),
//! `WS_WRITE_BUFFER_SIZE` (bytes tungstenite gathers before writing to the socket, 65536; a
//! flush always writes, so a burst goes out in one write; 0 writes every frame on its own, about
//! twice the CPU per delivery).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

/// sensorwire's `BATCH_MAX_READINGS` default: a larger window goes out in several batches.
const BATCH_MAX: usize = 500;
/// Frames queued per socket before it counts as too slow and is dropped.
const QUEUE: usize = 256;
/// sensorwire's `MAX_BODY_BYTES` default (larger bodies: 413).
const MAX_BODY: usize = 1024 * 1024;

#[derive(Deserialize)]
struct Claims {
    #[allow(dead_code)]
    sub: String,
    org_id: String,
    role: String,
}

/// `SensorReading`, fields in sensorwire's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Reading {
    id: String,
    unit_id: String,
    device_id: Option<String>,
    temperature: f64,
    humidity: Option<f64>,
    battery: Option<f64>,
    signal_strength: Option<f64>,
    recorded_at: String,
    source: String,
    #[serde(skip)]
    recorded_ms: i64,
}

/// `ReadingsBatch` with `offset` first, as sensorwire stamps it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Batch<'a> {
    offset: String,
    unit_id: &'a str,
    readings: &'a [Reading],
    count: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewReading {
    unit_id: String,
    temperature: f64,
    recorded_at: String,
    device_id: Option<String>,
    humidity: Option<f64>,
    battery: Option<f64>,
    signal_strength: Option<f64>,
    source: Option<String>,
}

#[derive(Deserialize)]
struct IngestBody {
    readings: Vec<NewReading>,
}

#[derive(Default)]
struct Data {
    /// Organisation → its units (unit ids are per organisation).
    units: HashMap<String, HashSet<String>>,
    /// API key → organisation.
    keys: HashMap<String, String>,
    /// Organisation → unit → the unit's readings since the last flush.
    buffers: HashMap<String, HashMap<String, Vec<Reading>>>,
    next_id: u64,
}

struct App {
    key: DecodingKey,
    validation: Validation,
    read_buffer: usize,
    write_buffer: usize,
    data: Mutex<Data>,
    /// Organisation → the queues of its sockets.
    sockets: Mutex<HashMap<String, Vec<mpsc::Sender<Utf8Bytes>>>>,
    /// Batches sent (one per unit window and chunk), like sensorwire's counter.
    emitted: AtomicU64,
    key_seq: AtomicU64,
}

impl App {
    fn claims(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .ok()
            .map(|t| t.claims)
    }

    /// The organisation of an admin bearer token.
    fn admin(&self, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(c) = token.and_then(|t| self.claims(t)) else {
            return Err(Box::new(fail(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "bad token",
            )));
        };
        if c.role != "admin" {
            return Err(Box::new(fail(
                StatusCode::FORBIDDEN,
                "forbidden",
                "admin role required",
            )));
        }
        Ok(c.org_id)
    }
}

fn fail(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(json!({ "error": error, "message": message }))).into_response()
}

fn parse_body(body: &[u8]) -> Result<serde_json::Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|_| {
        Box::new(fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "body is not JSON",
        ))
    })
}

/// An admin route's organisation (from the Bearer token) and JSON body.
fn admin_request(
    app: &App,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, serde_json::Value), Box<Response>> {
    Ok((app.admin(headers)?, parse_body(body)?))
}

async fn sites(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = app.admin(&headers) {
        return *r;
    }
    match parse_body(&body) {
        Ok(b) => (
            StatusCode::CREATED,
            Json(json!({ "id": b["id"], "name": b["name"] })),
        )
            .into_response(),
        Err(r) => *r,
    }
}

async fn units(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (org, b) = match admin_request(&app, &headers, &body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let Some(id) = b["id"].as_str() else {
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "id is required",
        );
    };
    app.data
        .lock()
        .expect("data")
        .units
        .entry(org)
        .or_default()
        .insert(id.to_string());
    let answer = json!({
        "id": id, "siteId": b["siteId"], "name": b["name"],
        "tempMin": b["tempMin"], "tempMax": b["tempMax"],
        "offlineAfterSeconds": 300, "status": "unknown", "lastReadingAt": null, "lastTemperature": null,
    });
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn keys(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (org, b) = match admin_request(&app, &headers, &body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    // Unguessable enough for a local benchmark: a counter and the std hasher's random keys.
    let seq = app.key_seq.fetch_add(1, Ordering::Relaxed);
    let salt = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(seq)
    };
    let key = format!("sw_floor_{seq}_{salt:016x}");
    app.data.lock().expect("data").keys.insert(key.clone(), org);
    let answer =
        json!({ "id": seq.to_string(), "key": key, "scopes": ["ingest"], "name": b["name"] });
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn ingest(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let org = {
        let data = app.data.lock().expect("data");
        key.and_then(|k| data.keys.get(k).cloned())
    };
    let Some(org) = org else {
        return fail(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key");
    };
    let Ok(IngestBody { readings }) = serde_json::from_slice::<IngestBody>(&body) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "readings must be an array of readings",
        );
    };
    if readings.is_empty() {
        return fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "readings must be a non-empty array",
        );
    }
    // Normalised to millisecond UTC as sensorwire stores it; the whole request or nothing.
    let mut times = Vec::with_capacity(readings.len());
    for (i, r) in readings.iter().enumerate() {
        let Ok(t) = chrono::DateTime::parse_from_rfc3339(&r.recorded_at) else {
            return fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                &format!("readings[{i}].recordedAt: must be RFC 3339"),
            );
        };
        let t = t.to_utc();
        times.push((
            t.timestamp_millis(),
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ));
    }
    let mut data = app.data.lock().expect("data");
    let known = data.units.get(&org);
    if let Some(i) = readings
        .iter()
        .position(|r| !known.is_some_and(|u| u.contains(&r.unit_id)))
    {
        drop(data);
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            &format!("readings[{i}].unitId: unknown unit"),
        );
    }
    let mut ids = Vec::with_capacity(readings.len());
    let Data {
        buffers, next_id, ..
    } = &mut *data;
    let buffers = buffers.entry(org).or_default();
    for (r, (ms, at)) in readings.into_iter().zip(times) {
        *next_id += 1;
        let id = next_id.to_string();
        ids.push(id.clone());
        let reading = Reading {
            id,
            unit_id: r.unit_id.clone(),
            device_id: r.device_id.filter(|d| !d.is_empty()),
            temperature: r.temperature,
            humidity: r.humidity,
            battery: r.battery,
            signal_strength: r.signal_strength,
            recorded_at: at,
            source: r.source.unwrap_or_else(|| "api".into()),
            recorded_ms: ms,
        };
        buffers.entry(r.unit_id).or_default().push(reading);
    }
    drop(data);
    Json(json!({ "accepted": ids.len(), "duplicates": 0, "ids": ids })).into_response()
}

#[derive(Deserialize)]
struct WsQuery {
    token: String,
}

async fn ws(
    State(app): State<Arc<App>>,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(claims) = app.claims(&q.token) else {
        return fail(StatusCode::UNAUTHORIZED, "unauthorized", "bad token");
    };
    // Registered before the upgrade answer goes out: whatever is flushed after the client sees
    // 101 reaches it (queued until the socket task runs).
    let (tx, rx) = mpsc::channel(QUEUE);
    app.sockets
        .lock()
        .expect("sockets")
        .entry(claims.org_id)
        .or_default()
        .push(tx);
    upgrade
        .read_buffer_size(app.read_buffer)
        .write_buffer_size(app.write_buffer)
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| run_socket(socket, rx))
}

/// Writes what is queued (each burst fed then flushed once: one write per burst) and reads
/// only to notice a close (tungstenite answers pings by itself).
async fn run_socket(mut ws: WebSocket, mut rx: mpsc::Receiver<Utf8Bytes>) {
    loop {
        tokio::select! {
            frame = rx.recv() => {
                // None: the flusher dropped this socket (queue full).
                let Some(frame) = frame else { break };
                if ws.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
                while let Ok(frame) = rx.try_recv() {
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
            msg = ws.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = ws.close().await;
}

/// `"<ms>-<seq>"`, increasing, as sensorwire's offset clock.
fn next_offset(last: &mut (i64, u64)) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    *last = if now <= last.0 {
        (last.0, last.1 + 1)
    } else {
        (now, 0)
    };
    format!("{}-{}", last.0, last.1)
}

/// Every flush interval: each unit's window as batches, serialised once per batch, queued to
/// every socket of the organisation.
async fn flusher(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock = (0i64, 0u64);
    loop {
        tick.tick().await;
        let due = std::mem::take(&mut app.data.lock().expect("data").buffers);
        let mut frames: HashMap<String, Vec<Utf8Bytes>> = HashMap::new();
        for (org, units) in due {
            let out = frames.entry(org).or_default();
            for (unit, mut readings) in units {
                readings.sort_by_key(|r| r.recorded_ms);
                for chunk in readings.chunks(BATCH_MAX) {
                    let batch = Batch {
                        offset: next_offset(&mut clock),
                        unit_id: &unit,
                        readings: chunk,
                        count: chunk.len(),
                    };
                    let text = serde_json::to_string(&batch).expect("a batch serialises");
                    out.push(Utf8Bytes::from(text));
                    app.emitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut sockets = app.sockets.lock().expect("sockets");
        for (org, frames) in &frames {
            if let Some(list) = sockets.get_mut(org) {
                // A socket that cannot take the whole burst is dropped (its task ends once it
                // wrote what was queued).
                list.retain(|tx| frames.iter().all(|f| tx.try_send(f.clone()).is_ok()));
            }
        }
        sockets.retain(|_, list| {
            list.retain(|tx| !tx.is_closed());
            !list.is_empty()
        });
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = format!(
        "sensorwire_events_emitted_total{{event=\"sensor:readings:batch\"}} {}\n",
        app.emitted.load(Ordering::Relaxed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let host: String = env_or("HOST", "127.0.0.1".to_string());
    let port: u16 = env_or("PORT", 0);
    let flush_ms: u64 = env_or("FLUSH_INTERVAL_MS", 1000);
    let Ok(secret) = std::env::var("JWT_SECRET") else {
        eprintln!("sensorwire-ref-floor: JWT_SECRET is required");
        std::process::exit(2);
    };
    let app = Arc::new(App {
        key: DecodingKey::from_secret(secret.as_bytes()),
        validation: Validation::new(Algorithm::HS256),
        read_buffer: env_or("WS_READ_BUFFER_SIZE", 1024),
        write_buffer: env_or("WS_WRITE_BUFFER_SIZE", 64 * 1024),
        data: Mutex::new(Data::default()),
        sockets: Mutex::new(HashMap::new()),
        emitted: AtomicU64::new(0),
        key_seq: AtomicU64::new(0),
    });
    tokio::spawn(flusher(app.clone(), Duration::from_millis(flush_ms.max(1))));
    let router = Router::new()
        .route("/api/sites", post(sites))
        .route("/api/units", post(units))
        .route("/api/keys", post(keys))
        .route("/api/readings/ingest", post(ingest))
        .route("/ws", get(ws))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app);
    let listener = match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sensorwire-ref-floor: bind {host}:{port}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("bound");
    println!("sensorwire-ref-floor listening on http://{addr}");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, router).await {
        eprintln!("sensorwire-ref-floor: {e}");
        std::process::exit(1);
    }
}
