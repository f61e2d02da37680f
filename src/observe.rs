//! Every metric of the gateway, named and counted in one place (Prometheus text at `/metrics`).
//!
//! Labels stay low-cardinality: transports, outcomes, status codes, event kinds — never an
//! organisation, unit, socket or user id.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide recorder; the handle renders `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("sensorwire_commit_batch_readings".into()),
            &[
                1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "sensorwire_deliveries_deferred_total",
        "Organisation events a socket could not take at once (its queue was full): it left live delivery and is caught up from the event log at its own pace"
    );
    describe_counter!(
        "sensorwire_webhook_attempts_total",
        "Webhook delivery attempts made by this node, by outcome (delivered, failed)"
    );
    describe_counter!(
        "sensorwire_resyncs_total",
        "sync:complete { recovered: false } sent to a connected socket, by reason (behind_retention: it fell further behind than the log keeps; redis_outage: events were lost while Redis was away)"
    );
    describe_histogram!(
        "sensorwire_catchup_seconds",
        "How long a socket that fell behind took to catch up and rejoin live delivery"
    );
    describe_gauge!(
        "sensorwire_sockets_catching_up",
        "Sockets currently being caught up from the event log"
    );
    describe_gauge!(
        "sensorwire_sockets_connected",
        "Connected Socket.io sockets by transport at connect"
    );
    describe_counter!(
        "sensorwire_socket_connects_total",
        "Accepted Socket.io handshakes"
    );
    describe_counter!(
        "sensorwire_socket_connect_errors_total",
        "Refused Socket.io handshakes by reason"
    );
    describe_counter!(
        "sensorwire_events_emitted_total",
        "Server events broadcast, by event"
    );
    describe_counter!(
        "sensorwire_ingest_requests_total",
        "Ingest requests by HTTP status"
    );
    describe_counter!(
        "sensorwire_readings_total",
        "Ingested readings by outcome (accepted, duplicate)"
    );
    describe_histogram!(
        "sensorwire_commit_batch_readings",
        "Readings per group commit"
    );
    describe_histogram!("sensorwire_commit_seconds", "Duration of a group commit");
    describe_histogram!(
        "sensorwire_flush_latency_seconds",
        "From commit to the reading's batch being emitted"
    );
    describe_gauge!(
        "sensorwire_buffered_readings",
        "Readings stored and waiting for their batch"
    );
    describe_counter!("sensorwire_alerts_opened_total", "Alerts opened by type");
    describe_counter!(
        "sensorwire_alerts_resolved_total",
        "Alerts resolved by type"
    );
    describe_counter!(
        "sensorwire_slow_consumer_disconnects_total",
        "Clients closed for not reading fast enough"
    );
    describe_counter!(
        "sensorwire_client_events_refused_total",
        "Client events refused by the rate limit"
    );
    describe_counter!(
        "sensorwire_storage_errors_total",
        "Storage operations that failed"
    );
    describe_counter!(
        "sensorwire_redis_outages_total",
        "Times Redis became unreachable"
    );
    describe_counter!(
        "sensorwire_replays_total",
        "Reconnects with an offset, by outcome (recovered, lost)"
    );
    describe_counter!(
        "sensorwire_replayed_events_total",
        "Missed events sent again to reconnecting sockets"
    );
    describe_gauge!(
        "sensorwire_replay_log_events",
        "Organisation events kept in memory for replays (one node)"
    );
    describe_gauge!(
        "sensorwire_replay_log_bytes",
        "Bytes held by the in-memory replay log (one node), within RECOVERY_MAX_BYTES"
    );
    describe_gauge!(
        "sensorwire_plain_ws_connected",
        "Connected plain WebSocket clients"
    );
    describe_counter!(
        "sensorwire_cluster_org_events_received_total",
        "Organisation events this node took from Redis (only organisations it has sockets of)"
    );
    describe_counter!(
        "sensorwire_cluster_live_received_total",
        "Live readings this node took from Redis (only sites it has subscribers of)"
    );
    describe_gauge!(
        "sensorwire_cluster_orgs_followed",
        "Organisations whose events this node follows in Redis"
    );
}

/// Organisation events taken from Redis (announcements, and entries read to fill a gap).
pub fn cluster_org_event_received(events: usize) {
    counter!("sensorwire_cluster_org_events_received_total").increment(events as u64);
}

