// `/metrics` after a scripted session: every counter and gauge the session touches moves by
// exactly what the session did (src/observe.rs names them; README "Operating sensorwire").
//
// One gateway per engine, one test: the deltas are exact because nothing else talks to it.
import assert from 'node:assert/strict';
import { before, it } from 'node:test';

import {
  api,
  assertStatus,
  forEachEngine,
  sleep,
  useGateway,
  withTimeout,
} from './harness.js';
import { collect, freshSite, ingest, ingestOk, reading } from './pipeline-helpers.js';

const FLUSH_MS = 200;

/**
 * Prometheus text → Map of `name{label="v",...}` (labels sorted) → number. Comments and blank
 * lines are skipped; every sample line must parse.
 */
export function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
    assert.ok(m, `not a Prometheus sample line: ${JSON.stringify(line)}`);
    const labels = [];
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels.push([l[1], l[2]]);
    samples.set(key(m[1], Object.fromEntries(labels)), Number(m[3]));
  }
  return samples;
}

function key(name, labels = {}) {
  const parts = Object.keys(labels).sort().map((k) => `${k}="${labels[k]}"`);
  return parts.length ? `${name}{${parts.join(',')}}` : name;
}

async function scrape(gw) {
  const res = await api(gw, 'GET', '/metrics');
  assertStatus(res, 200, 'GET /metrics:');
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
  return parseMetrics(res.text);
}

/** Value of one sample (0 when the series does not exist yet: nothing was counted). */
const value = (samples, name, labels) => samples.get(key(name, labels)) ?? 0;

/** Scrapes until `pred(samples)` holds (metrics of disconnects land a moment after the event). */
async function scrapeUntil(gw, pred, what, ms = 5000) {
  let last;
  await withTimeout((async () => {
    for (;;) {
      last = await scrape(gw);
      if (pred(last)) return;
      await sleep(50);
    }
  })(), ms, what).catch((err) => {
    throw new Error(`${err.message}\nlast scrape:\n${[...(last ?? [])].filter(([k]) => k.startsWith('sensorwire_')).map(([k, v]) => `${k} ${v}`).join('\n')}`);
  });
  return last;
}

