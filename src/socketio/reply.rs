//! Answering a client event: through its ack callback when it gave one, otherwise — for
//! failures — with an `error` event, as the contract asks.

use std::convert::Infallible;
use std::sync::Arc;

use serde::Serialize;
use socketioxide::adapter::Adapter;
use socketioxide::extract::AckSender;
use socketioxide::handler::{FromMessageParts, Value};
use socketioxide::socket::Socket;

use crate::wire::ErrorEvent;

/// The ack of the current event, and whether the client asked for one.
pub struct Reply<A: Adapter> {
    ack: AckSender<A>,
    socket: Arc<Socket<A>>,
    wants_ack: bool,
}

impl<A: Adapter> FromMessageParts<A> for Reply<A> {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<A>>,
        v: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        Ok(Reply {
            ack: AckSender::from_message_parts(s, v, ack_id)?,
            socket: s.clone(),
            wants_ack: ack_id.is_some(),
        })
    }
}

impl<A: Adapter> Reply<A> {
    /// Acks with `value` if an ack was asked for; otherwise, when `failure` is given, emits the
    /// `error` event instead.
    pub fn send<T: Serialize>(self, value: &T, failure: Option<(&str, String)>) {
        if self.wants_ack {
            if let Err(e) = self.ack.send(value) {
                tracing::debug!(error = %e, "ack not sent");
            }
        } else if let Some((code, message)) = failure {
            let event = ErrorEvent {
                code: code.into(),
                message,
            };
            if let Err(e) = self.socket.emit("error", &event) {
                tracing::debug!(error = %e, "error event not sent");
            }
        }
    }
}
