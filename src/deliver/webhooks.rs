//! Organisation webhooks: the address rules, the signature, the retry schedule and the delivery
//! worker.
//!
//! Deliveries are rows (see `store::webhooks`), made by the database in the transaction that
//! stores each alert event, so one exists for every committed event and matching webhook, and
//! none is lost with a process. Every node runs a [`Worker`]: it leases due rows (one node per
//! row), POSTs them, and records each attempt. A 2xx ends a delivery; anything else is retried
//! ([`next_attempt_at`]: 1 s, doubling up to an hour, for up to 24 hours after the first
//! attempt). The worker looks for due rows every [`POLL`] (and at once when an attempt ends),
//! so a new event goes out within about half a second.
//!
//! Delivery is at least once: a node that dies after the receiver answered but before the
//! attempt is recorded leaves the row leased, and it is attempted again when the lease runs out.
//! Receivers deduplicate by `X-Sensorwire-Delivery`, which is the same on every attempt.
//!
//! Addresses: unless `WEBHOOK_ALLOW_PRIVATE=true`, a URL whose host is, or resolves to, a
//! private, loopback, link-local, unspecified, multicast or unique-local address is refused —
//! at creation (422) and again before every attempt. An attempt refused that way fails with a
//! `lastError` that says why and is retried like any other failure (DNS may change back), until
//! the 24 hours are over. The attempt connects to the address that was checked (no second
//! lookup) and follows no redirects.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{AttemptRecord, ClaimedDelivery, Store, now_ms};
use crate::wire::format_time;

/// How long a receiver has to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How often the worker looks for due deliveries.
pub const POLL: Duration = Duration::from_millis(500);
/// Attempts in flight per node.
pub const CONCURRENCY: usize = 8;
/// How long attempts in flight may take to finish once the node is stopping.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a claimed delivery is this node's: well over [`TIMEOUT`], so a live node never loses
/// one it is still sending.
pub const LEASE_MS: i64 = 60_000;
/// The first retry's delay.
pub const FIRST_RETRY_MS: i64 = 1_000;
/// The longest delay between attempts.
pub const MAX_RETRY_MS: i64 = 3_600_000;
/// No attempt later than this after the first.
pub const GIVE_UP_AFTER_MS: i64 = 24 * 3_600_000;

// ---- pure rules ---------------------------------------------------------------------------------

/// When to try again after `attempts` failed attempts (the first made at `first_attempt_at`,
/// the last just ended at `now`): 1 s after the first failure, doubling up to one hour; `None`
/// when that would be more than 24 hours after the first attempt (given up).
pub fn next_attempt_at(attempts: i32, first_attempt_at: i64, now: i64) -> Option<i64> {
    let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let delay = FIRST_RETRY_MS
        .saturating_mul(1_i64 << doublings)
        .min(MAX_RETRY_MS);
    let at = now + delay;
    (at <= first_attempt_at + GIVE_UP_AFTER_MS).then_some(at)
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Why an address may not receive webhooks (without `WEBHOOK_ALLOW_PRIVATE`), or `None`.
pub fn refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if v6.segments()[..6] == [0; 6] {
                // IPv4-compatible (deprecated): `::a.b.c.d`.
                refused_v4(Ipv4Addr::from_bits(v6.to_bits() as u32)).or(Some("reserved"))
            } else {
                None
            }
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else {
        None
    }
}

// ---- addresses ----------------------------------------------------------------------------------

/// A URL that passed the rules, with the address to connect to (when it was resolved here).
#[derive(Debug)]
pub struct Checked {
    pub url: reqwest::Url,
    /// `(host, address)` to pin the connection to, so that it goes where the check looked.
    pub pin: Option<(String, SocketAddr)>,
}

/// Checks a webhook URL: `http(s)`, a host, and — unless `allow_private` — no refused address,
/// whether the host is an address or a name (all its addresses are checked).
pub async fn check_url(url: &str, allow_private: bool) -> Result<Checked, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    let host = match parsed.host() {
        Some(h) => h.to_owned(),
        None => return Err("must name a host".into()),
    };
    if allow_private {
        return Ok(Checked {
            url: parsed,
            pin: None,
        });
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let why = |ip: IpAddr, what: &str| {
        format!("{ip} is a {what} address (refused unless WEBHOOK_ALLOW_PRIVATE=true)")
    };
    match host {
        url::Host::Ipv4(ip) => match refused(ip.into()) {
            Some(what) => Err(why(ip.into(), what)),
            None => Ok(Checked {
                url: parsed,
                pin: None,
            }),
        },
        url::Host::Ipv6(ip) => match refused(ip.into()) {
            Some(what) => Err(why(ip.into(), what)),
            None => Ok(Checked {
                url: parsed,
                pin: None,
            }),
        },
        url::Host::Domain(name) => {
            let addrs: Vec<SocketAddr> = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await
            .map_err(|_| format!("{name} did not resolve within 5 s"))?
            .map_err(|e| format!("{name} does not resolve: {e}"))?
            .collect();
            let first = *addrs
                .first()
                .ok_or_else(|| format!("{name} has no address"))?;
            for a in &addrs {
                if let Some(what) = refused(a.ip()) {
                    return Err(format!("{name} resolves to {}", why(a.ip(), what)));
                }
            }
            Ok(Checked {
                url: parsed,
                pin: Some((name, first)),
            })
        }
    }
}

