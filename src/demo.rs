//! `sensorwire demo`: the gateway with a demo organisation and a device simulator, so a newcomer
//! sees live data, alerts and recoveries within seconds of one command.
//!
//! The simulator is an ordinary client: it posts through the real ingest API with an API key,
//! exactly as a device gateway would. Demo mode also mounts `GET /api/demo/token`, from which
//! the dashboard signs in.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use serde_json::json;
use tokio::net::TcpListener;

use crate::http::create_key;
use crate::store::{NewUnit, Store, StoreError};
use crate::wire::{KeyScope, format_time};
use crate::{Config, http::DEMO_ORG};

struct DemoUnit {
    id: &'static str,
    site: &'static str,
    name: &'static str,
    min: f64,
    max: f64,
}

const SITES: [(&str, &str); 2] = [
    ("northside", "Northside Market"),
    ("harbour", "Harbour Warehouse"),
];

const UNITS: [DemoUnit; 6] = [
    DemoUnit {
        id: "dairy-1",
        site: "northside",
        name: "Dairy fridge",
        min: 1.0,
        max: 5.0,
    },
    DemoUnit {
        id: "meat-1",
        site: "northside",
        name: "Meat chiller",
        min: -1.0,
        max: 3.0,
    },
    DemoUnit {
        id: "icecream-1",
        site: "northside",
        name: "Ice cream freezer",
        min: -25.0,
        max: -16.0,
    },
    DemoUnit {
        id: "produce-1",
        site: "harbour",
        name: "Produce cooler",
        min: 2.0,
        max: 8.0,
    },
    DemoUnit {
        id: "freezer-a",
        site: "harbour",
        name: "Blast freezer A",
        min: -30.0,
        max: -18.0,
    },
    DemoUnit {
        id: "pharma-1",
        site: "harbour",
        name: "Vaccine fridge",
        min: 2.0,
        max: 8.0,
    },
];

/// Seeds the demo organisation, then serves with the simulator running beside the gateway.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.demo = true;
    let store = Store::open(&config.database_url)
        .await
        .context("DATABASE_URL: cannot open the database")?;
    seed(&store).await?;
    let key = create_key(&store, DEMO_ORG, "demo simulator", vec![KeyScope::Ingest]).await?;
    store.close().await;

    let port = listener.local_addr()?.port();
    let simulator = tokio::spawn(simulate(format!("http://127.0.0.1:{port}"), key.key));
    let result = crate::run(config, listener, shutdown).await;
    // The simulator is this function's own task: aborted and joined, so it ends with the gateway.
    simulator.abort();
    simulator.await.ok();
    result
}

async fn seed(store: &Store) -> anyhow::Result<()> {
    let ignore_existing = |r: Result<_, StoreError>| match r {
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    };
    for (id, name) in SITES {
        ignore_existing(store.create_site(DEMO_ORG, id, name).await.map(|_| ()))?;
    }
    for u in &UNITS {
        let unit = NewUnit {
            id: u.id,
            site_id: u.site,
            name: u.name,
            temp_min: Some(u.min),
            temp_max: Some(u.max),
            offline_after_seconds: 60,
        };
        ignore_existing(store.create_unit(DEMO_ORG, unit).await.map(|_| ()))?;
    }
    Ok(())
}

/// Posts one reading per unit per second: a gentle random walk inside each unit's range, and
/// every 40 s one unit drifts out of range for 12 s (a door left open) and recovers.
async fn simulate(base: String, key: String) {
    let client = reqwest::Client::new();
    let url = format!("{base}/api/readings/ingest");
    let mut temps: Vec<f64> = UNITS.iter().map(|u| (u.min + u.max) / 2.0).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut second: u64 = 0;
    loop {
        tick.tick().await;
        second += 1;
        let troubled = ((second / 40) as usize) % UNITS.len();
        let in_trouble = second % 40 >= 25 && second % 40 < 37;
        let now = format_time(crate::store::now_ms());
        let readings: Vec<_> = {
            let mut rng = rand::rng();
            UNITS
                .iter()
                .zip(temps.iter_mut())
                .enumerate()
                .map(|(i, (u, t))| {
                    let mid = (u.min + u.max) / 2.0;
                    let target = if in_trouble && i == troubled {
                        u.max + 3.0
                    } else {
                        mid
                    };
                    *t += (target - *t) * 0.25 + rng.random_range(-0.2..0.2);
                    json!({
                        "unitId": u.id,
                        "deviceId": format!("sim-{}", u.id),
                        "temperature": (*t * 10.0).round() / 10.0,
                        "humidity": (rng.random_range(40.0..60.0f64) * 10.0).round() / 10.0,
                        "battery": 90,
                        "recordedAt": now,
                        "source": "simulator",
                    })
                })
                .collect()
        };
        let sent = client
            .post(&url)
            .header("X-API-Key", &key)
            .json(&json!({ "readings": readings }))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "simulator reading refused"),
            Err(e) => tracing::debug!(error = %e, "simulator could not post"),
        }
    }
}
