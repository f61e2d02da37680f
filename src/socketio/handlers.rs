//! Client → server events: subscriptions, `get:latest`, `auth:refresh`, `sync`.
//!
//! Every handler is generic over the adapter, so one code path serves a single node and a
//! cluster. Each event passes the socket's rate limiter as it arrives, before it waits for its
//! [`Turn`]. Arguments are taken as raw JSON and checked here, so a wrong type gets the
//! contract's `not_found` instead of silence. Each handler opens the same way (wait for the
//! turn, then act on the verdict taken on arrival); that stays inline in each, because each
//! answers a refusal in its own ack shape.

use std::sync::Arc;

use serde_json::Value;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{SocketRef, State, TryData};

use super::Ctx;
use super::reply::Reply;
use crate::auth::{UserClaims, valid_id};
use crate::deliver::emitter::Command;
use crate::deliver::feed::SocketFollows;
use crate::rate_limit::Verdict;
use crate::rooms;
use crate::session::{Session, Turn};
use crate::store::StoreError;
use crate::wire::{RefreshAck, SensorReading, SubscribeAck, SyncAck};

/// Why a subscription or lookup was refused; the ack's `error`.
use crate::wire::SubscribeError as Refusal;

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::RateLimited => "rate_limited",
            Refusal::Unavailable => "unavailable",
        }
    }

    fn message(self) -> String {
        match self {
            Refusal::Forbidden => "not allowed to subscribe to that".into(),
            Refusal::NotFound => "malformed id".into(),
            Refusal::RateLimited => "too many requests or subscriptions".into(),
            Refusal::Unavailable => "storage unavailable, retry later".into(),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "subscription lookup failed");
        Refusal::Unavailable
    }
}

/// Whether the rate limiter let the event through (decided when its [`Turn`] was taken);
/// `false` means it was refused (and, when the client keeps at it, the socket is already being
/// disconnected).
fn admit<A: Adapter>(s: &SocketRef<A>, turn: &Turn) -> bool {
    match turn.verdict() {
        Verdict::Allow => true,
        Verdict::Refuse => {
            crate::observe::event_refused();
            false
        }
        Verdict::Disconnect => {
            tracing::info!(sid = %s.id, "socket disconnected for flooding events");
            s.clone().disconnect().ok();
            false
        }
    }
}

fn ack_result<A: Adapter>(reply: Reply<A>, result: Result<(), Refusal>) {
    match result {
        Ok(()) => reply.send(
            &SubscribeAck {
                ok: true,
                error: None,
            },
            None,
        ),
        Err(r) => reply.send(
            &SubscribeAck {
                ok: false,
                error: Some(r),
            },
            Some((r.code(), r.message())),
        ),
    }
}

/// The id argument, if it is a well-formed id.
fn id_arg(data: Result<Value, impl std::fmt::Debug>) -> Result<String, Refusal> {
    match data {
        Ok(Value::String(id)) if valid_id(&id) => Ok(id),
        _ => Err(Refusal::NotFound),
    }
}

/// The site of a unit the caller may see. Unknown, foreign and out-of-scope units look alike.
async fn visible_unit_site(ctx: &Ctx, claims: &UserClaims, unit: &str) -> Result<String, Refusal> {
    match ctx.store.unit_site(&claims.org_id, unit).await? {
        Some(site) if claims.can_see_site(&site) => Ok(site),
        _ => Err(Refusal::Forbidden),
    }
}

async fn visible_site(ctx: &Ctx, claims: &UserClaims, site: &str) -> Result<(), Refusal> {
    if !claims.can_see_site(site) {
        return Err(Refusal::Forbidden);
    }
    match ctx.store.get_site(&claims.org_id, site).await? {
        Some(_) => Ok(()),
        None => Err(Refusal::Forbidden),
    }
}

fn join_capped<A: Adapter>(
    s: &SocketRef<A>,
    session: &Session,
    ctx: &Ctx,
    room: String,
) -> Result<(), Refusal> {
    if !session.add_subscription(&room, ctx.limits.max_rooms_per_socket) {
        return Err(Refusal::RateLimited);
    }
    s.join(room);
    Ok(())
}

/// What a `subscribe:*` / `unsubscribe:*` event names: the one word in which the site and unit
/// events differ, so each pair is one handler (registered twice in `socketio::authenticate`).
#[derive(Clone, Copy)]
pub(super) enum Target {
    Site,
    Unit,
}

