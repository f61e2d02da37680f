//! The way out to clients: pipeline stages put events in the [`Outbox`]; one emitter task,
//! generic over the Socket.io adapter, broadcasts them.
//!
//! Each payload is serialised once, here, into raw JSON; socketioxide then encodes the packet
//! once per broadcast and writes the same bytes to every recipient socket.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::value::RawValue;
use socketioxide::adapter::Adapter;
use socketioxide::{BroadcastError, SocketIo};
use tokio::sync::mpsc;

pub struct Outgoing {
    pub rooms: Vec<String>,
    pub event: Cow<'static, str>,
    pub payload: Box<RawValue>,
    /// The metric label: the event name for the gateway's own events, `published` otherwise.
    pub label: &'static str,
}

/// Where pipeline stages send events; cheap to clone. Bounded: a stalled emitter stalls the
/// stages, which turns into 503 at ingest instead of unbounded memory.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Outbox(tx), rx)
    }

    pub async fn send<T: Serialize>(&self, rooms: Vec<String>, event: &'static str, payload: &T) {
        self.send_dynamic(rooms, Cow::Borrowed(event), payload)
            .await
    }

    /// Like [`Outbox::send`], for event names chosen at run time (published events).
    pub async fn send_dynamic<T: Serialize>(
        &self,
        rooms: Vec<String>,
        event: impl Into<Cow<'static, str>>,
        payload: &T,
    ) {
        let event = event.into();
        let label = match &event {
            Cow::Borrowed(name) => name,
            Cow::Owned(_) => "published",
        };
        let payload = match serde_json::value::to_raw_value(payload) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::error!(event = %event, error = %e, "event not serialisable; dropped");
                return;
            }
        };
        if self
            .0
            .send(Outgoing {
                rooms,
                event,
                payload,
                label,
            })
            .await
            .is_err()
        {
            tracing::warn!("emitter stopped; event not delivered");
        }
    }
}

/// Broadcasts everything put in the outbox. When `stop` fires (after the pipeline stages have
/// ended) it refuses new events, sends what is already queued, and ends — it cannot wait for
/// every sender to go, since request handlers hold one until the server itself is gone.
///
/// With several nodes, a broadcast also goes through Redis. While Redis is known to be away the
/// emitter broadcasts to this node's sockets only, so local delivery never waits on a dead
/// connection (other nodes cannot be reached then anyway).
pub async fn run_emitter<A: Adapter>(
    io: SocketIo<A>,
    mut rx: mpsc::Receiver<Outgoing>,
    redis: Option<crate::cluster::RedisHealth>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut stop = Some(stop);
    loop {
        let next = match stop.as_mut() {
            Some(signal) => tokio::select! {
                biased;
                out = rx.recv() => out,
                _ = signal => {
                    rx.close();
                    stop = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(out) = next else { break };
        crate::observe::emitted(out.label);
        let local_only = redis.as_ref().is_some_and(|h| !h.is_up());
        let rooms = out.rooms;
        let mut to = io.to(rooms.clone());
        if local_only {
            to = to.local();
        }
        match to.emit(out.event.as_ref(), &out.payload).await {
            Ok(()) => {}
            // The Redis adapter publishes before it delivers locally, and skips the local part
            // when publishing fails: deliver locally now, so this node's clients miss nothing.
            Err(BroadcastError::Adapter(e)) => {
                if let Some(h) = &redis {
                    h.mark_down();
                }
                tracing::debug!(event = %out.event, error = %e, "cross-node broadcast failed; delivered locally");
                if let Err(e) = io
                    .to(rooms)
                    .local()
                    .emit(out.event.as_ref(), &out.payload)
                    .await
                {
                    tracing::warn!(event = %out.event, error = %e, "broadcast did not reach every socket");
                }
            }
            Err(e) => {
                tracing::warn!(event = %out.event, error = %e, "broadcast did not reach every socket");
            }
        }
    }
    tracing::debug!("emitter stopped");
}
