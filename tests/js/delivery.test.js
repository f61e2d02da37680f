// Delivery without silent loss (issue 14; CONTRACT.md `sensor:readings:batch` — "every reading
// arrives exactly once, none is ever dropped" —, "Missed events after a reconnect" — a connected
// socket may get `sync:complete { recovered: false }` at any time when it missed events that
// cannot be replayed; short of that nothing is skipped — and "Many nodes"; README "Running
// several nodes" and "Operating sensorwire").
//
// Black-box, with the stock socket.io-client. A dashboard passes when it received every accepted
// reading (the ids of the ingest answers) exactly once across its `sensor:readings:batch` events,
// or — only where the gateway may legitimately lose events (Redis away) — when it was told
// `sync:complete { recovered: false }` and got nothing twice before that.
//
//   1. bursts bigger than the socket queue (SOCKET_BUFFER_SIZE at its default, 256 packets):
//      600 units, then 2,000 units, one reading per unit per second for 10 s, to WebSocket and
//      long-polling dashboards, one WebSocket dashboard and one long-polling dashboard reading
//      slowly. The retention window (120 s) is ample: nobody may be told `recovered: false`, and
//      nobody may be disconnected. The same for slow dashboards whose catch-up spans engine.io
//      pings (SOCKET_PING_INTERVAL_MS=3000).
//   2. a long-polling-only dashboard of a 300-unit organisation for 20 s.
//   3. two nodes, Redis SIGKILLed for 10 s and restarted on the same port while both nodes
//      ingest; a dashboard that disconnects during the outage reconnects with its offset (never
//      `recovered: true` over a gap); every live `recovered: false` is counted in
//      sensorwire_resyncs_total{reason="redis_outage"} on its node.
//   4. one of two nodes SIGKILLed right after acknowledging readings it had not sent out yet.
//   5. /metrics: sensorwire_deliveries_deferred_total, sensorwire_catchup_seconds,
//      sensorwire_sockets_catching_up, sensorwire_resyncs_total{reason}.
//
// One node: SQLite; the 600-unit burst also on PostgreSQL. Several nodes: a fresh PostgreSQL
// database and a private redis-server per suite (skipped with a message when either is missing,
// failed instead with CI=true).
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { api, forEachEngine, sleep, useGateway } from './harness.js';
import {
  clusterSkipReason,
  createDatabase,
  newSecret,
  pollUntil,
  requirePrerequisites,
  startNode,
  startRedis,
} from './cluster-helpers.js';
import { freshOrg } from './ws-helpers.js';
import { offsetClient, rawClient } from './recovery-helpers.js';
import {
  assertDelivered,
  createUnits,
  deliveryReport,
  describeReport,
  scrapeMetrics,
  startPoster,
  throttlePolling,
  throttleWebSocket,
} from './delivery-helpers.js';

// After the last post: how long dashboards may take to catch up, and how long to watch for a
// late duplicate once every reading is there (a flush window and then some).
const CATCH_UP_MS = 30_000;
const QUIET_MS = 1500;

// The one-node gateway runs with the defaults that matter here: SOCKET_BUFFER_SIZE 256 (every
// burst is bigger than the queue), RECOVERY_WINDOW_SECS 120 and RECOVERY_MAX_BYTES 256 MiB with no
// RECOVERY_MAX_EVENTS cap — the 2,000-unit burst (22,000 organisation events, ~10 MB) stays well
// inside the log, so no dashboard may be told `recovered: false`.
const ONE_NODE_ENV = {};

const DEFERRED = 'sensorwire_deliveries_deferred_total';
const RESYNCS = 'sensorwire_resyncs_total';
const CATCHUP = 'sensorwire_catchup_seconds';
const CATCHING_UP = 'sensorwire_sockets_catching_up';

/** An organisation with one site of `count` units; `{ o, unitIds, operator, viewer(sub) }`. */
async function bigOrg(gw, count) {
  const o = await freshOrg(gw, [{ units: [] }]);
  const unitIds = await createUnits(gw, o.admin, o.sites[0].id, count);
  return {
    o,
    unitIds,
    operator: o.token({ sub: 'devices', role: 'operator' }),
    viewer: (sub) => o.token({ sub, role: 'viewer' }),
  };
}

