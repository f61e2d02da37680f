//! The delivery engine: everything between a committed reading or event and the sockets.
//!
//! Both edges use it: the Socket.io edge (`socketio`) through the emitter's commands and rooms,
//! the plain WebSocket edge (`ws`) through the relay.

pub mod emitter;
pub mod fanout;
pub mod feed;
pub mod history;
pub mod monitor;
pub mod offset;
pub mod outbox;
pub mod relay;
pub mod slow;
pub mod stream;
pub mod webhooks;
