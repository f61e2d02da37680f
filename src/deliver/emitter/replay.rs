//! Replays: a socket catching up from the log (after a reconnect, a `sync`, or a full queue),
//! then joining live delivery with nothing lost or sent twice in between.

use super::*;

/// Sends the rest of a replay as fast as the client reads it, then hands the replay back to the
/// emitter to send what came meanwhile. A client that reads nothing for the slow-consumer grace
/// is let go.
pub(super) async fn drain_then_resume<A: Adapter>(
    socket: socketioxide::extract::SocketRef<A>,
    events: Vec<Arc<Entry>>,
    again: Command,
    requeue: mpsc::Sender<Command>,
) {
    socket.extensions.insert(crate::deliver::slow::Replaying);
    for e in &events {
        if !wait_for_room(&socket, |s| send_replayed(s, e)).await {
            if let Command::Recover { cause, .. } = again {
                finish(cause);
            }
            return;
        }
    }
    socket
        .extensions
        .remove::<crate::deliver::slow::Replaying>();
    requeue.send(again).await.ok();
}

/// Retries `send` while the socket's queue is full, for up to the slow-consumer grace of no
/// progress; then the client is let go as a slow consumer. `false` when the send did not happen.
pub(super) async fn wait_for_room<A: Adapter>(
    socket: &socketioxide::extract::SocketRef<A>,
    send: impl Fn(&socketioxide::extract::SocketRef<A>) -> Result<(), SendError>,
) -> bool {
    let mut waited = Duration::ZERO;
    loop {
        match send(socket) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull))
                if waited < crate::deliver::slow::GRACE =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                waited += Duration::from_millis(10);
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tracing::info!(sid = %socket.id, "socket stopped reading while being caught up; disconnecting");
                crate::deliver::slow::evict(socket.clone());
                return false;
            }
            Err(_) => return false,
        }
    }
}

/// Free slots a replay leaves in a socket's queue: for engine.io's heartbeat ping (dropped with
/// the session when the queue is full) and the socket's live `sensor:reading`s.
pub(super) const REPLAY_HEADROOM: usize = 4;

/// Sends one missed event, keeping [`REPLAY_HEADROOM`] free.
pub(super) fn send_replayed<A: Adapter>(
    socket: &socketioxide::extract::SocketRef<A>,
    e: &Entry,
) -> Result<(), SendError> {
    crate::deliver::slow::emit_leaving_room(socket, REPLAY_HEADROOM, &|| {
        socket.emit(e.event.as_ref(), &e.payload)
    })
}

/// A replay ended without rejoining live delivery (the socket is gone): a catch-up is over.
pub(super) fn finish(cause: Cause) {
    if let Cause::Behind(since) = cause {
        crate::observe::caught_up(since.elapsed());
    }
}

/// Carries out a replay command, `replay` reading the log.
pub(super) async fn handle<A, F, Fut>(
    io: &SocketIo<A>,
    command: Command,
    requeue: &mpsc::Sender<Command>,
    replay: F,
) where
    A: Adapter,
    F: FnOnce(&str, Since, &[String]) -> Fut,
    Fut: std::future::Future<
            Output = Result<Replay, socketioxide_redis::drivers::fred::fred_client::error::Error>,
        >,
{
    let (org, membership, since) = match &command {
        Command::Recover {
            org,
            membership,
            since,
            ..
        } => (org.clone(), membership.as_slice(), *since),
        Command::Sync {
            org,
            membership,
            after,
            ..
        } => (org.clone(), membership.as_slice(), after.map(Since::After)),
    };
    let outcome = match since {
        None => Replay::Lost,
        Some(since) => match replay(&org, since, membership).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the event log for a replay failed");
                Replay::Lost
            }
        },
    };
    match command {
        Command::Recover {
            sid,
            membership,
            turn,
            cause,
            ..
        } => {
            let Some(socket) = io.get_socket(sid) else {
                finish(cause);
                return;
            };
            let complete = match outcome {
                Replay::Recovered { events, head } => {
                    if cause == Cause::Reconnect {
                        crate::observe::replay(true, events.len());
                    }
                    for (i, e) in events.iter().enumerate() {
                        match send_replayed(&socket, e) {
                            Ok(()) => {}
                            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                                // More missed events than the socket's buffer holds: the rest
                                // go out at the pace the client reads them, off this loop;
                                // then the replay resumes from `head` (and only then does the
                                // socket join its rooms).
                                let rest = events[i..].to_vec();
                                let again = Command::Recover {
                                    sid,
                                    org: org.to_string(),
                                    membership,
                                    since: Some(Since::After(head)),
                                    turn,
                                    cause,
                                };
                                // Per socket and bounded, so not an owned task: it ends
                                // with the socket, or once the socket reads nothing for the
                                // slow-consumer grace (`wait_for_room`), or when done.
                                tokio::spawn(drain_then_resume(
                                    socket,
                                    rest,
                                    again,
                                    requeue.clone(),
                                ));
                                return;
                            }
                            Err(_) => {
                                finish(cause);
                                return;
                            }
                        }
                    }
                    completion(cause, Some(head))
                }
                Replay::Lost => {
                    match cause {
                        Cause::Reconnect => crate::observe::replay(false, 0),
                        Cause::Behind(_) => crate::observe::resync("behind_retention"),
                    }
                    completion(cause, None)
                }
            };
            // Joining and telling happen here, between two events, so the client refetches
            // (on `recovered: false`) only once it is back in live delivery: nothing can fall
            // between its refetch and the next live event.
            socket.join(membership);
            if let Some(complete) = complete
                && socket.emit("sync:complete", &complete).is_err()
            {
                // A queue still full (a client that fell behind the log is reading slowly): it
                // gets the word as soon as it has room, before anything else of ours that
                // does not fit.
                let socket = socket.clone();
                // Bounded like the above (`wait_for_room`): not an owned task.
                tokio::spawn(async move {
                    wait_for_room(&socket, |s| s.emit("sync:complete", &complete)).await;
                });
            }
            if let Cause::Behind(since) = cause {
                crate::observe::caught_up(since.elapsed());
            }
            drop(turn);
        }
        Command::Sync { reply, .. } => {
            reply.send(ack(outcome)).ok();
        }
    }
}