// The slow dashboards. `websocket-slow` reads at most 40 KB/s while the devices post — a few
// times less than the gateway sends it (a batch event of one reading is ~310 bytes: ~185 KB/s
// for 600 units, ~620 KB/s for 2,000) — and normally once they stop (a tab busy during the burst;
// a WebSocket reader kept at 40 KB/s would need minutes to drain the backlog). `polling-slow`
// sends each poll 300 ms after the previous answer, throughout, catch-up included (a congested
// connection). See delivery-helpers.js for how.
const SLOW_WS_BYTES_PER_SECOND = 40_000;
const SLOW_POLL_DELAY_MS = 300;

/**
 * Opens the dashboards `kinds` (`'websocket'`, `'polling'`, `'websocket-slow'`, `'polling-slow'`)
 * of `org`, each recording everything it receives (recordSocket), and starts throttling the slow
 * ones. Resolves `[{ name, socket, rec, throttle? }]`.
 */
async function openDashboards(gw, org, kinds) {
  const dashboards = await Promise.all(kinds.map(async (kind, i) => {
    const transport = kind.startsWith('polling') ? 'polling' : 'websocket';
    const name = `${kind} #${i}`;
    const { socket, rec, connected } = rawClient(gw, { token: org.viewer(`viewer-${i}`) }, { transports: [transport] });
    await connected;
    assert.equal(socket.io.engine.transport.name, transport, `${name} is connected over ${transport}`);
    return { name, kind, socket, rec };
  }));
  for (const d of dashboards) {
    if (d.kind === 'websocket-slow') d.throttle = throttleWebSocket(d.socket, { bytesPerSecond: SLOW_WS_BYTES_PER_SECOND });
    if (d.kind === 'polling-slow') d.throttle = throttlePolling(d.socket, SLOW_POLL_DELAY_MS);
  }
  return dashboards;
}

/**
 * Waits until every dashboard (`{ rec, socket }`) has every accepted reading, was told
 * `recovered: false`, or is disconnected — at most `ms` —, then a quiet period. Resolves with a
 * Map of the time each one got there (ms after `from`), for the diagnostics; a timeout is left
 * to the assertions that follow.
 */
async function settle(dashboards, accepted, { ms = CATCH_UP_MS, from = Date.now() } = {}) {
  const doneAt = new Map();
  const gaveUp = new Set(); // disconnected (they do not reconnect by themselves): nothing more comes
  await pollUntil(() => {
    for (const d of dashboards) {
      if (doneAt.has(d) || gaveUp.has(d)) continue;
      const r = deliveryReport(d.rec, accepted);
      if (r.complete || r.lost.length > 0) doneAt.set(d, Date.now() - from);
      else if (!d.socket.connected) gaveUp.add(d);
    }
    return doneAt.size + gaveUp.size === dashboards.length;
  }, { ms, interval: 250, what: 'every dashboard has every accepted reading' }).catch(() => {});
  await sleep(QUIET_MS);
  return doneAt;
}

/**
 * One reading per unit per second for `seconds` s to the dashboards `kinds`; asserts exactly
 * once for each (no `recovered: false` allowed) and that no dashboard was disconnected.
 */
async function burst(gw, t, org, kinds, seconds) {
  const dashboards = await openDashboards(gw, org, kinds);
  const deferredBefore = (await scrapeMetrics(gw)).value(DEFERRED);
  const poster = startPoster(gw, org.operator, org.unitIds, { periodMs: 1000, ticks: seconds, strict: true });
  await poster.done;
  const postedAt = Date.now();
  for (const d of dashboards) if (d.kind === 'websocket-slow') d.throttle.stop();
  const doneAt = await settle(dashboards, poster.accepted, { from: postedAt });
  for (const d of dashboards) d.throttle?.stop();
  const metrics = await scrapeMetrics(gw);
  t.diagnostic(`${poster.accepted.length} readings accepted in ${seconds} s (${org.unitIds.length} units); ` +
    `${DEFERRED} +${metrics.value(DEFERRED) - deferredBefore}`);
  for (const d of dashboards) {
    const r = deliveryReport(d.rec, poster.accepted);
    const when = doneAt.has(d) ? `complete ${doneAt.get(d)} ms after the last post` : 'never complete';
    t.diagnostic(`${describeReport(d.name, r, poster.accepted.length)}; ${when}` +
      `${d.kind === 'websocket-slow' ? `; read ${d.throttle.bytes} bytes at ≤ ${SLOW_WS_BYTES_PER_SECOND} B/s, paused ${d.throttle.pauses} times` : ''}` +
      `${d.kind === 'polling-slow' ? `; ${d.throttle.polls} delayed polls` : ''}`);
  }
  for (const d of dashboards) {
    // A disconnect first: it is the cause of whatever is missing after it (these dashboards do
    // not reconnect by themselves, and a stock dashboard without an offset would never learn).
    const r = deliveryReport(d.rec, poster.accepted);
    assert.deepEqual(r.disconnects, [], `${d.name} was disconnected while reading — ${describeReport(d.name, r, poster.accepted.length)}`);
    assertDelivered(d.name, d.rec, poster.accepted);
    assert.ok(d.socket.connected, `${d.name} is still connected`);
  }
  return { dashboards, poster };
}

