// Several gateway nodes on a real Redis Cluster (issue 16; CONTRACT.md "Many nodes" and "Missed
// events after a reconnect"; PITFALLS "One stream that every event touches": each organisation's
// event log is its own stream `sensorwire:{<org>}:events`, hash-tagged so a Redis Cluster spreads
// organisations over its masters, and a node reads only the organisations it has sockets of).
//
// Three masters with one replica each (redis-cluster.js: six private redis-server children on
// loopback ports, `cluster-node-timeout` 1000 ms), three gateway nodes A, B, C with
// REDIS_URL=redis-cluster://<the three masters> on one fresh PostgreSQL database.
//
//   a. the multi-node basics on the cluster, for two organisations whose streams live on
//      different masters: a batch and an alert posted to A reach a socket on B and one on C of the
//      same organisation, once, with the same offsets; `sensor:reading` reaches a `subscribe:unit`
//      subscriber on C;
//   b. a node with no socket of an organisation takes none of its events from Redis: C holds only
//      a socket of a quiet organisation Y while organisation X (sockets on A and B) is flooded
//      through A — `sensorwire_cluster_org_events_received_total` and
//      `sensorwire_cluster_live_received_total` do not move on C and move on B;
//      `sensorwire_cluster_orgs_followed` is 1 on C;
//   c. the first socket of an organisation on a node connects with an offset it got on another
//      node while readings keep flowing: replay, then `sync:complete { recovered: true }`, then
//      live — every acknowledged reading after the offset exactly once, in order;
//   d. the master owning an organisation's stream SIGKILLed and failed over (its replica
//      promoted) while readings flow through A to a dashboard on B: every ingest request answers
//      (200 or an error, no hang), every acknowledged reading is stored, and the dashboard got every
//      acknowledged reading once or was told `sync:complete { recovered: false }`.
//
// Needs PostgreSQL (TEST_POSTGRES_URL), `redis-server` and `redis-cli` (Debian: redis-server,
// redis-tools): skipped with a message when one is missing, failed instead with CI=true.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  api,
  assertSchema,
  assertStatus,
  createSite,
  createUnit,
  emitAck,
  mintToken,
  randomId,
  sleep,
  withTimeout,
} from './harness.js';
import {
  IN_CI,
  assertBatch,
  clusterSkipReason,
  createDatabase,
  newSecret,
  pollUntil,
  requirePrerequisites,
  startThreeNodes,
} from './cluster-helpers.js';
import { ingest, ingestOk, reading, storedReadings } from './pipeline-helpers.js';
import { assertStrictlyIncreasing, compareOffsets, offsetClient, startPump } from './recovery-helpers.js';
import { assertDelivered, deliveryReport, describeReport, scrapeMetrics } from './delivery-helpers.js';
import { orgStreamKey, orgsOnDistinctMasters, probeRedisCli, startRedisCluster } from './redis-cluster.js';

const FLUSH_MS = 300; // startNode's FLUSH_INTERVAL_MS
// A flush window on every node plus the Redis round trips: "nothing more" checks wait this long.
const QUIET_MS = FLUSH_MS * 2 + 1200;
// Nine processes on a small machine (six redis-server, three debug gateways): generous.
const EVENT_MS = 8000;

// The /metrics names of issue 16.
const ORG_EVENTS_RECEIVED = 'sensorwire_cluster_org_events_received_total';
const LIVE_RECEIVED = 'sensorwire_cluster_live_received_total';
const ORGS_FOLLOWED = 'sensorwire_cluster_orgs_followed';

const skip = await (async () => {
  const reasons = [];
  const base = await clusterSkipReason();
  if (base) reasons.push(base);
  if (!IN_CI) {
    const cli = probeRedisCli();
    if (cli) reasons.push(`redis-cli not available: ${cli}`);
  }
  return reasons.length ? reasons.join('; ') : false;
})();

