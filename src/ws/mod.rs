//! The plain WebSocket protocol, `GET /api/v2/ws?token=<JWT>`, for clients without socket.io.
//!
//! JSON text frames both ways (the message types are in `wire.rs`). A bad, missing or expired
//! token closes the connection with 4001 — also when a live connection's token runs out — and a
//! valid token that may see nothing (an empty `site_ids`) with 4003. Unknown or malformed
//! requests get an `error` message and the connection stays open. The server pings every 25 s
//! and drops a peer that has not answered for 60 s.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::auth::jwt::now_secs;
use crate::auth::{JwtVerifier, UserClaims, valid_id};
use crate::deliver::relay::{Delivery, Relay, Topic};
use crate::store::unit_cache::Units;
use crate::wire::{TelemetryData, TelemetryMetrics, WsChannel, WsClientMessage, WsServerMessage};

const PING_EVERY: Duration = Duration::from_secs(25);
const DEAD_AFTER: Duration = Duration::from_secs(60);

/// What a plain WebSocket connection needs of the gateway.
#[derive(Clone)]
pub struct AppState {
    pub jwt: Arc<JwtVerifier>,
    /// Telemetry and alerts of the connection's organisation, from every node.
    pub relay: Relay,
    /// Whether a unit exists and which site holds it, for `subscribe` checks.
    pub units: Arc<Units>,
    /// Per-connection cap on subscriptions (`MAX_ROOMS_PER_SOCKET`).
    pub max_rooms: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v2/ws", get(upgrade))
        .with_state(state)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    q: Result<Query<TokenQuery>, QueryRejection>,
    State(app): State<AppState>,
) -> Response {
    // A request that is not a WebSocket handshake gets the contract's error shape, like every
    // other error under /api, instead of axum's plain-text rejection.
    let (ws, Query(q)) = match (ws, q) {
        (Ok(ws), Ok(q)) => (ws, q),
        (Err(e), _) => return refused(e.status(), e.body_text()),
        (_, Err(e)) => return refused(e.status(), e.body_text()),
    };
    let verified = app.jwt.verify(q.token.as_deref().unwrap_or_default());
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            match verified {
                Err(e) => close(socket, 4001, &e.to_string()).await,
                Ok(c) if c.site_ids.as_ref().is_some_and(Vec::is_empty) => {
                    close(socket, 4003, "forbidden: the token grants no site").await
                }
                Ok(claims) => Connection::new(app, claims).run(socket).await,
            }
        })
}

/// An HTTP error before the upgrade, as `{ error, message }`.
fn refused(status: StatusCode, message: String) -> Response {
    let error = if status == StatusCode::METHOD_NOT_ALLOWED {
        "method_not_allowed"
    } else {
        "bad_request"
    };
    (status, Json(json!({ "error": error, "message": message }))).into_response()
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    };
    socket.send(Message::Close(Some(frame))).await.ok();
}

struct Connection {
    app: AppState,
    claims: UserClaims,
    /// This connection's id in the relay, which queues for it only what it subscribed to.
    id: u64,
    alerts: bool,
    devices: HashSet<String>,
    units: HashSet<String>,
}