// ---- the worker ---------------------------------------------------------------------------------

/// The delivery worker of one node.
pub struct Worker {
    pub store: Store,
    pub allow_private: bool,
}

impl Worker {
    /// Runs until `stop` is cancelled, then gives the attempts in flight [`SHUTDOWN_GRACE`] to
    /// finish and be recorded; those still running are cut off and their leases released, so
    /// that the next node (or this one restarted) attempts them again at once.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut inflight: JoinSet<()> = JoinSet::new();
        // The deliveries in flight, by task, for releasing them at shutdown.
        let mut leased: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut claim_failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    match done {
                        Ok((id, ())) => { leased.remove(&id); }
                        Err(e) => {
                            leased.remove(&e.id());
                            tracing::warn!(error = %e, "webhook attempt task failed");
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            let free = CONCURRENCY.saturating_sub(inflight.len());
            if free == 0 {
                continue;
            }
            let now = now_ms();
            match this
                .store
                .claim_deliveries(now, now + LEASE_MS, free as i64)
                .await
            {
                Ok(claimed) => {
                    if std::mem::take(&mut claim_failing) {
                        tracing::info!("claiming webhook deliveries works again");
                    }
                    for d in claimed {
                        let this = this.clone();
                        let delivery = d.id.clone();
                        let handle = inflight.spawn(async move { this.attempt(d).await });
                        leased.insert(handle.id(), delivery);
                    }
                }
                // Once per outage, not every poll.
                Err(e) if !claim_failing => {
                    claim_failing = true;
                    tracing::warn!(error = %e, "claiming webhook deliveries failed; retrying every poll");
                }
                Err(_) => {}
            }
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = inflight.join_next_with_id().await {
                if let Ok((id, ())) = done {
                    leased.remove(&id);
                }
            }
        })
        .await;
        if drained.is_err() {
            inflight.abort_all();
            while let Some(done) = inflight.join_next_with_id().await {
                if let Ok((id, ())) = done {
                    leased.remove(&id);
                }
            }
            let ids: Vec<String> = leased.into_values().collect();
            tracing::info!(
                count = ids.len(),
                "webhook attempts cut off by the shutdown; released for another attempt"
            );
            if let Err(e) = this.store.release_deliveries(&ids).await {
                tracing::warn!(error = %e, "releasing webhook deliveries failed; they are attempted again when their leases run out");
            }
        }
    }

    /// One attempt of one delivery, recorded.
    async fn attempt(&self, d: ClaimedDelivery) {
        let started = now_ms();
        let target = match self.store.webhook_target(&d.webhook_id).await {
            Ok(Some(t)) => t,
            // Deleted meanwhile: its deliveries went with it.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading a webhook failed; the delivery is retried when its lease runs out");
                return;
            }
        };
        let outcome = self.send(&target.0, &target.1, &d).await;
        let now = now_ms();
        let attempts = d.attempts + 1;
        let first_attempt_at = d.first_attempt_at.unwrap_or(started);
        let record = match outcome {
            Ok(status) if (200..300).contains(&status) => AttemptRecord {
                attempts,
                first_attempt_at,
                last_status: Some(status),
                last_error: None,
                next_attempt_at: None,
                delivered_at: Some(now),
            },
            failed => {
                let (status, mut error) = match failed {
                    Ok(status) => (Some(status), format!("HTTP {status}")),
                    Err(e) => (None, e),
                };
                let next = next_attempt_at(attempts, first_attempt_at, now);
                if next.is_none() {
                    error.push_str("; given up: no attempt succeeded within 24 hours");
                }
                AttemptRecord {
                    attempts,
                    first_attempt_at,
                    last_status: status,
                    last_error: Some(error),
                    next_attempt_at: next,
                    delivered_at: None,
                }
            }
        };
        tracing::debug!(
            event = %d.event,
            attempts,
            status = ?record.last_status,
            error = ?record.last_error,
            "webhook attempt"
        );
        metrics::counter!(
            "sensorwire_webhook_attempts_total",
            "outcome" => if record.delivered_at.is_some() { "delivered" } else { "failed" }
        )
        .increment(1);
        if let Err(e) = self.store.record_attempt(&d.id, &record).await {
            tracing::warn!(error = %e, "recording a webhook attempt failed; it is attempted again when its lease runs out");
        }
    }

    /// POSTs the delivery; the answer's status, or why there was none.
    async fn send(&self, url: &str, secret: &str, d: &ClaimedDelivery) -> Result<i32, String> {
        let checked = check_url(url, self.allow_private).await?;
        let data = RawValue::from_string(d.payload.clone())
            .map_err(|e| format!("stored payload is not JSON: {e}"))?;
        let body = serde_json::to_vec(&Body {
            event: &d.event,
            data: &data,
            org_id: &d.org_id,
            delivery_id: &d.id,
            sent_at: format_time(now_ms()),
        })
        .map_err(|e| format!("encoding the body: {e}"))?;
        let mut client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some((host, addr)) = &checked.pin {
            client = client.resolve(host, *addr);
        }
        let client = client
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let response = client
            .post(checked.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Sensorwire-Event", &d.event)
            .header("X-Sensorwire-Delivery", &d.id)
            .header("X-Sensorwire-Signature", signature(secret, &body))
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        Ok(i32::from(response.status().as_u16()))
    }
}