forEachEngine('/metrics after a scripted session', (engine) => {
  const gw = useGateway(engine, {
    env: { FLUSH_INTERVAL_MS: String(FLUSH_MS), INGEST_PER_SECOND_PER_KEY: '2' },
  });
  let admin;
  before(() => {
    admin = gw.token({ sub: 'metrics-admin', org: 'acme', role: 'admin' });
  });

  it('connects, refusals, ingest outcomes, batches, alerts and 429s each move their metric by what happened', async () => {
    const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
    const keyRes = await api(gw, 'POST', '/api/keys', { token: admin, body: { name: 'metrics-key' } });
    assertStatus(keyRes, 201, 'POST /api/keys:');
    const apiKey = keyRes.body.key;

    // Series appear when first counted; one that is absent here counts as 0.
    const before = await scrape(gw);
    const delta = (after, name, labels) => value(after, name, labels) - value(before, name, labels);

    // Sockets: one over WebSocket, one over long-polling, one refused for a bad token.
    const ws = await gw.connect({ token: admin, transports: ['websocket'] });
    const polling = await gw.connect({ token: gw.token({ sub: 'metrics-viewer', org: 'acme', role: 'viewer' }), transports: ['polling'] });
    const refused = await gw.connectError({ token: 'not-a-jwt' });
    assert.match(refused.message, /^unauthorized/);
    const batches = collect(ws, 'sensor:readings:batch', 'ReadingsBatch');
    const triggered = collect(ws, 'alert:triggered', 'AlertTriggered');
    const resolved = collect(ws, 'alert:resolved', 'AlertResolved');
    const statuses = collect(ws, 'unit:status', 'UnitStatusChanged');

    let connected = await scrapeUntil(gw, (s) =>
      delta(s, 'sensorwire_sockets_connected', { transport: 'websocket' }) === 1
      && delta(s, 'sensorwire_sockets_connected', { transport: 'polling' }) === 1,
    'sockets_connected by transport');
    assert.equal(delta(connected, 'sensorwire_socket_connects_total'), 2, 'two accepted handshakes');
    assert.equal(delta(connected, 'sensorwire_socket_connect_errors_total', { reason: 'invalid_token' }), 1);
    assert.equal(delta(connected, 'sensorwire_socket_connect_errors_total', { reason: 'missing_token' }), 0);

    // Ingest: 3 new readings, then the same 3 again (duplicates) with 1 new one.
    const first = [reading(unit.id, 4), reading(unit.id, 5), reading(unit.id, 6)];
    const r1 = await ingestOk(gw, admin, first);
    assert.deepEqual([r1.accepted, r1.duplicates], [3, 0]);
    const r2 = await ingestOk(gw, admin, [...first, reading(unit.id, 5.5)]);
    assert.deepEqual([r2.accepted, r2.duplicates], [1, 3]);
    let okRequests = 2;
    let accepted = 4;
    await batches.waitFor((l) => l.flatMap((b) => b.readings).length >= 4, 5000, 'batches with the 4 new readings');

    // An alert: three readings above tempMax open one temp_high alert; one back in range resolves it.
    for (const t of [9, 10, 11]) await ingestOk(gw, admin, [reading(unit.id, t)]);
    await triggered.waitFor((l) => l.length >= 1, 5000, 'alert:triggered');
    await ingestOk(gw, admin, [reading(unit.id, 6)]);
    await resolved.waitFor((l) => l.length >= 1, 5000, 'alert:resolved');
    okRequests += 4;
    accepted += 4;

    // 429: the key may make 2 requests a second with a burst of 4; ten at once exceed it.
    const flood = await Promise.all(Array.from({ length: 10 }, () => ingest(gw, { apiKey }, [reading(unit.id, 5)])));
    const statusesSeen = flood.map((r) => r.status);
    const limited = statusesSeen.filter((s) => s === 429).length;
    const floodOk = statusesSeen.filter((s) => s === 200).length;
    assert.ok(limited >= 1, `some of the flood is refused with 429: ${statusesSeen}`);
    assert.equal(limited + floodOk, 10, `only 200 and 429: ${statusesSeen}`);
    for (const r of flood.filter((x) => x.status === 429)) assert.ok(Number(r.headers.get('retry-after')) >= 1, 'Retry-After');
    okRequests += floodOk;
    accepted += floodOk;

    await batches.waitFor((l) => l.flatMap((b) => b.readings).length >= accepted, 5000, `batches with all ${accepted} readings`);
    await sleep(3 * FLUSH_MS); // nothing further should come; let the last counters land

    const after = await scrapeUntil(gw, (s) => value(s, 'sensorwire_buffered_readings') === 0, 'buffered_readings back to 0');
    assert.equal(delta(after, 'sensorwire_ingest_requests_total', { status: '200' }), okRequests, 'ingest 200s');
    assert.equal(delta(after, 'sensorwire_ingest_requests_total', { status: '429' }), limited, 'ingest 429s');
    assert.equal(delta(after, 'sensorwire_readings_total', { outcome: 'accepted' }), accepted, 'readings accepted');
    assert.equal(delta(after, 'sensorwire_readings_total', { outcome: 'duplicate' }), 3, 'readings duplicate');

    // Each broadcast counts once, however many sockets receive it; the admin socket is in the
    // organisation room, which every one of these events reaches.
    assert.equal(delta(after, 'sensorwire_events_emitted_total', { event: 'sensor:readings:batch' }), batches.all.length,
      'one sensor:readings:batch counted per batch broadcast');
    assert.equal(batches.all.flatMap((b) => b.readings).length, accepted, 'every accepted reading was batched once');
    assert.equal(delta(after, 'sensorwire_events_emitted_total', { event: 'alert:triggered' }), 1);
    assert.equal(delta(after, 'sensorwire_events_emitted_total', { event: 'alert:resolved' }), 1);
    assert.equal(delta(after, 'sensorwire_events_emitted_total', { event: 'unit:status' }), statuses.all.length,
      `unit:status broadcasts: ${JSON.stringify(statuses.all.map((s) => s.status))}`);
    assert.equal(delta(after, 'sensorwire_alerts_opened_total', { type: 'temp_high' }), 1);
    assert.equal(delta(after, 'sensorwire_alerts_resolved_total', { type: 'temp_high' }), 1);

    // Histograms: one commit per accepted request at most (group commit may merge them), each timed.
    const commits = delta(after, 'sensorwire_commit_batch_readings_count');
    assert.ok(commits >= 1 && commits <= okRequests, `group commits: ${commits} for ${okRequests} requests`);
    assert.equal(delta(after, 'sensorwire_commit_seconds_count'), commits, 'every commit is timed');
    assert.ok(delta(after, 'sensorwire_commit_batch_readings_sum') >= accepted, 'committed rows cover the accepted readings');
    assert.ok(delta(after, 'sensorwire_flush_latency_seconds_count') >= 1, 'flush latency recorded');

    // Nothing that did not happen moved.
    assert.equal(delta(after, 'sensorwire_slow_consumer_disconnects_total', { client: 'socketio' }), 0);
    assert.equal(delta(after, 'sensorwire_storage_errors_total'), 0);

    // Disconnecting brings the gauges back.
    ws.disconnect();
    polling.disconnect();
    connected = await scrapeUntil(gw, (s) =>
      delta(s, 'sensorwire_sockets_connected', { transport: 'websocket' }) === 0
      && delta(s, 'sensorwire_sockets_connected', { transport: 'polling' }) === 0,
    'sockets_connected back after disconnects');
    assert.equal(delta(connected, 'sensorwire_socket_connects_total'), 2, 'no further connects');
  });
});