impl Target {
    fn room(self, org: &str, id: &str) -> String {
        match self {
            Target::Site => rooms::site(org, id),
            Target::Unit => rooms::unit(org, id),
        }
    }
}

/// `subscribe:site` / `subscribe:unit`: joins a site or unit room the caller may see, within the
/// per-socket cap.
pub(super) async fn subscribe<A: Adapter>(
    s: SocketRef<A>,
    data: Result<Value, impl std::fmt::Debug>,
    turn: Turn,
    ctx: Ctx,
    reply: Reply<A>,
    target: Target,
) {
    turn.wait().await;
    let session = turn.session().clone();
    let result = async {
        if !admit(&s, &turn) {
            return Err(Refusal::RateLimited);
        }
        let id = id_arg(data)?;
        let claims = session.claims();
        let room = target.room(&claims.org_id, &id);
        let site = match target {
            Target::Site => visible_site(&ctx, &claims, &id).await.map(|()| id)?,
            Target::Unit => visible_unit_site(&ctx, &claims, &id).await?,
        };
        // With several nodes, this node follows the site's live readings before the client is
        // told it is subscribed: from the acknowledgement on, readings posted anywhere reach it.
        let following = ctx.follows.live(&claims.org_id, &site).await;
        join_capped(&s, &session, &ctx, room.clone())?;
        if let Some(follows) = s.extensions.get::<Arc<SocketFollows>>() {
            follows.add_live(room, following);
        }
        Ok(())
    }
    .await;
    ack_result(reply, result);
}

/// `unsubscribe:site` / `unsubscribe:unit`: leaves a site or unit room. Leaving something never
/// joined is fine.
pub(super) async fn unsubscribe<A: Adapter>(
    s: SocketRef<A>,
    data: Result<Value, impl std::fmt::Debug>,
    turn: Turn,
    reply: Reply<A>,
    target: Target,
) {
    turn.wait().await;
    let session = turn.session();
    let result = (|| {
        if !admit(&s, &turn) {
            return Err(Refusal::RateLimited);
        }
        let id = id_arg(data)?;
        let room = target.room(&session.claims().org_id, &id);
        session.remove_subscription(&room);
        unfollow_live(&s, &room);
        s.leave(room);
        Ok(())
    })();
    ack_result(reply, result);
}

/// `get:latest`: the unit's newest reading, or `null` (also for a unit the caller cannot see).
pub async fn get_latest<A: Adapter>(
    s: SocketRef<A>,
    TryData(data): TryData<Value>,
    turn: Turn,
    State(ctx): State<Ctx>,
    reply: Reply<A>,
) {
    turn.wait().await;
    let session = turn.session().clone();
    let result: Result<Option<SensorReading>, Refusal> = async {
        if !admit(&s, &turn) {
            return Err(Refusal::RateLimited);
        }
        let unit = id_arg(data)?;
        let claims = session.claims();
        if visible_unit_site(&ctx, &claims, &unit).await.is_err() {
            return Ok(None);
        }
        let latest = ctx.store.latest_reading(&claims.org_id, &unit).await?;
        Ok(latest.map(SensorReading::from))
    }
    .await;
    match result {
        Ok(latest) => reply.send(&latest, None),
        Err(Refusal::NotFound) => reply.send(&None::<SensorReading>, None),
        Err(r) => reply.send(&None::<SensorReading>, Some((r.code(), r.message()))),
    }
}

