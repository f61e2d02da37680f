//! The emitter of a single node: the outbox is the log, kept in memory ([`History`]).

use super::*;

pub(super) async fn run_single<A: Adapter>(
    io: SocketIo<A>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    (requeue, mut commands): (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    retention: Retention,
    sent: Sent,
    stop: CancellationToken,
) {
    let mut stop = Some(stop);
    let mut history = History::new(
        retention.window.as_millis() as u64,
        retention.max_bytes,
        retention.max_events,
    );
    let mut clock = Clock::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            biased;
            Some(command) = commands.recv() => {
                handle(&io, command, &requeue, |org, since, membership| {
                    let replay = history.replay(org, since, membership, now_ms());
                    async move { Ok(replay) }
                })
                .await;
            }
            out = next_outgoing(&mut outgoing, &mut stop) => {
                let Some(out) = out else { break };
                if crate::fault::active("panic-emitter") {
                    panic!("fault switch panic-emitter");
                }
                crate::observe::emitted(crate::observe::event_label(&out.event));
                match out.org {
                    Some(org) => {
                        let now = now_ms();
                        let offset = clock.next(now);
                        let entry = Arc::new(Entry {
                            offset,
                            payload: stamp(&out.payload, offset),
                            event: out.event,
                            rooms: out.rooms,
                        });
                        history.record(&org, entry.clone(), now);
                        let history = &mut history;
                        deliver(&io, &org, &entry, &requeue, None, |org, since, membership| {
                            let replay = history.replay(org, since, membership, now_ms());
                            async move { Ok(replay) }
                        })
                        .await;
                        for done in out.done {
                            sent.send(done).ok();
                        }
                    }
                    None => {
                        // The live `sensor:reading` stream is not logged: a socket that misses
                        // one gets the reading in its unit's batch.
                        broadcast(&io, &out.rooms, &out.event, &out.payload, None).await;
                    }
                }
            }
            _ = sweep.tick() => {
                history.expire_all(now_ms());
                crate::observe::replay_log(history.len(), history.bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETENTION: Retention = Retention {
        window: Duration::from_secs(60),
        max_bytes: 1 << 20,
        max_events: None,
    };

    /// An organisation event completing outbox row `id`, or (`id` 0) a live reading.
    fn event(id: i64, payload: &str) -> Outgoing {
        Outgoing {
            org: (id != 0).then(|| "org".into()),
            live: None,
            rooms: vec![crate::rooms::org("org")],
            event: if id != 0 {
                "alert:triggered".into()
            } else {
                "sensor:reading".into()
            },
            payload: RawValue::from_string(payload.into()).unwrap(),
            done: if id != 0 {
                vec![Leased::Event(id)]
            } else {
                Vec::new()
            },
        }
    }

    /// A Socket.IO server with no connection: broadcasts reach no one, and succeed.
    fn io() -> SocketIo {
        let (_svc, io) = SocketIo::new_svc();
        io.ns("/", async || {});
        io
    }

    async fn sync(commands: &mpsc::Sender<Command>, after: Offset) -> SyncAck {
        let (reply, answer) = oneshot::channel();
        let membership = vec![crate::rooms::org("org")];
        let after = Some(after);
        let org = "org".into();
        let command = Command::Sync {
            org,
            membership,
            after,
            reply,
        };
        commands.send(command).await.unwrap();
        answer.await.unwrap()
    }

    #[tokio::test]
    async fn one_node_logs_organisation_events_reports_them_sent_and_replays_them() {
        let io = io();
        let (outbox, outgoing) = mpsc::channel(8);
        let (requeue, commands) = mpsc::channel(8);
        let (sent, mut reports) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let emitter = tokio::spawn(run_single(
            io,
            outgoing,
            (requeue.clone(), commands),
            RETENTION,
            sent,
            stopped,
        ));
        let before = now_ms();
        outbox.send(event(1, r#"{"n":1}"#)).await.ok();
        assert_eq!(reports.recv().await, Some(Leased::Event(1)));
        let after = now_ms();
        outbox.send(event(0, r#"{"live":true}"#)).await.ok();
        outbox.send(event(2, r#"{"n":2}"#)).await.ok();
        assert_eq!(reports.recv().await, Some(Leased::Event(2)));
        // The first event's offset is the millisecond it was logged at, first of it: the replay
        // after exactly that one offset is recovered.
        let mut recovered = Vec::new();
        for ms in before..=after {
            let ack = sync(&requeue, Offset { ms, seq: 0 }).await;
            if ack.recovered {
                recovered.push(ack);
            }
        }
        assert_eq!(recovered.len(), 1);
        let ack = &recovered[0];
        let head = ack.offset.clone().unwrap();
        // Only the second event: the live reading is not logged; each is stamped with its
        // offset, the newest being the head.
        assert_eq!(ack.events.len(), 1);
        assert_eq!(ack.events[0].event, "alert:triggered");
        assert_eq!(
            ack.events[0].data,
            serde_json::json!({"offset": head, "n": 2})
        );
        stop.cancel();
        emitter.await.unwrap();
    }

    #[tokio::test]
    async fn on_stop_one_node_sends_what_was_queued_then_ends() {
        let io = io();
        let (outbox, outgoing) = mpsc::channel(8);
        let (requeue, commands) = mpsc::channel(8);
        let (sent, mut reports) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        for id in 1..=3 {
            outbox.send(event(id, "{}")).await.ok();
        }
        stop.cancel();
        let emitter = run_single(io, outgoing, (requeue, commands), RETENTION, sent, stopped);
        // Ends although `outbox` is still held (as request handlers hold theirs).
        tokio::time::timeout(Duration::from_secs(5), emitter)
            .await
            .expect("the emitter ends once the queue is empty");
        let out: Vec<Leased> = std::iter::from_fn(|| reports.try_recv().ok()).collect();
        assert_eq!(out, [Leased::Event(1), Leased::Event(2), Leased::Event(3)]);
        assert!(outbox.try_send(event(4, "{}")).is_err());
    }
}
