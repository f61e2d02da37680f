//! Storage decides alerts and status: two `Store` handles on one database stand for two gateway
//! nodes, each with its own connection pool and no shared memory. Whatever handle a reading
//! goes through, the decision comes from the stored state. Against SQLite and PostgreSQL.

mod common;

use common::{Engine, TestDb, engines};
use sensorwire::ingest::NewReading;
use sensorwire::store::{Leased, NewUnit, OutboxEvent, Store};
use sensorwire::wire::AlertStatus;

fn reading(unit: &str, at: i64, t: f64) -> NewReading {
    NewReading {
        unit_id: unit.into(),
        device_id: String::new(),
        temperature: t,
        humidity: None,
        battery: None,
        signal_strength: None,
        recorded_at: at,
        source: "api".into(),
    }
}

async fn unit(store: &Store, id: &str) {
    store
        .create_unit(
            "o",
            NewUnit {
                id,
                site_id: "s",
                name: id,
                temp_min: Some(0.0),
                temp_max: Some(5.0),
                offline_after_seconds: 1,
            },
        )
        .await
        .unwrap();
}

/// Two "nodes" on a fresh database with site `s`.
async fn nodes(engine: Engine) -> (TestDb, Store, Store) {
    let db = TestDb::new(engine).await;
    let a = Store::open(&db.url).await.unwrap();
    let b = Store::connect(&db.url).await.unwrap();
    a.create_site("o", "s", "S").await.unwrap();
    (db, a, b)
}

async fn post(store: &Store, unit: &str, at: i64, t: f64) -> Vec<OutboxEvent> {
    let r = reading(unit, at, t);
    store
        .commit_readings(&[("o", &r)], at)
        .await
        .unwrap()
        .events
}