/** `describe`, or — when a prerequisite is missing outside CI — one skipped test saying why. */
function clusterSuite(title, body) {
  describe(title, () => {
    if (skip) it('runs', (t) => t.skip(skip));
    else body();
  });
}

const readyz = (node) => api(node, 'GET', '/readyz');

function assertAlive(nodes) {
  for (const n of nodes) assert.ok(n.alive(), n.describeExit());
}

/** How often each reading id occurs in `readings`. */
function idCounts(readings) {
  const counts = new Map();
  for (const r of readings) counts.set(r.id, (counts.get(r.id) ?? 0) + 1);
  return counts;
}

const show = (entries) => entries.map((e) => `${e.event}@${e.offset}`).join(', ');

clusterSuite('redis cluster: three gateway nodes on a three-master Redis Cluster (a stream per organisation)', () => {
  let cluster;
  let db;
  let secret;
  let A;
  let B;
  let C;
  let nodes = [];
  const started = [];

  before(async () => {
    await requirePrerequisites();
    const cli = probeRedisCli();
    if (cli) throw new Error(`redis-cli is required for the Redis Cluster tests (Debian: redis-tools): ${cli}`);
    cluster = await startRedisCluster({ masters: 3, replicas: 1 });
    db = await createDatabase();
    secret = newSecret();
    nodes = await startThreeNodes({ databaseUrl: db.url, redisUrl: cluster.url, secret, started });
    [A, B, C] = nodes;
  }, { timeout: 120_000 });

  afterEach(() => {
    for (const n of nodes) n.disconnectSockets();
  });

  after(async () => {
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await cluster?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  /**
   * Organisation `org` with one site and a unit per entry of `units` (safe range 0–10 unless
   * given), created through A; its tokens and the master its stream lives on right now.
   */
  async function setupOrg(org, units = [{}]) {
    const token = (claims) => mintToken({ secret, org, ...claims });
    const admin = token({ sub: `admin-${org}`, role: 'admin' });
    const siteId = `s-${randomId(4)}`;
    await createSite(A, admin, { id: siteId, name: `Site ${siteId}` });
    const created = [];
    for (const spec of units) {
      const id = `u-${randomId(4)}`;
      created.push(await createUnit(A, admin, { id, siteId, name: `Unit ${id}`, tempMin: 0, tempMax: 10, offlineAfterSeconds: 600, ...spec }));
    }
    return {
      org,
      admin,
      siteId,
      units: created,
      unitIds: created.map((u) => u.id),
      operator: token({ sub: `op-${org}`, role: 'operator' }),
      viewer: (sub) => token({ sub, role: 'viewer' }),
      master: await cluster.masterFor(orgStreamKey(org)),
    };
  }

  /**
   * A dashboard of `o` on `node` recording everything it receives (recovery-helpers
   * offsetClient), subscribed to `subscribeUnit` when given.
   */
  async function dashboard(node, o, sub, { subscribeUnit, ...opts } = {}) {
    const c = await offsetClient(node, { token: o.viewer(sub), ...opts });
    if (subscribeUnit) {
      assert.deepEqual(await emitAck(c.socket, 'subscribe:unit', subscribeUnit), { ok: true }, `subscribe:unit on node ${node.name}`);
    }
    return c;
  }

  it('the cluster is up: three masters with a replica each, /readyz 200 with redis ok on every node', async (t) => {
    await cluster.refresh();
    const masters = cluster.nodes.filter((n) => n.role === 'master');
    const replicas = cluster.nodes.filter((n) => n.role === 'replica');
    assert.equal(masters.length, 3, `three masters: ${JSON.stringify(cluster.nodes.map(({ port, role }) => ({ port, role })))}`);
    assert.equal(replicas.length, 3, 'three replicas');
    for (const m of masters) assert.equal(replicas.filter((r) => r.masterPort === m.port).length, 1, `master ${m.port} has one replica`);
    t.diagnostic(`REDIS_URL=${cluster.url}`);
    for (const n of nodes) {
      const res = await readyz(n);
      assertStatus(res, 200, `/readyz on ${n.name}:`);
      assert.equal(res.body.redis, 'ok', `/readyz on ${n.name}: ${res.text}`);
    }
    assertAlive(nodes);
  });

  it('a. for two organisations whose streams live on different masters: a batch and an alert posted to A reach a socket on B and one on C once each, with the same offsets; sensor:reading reaches a subscribe:unit subscriber on C', { timeout: 60_000 }, async (t) => {
    const orgs = await Promise.all((await orgsOnDistinctMasters(cluster, 2)).map((org) => setupOrg(org)));
    assert.notEqual(orgs[0].master, orgs[1].master, 'the two streams live on different masters');
    t.diagnostic(orgs.map((o) => `${orgStreamKey(o.org)} on master ${o.master}`).join('; '));

    const flows = await Promise.all(orgs.map(async (o) => {
      const [unit] = o.units;
      const onB = await dashboard(B, o, 'viewer-b');
      const onC = await dashboard(C, o, 'viewer-c', { subscribeUnit: unit.id });
      const both = (pred, what) => Promise.all([['B', onB], ['C', onC]].map(([name, c]) => c.rec.waitFor(pred, EVENT_MS, `${o.org}, socket on ${name}: ${what}`)));

      // In range: a batch (and sensor:reading on C).
      const { ids: [inRange] } = await ingestOk(A, o.operator, [reading(unit.id, 4.5)]);
      await both((rec) => rec.batchReadings().some((r) => r.id === inRange), 'the batch with the reading posted to A');
      await onC.rec.waitFor((rec) => rec.named('sensor:reading').some((e) => e.payload.id === inRange), EVENT_MS, `${o.org}, subscriber on C: sensor:reading`);
      // Above tempMax: an alert (and a batch, and sensor:reading on C).
      const { ids: [hot] } = await ingestOk(A, o.operator, [reading(unit.id, 12)]);
      await both((rec) => rec.named('alert:triggered').length >= 1 && rec.batchReadings().some((r) => r.id === hot), 'alert:triggered and the batch of the reading above tempMax');
      await onC.rec.waitFor((rec) => rec.named('sensor:reading').some((e) => e.payload.id === hot), EVENT_MS, `${o.org}, subscriber on C: sensor:reading of the reading above tempMax`);
      return { o, unit, onB, onC, ids: [inRange, hot] };
    }));
    await sleep(QUIET_MS); // past a flush window on every node: no late duplicate

    const otherUnits = new Set(flows.flatMap((f) => f.o.unitIds));
    for (const { o, unit, onB, onC, ids } of flows) {
      for (const [name, c] of [['B', onB], ['C', onC]]) {
        const what = `${o.org} (stream on master ${o.master}), socket on ${name}`;
        c.rec.check();
        const batches = c.rec.named('sensor:readings:batch');
        batches.forEach((e) => assertBatch(e.payload));
        // Only its own organisation's unit.
        assert.deepEqual([...new Set(batches.map((e) => e.payload.unitId))].filter((u) => u !== unit.id && otherUnits.has(u)), [],
          `${what}: no batch of the other organisation`);
        const counts = idCounts(c.rec.batchReadings());
        for (const id of ids) assert.equal(counts.get(id) ?? 0, 1, `${what}: reading ${id} exactly once in the batches; timeline: ${c.rec.summary()}`);
        const alerts = c.rec.named('alert:triggered');
        assert.equal(alerts.length, 1, `${what}: exactly one alert:triggered, got ${JSON.stringify(alerts.map((e) => e.payload))}`);
        assert.equal(alerts[0].payload.unitId, unit.id);
        assert.equal(alerts[0].payload.alertType, 'temp_high');
        assert.equal(alerts[0].payload.value, 12);
        const orgEvents = c.rec.events().filter((e) => ['sensor:readings:batch', 'alert:triggered', 'alert:resolved', 'unit:status'].includes(e.event));
        const noOffset = orgEvents.filter((e) => typeof e.offset !== 'string');
        assert.deepEqual(noOffset.map((e) => ({ event: e.event, payload: e.payload })), [], `${what}: every batch, alert and status event carries an offset`);
        assertStrictlyIncreasing(c.rec.offsetEvents(), what);
      }
      // The same events with the same offsets on both nodes.
      const seq = (c) => c.rec.offsetEvents().map((e) => `${e.event}@${e.offset}`);
      assert.deepEqual(seq(onC), seq(onB), `${o.org}: the sockets on B and C received the same events with the same offsets, in the same order`);
      assert.equal(onB.rec.named('alert:triggered')[0].payload.alertId, onC.rec.named('alert:triggered')[0].payload.alertId, `${o.org}: the same alert on B and C`);
      // sensor:reading: each once on C's subscriber, none on B's (not subscribed).
      const live = onC.rec.named('sensor:reading').map((e) => e.payload);
      assert.deepEqual(live.map((r) => r.id), ids, `${o.org}, subscriber on C: each sensor:reading once, in order`);
      assert.deepEqual(onB.rec.named('sensor:reading').map((e) => e.payload.id), [], `${o.org}, socket on B (no subscription): no sensor:reading`);
    }
    assertAlive(nodes);
  });

  it('b. a node with no socket of an organisation takes none of its events from Redis: C (only a socket of a quiet organisation) does not count any of a flood of X through A; B does; C follows one organisation', { timeout: 90_000 }, async (t) => {
    const [X, Y] = await Promise.all((await orgsOnDistinctMasters(cluster, 2)).map((org) => setupOrg(org)));
    const [unit] = X.units;
    const xOnA = await dashboard(A, X, 'x-a');
    const xOnB = await dashboard(B, X, 'x-b', { subscribeUnit: unit.id });
    const yOnC = await dashboard(C, Y, 'y-c');

    // C serves one organisation now (the sockets of earlier tests are gone).
    let followed;
    await pollUntil(async () => {
      const m = await scrapeMetrics(C);
      followed = m.has(ORGS_FOLLOWED) ? m.value(ORGS_FOLLOWED) : 'absent from /metrics';
      return followed === 1;
    }, { ms: 15_000, interval: 250, what: `${ORGS_FOLLOWED} on C (one socket, of ${Y.org}) reaches 1` }).catch((err) => {
      throw new Error(`${err.message}; last value ${followed}`);
    });

    // Warm-up: a reading posted to A reaches B (batch and sensor:reading), so B follows X.
    const { ids: [warm] } = await ingestOk(A, X.operator, [reading(unit.id, 4)]);
    await xOnB.rec.waitFor((rec) => rec.batchReadings().some((r) => r.id === warm) && rec.named('sensor:reading').some((e) => e.payload.id === warm),
      EVENT_MS, 'warm-up: the reading posted to A reaches the socket on B (batch and sensor:reading)');
    await sleep(QUIET_MS);

    const before = { B: await scrapeMetrics(B), C: await scrapeMetrics(C) };
    for (const [name, m] of Object.entries(before)) {
      for (const [metric, type] of [[ORG_EVENTS_RECEIVED, 'counter'], [LIVE_RECEIVED, 'counter'], [ORGS_FOLLOWED, 'gauge']]) {
        assert.ok(m.has(metric), `/metrics on ${name} has a ${metric} sample (no labels); cluster lines:\n${m.lines('sensorwire_cluster')}`);
        assert.equal(m.types.get(metric), type, `${metric} is a ${type}`);
      }
    }

    // The flood: 25 requests of 4 readings, ~50 ms apart, all to A.
    const flood = [];
    for (let i = 0; i < 25; i += 1) {
      const { ids } = await ingestOk(A, X.operator, [0, 1, 2, 3].map((j) => reading(unit.id, 3 + j)));
      flood.push(...ids);
      await sleep(50);
    }
    await Promise.all([
      xOnB.rec.waitFor((rec) => {
        const got = new Set(rec.batchReadings().map((r) => r.id));
        const live = new Set(rec.named('sensor:reading').map((e) => e.payload.id));
        return flood.every((id) => got.has(id) && live.has(id));
      }, EVENT_MS, `socket on B: all ${flood.length} readings of the flood, in batches and as sensor:reading`),
      xOnA.rec.waitFor((rec) => {
        const got = new Set(rec.batchReadings().map((r) => r.id));
        return flood.every((id) => got.has(id));
      }, EVENT_MS, `socket on A: all ${flood.length} readings of the flood in batches`),
    ]);
    await sleep(QUIET_MS);
    const afterFlood = { B: await scrapeMetrics(B), C: await scrapeMetrics(C) };
    const delta = (name, metric) => afterFlood[name].value(metric) - before[name].value(metric);
    t.diagnostic(`flood of ${flood.length} readings: B took ${delta('B', ORG_EVENTS_RECEIVED)} org events and ${delta('B', LIVE_RECEIVED)} live messages from Redis, C ${delta('C', ORG_EVENTS_RECEIVED)} and ${delta('C', LIVE_RECEIVED)}; ` +
      `batches on B's socket: ${xOnB.rec.named('sensor:readings:batch').length}`);

    assert.equal(delta('C', ORG_EVENTS_RECEIVED), 0, `C has no socket of ${X.org}: ${ORG_EVENTS_RECEIVED} must not grow during its flood`);
    assert.equal(delta('C', LIVE_RECEIVED), 0, `C has no subscriber of ${X.org}'s unit: ${LIVE_RECEIVED} must not grow while B's subscriber gets live readings`);
    assert.ok(delta('B', ORG_EVENTS_RECEIVED) > 0, `B has sockets of ${X.org}: ${ORG_EVENTS_RECEIVED} grows during the flood (from ${before.B.value(ORG_EVENTS_RECEIVED)} to ${afterFlood.B.value(ORG_EVENTS_RECEIVED)})`);
    assert.ok(delta('B', LIVE_RECEIVED) > 0, `B has a subscriber of the unit: ${LIVE_RECEIVED} grows (from ${before.B.value(LIVE_RECEIVED)} to ${afterFlood.B.value(LIVE_RECEIVED)})`);
    assert.equal(afterFlood.C.value(ORGS_FOLLOWED), 1, `${ORGS_FOLLOWED} on C: only ${Y.org}`);
    // And C's socket of Y got nothing of X (Y was quiet).
    assert.deepEqual(yOnC.rec.events().map((e) => e.event), [], `the socket of ${Y.org} on C received nothing`);
    // Each reading once on B.
    const counts = idCounts(xOnB.rec.batchReadings());
    const wrong = flood.filter((id) => counts.get(id) !== 1).map((id) => `${id}×${counts.get(id) ?? 0}`);
    assert.deepEqual(wrong, [], 'socket on B: each reading of the flood exactly once in the batches');
    assertAlive(nodes);
  });

  it('c. the first socket of an organisation on C connects with an offset from a batch seen on B while readings keep flowing to A: the replay, sync:complete { recovered: true }, then live — every acknowledged reading after the offset exactly once, in order', { timeout: 90_000 }, async (t) => {
    const [org] = await orgsOnDistinctMasters(cluster, 1);
    const Z = await setupOrg(org, [{}, {}]);
    const ref = await dashboard(B, Z, 'ref-b'); // connected before the first reading: sees every batch
    const pump = startPump(A, Z.operator, Z.unitIds, { temps: [4, 5, 6], pauseMs: 50 });
    try {
      await ref.rec.waitFor((rec) => rec.named('sensor:readings:batch').length >= 4, EVENT_MS, 'reference on B: first batches');
      const offset = ref.rec.named('sensor:readings:batch')[1].offset;
      assert.equal(typeof offset, 'string', 'the batch on B carries an offset');
      // Let events pile up after that offset before the socket on C connects.
      await ref.rec.waitFor((rec) => rec.named('sensor:readings:batch').filter((e) => compareOffsets(e.offset, offset) > 0).length >= 6,
        EVENT_MS, 'reference on B: batches after the chosen offset');

      // C has no socket of Z before this one.
      const r = await offsetClient(C, { token: Z.viewer('r-c'), offset });
      await r.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete on C');
      const sync = r.rec.syncs()[0];
      await r.rec.waitFor((rec) => rec.offsetEvents(sync.index).length >= 4, EVENT_MS, 'live events on C after sync:complete');
      await sleep(500);
      const posted = await pump.stop();
      t.diagnostic(`${posted.length} readings acknowledged while the pump ran; stream ${orgStreamKey(org)} on master ${Z.master}`);

      // Readings of the batches up to the offset (the reference saw every batch): per unit, the
      // newest recordedAt among them. Everything acknowledged after is what C must deliver.
      const cutoff = new Map(Z.unitIds.map((u) => [u, -Infinity]));
      for (const e of ref.rec.named('sensor:readings:batch')) {
        if (compareOffsets(e.offset, offset) > 0) continue;
        for (const x of e.payload.readings) cutoff.set(x.unitId, Math.max(cutoff.get(x.unitId), Date.parse(x.recordedAt)));
      }
      const expected = posted.filter((p) => Date.parse(p.recordedAt) > cutoff.get(p.unitId));
      const wanted = new Set(expected.map((p) => p.id));
      await Promise.all([
        r.rec.waitFor((rec) => {
          const got = new Set(rec.batchReadings().map((x) => x.id));
          return expected.every((p) => got.has(p.id));
        }, EVENT_MS, `socket on C: every reading acknowledged after the offset (${expected.length})`).catch(() => {}), // judged below
        ref.rec.waitFor((rec) => {
          const got = new Set(rec.batchReadings().map((x) => x.id));
          return posted.every((p) => got.has(p.id));
        }, EVENT_MS, `reference on B: every acknowledged reading (${posted.length})`),
      ]);
      await sleep(QUIET_MS);

      assert.equal(r.authSent[0].offset, offset, 'the socket on C sent the offset');
      const syncs = r.rec.syncs();
      assert.equal(syncs.length, 1, `exactly one sync:complete; timeline: ${r.rec.summary()}`);
      assert.equal(sync.payload.recovered, true, `sync:complete ${JSON.stringify(sync.payload)} must say recovered: true: the offset is seconds old`);
      const replayed = r.rec.offsetEvents().filter((e) => e.index < sync.index);
      const live = r.rec.offsetEvents(sync.index);
      t.diagnostic(`replayed ${replayed.length} events before sync:complete, ${live.length} live after; ${expected.length} readings expected`);
      // Before sync:complete nothing but the replay.
      assert.deepEqual(r.rec.events().filter((e) => e.index < sync.index && e.offset === undefined).map((e) => e.event), [],
        'only replayed (offset-carrying) events before sync:complete');
      assert.ok(replayed.length > 0, `events were emitted after the offset before C's socket connected, so there is a replay; timeline: ${r.rec.summary()}`);
      for (const e of r.rec.offsetEvents()) {
        assert.ok(compareOffsets(e.offset, offset) > 0, `${e.event}@${e.offset} is not after the offset sent (${offset})`);
      }
      if (typeof sync.payload.offset === 'string') {
        for (const e of replayed) assert.ok(compareOffsets(e.offset, sync.payload.offset) <= 0, `replayed ${e.event}@${e.offset} is after sync:complete's offset ${sync.payload.offset}`);
        for (const e of live) assert.ok(compareOffsets(e.offset, sync.payload.offset) > 0, `live ${e.event}@${e.offset} is not newer than sync:complete's offset ${sync.payload.offset}`);
      } else {
        assert.fail(`a recovered sync:complete carries the offset the client now has: ${JSON.stringify(sync.payload)}`);
      }
      // In order, once: offsets strictly increase across replay and live.
      assertStrictlyIncreasing(r.rec.offsetEvents(), 'socket on C (replay, then live)');
      // The same events as the reference on B after the offset.
      const refAfter = ref.rec.offsetEvents().filter((e) => compareOffsets(e.offset, offset) > 0);
      const a = r.rec.offsetEvents().map((e) => `${e.event}@${e.offset}`);
      const b = refAfter.map((e) => `${e.event}@${e.offset}`);
      assert.deepEqual({ missing: b.filter((x) => !a.includes(x)), extra: a.filter((x) => !b.includes(x)) }, { missing: [], extra: [] },
        'socket on C: exactly the events the reference on B received after the offset');
      assert.deepEqual(r.rec.offsetEvents().map((e) => e.payload), refAfter.map((e) => e.payload), 'socket on C: the same payloads, in the same order');
      // Against what ingest acknowledged: every reading after the offset once, nothing before it.
      const counts = idCounts(r.rec.batchReadings());
      const missing = expected.filter((p) => !counts.has(p.id)).map((p) => `${p.id} (${p.recordedAt})`);
      const twice = [...counts].filter(([, n]) => n > 1).map(([id, n]) => `${id}×${n}`);
      const extra = [...counts.keys()].filter((id) => !wanted.has(id));
      assert.deepEqual({ missing, twice, extra }, { missing: [], twice: [], extra: [] },
        `socket on C: every reading acknowledged after the offset exactly once (replayed ∪ live), none from before it; ${expected.length} expected, replayed ${show(replayed.slice(0, 5))}…`);
      for (const unitId of Z.unitIds) {
        const times = r.rec.batchReadings().filter((x) => x.unitId === unitId).map((x) => Date.parse(x.recordedAt));
        for (let i = 1; i < times.length; i += 1) assert.ok(times[i - 1] < times[i], `socket on C: readings of ${unitId} in recordedAt order across replay and live`);
      }
      assertAlive(nodes);
    } finally {
      await pump.stop().catch(() => {});
    }
  });

  it("d. the master owning an organisation's stream SIGKILLed and failed over while readings flow to A with a dashboard on B: every request answers (200 or an error, no hang), every acknowledged reading is stored, the dashboard got each once or was told recovered: false", { timeout: 240_000 }, async (t) => {
    const [org] = await orgsOnDistinctMasters(cluster, 1);
    const W = await setupOrg(org);
    const [unit] = W.units;
    const victim = await cluster.masterFor(orgStreamKey(org));
    // A dashboard as the README writes it: reconnects by itself, with the last offset it saw.
    const dash = await dashboard(B, W, 'dash-b', { reconnection: true, reconnectionDelay: 200, reconnectionDelayMax: 1000 });

    // The poster: one reading per request, ~100 ms apart, each request awaited.
    const requests = []; // { status: number | 'network', ms, at, text }
    const accepted = []; // { id, ackedAt }
    let stopped = false;
    const posting = (async () => {
      let n = 0;
      while (!stopped) {
        n += 1;
        const sent = [reading(unit.id, 4 + (n % 3))];
        const at = Date.now();
        try {
          const res = await ingest(A, W.operator, sent);
          requests.push({ status: res.status, ms: Date.now() - at, at, text: res.text.slice(0, 300), body: res.body });
          if (res.status === 200) {
            assertSchema('IngestResponse', res.body);
            const ackedAt = Date.now();
            res.body.ids.forEach((id) => accepted.push({ id, ackedAt }));
          }
        } catch (err) {
          // api() aborts after 10 s: a hang ends here too.
          requests.push({ status: 'network', ms: Date.now() - at, at, text: `${err.name}: ${err.message}` });
        }
        await sleep(100);
      }
    })();

    let promoted;
    let killedAt;
    let failedOverAt;
    try {
      await dash.rec.waitFor((rec) => rec.batchReadings().length >= 5, EVENT_MS, 'the dashboard on B gets readings before the kill');
      killedAt = Date.now();
      await cluster.killMaster(victim);
      promoted = await cluster.waitForFailover(victim, { ms: 60_000 });
      failedOverAt = Date.now();
      t.diagnostic(`master ${victim} (stream ${orgStreamKey(org)}) SIGKILLed; replica ${promoted} promoted, cluster ok ${failedOverAt - killedAt} ms later`);
      // Go on posting: until a reading acknowledged after the failover reached the dashboard
      // (at most 30 s), then 3 s more.
      await pollUntil(() => {
        const later = accepted.filter((a) => a.ackedAt > failedOverAt);
        const got = new Set(dash.rec.batchReadings().map((r) => r.id));
        return later.some((a) => got.has(a.id));
      }, { ms: 30_000, interval: 250, what: 'a reading acknowledged after the failover reaches the dashboard on B' }).catch((err) => t.diagnostic(err.message));
      await sleep(3000);
    } finally {
      stopped = true;
      await withTimeout(posting, 15_000, 'the poster did not finish its last request');
    }
    const stoppedAt = Date.now();

    // The dashboard settles: every acknowledged reading, or a recovered: false and everything after it.
    await pollUntil(() => {
      const r = deliveryReport(dash.rec, accepted);
      if (r.complete) return true;
      if (r.lost.length === 0) return false;
      const after = accepted.filter((a) => a.ackedAt > r.lost.at(-1).at);
      return after.every((a) => r.counts.has(a.id));
    }, { ms: 30_000, interval: 250, what: 'the dashboard on B settles' }).catch(() => {}); // judged below
    await sleep(QUIET_MS);

    const statuses = {};
    for (const r of requests) statuses[r.status] = (statuses[r.status] ?? 0) + 1;
    const slowest = Math.max(...requests.map((r) => r.ms));
    const report = deliveryReport(dash.rec, accepted);
    t.diagnostic(`${requests.length} requests (${JSON.stringify(statuses)}), slowest ${slowest} ms; ${accepted.length} readings acknowledged; ` +
      `${describeReport('dashboard on B', report, accepted.length)}; settled ${Date.now() - stoppedAt} ms after the last post`);

    // 1. Every request answered, none hung.
    const hung = requests.filter((r) => r.status === 'network');
    assert.deepEqual(hung.map((r) => `${new Date(r.at).toISOString()} after ${r.ms} ms: ${r.text}`), [],
      'every ingest request is answered (200 or an HTTP error), none hangs or loses its connection');
    // 2. A refusal is a proper error answer.
    for (const r of requests.filter((x) => x.status !== 200 && x.status !== 'network')) {
      assert.ok(r.status === 429 || r.status >= 500, `a refused ingest during the failover is 503/5xx or 429, got ${r.status}: ${r.text}`);
      assertSchema('ApiError', r.body);
    }
    assert.ok(accepted.some((a) => a.ackedAt > failedOverAt), 'ingest acknowledges readings again after the failover');
    // 3. Nothing acknowledged is lost from storage.
    const stored = await storedReadings(A, W.viewer('reader'), unit.id, '?limit=10000');
    const storedCounts = idCounts(stored);
    const notStored = accepted.filter((a) => !storedCounts.has(a.id)).map((a) => a.id);
    assert.deepEqual(notStored, [], `every reading acknowledged 200 is in GET /api/units/${unit.id}/readings (${stored.length} stored, ${accepted.length} acknowledged)`);
    assert.deepEqual([...storedCounts].filter(([, n]) => n > 1), [], 'each stored once');
    // 4. The dashboard: every acknowledged reading once, or told recovered: false (then
    //    everything acknowledged after that, once).
    assertDelivered('dashboard on B', dash.rec, accepted, { allowLost: true });
    // 5. The gateway is healthy on the new topology.
    for (const n of nodes) {
      await pollUntil(async () => (await readyz(n)).status === 200, { ms: 15_000, interval: 250, what: `/readyz on ${n.name} answers 200 after the failover` });
    }
    assertAlive(nodes);
  });
});