const FIVE_AND_TWO = ['websocket', 'websocket', 'websocket', 'websocket', 'websocket-slow', 'polling', 'polling-slow'];

forEachEngine('delivery: bursts bigger than the socket queue, one node', (engine) => {
  const gw = useGateway(engine, { env: ONE_NODE_ENV });
  let org600; // shared by the 600-unit burst and the /metrics test (each posts readings of its own)
  const sixHundred = async () => {
    org600 ??= bigOrg(gw, 600);
    return org600;
  };

  it('600 units × 1 reading/s for 10 s: five WebSocket and two long-polling dashboards (one of each reading slowly) each get every reading exactly once, none told recovered: false', { timeout: 120_000 }, async (t) => {
    await burst(gw, t, await sixHundred(), FIVE_AND_TWO, 10);
  });

  if (engine !== 'sqlite') return;

  // No `polling-slow` here: at one poll per 300 ms it takes at most 256 packets a poll (its
  // queue), under 900 events a second against 2,000 sent — its own pace would need about a
  // minute after the burst to catch up.
  it('2,000 units × 1 reading/s for 10 s (two requests of 1,000 a second): WebSocket, slow WebSocket and long-polling dashboards each get every reading exactly once', { timeout: 180_000 }, async (t) => {
    const org = await bigOrg(gw, 2000);
    await burst(gw, t, org, ['websocket', 'websocket-slow', 'polling'], 10);
  });

  it('a long-polling-only dashboard of a 300-unit organisation, 1 reading per unit per second for 20 s: every reading exactly once', { timeout: 120_000 }, async (t) => {
    const org = await bigOrg(gw, 300);
    await burst(gw, t, org, ['polling'], 20);
  });

  it('/metrics: a slow dashboard that fell behind is counted in sensorwire_deliveries_deferred_total and sensorwire_catchup_seconds, sensorwire_sockets_catching_up returns to 0, no resync; it still gets every reading once', { timeout: 120_000 }, async (t) => {
    const org = await sixHundred();
    const before_ = await scrapeMetrics(gw);
    await burst(gw, t, org, ['websocket', 'websocket-slow', 'polling-slow'], 4);
    // The gauge drops when a socket rejoins live delivery; give the last one a moment.
    const m = await pollUntil(async () => {
      const s = await scrapeMetrics(gw);
      return s.value(CATCHING_UP) === 0 ? s : false;
    }, { ms: 5000, interval: 200, what: `${CATCHING_UP} returns to 0 once every dashboard caught up` });
    const deferred = m.value(DEFERRED) - before_.value(DEFERRED);
    const caughtUp = m.value(`${CATCHUP}_count`) - before_.value(`${CATCHUP}_count`);
    t.diagnostic(`${DEFERRED} +${deferred}; ${CATCHUP}_count +${caughtUp} (sum +${(m.value(`${CATCHUP}_sum`) - before_.value(`${CATCHUP}_sum`)).toFixed(3)} s)`);
    assert.equal(m.types.get(DEFERRED), 'counter', `${DEFERRED} is a counter:\n${m.lines(DEFERRED)}`);
    assert.equal(m.types.get(CATCHUP), 'histogram', `${CATCHUP} is a histogram:\n${m.lines(CATCHUP)}`);
    assert.equal(m.types.get(CATCHING_UP), 'gauge', `${CATCHING_UP} is a gauge:\n${m.lines(CATCHING_UP)}`);
    assert.ok(deferred > 0, `a throttled dashboard fell behind a 600-event burst (queue of 256): ${DEFERRED} must grow (before ${before_.value(DEFERRED)}, after ${m.value(DEFERRED)})`);
    assert.ok(caughtUp > 0, `the dashboards that fell behind caught up: ${CATCHUP}_count must grow\n${m.lines(CATCHUP)}`);
    assert.equal(m.sum(RESYNCS) - before_.sum(RESYNCS), 0, `nobody was beyond the retention window: ${RESYNCS} unchanged\n${m.lines(RESYNCS)}`);
  });
});

