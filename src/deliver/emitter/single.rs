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
