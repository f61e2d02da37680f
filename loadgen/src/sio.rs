//! A lean Socket.io v4 client over WebSocket: one small task per connection, no browser, no
//! Socket.io library. It speaks just what a dashboard needs: the Engine.IO `OPEN` packet, the
//! namespace `CONNECT` with `{ token }`, heartbeats (`2` → `3`), and `EVENT` packets
//! (`42["name", payload]`), of which it decodes only `sensor:readings:batch`.
//!
//! With [`Protocol::Raw`] (the minimal Rust floor, `bench/ref-floor`) it is a plain WebSocket
//! client instead: `GET /ws?token=<jwt>`, connected once the upgrade succeeds, every text frame
//! one batch JSON object. Both protocols share the batch accounting ([`on_batch`]).
//!
//! Per connection it keeps a delivery count and a sum of hashed reading ids (see
//! [`crate::stats::id_hash`]): with the set of readings posted to the organisation that is enough
//! to tell "every reading exactly once" from "missing some" or "some twice", in 16 bytes instead
//! of a set of ids. Latencies go to the shared histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::stats::{Histogram, id_hash};
use crate::time::{now_ms, parse_ms};

const BATCH_PREFIX: &str = "42[\"sensor:readings:batch\",";

/// Counters every connection updates.
pub struct Shared {
    pub latency: Histogram,
    pub deliveries: AtomicU64,
    pub batch_events: AtomicU64,
    pub other_events: AtomicU64,
    /// Batch payloads that did not parse, or whose `count` is not `readings.length`.
    pub bad_events: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub lost: AtomicU64,
    /// Deliveries before this is set (there should be none) are counted but not timed.
    pub timing: AtomicBool,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Shared {
            latency: Histogram::new(),
            deliveries: AtomicU64::new(0),
            batch_events: AtomicU64::new(0),
            other_events: AtomicU64::new(0),
            bad_events: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            timing: AtomicBool::new(false),
        })
    }
}

/// What one connection saw, returned when it ends.
#[derive(Debug, Default)]
pub struct Outcome {
    pub org: u32,
    pub node: u16,
    pub connected: bool,
    pub connect_error: Option<String>,
    /// Why the connection ended before it was told to stop.
    pub lost: Option<String>,
    pub received: u64,
    pub id_hash_sum: u64,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    readings: Vec<Reading<'a>>,
    count: usize,
}

#[derive(Deserialize)]
struct Reading<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(rename = "recordedAt", borrow)]
    recorded_at: &'a str,
}

type Ws = WebSocketStream<TcpStream>;

/// What the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Engine.IO v4 / Socket.io v4 over WebSocket (sensorwire, the Node reference).
    Socketio,
    /// A plain WebSocket at `/ws?token=`, one batch JSON object per text frame (the floor).
    Raw,
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of connections per process; batches are a few KiB.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// Opens the WebSocket: the Socket.io transport (then the namespace handshake), or the raw
/// `/ws` endpoint with the token in the query (connected once upgraded).
async fn handshake(addr: &str, token: &str, protocol: Protocol) -> Result<Ws, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("tcp: {}", e.kind()))?;
    tcp.set_nodelay(true).ok();
    let url = match protocol {
        Protocol::Socketio => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        // A JWT is base64url and dots: nothing to escape in a query.
        Protocol::Raw => format!("ws://{addr}/ws?token={token}"),
    };
    let (mut ws, _) = client_async_with_config(url, tcp, Some(ws_config()))
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    if protocol == Protocol::Raw {
        return Ok(ws);
    }
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
        other => return Err(format!("no engine.io open packet: {other:?}")),
    }
    ws.send(Message::text(format!("40{{\"token\":\"{token}\"}}")))
        .await
        .map_err(|e| format!("send connect: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if t.starts_with("40") {
                    return Ok(ws);
                } else if let Some(err) = t.strip_prefix("44") {
                    // {"message":"unauthorized: ..."}: keep the message, not the JSON.
                    let msg = serde_json::from_str::<serde_json::Value>(err)
                        .ok()
                        .and_then(|v| v.get("message")?.as_str().map(str::to_string))
                        .unwrap_or_else(|| err.to_string());
                    return Err(format!("connect_error: {msg}"));
                } else if t.as_str() == "2" {
                    ws.send(Message::text("3"))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("handshake: {e}")),
            None => return Err("closed during handshake".into()),
        }
    }
}

/// One dashboard: connects (holding a `gate` permit only while connecting, so at most that many
/// handshakes run at once), then receives until `stop` turns true or the server drops it.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    addr: Arc<str>,
    protocol: Protocol,
    token: String,
    org: u32,
    node: u16,
    gate: Arc<Semaphore>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut out = Outcome {
        org,
        node,
        ..Outcome::default()
    };
    let connecting = async {
        let _permit = gate.acquire().await;
        tokio::time::timeout(Duration::from_secs(30), handshake(&addr, &token, protocol)).await
    };
    let mut ws = tokio::select! {
        r = connecting => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                out.connect_error = Some(e);
                return out;
            }
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                out.connect_error = Some("handshake timed out".into());
                return out;
            }
        },
        _ = stop.changed() => return out,
    };
    drop(token);
    out.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if protocol == Protocol::Raw {
                        on_batch(&t, &shared, &mut out);
                    } else if let Some(event) = t.strip_prefix(BATCH_PREFIX) {
                        // 42["sensor:readings:batch",{...}]: the payload without the `]`.
                        match event.strip_suffix(']') {
                            Some(body) => on_batch(body, &shared, &mut out),
                            None => {
                                shared.batch_events.fetch_add(1, Ordering::Relaxed);
                                shared.bad_events.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if t.as_str() == "2" {
                        if let Err(e) = ws.send(Message::text("3")).await {
                            out.lost = Some(format!("pong: {e}"));
                            break;
                        }
                    } else if t.starts_with("41") {
                        out.lost = Some("server disconnect".into());
                        break;
                    } else {
                        shared.other_events.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    out.lost = Some(format!("closed: {frame:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.lost = Some(format!("error: {e}"));
                    break;
                }
                None => {
                    out.lost = Some("closed".into());
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    if out.lost.is_some() {
        shared.lost.fetch_add(1, Ordering::Relaxed);
    }
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    // Best effort, without waiting for the server's answer.
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    out
}

/// One `ReadingsBatch` JSON object, whatever carried it: counts its readings and their id
/// hashes for this client, and times them from `recordedAt`.
fn on_batch(body: &str, shared: &Shared, out: &mut Outcome) {
    shared.batch_events.fetch_add(1, Ordering::Relaxed);
    let batch: Batch = match serde_json::from_str(body) {
        Ok(b) => b,
        Err(_) => {
            shared.bad_events.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if batch.count != batch.readings.len() {
        shared.bad_events.fetch_add(1, Ordering::Relaxed);
    }
    let now = now_ms();
    let timing = shared.timing.load(Ordering::Relaxed);
    for r in &batch.readings {
        out.received += 1;
        out.id_hash_sum = out.id_hash_sum.wrapping_add(id_hash(r.id));
        if timing && let Some(at) = parse_ms(r.recorded_at) {
            shared.latency.record(now - at);
        }
    }
    shared
        .deliveries
        .fetch_add(batch.readings.len() as u64, Ordering::Relaxed);
}