// A dashboard being caught up has a queue that is full by design (the catch-up refills it as fast
// as the client reads): engine.io's heartbeat must still get through, or the gateway drops the
// session (HeartbeatTimeout) while the client is reading. With the default ping interval (25 s)
// only a catch-up longer than that meets a ping; at 3 s, every catch-up here meets several.
describe('delivery: slow dashboards being caught up across engine.io heartbeats (SOCKET_PING_INTERVAL_MS=3000) [sqlite]', () => {
  const gw = useGateway('sqlite', { env: { ...ONE_NODE_ENV, SOCKET_PING_INTERVAL_MS: '3000' } });

  it('600 units × 1 reading/s for 5 s: a slow long-polling and a slow WebSocket dashboard stay connected through the pings and get every reading exactly once', { timeout: 120_000 }, async (t) => {
    const org = await bigOrg(gw, 600);
    await burst(gw, t, org, ['websocket', 'websocket-slow', 'polling-slow'], 5);
  });
});

// ---------------------------------------------------------------------------------------------
// Several nodes: a fresh PostgreSQL database and a private redis-server per suite

const clusterSkip = await clusterSkipReason();

/** `describe`, or — when PostgreSQL or redis-server is missing outside CI — one skipped test saying why. */
function clusterSuite(title, body) {
  describe(title, () => {
    if (clusterSkip) it('runs', (t) => t.skip(clusterSkip));
    else body();
  });
}

/**
 * Before/after hooks for two nodes A and B on a fresh database and a private Redis. Returns a
 * handle whose fields are filled in by `before`; `sockets` are closed by `after`.
 */
function useTwoNodes({ envA = {}, envB = {} } = {}) {
  const c = { redis: undefined, db: undefined, secret: newSecret(), A: undefined, B: undefined, sockets: new Set() };
  const started = [];
  before(async () => {
    await requirePrerequisites();
    c.redis = await startRedis();
    c.db = await createDatabase();
    const start = async (name, env) => {
      const node = await startNode({ name, databaseUrl: c.db.url, redisUrl: c.redis.url, secret: c.secret, env });
      started.push(node); // stopped by `after` even if the other one fails to start
      return node;
    };
    c.A = await start('A', envA); // runs the migrations
    c.B = await start('B', envB);
  }, { timeout: 60_000 });
  after(async () => {
    for (const s of c.sockets) s.disconnect();
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await c.redis?.stop();
    await c.db?.drop().catch(() => {});
  }, { timeout: 30_000 });
  return c;
}

/** `GET /readyz` answers 200 on `node` within `ms`. */
const ready = (node, ms, what) => pollUntil(async () => (await api(node, 'GET', '/readyz')).status === 200, { ms, interval: 250, what });