/// The body as sent; `data` is the stored payload, byte for byte.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    event: &'a str,
    data: &'a RawValue,
    org_id: &'a str,
    delivery_id: &'a str,
    sent_at: String,
}

/// Why a request failed, without its URL (which may carry credentials): the URL is the
/// webhook's, the reader knows it.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("no answer within {} s", TIMEOUT.as_secs());
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A fresh secret: 32 random bytes, hex.
pub fn generate_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// A fresh webhook id.
pub fn generate_id() -> String {
    format!("wh_{}", hex::encode(rand::random::<[u8; 12]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_rfc_4231() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_to_an_hour_for_a_day() {
        let t0 = 1_000_000;
        assert_eq!(next_attempt_at(1, t0, t0), Some(t0 + 1_000));
        assert_eq!(next_attempt_at(2, t0, t0 + 1_000), Some(t0 + 3_000));
        assert_eq!(next_attempt_at(3, t0, t0), Some(t0 + 4_000));
        assert_eq!(next_attempt_at(12, t0, t0), Some(t0 + 2_048_000));
        assert_eq!(next_attempt_at(13, t0, t0), Some(t0 + 3_600_000));
        assert_eq!(next_attempt_at(1_000, t0, t0), Some(t0 + 3_600_000));
        // The whole schedule: the last attempt is no later than 24 h after the first.
        let (mut now, mut n, mut last) = (t0, 1, t0);
        while let Some(at) = next_attempt_at(n, t0, now) {
            assert!(at > now && at - now <= MAX_RETRY_MS);
            last = at;
            now = at;
            n += 1;
        }
        assert!(last <= t0 + GIVE_UP_AFTER_MS);
        assert!(last > t0 + GIVE_UP_AFTER_MS - MAX_RETRY_MS);
        assert!((30..40).contains(&n), "{n} attempts");
        assert_eq!(next_attempt_at(5, t0, t0 + GIVE_UP_AFTER_MS), None);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_internal_ipv4() {
        for (addr, why) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "reserved"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
        ] {
            assert_eq!(refused(ip(addr)), Some(why), "{addr}");
        }
        for addr in [
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "100.128.0.1",
            "93.184.216.34",
        ] {
            assert_eq!(refused(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn refuses_internal_ipv6() {
        for (addr, why) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.1.1", "link-local"),
            ("::127.0.0.1", "loopback"),
        ] {
            assert_eq!(refused(ip(addr)), Some(why), "{addr}");
        }
        for addr in ["2001:4860:4860::8888", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(refused(ip(addr)), None, "{addr}");
        }
    }

    #[tokio::test]
    async fn checks_urls() {
        let refused = |u: &'static str| async move { check_url(u, false).await.unwrap_err() };
        assert!(refused("ftp://example.com/").await.contains("http"));
        assert!(refused("not a url").await.contains("not a URL"));
        assert!(
            refused("http://127.0.0.1:9/hook")
                .await
                .contains("loopback")
        );
        assert!(refused("http://[::1]/hook").await.contains("loopback"));
        assert!(refused("http://10.0.0.7/").await.contains("private"));
        assert!(refused("http://localhost:8080/").await.contains("loopback"));
        assert!(check_url("http://93.184.216.34/hook", false).await.is_ok());
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
        assert!(check_url("https://localhost/x", true).await.is_ok());
    }
}