/// `auth:refresh`: swaps in a fresh token for the same user and organisation, extending the
/// socket's life without a reconnect.
pub async fn auth_refresh<A: Adapter>(
    s: SocketRef<A>,
    TryData(data): TryData<Value>,
    turn: Turn,
    State(ctx): State<Ctx>,
    reply: Reply<A>,
) {
    turn.wait().await;
    let session = turn.session().clone();
    let refused = |error: &str| RefreshAck {
        ok: false,
        exp: None,
        error: Some(error.into()),
    };
    if !admit(&s, &turn) {
        let code = Refusal::RateLimited.code();
        return reply.send(&refused(code), Some((code, Refusal::RateLimited.message())));
    }
    let token = match &data {
        Ok(Value::String(t)) => t.as_str(),
        _ => "",
    };
    let fresh = match ctx.jwt.verify(token) {
        Ok(c) => c,
        Err(e) => return reply.send(&refused(e.code()), Some((e.code(), e.to_string()))),
    };
    let current = session.claims();
    if fresh.sub != current.sub || fresh.org_id != current.org_id {
        let msg = "the new token is for another user or organisation".to_string();
        return reply.send(&refused("forbidden"), Some(("forbidden", msg)));
    }
    // A change of `site_ids` changes which org-room events the socket may see. The new rooms
    // are joined before the old ones are left, so no event sent meanwhile is missed (a socket
    // in two rooms of one broadcast gets it once).
    let old_rooms = rooms::membership(&current);
    let new_rooms = rooms::membership(&fresh);
    if old_rooms != new_rooms {
        let gone: Vec<String> = old_rooms
            .into_iter()
            .filter(|r| !new_rooms.contains(r))
            .collect();
        s.join(new_rooms);
        if !gone.is_empty() {
            s.leave(gone);
        }
    }
    if fresh.site_ids.is_some() && fresh.site_ids != current.site_ids {
        drop_unseen_subscriptions(&s, &session, &ctx, &fresh).await;
    }
    let exp = fresh.exp;
    let deadline = fresh.deadline();
    session.set_claims(fresh);
    ctx.expiry.watch(deadline, s.id);
    tracing::debug!(sid = %s.id, exp, "token refreshed");
    reply.send(
        &RefreshAck {
            ok: true,
            exp: Some(exp),
            error: None,
        },
        None,
    );
}

/// Leaves the site and unit rooms a narrower token may not see. A unit whose site cannot be
/// read (gone, or storage unavailable) is left too: a refresh never widens what a socket sees.
async fn drop_unseen_subscriptions<A: Adapter>(
    s: &SocketRef<A>,
    session: &Session,
    ctx: &Ctx,
    fresh: &UserClaims,
) {
    for room in session.subscriptions() {
        let visible = match rooms::subscribed(&room) {
            Some(rooms::Subscribed::Site(site)) => fresh.can_see_site(site),
            Some(rooms::Subscribed::Unit(unit)) => {
                matches!(ctx.store.unit_site(&fresh.org_id, unit).await,
                    Ok(Some(site)) if fresh.can_see_site(&site))
            }
            None => true,
        };
        if !visible {
            session.remove_subscription(&room);
            unfollow_live(s, &room);
            s.leave(room);
        }
    }
}

/// This socket no longer needs the live readings of `room`'s site (`deliver::feed`).
fn unfollow_live<A: Adapter>(s: &SocketRef<A>, room: &str) {
    if let Some(follows) = s.extensions.get::<Arc<SocketFollows>>() {
        follows.remove_live(room);
    }
}

/// Any other event: counted against the rate limit (so floods of junk get disconnected) and
/// otherwise ignored, like socket.io does with events nobody listens to.
pub async fn unknown_event<A: Adapter>(s: SocketRef<A>, turn: Turn) {
    turn.wait().await;
    admit(&s, &turn);
}

/// `sync`: the organisation and user events after `{ offset }` that this socket may see, as an
/// ack — the replay of a reconnect, on demand.
pub async fn sync<A: Adapter>(
    s: SocketRef<A>,
    TryData(data): TryData<Value>,
    turn: Turn,
    State(ctx): State<Ctx>,
    reply: Reply<A>,
) {
    turn.wait().await;
    let session = turn.session().clone();
    let lost = SyncAck {
        recovered: false,
        events: Vec::new(),
        offset: None,
    };
    if !admit(&s, &turn) {
        let code = Refusal::RateLimited.code();
        return reply.send(&lost, Some((code, Refusal::RateLimited.message())));
    }
    let after = data
        .ok()
        .as_ref()
        .and_then(|v| v.get("offset"))
        .and_then(Value::as_str)
        .and_then(|o| o.parse().ok());
    let claims = session.claims();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let command = Command::Sync {
        org: claims.org_id.clone(),
        membership: rooms::membership(&claims),
        after,
        reply: tx,
    };
    if ctx.commands.send(command).await.is_err() {
        return reply.send(&lost, Some(("unavailable", "shutting down".into())));
    }
    let ack = rx.await.unwrap_or(lost);
    reply.send(&ack, None);
}