clusterSuite('delivery across two nodes: Redis SIGKILLed for 10 s and restarted on the same port while both nodes ingest', () => {
  const c = useTwoNodes();

  it('every dashboard on either node ends with every accepted reading exactly once, or was told sync:complete { recovered: false } (and got nothing twice before); a dashboard that reconnects with its offset after the outage is never told recovered: true while it misses a reading', { timeout: 150_000 }, async (t) => {
    const { A, B, redis, sockets } = c;
    const o = await freshOrg(A, [{ units: [] }], { secret: c.secret });
    const unitIds = await createUnits(A, o.admin, o.sites[0].id, 100);
    const [unitsOfA, unitsOfB] = [unitIds.slice(0, 50), unitIds.slice(50)];
    const operator = o.token({ sub: 'devices', role: 'operator' });
    const viewer = (sub) => o.token({ sub, role: 'viewer' });

    const dashboards = [];
    for (const [node, n] of [[A, 1], [A, 2], [B, 1], [B, 2]]) {
      const d = await offsetClient({ url: node.url, sockets }, { token: viewer(`${node.name}${n}`) });
      dashboards.push({ name: `dashboard ${n} on ${node.name}`, node, ...d });
    }
    // Disconnects during the outage and reconnects (auth.offset = the last offset it saw) after.
    const away = { name: 'reconnecting dashboard on B', node: B, ...(await offsetClient({ url: B.url, sockets }, { token: viewer('away') })) };

    // Each node ingests half of the units, 50 readings every 200 ms.
    const posters = [startPoster(A, operator, unitsOfA, { periodMs: 200 }), startPoster(B, operator, unitsOfB, { periodMs: 200 })];
    const accepted = () => posters.flatMap((p) => p.accepted);
    try {
      // Cross-node delivery works before the outage: every dashboard has readings of both nodes.
      await pollUntil(() => [...dashboards, away].every((d) => {
        const got = new Set(d.rec.batchReadings().map((r) => r.unitId));
        return unitsOfA.some((u) => got.has(u)) && unitsOfB.some((u) => got.has(u));
      }), { ms: 10_000, interval: 200, what: 'before the outage, every dashboard gets readings ingested by A and by B' });
      await sleep(2000);

      await redis.kill('SIGKILL');
      const killedAt = Date.now();
      await sleep(3000);
      const offsetSent = away.rec.lastOffset;
      away.socket.disconnect();
      await sleep(Math.max(0, killedAt + 10_000 - Date.now()));
      await redis.restart();
      const restartedAt = Date.now();
      await Promise.all([A, B].map((n) => ready(n, 20_000, `/readyz on ${n.name} answers 200 after Redis came back`)));
      t.diagnostic(`Redis down ${restartedAt - killedAt} ms; both nodes ready again ${Date.now() - restartedAt} ms after the restart`);

      const reconnectFrom = away.rec.entries.length;
      away.socket.connect();
      await away.rec.waitFor((rec) => rec.kinds('connect').some((e) => e.index >= reconnectFrom), 8000, 'the reconnecting dashboard connects again');
      assert.ok(offsetSent !== undefined && away.authSent.at(-1).offset === offsetSent,
        `the reconnect carried the last offset seen before the outage (${offsetSent}): ${JSON.stringify(away.authSent)}`);
      await away.rec.waitFor((rec) => rec.syncs(reconnectFrom).length >= 1, 10_000, 'sync:complete after the reconnect with an offset');

      await sleep(5000);
    } finally {
      await Promise.all(posters.map((p) => p.stop()));
    }
    const all = accepted();
    const refused = posters.flatMap((p) => p.refused);
    t.diagnostic(`${all.length} readings accepted (A ${posters[0].accepted.length}, B ${posters[1].accepted.length}); ${refused.length} requests refused${refused.length ? `: ${JSON.stringify(refused.slice(0, 3))}` : ''}`);
    assert.ok(posters.every((p) => p.accepted.length > 0), 'both nodes accepted readings');

    // Every dashboard: complete, or told recovered: false.
    const everyone = [...dashboards, away];
    await settle(everyone, all, { ms: 20_000 });
    for (const d of everyone) t.diagnostic(describeReport(d.name, deliveryReport(d.rec, all), all.length));
    for (const d of everyone) assertDelivered(d.name, d.rec, all, { allowLost: true });

    // The reconnect: a recovered: true (not preceded by a recovered: false) promises that nothing
    // acknowledged before it is missing.
    const reconnectIndex = away.rec.kinds('connect')[1].index;
    const [sync] = away.rec.syncs(reconnectIndex);
    const lostBefore = away.rec.syncs().some((e) => e.index < sync.index && e.payload.recovered === false);
    t.diagnostic(`reconnecting dashboard: sync:complete ${JSON.stringify(sync.payload)} after the reconnect${lostBefore ? ' (after an earlier recovered: false)' : ''}`);
    if (sync.payload.recovered === true && !lostBefore) {
      const r = deliveryReport(away.rec, all);
      const promised = new Set(all.filter((a) => a.ackedAt <= sync.at).map((a) => a.id));
      const missing = r.missing.filter((id) => promised.has(id));
      assert.deepEqual(missing.slice(0, 20), [],
        `the reconnecting dashboard was told recovered: true, but ${missing.length} readings acknowledged before that never reached it — ${describeReport(away.name, r, all.length)}`);
      assert.deepEqual(r.duplicated.slice(0, 20), [], `the reconnecting dashboard was told recovered: true and got readings twice`);
    }

    // Every sync:complete { recovered: false } sent on a live connection (all but the answer to
    // the reconnect) is counted by its node: sensorwire_resyncs_total{reason="redis_outage"}.
    for (const node of [A, B]) {
      const live = everyone.filter((d) => d.node === node)
        .flatMap((d) => d.rec.syncs().filter((e) => e.payload.recovered === false && !(d === away && e.index === sync.index)));
      const m = await scrapeMetrics(node);
      const counted = m.value(RESYNCS, { reason: 'redis_outage' });
      t.diagnostic(`node ${node.name}: ${live.length} live sync:complete { recovered: false } received by the dashboards; ${RESYNCS}: ${m.lines(RESYNCS).replace(/\n/g, ', ') || 'absent'}`);
      assert.ok(counted >= live.length,
        `node ${node.name}: the dashboards got ${live.length} sync:complete { recovered: false } on live connections, but ${RESYNCS}{reason="redis_outage"} is ${counted}\n${m.lines(RESYNCS)}`);
    }
    assert.ok(A.alive(), A.describeExit());
    assert.ok(B.alive(), B.describeExit());
  });
});