/// The `sync:complete` that ends a socket's replay, once every missed event is sent:
/// `recovered_up_to` is the log's head when the replay reached back far enough, `None` when the
/// log no longer holds where the socket stood (it refetches).
pub(super) fn completion(cause: Cause, recovered_up_to: Option<Offset>) -> Option<SyncComplete> {
    match (recovered_up_to, cause) {
        (Some(head), Cause::Reconnect) => Some(SyncComplete {
            recovered: true,
            offset: Some(head.to_string()),
        }),
        // Caught up: back to live delivery, silently.
        (Some(_), Cause::Behind(_)) => None,
        (None, _) => Some(SyncComplete {
            recovered: false,
            offset: None,
        }),
    }
}

/// The answer to a `sync` event: the missed events themselves, or word to refetch.
pub(super) fn ack(outcome: Replay) -> SyncAck {
    match outcome {
        Replay::Recovered { events, head } => SyncAck {
            recovered: true,
            events: events
                .iter()
                .map(|e| MissedEvent {
                    event: e.event.to_string(),
                    data: serde_json::from_str(e.payload.get()).unwrap_or_default(),
                })
                .collect(),
            offset: Some(head.to_string()),
        },
        Replay::Lost => SyncAck {
            recovered: false,
            events: Vec::new(),
            offset: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Offset = Offset { ms: 1_700, seq: 2 };

    fn entry(event: &'static str, payload: &str, ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            offset: Offset { ms, seq: 0 },
            event: event.into(),
            rooms: Vec::new(),
            payload: RawValue::from_string(payload.into()).unwrap(),
        })
    }

    #[test]
    fn sync_complete_ends_a_reconnect_always_and_a_catch_up_only_when_it_failed() {
        let behind = Cause::Behind(std::time::Instant::now());
        let recovered = Some(SyncComplete {
            recovered: true,
            offset: Some("1700-2".into()),
        });
        let refetch = Some(SyncComplete {
            recovered: false,
            offset: None,
        });
        let cases = [
            (Cause::Reconnect, Some(HEAD), recovered),
            (Cause::Reconnect, None, refetch.clone()),
            // Caught up from the log: back to live delivery without a word.
            (behind, Some(HEAD), None),
            // The log no longer reaches back to where it fell behind.
            (behind, None, refetch),
        ];
        for (cause, head, expected) in cases {
            assert_eq!(completion(cause, head), expected, "{cause:?} {head:?}");
        }
    }

    #[test]
    fn a_sync_ack_carries_the_missed_events_in_order_and_the_head() {
        let events = vec![
            entry("alert:triggered", r#"{"offset":"1-0","alertId":"x"}"#, 1),
            entry("unit:status", r#"{"offset":"2-0"}"#, 2),
        ];
        let got = ack(Replay::Recovered { events, head: HEAD });
        assert!(got.recovered);
        assert_eq!(got.offset.as_deref(), Some("1700-2"));
        let missed: Vec<(&str, serde_json::Value)> = got
            .events
            .iter()
            .map(|e| (e.event.as_str(), e.data.clone()))
            .collect();
        assert_eq!(
            missed,
            [
                (
                    "alert:triggered",
                    serde_json::json!({"offset": "1-0", "alertId": "x"})
                ),
                ("unit:status", serde_json::json!({"offset": "2-0"})),
            ]
        );
    }

    #[test]
    fn a_sync_ack_past_the_log_says_refetch_with_nothing_else() {
        let got = ack(Replay::Lost);
        assert!(!got.recovered);
        assert!(got.events.is_empty());
        assert_eq!(got.offset, None);
    }
}
