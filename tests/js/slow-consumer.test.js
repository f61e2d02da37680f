// Slow consumers (src/deliver/slow.rs): a Socket.io client that stops reading while batches
// flow to its organisation is disconnected once its outgoing buffer stays full, counted in
// `sensorwire_slow_consumer_disconnects_total{client="socketio"}`; the gateway's memory stays
// bounded and a normal client of the same organisation receives every batch.
//
// The stalled client is a raw engine.io WebSocket (ws) that completes the Socket.io handshake and
// then stops reading its TCP socket (`ws._socket.pause()`), like a frozen tab. Storage plays no
// part in this, so it runs on SQLite only. The engine.io heartbeat is set to two minutes, well
// past the test's bound, so that only the slow-consumer mechanism can end the socket in time.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';

import { api, assertStatus, connect, mintToken, randomId, sleep, withTimeout } from './harness.js';
import { openRawConnected } from './hostile-helpers.js';
import { assertEachOnce, collect, freshSite, ingest, ownDatabase, spawnGateway } from './pipeline-helpers.js';

const BUFFER = 16; // SOCKET_BUFFER_SIZE: packets queued per socket
const READINGS_PER_REQUEST = 500; // one ~170 KB batch per unit and flush window
const UNITS = 3;
const EVICT_WITHIN_MS = 45_000; // from the pause: fill the kernel buffers, then the queue, then the grace (~10 s)
// What may flow to the organisation before the test stops, and how much the gateway may grow
// meanwhile: the stalled socket's queue holds at most BUFFER batches (~3 MB), so RSS must not
// follow the volume sent to it.
const FLOW_BYTES = 32 * 1024 * 1024;
const RSS_GROWTH_LIMIT = 64 * 1024 * 1024;

