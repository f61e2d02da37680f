//! Talking to the gateway over HTTP the way operators and devices do: HS256 tokens minted from
//! the gateway's `JWT_SECRET`, organisations set up through the admin API (site, units, an API
//! key per organisation), readings posted to `POST /api/readings/ingest` with that key, and the
//! Prometheus counters read from `/metrics`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::time::{format_ms, now_ms};

/// An HS256 JWT with the claims the gateway reads (`sub`, `org_id`, `role`, `exp`).
pub fn mint(secret: &str, sub: &str, org: &str, role: &str, ttl_secs: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "sub": sub,
        "org_id": org,
        "role": role,
        "exp": now_ms() / 1000 + ttl_secs,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signing.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

/// One organisation of the run, as created on the gateway.
#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
    pub units: Vec<String>,
    /// An ingest API key: devices post with it.
    pub key: String,
}

pub fn http_client(pool: usize) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let res = http
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = res.status();
    let text = res.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// Creates `orgs` organisations named `{prefix}-NNN`, each with one site, its share of `units`
/// units (unit j belongs to organisation j mod orgs; limits -40..60 °C, so the readings posted
/// never raise an alert) and one ingest API key.
pub async fn create_orgs(
    http: &reqwest::Client,
    base: &str,
    secret: &str,
    prefix: &str,
    orgs: usize,
    units: usize,
) -> Result<Vec<Org>> {
    let started = Instant::now();
    let made: Vec<Result<Org>> = futures_util::stream::iter(0..orgs)
        .map(|o| async move {
            let id = format!("{prefix}-{o:03}");
            let admin = mint(secret, "loadgen-admin", &id, "admin", 6 * 3600);
            post_json(
                http,
                &format!("{base}/api/sites"),
                &admin,
                serde_json::json!({ "id": "s-1", "name": "Load site" }),
            )
            .await?;
            let mine: Vec<String> = (o..units).step_by(orgs).map(|j| format!("u-{j:04}")).collect();
            for u in &mine {
                post_json(
                    http,
                    &format!("{base}/api/units"),
                    &admin,
                    serde_json::json!({ "id": u, "siteId": "s-1", "name": u, "tempMin": -40, "tempMax": 60 }),
                )
                .await?;
            }
            let key = post_json(
                http,
                &format!("{base}/api/keys"),
                &admin,
                serde_json::json!({ "name": "loadgen-device" }),
            )
            .await?;
            let key = key["key"].as_str().context("POST /api/keys: no key")?.to_string();
            Ok(Org { id, units: mine, key })
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut out = made.into_iter().collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    eprintln!(
        "loadgen: created {} organisations, {} units in {:.1} s",
        out.len(),
        units,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

#[derive(Deserialize)]
struct IngestAnswer {
    accepted: u64,
    duplicates: u64,
    ids: Vec<String>,
}

/// What the posting side saw (per organisation or per poster; merged at the end).
#[derive(Debug, Default)]
pub struct Posted {
    pub requests: u64,
    pub ok: u64,
    pub readings_sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// [`crate::stats::id_hash`] of the stored id of every reading answered 200 (a duplicate
    /// repeats its first id; dedupe before summing).
    pub id_hashes: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Round trip of each 200 answer, ms.
    pub latencies_ms: Vec<f64>,
}

impl Posted {
    pub fn merge(&mut self, o: Posted) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.readings_sent += o.readings_sent;
        self.accepted += o.accepted;
        self.duplicates += o.duplicates;
        self.id_hashes.extend(o.id_hashes);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latencies_ms.extend(o.latencies_ms);
    }
}

/// A tiny xorshift for temperatures: not worth a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The body of one ingest request: `n` readings over `units` (round robin from `first_unit`),
/// all with `recordedAt` = `at_ms`. Slot j carries `deviceId` `d{j}`, so the idempotency key
/// `(unitId, recordedAt, deviceId, source)` is unique within a request, and the caller never
/// reuses a millisecond, so never across requests either.
pub fn ingest_body(
    units: &[String],
    first_unit: usize,
    n: usize,
    at_ms: i64,
    rng: &mut Rng,
) -> String {
    use std::fmt::Write;
    let at = format_ms(at_ms);
    let mut body = String::with_capacity(32 + n * 96);
    body.push_str("{\"readings\":[");
    for j in 0..n {
        if j > 0 {
            body.push(',');
        }
        let unit = &units[(first_unit + j) % units.len()];
        let t = 18.0 + rng.next_f64() * 8.0;
        let _ = write!(
            body,
            "{{\"unitId\":\"{unit}\",\"temperature\":{t:.2},\"recordedAt\":\"{at}\",\"deviceId\":\"d{j}\"}}"
        );
    }
    body.push_str("]}");
    body
}

/// Posts one request with the device key and records the answer into `into`.
pub async fn post_readings(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: String,
    n: u64,
    into: &mut Posted,
) {
    into.requests += 1;
    into.readings_sent += n;
    let started = Instant::now();
    let res = http
        .post(url)
        .header("X-API-Key", key)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await;
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.is_timeout() { "timeout" } else { "network" };
            *into.errors.entry(kind.into()).or_default() += 1;
            return;
        }
    };
    let status = res.status();
    let bytes = res.bytes().await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let answer = match (status.as_u16(), bytes) {
        (200, Ok(b)) => serde_json::from_slice::<IngestAnswer>(&b).ok(),
        _ => None,
    };
    let Some(a) = answer else {
        *into.errors.entry(status.as_u16().to_string()).or_default() += 1;
        return;
    };
    into.ok += 1;
    into.accepted += a.accepted;
    into.duplicates += a.duplicates;
    into.latencies_ms.push(elapsed);
    into.id_hashes
        .extend(a.ids.iter().map(|id| crate::stats::id_hash(id)));
}

/// The sum of a counter in the gateway's Prometheus text, over the series whose labels contain
/// `label` (e.g. `event="sensor:readings:batch"`).
pub async fn metric(http: &reqwest::Client, base: &str, name: &str, label: &str) -> Option<f64> {
    let res = http.get(format!("{base}/metrics")).send().await.ok()?;
    // A server without the endpoint (404) has no figure, not zero.
    if !res.status().is_success() {
        return None;
    }
    let text = res.text().await.ok()?;
    // A counter appears once it was first incremented: absent means 0.
    let mut sum = Some(0.0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(name)
            && (rest.starts_with('{') || rest.starts_with(' '))
            && rest.contains(label)
        {
            let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            sum = sum.map(|s| s + v);
        }
    }
    sum
}