/// Live readings another node published, taken from Redis.
pub fn cluster_live_received(readings: usize) {
    counter!("sensorwire_cluster_live_received_total").increment(readings as u64);
}

pub fn orgs_followed(orgs: usize) {
    gauge!("sensorwire_cluster_orgs_followed").set(orgs as f64);
}

pub fn socket_connected(transport: &'static str) {
    gauge!("sensorwire_sockets_connected", "transport" => transport).increment(1.0);
    counter!("sensorwire_socket_connects_total").increment(1);
}

pub fn socket_disconnected(transport: &'static str) {
    gauge!("sensorwire_sockets_connected", "transport" => transport).decrement(1.0);
}

pub fn socket_refused(reason: &'static str) {
    counter!("sensorwire_socket_connect_errors_total", "reason" => reason).increment(1);
}

/// The metric label of an event name: the gateway's own names, `published` for the rest.
pub fn event_label(event: &str) -> &'static str {
    match event {
        "sensor:readings:batch" => "sensor:readings:batch",
        "sensor:reading" => "sensor:reading",
        "alert:triggered" => "alert:triggered",
        "alert:resolved" => "alert:resolved",
        "alert:acknowledged" => "alert:acknowledged",
        "unit:status" => "unit:status",
        _ => "published",
    }
}

/// A replay after a reconnect: recovered (with how many events) or lost.
pub fn replay(recovered: bool, events: usize) {
    let outcome = if recovered { "recovered" } else { "lost" };
    counter!("sensorwire_replays_total", "outcome" => outcome).increment(1);
    counter!("sensorwire_replayed_events_total").increment(events as u64);
}

pub fn replay_log(events: usize, bytes: usize) {
    gauge!("sensorwire_replay_log_events").set(events as f64);
    gauge!("sensorwire_replay_log_bytes").set(bytes as f64);
}

/// `event` must be one of the gateway's own names or `"published"`.
pub fn emitted(event: &'static str) {
    counter!("sensorwire_events_emitted_total", "event" => event).increment(1);
}

pub fn ingest_request(status: u16) {
    counter!("sensorwire_ingest_requests_total", "status" => status.to_string()).increment(1);
}

pub fn readings(accepted: usize, duplicates: usize) {
    counter!("sensorwire_readings_total", "outcome" => "accepted").increment(accepted as u64);
    counter!("sensorwire_readings_total", "outcome" => "duplicate").increment(duplicates as u64);
}

pub fn committed(rows: usize, took: Duration) {
    histogram!("sensorwire_commit_batch_readings").record(rows as f64);
    histogram!("sensorwire_commit_seconds").record(took.as_secs_f64());
}

pub fn flushed(after_commit: Duration) {
    histogram!("sensorwire_flush_latency_seconds").record(after_commit.as_secs_f64());
}

pub fn buffered(now: usize) {
    gauge!("sensorwire_buffered_readings").set(now as f64);
}

pub fn alert_opened(kind: &'static str) {
    counter!("sensorwire_alerts_opened_total", "type" => kind).increment(1);
}

pub fn alert_resolved(kind: &'static str) {
    counter!("sensorwire_alerts_resolved_total", "type" => kind).increment(1);
}

pub fn slow_consumer(kind: &'static str) {
    counter!("sensorwire_slow_consumer_disconnects_total", "client" => kind).increment(1);
}

pub fn event_refused() {
    counter!("sensorwire_client_events_refused_total").increment(1);
}

pub fn storage_error() {
    counter!("sensorwire_storage_errors_total").increment(1);
}

pub fn redis_outage() {
    counter!("sensorwire_redis_outages_total").increment(1);
}

pub fn plain_ws(delta: f64) {
    gauge!("sensorwire_plain_ws_connected").increment(delta);
}

/// A socket could not take an organisation event at once and is caught up instead.
pub fn delivery_deferred() {
    counter!("sensorwire_deliveries_deferred_total").increment(1);
    gauge!("sensorwire_sockets_catching_up").increment(1.0);
}

/// A socket that fell behind is live again (caught up, or told to refetch, or gone).
pub fn caught_up(took: Duration) {
    gauge!("sensorwire_sockets_catching_up").decrement(1.0);
    histogram!("sensorwire_catchup_seconds").record(took.as_secs_f64());
}

/// A connected socket was told `sync:complete { recovered: false }`.
pub fn resync(reason: &'static str) {
    counter!("sensorwire_resyncs_total", "reason" => reason).increment(1);
}