/** Resident set size of `pid` in bytes (Linux /proc). */
function rss(pid) {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m, `no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

async function metric(gw, sample) {
  const res = await api(gw, 'GET', '/metrics');
  assertStatus(res, 200, 'GET /metrics:');
  const line = res.text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line ? Number(line.slice(sample.length + 1)) : 0;
}

async function waitForMetric(gw, sample, pred, ms, what) {
  let last;
  await withTimeout((async () => {
    for (;;) {
      last = await metric(gw, sample);
      if (pred(last)) return;
      await sleep(200);
    }
  })(), ms, `${what} (${sample} is ${last})`);
  return last;
}

const SLOW = 'sensorwire_slow_consumer_disconnects_total{client="socketio"}';
const WS_CONNECTED = 'sensorwire_sockets_connected{transport="websocket"}';

describe('slow consumers [sqlite]', () => {
  let db;
  let gw;
  before(async () => {
    db = await ownDatabase('sqlite');
    gw = await spawnGateway({
      databaseUrl: db.url,
      env: {
        SOCKET_BUFFER_SIZE: String(BUFFER),
        FLUSH_INTERVAL_MS: '100',
        BATCH_MAX_READINGS: String(READINGS_PER_REQUEST),
        SOCKET_PING_INTERVAL_MS: '120000',
        SOCKET_PING_TIMEOUT_MS: '120000',
        // The replay log keeps every organisation event for RECOVERY_WINDOW_SECS on purpose, up
        // to its own byte budget (tested in history.rs); bounded small here, so what this test
        // measures is the memory a stalled socket costs, not the log's.
        RECOVERY_MAX_BYTES: String(8 * 1024 * 1024),
      },
    });
  });
  after(async () => {
    if (gw) await gw.stop();
    if (db) await db.drop();
  });

  it('a client that stops reading is disconnected and counted; RSS stays bounded; a normal client gets every batch', { timeout: 240_000 }, async () => {
    const token = (sub, role = 'viewer') => mintToken({ secret: gw.secret, sub, org: 'acme', role });
    const admin = token('slow-admin', 'admin');
    const { units } = await freshSite(gw, admin, Array.from({ length: UNITS }, () => ({})));

    const normal = await connect(gw, { token: token('normal-viewer'), transports: ['websocket'] });
    const batches = collect(normal, 'sensor:readings:batch', 'ReadingsBatch');
    let delivered = 0; // bytes of batch JSON the organisation's sockets were sent (each)
    normal.on('sensor:readings:batch', (b) => {
      delivered += JSON.stringify(b).length;
    });
    const stalled = await openRawConnected(gw, token('frozen-tab'));
    let stalledClosed = false;
    stalled.closed.then(() => { stalledClosed = true; });
    assert.equal(await metric(gw, WS_CONNECTED), 2, 'both sockets are connected');
    const slowBefore = await metric(gw, SLOW);

    stalled.ws._socket.pause(); // the tab freezes: nothing more is read from the connection
    const pausedAt = Date.now();
    const baseline = rss(gw.child.pid);
    let peak = baseline;
    const sampler = setInterval(() => {
      try {
        peak = Math.max(peak, rss(gw.child.pid));
      } catch {
        // the process is gone; the assertions below say so
      }
    }, 100);

    // Batches flow: each unit gets 500 readings a request, as fast as ingest answers, each reading
    // padded to the longest deviceId and source so every batch is large.
    const ids = [];
    let pumping = true;
    const pad = 'x'.repeat(100);
    const pump = async (unit) => {
      while (pumping) {
        const at = new Date(Date.now() - 1000).toISOString();
        const readings = Array.from({ length: READINGS_PER_REQUEST }, (_, i) => ({
          unitId: unit.id,
          deviceId: `d-${randomId(4)}-${i}-${pad}`.slice(0, 128),
          source: `slow-consumer-test-${'s'.repeat(64)}`.slice(0, 64),
          temperature: 4 + (i % 10) / 10,
          humidity: 50,
          battery: 90,
          signalStrength: -60,
          recordedAt: at,
        }));
        const res = await ingest(gw, admin, readings);
        assertStatus(res, 200, 'ingest while a consumer is stalled:');
        ids.push(...res.body.ids);
      }
    };
    const pumps = units.map(pump);

    try {
      // Disconnected and counted, well before any heartbeat would notice.
      await waitForMetric(gw, SLOW, (v) => v === slowBefore + 1, EVICT_WITHIN_MS,
        `the stalled socket was not disconnected as a slow consumer within ${EVICT_WITHIN_MS} ms of the pause`);
      const evictedAfter = Date.now() - pausedAt;
      await waitForMetric(gw, WS_CONNECTED, (v) => v === 1, 5000, 'the stalled socket is gone from sockets_connected');
      assert.ok(normal.connected, 'the normal client is still connected');
      // Batches keep flowing to the normal client after the eviction, until FLOW_BYTES went out.
      const idsAtEviction = ids.length;
      await sleep(2000);
      await withTimeout((async () => {
        while (delivered < FLOW_BYTES) await sleep(200);
      })(), 90_000, `${FLOW_BYTES} bytes of batches did not flow`);
      assert.ok(ids.length > idsAtEviction, 'ingest went on after the eviction');
      pumping = false;
      await Promise.all(pumps);
      clearInterval(sampler);
      peak = Math.max(peak, rss(gw.child.pid));

      // Every batch reached the normal client, each reading once.
      await batches.waitFor((l) => l.reduce((n, b) => n + b.readings.length, 0) >= ids.length, 30_000,
        `all ${ids.length} readings batched to the normal client`);
      assertEachOnce(batches.all.flatMap((b) => b.readings), ids, 'normal client');
      const sentMb = (delivered / 1048576).toFixed(1);
      const growthMb = ((peak - baseline) / 1048576).toFixed(1);
      console.log(`# evicted ${evictedAfter} ms after the pause; ${ids.length} readings, ${sentMb} MB of batch JSON sent to each socket; RSS ${(baseline / 1048576).toFixed(1)} MB → peak ${(peak / 1048576).toFixed(1)} MB (+${growthMb} MB)`);
      assert.ok(peak - baseline < RSS_GROWTH_LIMIT,
        `gateway RSS grew by ${growthMb} MB (limit ${RSS_GROWTH_LIMIT / 1048576} MB) while ${sentMb} MB flowed`);

      // The server ended the connection: once the client reads again it drains what was in
      // flight and finds the connection closed (no further pings or batches keep it open).
      assert.equal(stalledClosed, false, 'a paused client cannot have seen the close yet');
      stalled.ws._socket.resume();
      await withTimeout(stalled.closed, 15_000, 'the stalled connection was not closed by the server');
      assert.doesNotMatch(gw.stderr(), /panicked/, 'the gateway logged a panic');
    } finally {
      pumping = false;
      clearInterval(sampler);
      await Promise.allSettled(pumps);
    }
  });
});
