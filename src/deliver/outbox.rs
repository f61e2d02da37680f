//! The way out to clients: pipeline stages put events in the [`Outbox`]; the emitter
//! (`emitter/`) logs organisation events and broadcasts everything.
//!
//! Each payload is serialised once, here, into raw JSON; socketioxide then encodes the packet
//! once per broadcast and writes the same bytes to every recipient socket.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::store::Leased;

pub struct Outgoing {
    /// The organisation whose event log it goes into (with an offset), or `None` for the live
    /// `sensor:reading` stream, which is not logged.
    pub org: Option<String>,
    /// For the live `sensor:reading` stream: the reading's unit, which other nodes deliver to
    /// the same rooms (`feed.rs`).
    pub live: Option<LiveTarget>,
    pub rooms: Vec<String>,
    pub event: Cow<'static, str>,
    pub payload: Box<RawValue>,
    /// Stored rows this event completes the announcement of (its `event_outbox` row; the
    /// `pending_batches` rows of a flush, on the flush's last batch): the emitter reports them
    /// once the event is out, so the rows can go (see `monitor`).
    pub done: Vec<Leased>,
}

/// Whose live reading it is.
pub struct LiveTarget {
    pub org: String,
    pub site: String,
    pub unit: String,
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

    /// A live `sensor:reading`, which is not logged: to the unit's and the site's subscribers.
    pub async fn send_live<T: Serialize>(&self, org: &str, site: &str, unit: &str, payload: &T) {
        let payload = match serde_json::value::to_raw_value(payload) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::error!(error = %e, "reading not serialisable; dropped");
                return;
            }
        };
        let out = Outgoing {
            org: None,
            live: Some(LiveTarget {
                org: org.to_string(),
                site: site.to_string(),
                unit: unit.to_string(),
            }),
            rooms: vec![crate::rooms::unit(org, unit), crate::rooms::site(org, site)],
            event: Cow::Borrowed("sensor:reading"),
            payload,
            done: Vec::new(),
        };
        if self.0.send(out).await.is_err() {
            tracing::warn!("emitter stopped; event not delivered");
        }
    }

    /// An organisation event: logged with an offset, replayed to clients that missed it.
    pub async fn send_to_org<T: Serialize>(
        &self,
        org: &str,
        rooms: Vec<String>,
        event: &'static str,
        payload: &T,
    ) {
        self.put(Some(org.to_string()), rooms, Cow::Borrowed(event), payload)
            .await
    }

    /// Like [`Outbox::send_to_org`], completing the announcement of stored rows.
    pub async fn send_to_org_done<T: Serialize>(
        &self,
        org: &str,
        rooms: Vec<String>,
        event: &'static str,
        payload: &T,
        done: Vec<Leased>,
    ) {
        self.put_done(
            Some(org.to_string()),
            rooms,
            Cow::Borrowed(event),
            payload,
            done,
        )
        .await
    }

    /// Like [`Outbox::send_to_org`], for event names chosen at run time (published events).
    pub async fn send_dynamic<T: Serialize>(
        &self,
        org: &str,
        rooms: Vec<String>,
        event: impl Into<Cow<'static, str>>,
        payload: &T,
    ) {
        self.put(Some(org.to_string()), rooms, event.into(), payload)
            .await
    }

    /// An organisation event from the storage outbox, already serialised.
    pub async fn send_stored(
        &self,
        org: &str,
        rooms: Vec<String>,
        event: String,
        payload: Box<RawValue>,
        id: i64,
    ) {
        let out = Outgoing {
            org: Some(org.to_string()),
            live: None,
            rooms,
            event: Cow::Owned(event),
            payload,
            done: vec![Leased::Event(id)],
        };
        if self.0.send(out).await.is_err() {
            tracing::warn!("emitter stopped; stored event left for the next announcement");
        }
    }

    async fn put<T: Serialize>(
        &self,
        org: Option<String>,
        rooms: Vec<String>,
        event: impl Into<Cow<'static, str>>,
        payload: &T,
    ) {
        self.put_done(org, rooms, event, payload, Vec::new()).await
    }

    async fn put_done<T: Serialize>(
        &self,
        org: Option<String>,
        rooms: Vec<String>,
        event: impl Into<Cow<'static, str>>,
        payload: &T,
        done: Vec<Leased>,
    ) {
        let event = event.into();
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
                org,
                live: None,
                rooms,
                event,
                payload,
                done,
            })
            .await
            .is_err()
        {
            tracing::warn!("emitter stopped; event not delivered");
        }
    }
}
