//! Socket.io on namespace `/`: the authenticating connect middleware, the rooms a socket joins,
//! the client events, and the end of a socket whose token runs out.
//!
//! A socket is admitted only with a valid token (from `auth.token`, an `Authorization: Bearer`
//! header, or — when the operator allows it — the `token` query parameter); the refusal reaches
//! the client as `connect_error` with the contract's message. Once in, it joins its organisation
//! and user rooms ([`rooms::membership`]) and its [`Session`] lives in the socket's extensions.

pub mod expiry;
mod handlers;
mod reply;
pub mod request_head;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;
use socketioxide::{SocketIo, SocketIoBuilder};

pub use crate::session::Session;

use crate::auth::{AuthError, JwtVerifier};
use crate::config::{Config, Limits};
use crate::deliver::{emitter, feed, history, offset};
use crate::rooms;
use crate::session;
use crate::store::Store;

/// What the socket handlers share (registered as socketioxide state).
#[derive(Clone)]
pub struct Ctx {
    pub store: Store,
    pub jwt: Arc<JwtVerifier>,
    pub limits: Arc<Limits>,
    pub allow_token_in_query: bool,
    /// Replays for reconnecting sockets and `sync` go to the emitter.
    pub commands: tokio::sync::mpsc::Sender<emitter::Command>,
    /// Ends sockets whose token runs out.
    pub expiry: Arc<expiry::Expiry>,
    /// What this node follows in Redis, with several nodes (`deliver::feed`).
    pub follows: feed::Follows,
}

/// The first read buffer of a WebSocket connection.
const WS_READ_BUFFER: usize = 1024;

/// The Socket.io builder with our limits and state; the caller picks the adapter.
pub fn builder(config: &Config, ctx: Ctx) -> SocketIoBuilder {
    let l = &config.limits;
    SocketIo::builder()
        .max_buffer_size(l.socket_buffer_size)
        // Clients send small packets (pongs, subscriptions); 1 KiB instead of tungstenite's 4
        // KiB per idle socket, and a larger message still arrives whole (the buffer grows).
        .ws_read_buffer_size(WS_READ_BUFFER)
        // One limit for a client's packets, whatever the transport: a long-polling POST body,
        // a WebSocket message (and frame).
        .max_payload(l.socket_max_payload)
        .ws_max_message_size(l.socket_max_payload as usize)
        .ws_max_frame_size(l.socket_max_payload as usize)
        .connect_timeout(Duration::from_secs(l.handshake_timeout_secs))
        .ping_interval(Duration::from_millis(l.socket_ping_interval_ms))
        .ping_timeout(Duration::from_millis(l.socket_ping_timeout_ms))
        .with_state(ctx)
}

/// The token a client presented, in the order the contract gives.
fn presented_token<A: Adapter>(
    s: &SocketRef<A>,
    auth: &Option<Value>,
    allow_query: bool,
) -> Option<String> {
    if let Some(Value::String(t)) = auth.as_ref().and_then(|a| a.get("token"))
        && !t.is_empty()
    {
        return Some(t.clone());
    }
    let parts = s.req_parts();
    if let Some(t) = crate::auth::bearer(&parts.headers) {
        return Some(t.to_string());
    }
    if allow_query {
        let query = parts.uri.query().unwrap_or_default();
        return query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .filter(|t| !t.is_empty())
            .map(str::to_string);
    }
    None
}

/// Why a handshake was refused; `Display` is the `connect_error` message the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ConnectRefused {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("rate_limited: too many connections for this user")]
    TooManyConnections,
}