fn names(events: &[OutboxEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

#[tokio::test]
async fn excursions_opened_on_one_node_are_resolved_on_the_other() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        let mut at = 1_000;
        for round in 0..6 {
            // Alternate which node opens and which resolves.
            let (opener, resolver) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
            at += 1_000;
            let opened = post(opener, "u", at, 9.0).await;
            assert_eq!(
                names(&opened),
                ["alert:triggered", "unit:status"],
                "{engine:?} round {round}"
            );
            at += 1_000;
            // Still out of range, on the other node: nothing new.
            assert!(post(resolver, "u", at, 10.0).await.is_empty());
            at += 1_000;
            let resolved = post(resolver, "u", at, 3.0).await;
            assert_eq!(names(&resolved), ["alert:resolved", "unit:status"]);
        }
        let alerts = a.list_alerts("o", None, 100).await.unwrap();
        assert_eq!(alerts.len(), 6, "{engine:?}: one alert per excursion");
        assert!(alerts.iter().all(|al| al.status == "resolved"));
        assert!(
            a.list_alerts("o", Some(AlertStatus::Active), 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(b.get_unit("o", "u").await.unwrap().unwrap().status, "ok");
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

#[tokio::test]
async fn an_older_reading_on_another_node_never_moves_state_back() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        post(&a, "u", 10_000, 3.0).await;
        assert!(post(&b, "u", 9_000, 9.0).await.is_empty(), "{engine:?}");
        let u = a.get_unit("o", "u").await.unwrap().unwrap();
        assert_eq!((u.status.as_str(), u.last_temperature), ("ok", Some(3.0)));
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

#[tokio::test]
async fn a_recreated_unit_starts_from_nothing() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        for (i, before) in [-1_000i64, 0, 1_000].into_iter().enumerate() {
            unit(&a, "u").await;
            let last = 100_000 * (i as i64 + 1);
            post(&a, "u", last - 5_000, 3.0).await;
            post(&a, "u", last, 3.0).await;
            assert!(a.delete_unit("o", "u").await.unwrap());
            unit(&b, "u").await;
            let events = post(&b, "u", last + before, 9.0).await;
            assert_eq!(
                names(&events),
                ["alert:triggered", "unit:status"],
                "{engine:?}: reading {before} ms from the old unit's last"
            );
            assert!(a.delete_unit("o", "u").await.unwrap());
        }
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

#[tokio::test]
async fn a_deleted_unit_refuses_the_commit_and_stores_nothing() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        unit(&a, "v").await;
        b.delete_unit("o", "v").await.unwrap();
        let (u, v) = (reading("u", 1_000, 3.0), reading("v", 1_000, 3.0));
        match a.commit_readings(&[("o", &u), ("o", &v)], 1_000).await {
            Err(sensorwire::store::StoreError::UnitsGone(gone)) => {
                assert_eq!(gone, [("o".to_string(), "v".to_string())])
            }
            other => panic!("{engine:?}: expected UnitsGone, got {other:?}"),
        }
        assert!(a.latest_reading("o", "u").await.unwrap().is_none());
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

/// Both nodes sweep the same silent unit at once: one `offline` alert; a reading on the other
/// node resolves it.
#[tokio::test]
async fn offline_is_decided_once_and_ended_anywhere() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        let r = reading("u", 1_000, 3.0);
        a.commit_readings(&[("o", &r)], 1_000).await.unwrap();
        let now = 10_000;
        let (x, y) = tokio::join!(a.go_offline("o", "u", now), b.go_offline("o", "u", now));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(
            names(&x).len() + names(&y).len(),
            2,
            "{engine:?}: one triggered + one status in total, got {x:?} {y:?}"
        );
        let active = a
            .list_alerts("o", Some(AlertStatus::Active), 10)
            .await
            .unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].alert_type, "offline");
        let back = post(&b, "u", 20_000, 3.0).await;
        assert_eq!(names(&back), ["alert:resolved", "unit:status"]);
        assert!(
            a.list_alerts("o", Some(AlertStatus::Active), 10)
                .await
                .unwrap()
                .is_empty()
        );
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

/// Group commits of both nodes touching the same units in opposite orders, concurrently: every
/// commit succeeds (locks are taken in one order), and each unit has exactly one open alert.
#[tokio::test]
async fn concurrent_commits_on_the_same_units_neither_deadlock_nor_double_open() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        let ids: Vec<String> = (0..20).map(|i| format!("u{i:02}")).collect();
        for id in &ids {
            unit(&a, id).await;
        }
        let mut tasks = Vec::new();
        for k in 0..16i64 {
            let store = if k % 2 == 0 { a.clone() } else { b.clone() };
            let mut order = ids.clone();
            if k % 2 == 1 {
                order.reverse();
            }
            tasks.push(tokio::spawn(async move {
                let rows: Vec<NewReading> = order
                    .iter()
                    .map(|u| reading(u, 1_000 + k, 9.0 + k as f64))
                    .collect();
                let flat: Vec<(&str, &NewReading)> = rows.iter().map(|r| ("o", r)).collect();
                store.commit_readings(&flat, 1_000).await.map(|c| c.events)
            }));
        }
        let mut triggered = 0;
        for t in tasks {
            let events = t
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{engine:?}: {e}"));
            triggered += names(&events)
                .iter()
                .filter(|n| **n == "alert:triggered")
                .count();
        }
        assert_eq!(triggered, ids.len(), "{engine:?}: one alert per unit");
        let active = a
            .list_alerts("o", Some(AlertStatus::Active), 100)
            .await
            .unwrap();
        assert_eq!(active.len(), ids.len());
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

/// Events not announced within their lease are claimable by any node, once per lease; deleted
/// ones are gone.
#[tokio::test]
async fn unannounced_events_are_claimed_after_their_lease() {
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        let events = post(&a, "u", 1_000, 9.0).await;
        assert_eq!(events.len(), 2);
        // Within the lease (from the commit's clock, 1_000): nothing to claim.
        assert!(b.claim_outbox(1_500, 100).await.unwrap().is_empty());
        let later = 1_000 + sensorwire::store::LEASE_MS;
        let claimed = b.claim_outbox(later, 100).await.unwrap();
        assert_eq!(
            claimed.iter().map(|e| e.id).collect::<Vec<_>>(),
            events.iter().map(|e| e.id).collect::<Vec<_>>(),
            "{engine:?}"
        );
        assert!(
            a.claim_outbox(later, 100).await.unwrap().is_empty(),
            "leased again"
        );
        b.release(&[Leased::Event(events[0].id), Leased::Event(events[1].id)])
            .await
            .unwrap();
        assert!(
            a.claim_outbox(later + 10 * sensorwire::store::LEASE_MS, 100)
                .await
                .unwrap()
                .is_empty()
        );
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}

/// The peak of an excursion is decided under the unit's row lock from the stored one: readings
/// racing through two nodes, in any order of commits, leave the highest of them; and of two
/// nodes acknowledging the same alert at once, exactly one does.
#[tokio::test]
async fn peaks_and_acknowledgements_race_through_two_nodes() {
    use sensorwire::store::Acknowledge;
    for engine in engines().await {
        let (db, a, b) = nodes(engine).await;
        unit(&a, "u").await;
        assert_eq!(post(&a, "u", 1_000, 6.0).await.len(), 2, "opened");
        // Out-of-range readings at distinct times, spread over both nodes, committed at once.
        let temps: Vec<f64> = (0..20)
            .map(|i| 6.0 + f64::from((i * 7) % 20) / 2.0)
            .collect();
        let highest = temps.iter().cloned().fold(f64::MIN, f64::max);
        let posts = temps.iter().enumerate().map(|(i, t)| {
            let node = if i % 2 == 0 { &a } else { &b };
            post(node, "u", 2_000 + i as i64, *t)
        });
        futures_util::future::join_all(posts).await;
        let active = a
            .list_alerts("o", Some(AlertStatus::Active), 10)
            .await
            .unwrap();
        assert_eq!(active.len(), 1, "{engine:?}: one excursion");
        assert_eq!(active[0].peak_value, Some(highest), "{engine:?}");
        let id = active[0].id.clone();

        let (x, y) = tokio::join!(
            a.acknowledge_alert("o", &id, None, "ann", Some("from a"), 10_000),
            b.acknowledge_alert("o", &id, None, "bob", Some("from b"), 10_001),
        );
        let outcomes = [x.unwrap(), y.unwrap()];
        let done: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                Acknowledge::Done(row, event) => Some((row, event)),
                _ => None,
            })
            .collect();
        assert_eq!(done.len(), 1, "{engine:?}: exactly one wins: {outcomes:?}");
        assert!(
            outcomes.iter().any(|o| matches!(o, Acknowledge::Already)),
            "{outcomes:?}"
        );
        let (row, event) = done[0];
        assert_eq!(event.event, "alert:acknowledged");
        let stored = &a.list_alerts("o", None, 10).await.unwrap()[0];
        assert_eq!(
            stored.acknowledged_by, row.acknowledged_by,
            "storage agrees"
        );
        assert_eq!(stored.note, row.note);
        // The event is an outbox row: a node that died after the commit leaves it to the relay.
        let claimed = b.claim_outbox(20_000, 100).await.unwrap();
        assert!(
            claimed.iter().any(|e| e.id == event.id),
            "{engine:?}: {claimed:?}"
        );
        b.release(&[Leased::Event(event.id)]).await.unwrap();
        // Unknown, or outside the caller's sites: not found.
        let elsewhere = vec!["other-site".to_string()];
        assert!(matches!(
            a.acknowledge_alert("o", &id, Some(&elsewhere), "c", None, 1)
                .await
                .unwrap(),
            Acknowledge::NotFound
        ));
        assert!(matches!(
            a.acknowledge_alert("o", "al-none", None, "c", None, 1)
                .await
                .unwrap(),
            Acknowledge::NotFound
        ));
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }
}