clusterSuite('delivery across two nodes: a node SIGKILLed right after acknowledging readings it had not sent out yet', () => {
  // FLUSH_INTERVAL_MS at its default (1000 ms): when A dies, up to a second of readings it
  // acknowledged are still waiting for their batch.
  const c = useTwoNodes({ envA: { FLUSH_INTERVAL_MS: '1000' }, envB: { FLUSH_INTERVAL_MS: '1000' } });

  it('a dashboard on B gets every reading A acknowledged, exactly once, in sensor:readings:batch events, within 10 s of the kill', { timeout: 90_000 }, async (t) => {
    const { A, B, sockets } = c;
    const o = await freshOrg(B, [{ units: [] }], { secret: c.secret });
    const unitIds = await createUnits(B, o.admin, o.sites[0].id, 20);
    const operator = o.token({ sub: 'devices', role: 'operator' });
    const dashboard = await offsetClient({ url: B.url, sockets }, { token: o.token({ sub: 'viewer', role: 'viewer' }) });

    // 20 readings every 100 ms to A only; after 3 s, A is SIGKILLed as soon as a request is
    // acknowledged (and before the next one is sent: nothing is in flight).
    let armed = false;
    let killedAt;
    let pendingAtKill;
    let poster;
    const armTimer = setTimeout(() => { armed = true; }, 3000);
    poster = startPoster(A, operator, unitIds, {
      periodMs: 100,
      strict: true,
      onAck: () => {
        if (!armed || killedAt) return;
        A.child.kill('SIGKILL');
        killedAt = Date.now();
        poster.stop();
        pendingAtKill = deliveryReport(dashboard.rec, poster.accepted).missing.length;
      },
    });
    try {
      await poster.done;
    } finally {
      clearTimeout(armTimer);
    }
    assert.ok(killedAt, 'A was killed');
    const { signal } = await A.exited;
    assert.equal(signal, 'SIGKILL');
    const accepted = poster.accepted;
    t.diagnostic(`${accepted.length} readings acknowledged by A; ${pendingAtKill} of them not yet on the dashboard when A was killed`);
    assert.ok(pendingAtKill > 0, 'precondition: A had acknowledged readings that had not reached the dashboard when it was killed');

    const doneAt = await settle([dashboard], accepted, { ms: 10_000, from: killedAt });
    const r = deliveryReport(dashboard.rec, accepted);
    t.diagnostic(`${describeReport('dashboard on B', r, accepted.length)}; ${doneAt.size ? `complete ${[...doneAt.values()][0]} ms after the kill` : 'not complete 10 s after the kill'}`);
    assertDelivered('dashboard on B', dashboard.rec, accepted);
    assert.ok(dashboard.socket.connected, 'the dashboard on B stayed connected');
    assert.ok(B.alive(), B.describeExit());
  });
});