/// Connect middleware: verify the token or refuse with the contract's `connect_error` message.
pub async fn authenticate<A: Adapter>(
    s: SocketRef<A>,
    TryData(auth): TryData<Value>,
    State(ctx): State<Ctx>,
) -> Result<(), ConnectRefused> {
    let auth = auth.ok();
    let token = presented_token(&s, &auth, ctx.allow_token_in_query).ok_or(AuthError::Missing);
    let claims = token.and_then(|t| ctx.jwt.verify(&t)).inspect_err(|e| {
        tracing::info!(sid = %s.id, reason = %e, "connection refused");
        crate::observe::socket_refused(match e {
            AuthError::Missing => "missing_token",
            AuthError::Invalid => "invalid_token",
            AuthError::Expired => "token_expired",
        });
    })?;
    let tabs = s
        .within(rooms::user(&claims.org_id, &claims.sub))
        .local()
        .sockets()
        .len();
    if tabs >= ctx.limits.max_connections_per_user {
        tracing::info!(sid = %s.id, "connection refused: too many connections for one user");
        crate::observe::socket_refused("too_many_connections");
        return Err(ConnectRefused::TooManyConnections);
    }
    // With several nodes, this node follows the organisation's events before the socket joins
    // its rooms: every event after the handshake reaches it.
    let following = ctx.follows.org(&claims.org_id).await;
    s.extensions
        .insert(Arc::new(feed::SocketFollows::new(following)));
    let session = Session::new(claims, &ctx.limits, s.transport_type());
    // Rooms and listeners are set up here, before the handshake completes: the connect handler
    // runs as a separate task after the client is told it is connected, and a dashboard that
    // emits in its `connect` callback must never find nobody listening.
    // A client that brings an offset joins its organisation rooms only after its replay (the
    // emitter does it), and its events wait for the replay: the first turn is the replay's.
    match auth.as_ref().and_then(|a| a.get("offset")) {
        None | Some(Value::Null) => s.join(rooms::membership(&session.claims())),
        Some(offset) => {
            let after = offset.as_str().and_then(|o| o.parse().ok());
            let turn = session::Turn::take(session.clone());
            s.extensions
                .insert(PendingReplay(Arc::new(std::sync::Mutex::new(Some((
                    after, turn,
                ))))));
        }
    }
    use handlers::Target;
    for (target, subscribe, unsubscribe) in [
        (Target::Site, "subscribe:site", "unsubscribe:site"),
        (Target::Unit, "subscribe:unit", "unsubscribe:unit"),
    ] {
        s.on(
            subscribe,
            move |s: SocketRef<A>,
                  TryData(data): TryData<Value>,
                  turn: session::Turn,
                  State(ctx): State<Ctx>,
                  reply: reply::Reply<A>| {
                handlers::subscribe(s, data, turn, ctx, reply, target)
            },
        );
        s.on(
            unsubscribe,
            move |s: SocketRef<A>,
                  TryData(data): TryData<Value>,
                  turn: session::Turn,
                  reply: reply::Reply<A>| {
                handlers::unsubscribe(s, data, turn, reply, target)
            },
        );
    }
    s.on("get:latest", handlers::get_latest::<A>);
    s.on("auth:refresh", handlers::auth_refresh::<A>);
    s.on("sync", handlers::sync::<A>);
    s.on_fallback(handlers::unknown_event::<A>);
    s.on_disconnect(on_disconnect::<A>);
    s.extensions.insert(session);
    Ok(())
}

/// The offset a client connected with, and its first turn, until the connect handler hands
/// them to the emitter.
#[derive(Clone)]
struct PendingReplay(Arc<std::sync::Mutex<Option<Replaying>>>);

/// The offset (`None` when the client sent something else) and the socket's first turn.
type Replaying = (Option<offset::Offset>, session::Turn);

/// A socket that passed [`authenticate`]: start its replay if it asked for one (now that the
/// client knows it is connected), and watch for its token to run out.
pub async fn on_connect<A: Adapter>(
    s: SocketRef<A>,
    Extension(session): Extension<Arc<Session>>,
    State(ctx): State<Ctx>,
) {
    let claims = session.claims();
    tracing::info!(sid = %s.id, org = %claims.org_id, transport = ?s.transport_type(), "socket connected");
    crate::observe::socket_connected(transport_label(s.transport_type()));
    let pending = s
        .extensions
        .remove::<PendingReplay>()
        .and_then(|p| p.0.lock().unwrap().take());
    if let Some((after, turn)) = pending {
        let command = emitter::Command::Recover {
            sid: s.id,
            org: claims.org_id.clone(),
            membership: rooms::membership(&claims),
            since: after.map(history::Since::After),
            turn: Some(turn),
            cause: emitter::Cause::Reconnect,
        };
        if ctx.commands.send(command).await.is_err() {
            tracing::debug!(sid = %s.id, "shutting down; no replay");
        }
    }
    ctx.expiry.watch(claims.deadline(), s.id);
}

async fn on_disconnect<A: Adapter>(
    s: SocketRef<A>,
    Extension(session): Extension<Arc<Session>>,
    State(ctx): State<Ctx>,
    reason: DisconnectReason,
) {
    ctx.expiry.forget(s.id);
    // Unfollows what only this socket needed.
    s.extensions.remove::<Arc<feed::SocketFollows>>();
    crate::observe::socket_disconnected(transport_label(session.transport()));
    tracing::info!(sid = %s.id, ?reason, "socket disconnected");
}

fn transport_label(t: socketioxide::TransportType) -> &'static str {
    match t {
        socketioxide::TransportType::Websocket => "websocket",
        socketioxide::TransportType::Polling => "polling",
    }
}