impl Connection {
    fn new(app: AppState, claims: UserClaims) -> Self {
        Connection {
            app,
            claims,
            id: 0,
            alerts: false,
            devices: HashSet::new(),
            units: HashSet::new(),
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        let org = self.claims.org_id.clone();
        let (id, mut deliveries) = self.app.relay.register(&org, self.claims.site_ids.clone());
        self.id = id;
        let deadline = tokio::time::sleep(Duration::from_secs(
            (self.claims.deadline() - now_secs() + 1).max(0) as u64,
        ));
        tokio::pin!(deadline);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        tracing::info!(org = %org, "plain websocket connected");
        crate::observe::plain_ws(1.0);
        let close_code = loop {
            let outgoing: Vec<WsServerMessage> = tokio::select! {
                frame = rx.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        last_heard = Instant::now();
                        self.handle(&text).await
                    }
                    Some(Ok(Message::Binary(_))) => {
                        vec![error("binary frames are not supported; send JSON text")]
                    }
                    Some(Ok(Message::Pong(_) | Message::Ping(_))) => {
                        last_heard = Instant::now();
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                },
                delivery = deliveries.recv() => match delivery {
                    Some(d) => self.deliveries(&d),
                    // Dropped by the relay: this client did not keep up with what it subscribed to.
                    None => break Some((1013, "too slow: reconnect")),
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > DEAD_AFTER {
                        break None;
                    }
                    if tx.send(Message::Ping(Default::default())).await.is_err() {
                        break None;
                    }
                    continue;
                }
                _ = &mut deadline => break Some((4001, "unauthorized: token expired")),
            };
            let mut failed = false;
            for msg in outgoing {
                let Ok(text) = serde_json::to_string(&msg) else {
                    continue;
                };
                if tx.send(Message::Text(text.into())).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed {
                break None;
            }
        };
        self.app.relay.unregister(&org, id);
        crate::observe::plain_ws(-1.0);
        if let Some((code, reason)) = close_code {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            tx.send(Message::Close(Some(frame))).await.ok();
        }
        tracing::info!(org = %org, "plain websocket closed");
    }

    /// What a delivery means for this connection's subscriptions. The relay only queues what the
    /// connection subscribed to; checking again here keeps a delivery queued just before an
    /// unsubscribe from arriving after its `unsubscribed`.
    fn deliveries(&self, d: &Delivery) -> Vec<WsServerMessage> {
        match d {
            Delivery::Alerts(all) if self.alerts => vec![self.visible_alerts(all)],
            Delivery::Alerts(_) => vec![],
            Delivery::Reading { site_id, reading } => {
                let wanted = self.units.contains(&reading.unit_id)
                    || reading
                        .device_id
                        .as_ref()
                        .is_some_and(|d| self.devices.contains(d));
                if wanted && self.claims.can_see_site(site_id) {
                    vec![WsServerMessage::Telemetry {
                        device_id: reading.device_id.clone(),
                        unit_id: reading.unit_id.clone(),
                        data: TelemetryData {
                            timestamp: reading.recorded_at.clone(),
                            metrics: TelemetryMetrics {
                                temperature: reading.temperature,
                                humidity: reading.humidity,
                                battery: reading.battery,
                                signal_strength: reading.signal_strength,
                            },
                        },
                    }]
                } else {
                    vec![]
                }
            }
        }
    }

    fn visible_alerts(&self, all: &[crate::wire::Alert]) -> WsServerMessage {
        WsServerMessage::Alerts {
            alerts: all
                .iter()
                .filter(|a| self.claims.can_see_site(&a.site_id))
                .cloned()
                .collect(),
        }
    }

    async fn handle(&mut self, text: &str) -> Vec<WsServerMessage> {
        let msg: WsClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return vec![error(&format!("malformed message: {e}"))],
        };
        if msg.kind == "ping" && msg.action.is_none() {
            return vec![WsServerMessage::Pong];
        }
        let subscribe = match msg.action.as_deref() {
            Some("subscribe") => true,
            Some("unsubscribe") => false,
            Some(other) => return vec![error(&format!("unknown action {other:?}"))],
            None => return vec![error("missing \"action\" (subscribe or unsubscribe)")],
        };
        let cap = self.app.max_rooms;
        let org = self.claims.org_id.as_str();
        match msg.kind.as_str() {
            "alerts" => {
                self.alerts = subscribe;
                let confirm = confirmation(subscribe, WsChannel::Alerts, None, None);
                if !subscribe {
                    self.app.relay.unsubscribe(org, self.id, &Topic::Alerts);
                    return vec![confirm];
                }
                // Registered before the list is read: a change meanwhile is pushed afterwards.
                self.app.relay.subscribe(org, self.id, Topic::Alerts).await;
                match self.app.relay.open_alerts(org).await {
                    Ok(all) => vec![confirm, self.visible_alerts(&all)],
                    Err(_) => vec![confirm, error("alerts are unavailable right now")],
                }
            }
            "device" => {
                let Some(device) = msg.device_id.filter(|d| !d.is_empty() && d.len() <= 128) else {
                    return vec![error("\"device_id\" must be 1-128 characters")];
                };
                if subscribe {
                    if self.devices.len() + self.units.len() >= cap
                        && !self.devices.contains(&device)
                    {
                        return vec![error("too many subscriptions")];
                    }
                    self.devices.insert(device.clone());
                    let topic = Topic::Device(device.clone());
                    self.app.relay.subscribe(org, self.id, topic).await;
                } else {
                    self.devices.remove(&device);
                    let topic = Topic::Device(device.clone());
                    self.app.relay.unsubscribe(org, self.id, &topic);
                }
                vec![confirmation(
                    subscribe,
                    WsChannel::Device,
                    Some(device),
                    None,
                )]
            }
            "unit" => {
                let Some(unit) = msg.unit_id.filter(|u| valid_id(u)) else {
                    return vec![error("\"unit_id\" must be a unit id")];
                };
                if subscribe {
                    let visible = match self.app.units.get(org, &unit).await {
                        Ok(Some(info)) => self.claims.can_see_site(&info.site_id),
                        Ok(None) => false,
                        Err(_) => return vec![error("storage unavailable, retry later")],
                    };
                    if !visible {
                        return vec![error(&format!("forbidden: unit {unit:?}"))];
                    }
                    if self.devices.len() + self.units.len() >= cap && !self.units.contains(&unit) {
                        return vec![error("too many subscriptions")];
                    }
                    self.units.insert(unit.clone());
                    let topic = Topic::Unit(unit.clone());
                    self.app.relay.subscribe(org, self.id, topic).await;
                } else {
                    self.units.remove(&unit);
                    self.app
                        .relay
                        .unsubscribe(org, self.id, &Topic::Unit(unit.clone()));
                }
                vec![confirmation(subscribe, WsChannel::Unit, None, Some(unit))]
            }
            other => vec![error(&format!("unknown type {other:?}"))],
        }
    }
}

fn confirmation(
    subscribe: bool,
    channel: WsChannel,
    device_id: Option<String>,
    unit_id: Option<String>,
) -> WsServerMessage {
    if subscribe {
        WsServerMessage::Subscribed {
            channel,
            device_id,
            unit_id,
        }
    } else {
        WsServerMessage::Unsubscribed {
            channel,
            device_id,
            unit_id,
        }
    }
}

fn error(message: &str) -> WsServerMessage {
    WsServerMessage::Error {
        message: message.to_string(),
    }
}
