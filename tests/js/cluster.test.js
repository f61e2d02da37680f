// Several gateway nodes (CONTRACT.md "Many nodes"): three nodes A, B, C on one PostgreSQL
// database and one private Redis (the Socket.io Redis adapter over fred). A reading posted to any
// node reaches every subscribed client on every node, once; exactly one alert per excursion even
// when several nodes ingest concurrently; one offline alert per silence; a Redis restart
// (PITFALLS "fred reconnects") and an unreachable PostgreSQL are survived.
//
// Needs PostgreSQL (TEST_POSTGRES_URL) and `redis-server` on PATH: skipped with a message when
// either is missing, failed instead with CI=true.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  api,
  assertApiError,
  assertSchema,
  assertStatus,
  connect,
  createSite,
  createUnit,
  emitAck,
  mintToken,
  randomId,
  sleep,
} from './harness.js';
import {
  assertBatch,
  clusterSkipReason,
  collect,
  countInBatches,
  createDatabase,
  newSecret,
  pollUntil,
  reading,
  requirePrerequisites,
  startNode,
  startThreeNodes,
  startRedis,
  tcpProxy,
} from './cluster-helpers.js';

const FLUSH_MS = 300;
// Long enough for a flush window on every node plus the Redis round trip: "no duplicate" checks
// wait this long after the expected events arrived.
const QUIET_MS = FLUSH_MS * 2 + 900;
const EVENT_MS = 5000;

const skip = await clusterSkipReason();

/** `describe`, or — when PostgreSQL or redis-server is missing outside CI — one skipped test saying why. */
function clusterSuite(title, body) {
  describe(title, () => {
    if (skip) it('runs', (t) => t.skip(skip));
    else body();
  });
}

/** `POST /api/readings/ingest` on `node`. */
const ingest = (node, token, readings) => api(node, 'POST', '/api/readings/ingest', { token, body: { readings } });

async function ingestOk(node, token, readings) {
  const res = await ingest(node, token, readings);
  assertStatus(res, 200, `POST /api/readings/ingest on node ${node.name}:`);
  assertSchema('IngestResponse', res.body);
  assert.equal(res.body.ids.length, readings.length, 'ids has one entry per reading');
  return res.body;
}

const readyz = (node) => api(node, 'GET', '/readyz');

async function activeAlerts(node, token, unitId) {
  const res = await api(node, 'GET', '/api/alerts?status=active', { token });
  assertStatus(res, 200, `GET /api/alerts?status=active on node ${node.name}:`);
  assert.ok(Array.isArray(res.body), 'alerts list is a bare JSON array');
  for (const a of res.body) assertSchema('Alert', a);
  return res.body.filter((a) => a.unitId === unitId);
}

function assertAlive(nodes) {
  for (const n of nodes) assert.ok(n.alive(), n.describeExit());
}

clusterSuite('cluster: three nodes, one PostgreSQL, one Redis', () => {
  let redis;
  let db;
  let secret;
  let A;
  let B;
  let C;
  let nodes = [];
  const started = [];
  let org;
  let admin;
  let operator;

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    nodes = await startThreeNodes({ databaseUrl: db.url, redisUrl: redis.url, secret, started });
    [A, B, C] = nodes;
    org = `org-${randomId(4)}`;
    admin = mintToken({ secret, sub: 'admin', org, role: 'admin' });
    operator = mintToken({ secret, sub: 'operator', org, role: 'operator' });
  }, { timeout: 60_000 });

  afterEach(() => {
    for (const n of nodes) n.disconnectSockets();
  });

  after(async () => {
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  const viewerToken = (sub) => mintToken({ secret, sub, org, role: 'viewer' });

  /** A site and one unit (created through node A) with fresh ids. */
  async function freshUnit(unit = {}) {
    const siteId = `s-${randomId(4)}`;
    await createSite(A, admin, { id: siteId, name: `Site ${siteId}` });
    const id = `u-${randomId(4)}`;
    return createUnit(A, admin, { id, siteId, name: `Unit ${id}`, offlineAfterSeconds: 300, ...unit });
  }

  /** A connected socket of `sub` on `node`, collecting batches, live readings, alerts, status. */
  async function watcher(node, sub, { subscribeUnit } = {}) {
    const socket = await connect(node, { token: viewerToken(sub), transports: ['websocket'] });
    const w = {
      socket,
      batches: collect(socket, 'sensor:readings:batch', 'ReadingsBatch'),
      live: collect(socket, 'sensor:reading', 'SensorReading'),
      alerts: collect(socket, 'alert:triggered', 'AlertTriggered'),
      status: collect(socket, 'unit:status', 'UnitStatusChanged'),
    };
    if (subscribeUnit) {
      assert.deepEqual(await emitAck(socket, 'subscribe:unit', subscribeUnit), { ok: true }, `subscribe:unit on node ${node.name}`);
    }
    return w;
  }

  it('a reading posted to B reaches a socket on A (batch), a subscribed socket on C (sensor:reading), and both sockets of one user on A and C, once each', async () => {
    const unit = await freshUnit({ tempMin: 0, tempMax: 10 });
    const onA = await watcher(A, 'alice');
    const onC = await watcher(C, 'carol', { subscribeUnit: unit.id });
    // Two tabs of one user, one on A and one on C.
    const userOnA = await watcher(A, 'dave');
    const userOnC = await watcher(C, 'dave');

    const sent = reading(unit.id, 4.5);
    const { ids: [id], accepted } = await ingestOk(B, operator, [sent]);
    assert.equal(accepted, 1);

    const hasIt = (list) => countInBatches(list.filter((b) => b.unitId === unit.id), id) > 0;
    await Promise.all([
      onA.batches.waitFor(hasIt, EVENT_MS, 'socket on A: batch with the reading posted to B'),
      userOnA.batches.waitFor(hasIt, EVENT_MS, "user's socket on A: batch with the reading posted to B"),
      userOnC.batches.waitFor(hasIt, EVENT_MS, "user's socket on C: batch with the reading posted to B"),
      onC.batches.waitFor(hasIt, EVENT_MS, 'subscribed socket on C: batch'),
      onC.live.waitFor((l) => l.some((r) => r.id === id), EVENT_MS, 'subscribed socket on C: sensor:reading'),
    ]);
    await sleep(QUIET_MS); // past the flush window on every node: no late duplicate

    for (const [what, w] of [['socket on A', onA], ['subscribed socket on C', onC], ["user's socket on A", userOnA], ["user's socket on C", userOnC]]) {
      const batches = w.batches.forUnit(unit.id);
      batches.forEach(assertBatch);
      assert.equal(batches.length, 1, `${what}: exactly one sensor:readings:batch for the unit, got ${JSON.stringify(batches)}`);
      assert.equal(countInBatches(batches, id), 1, `${what}: the reading appears once`);
      const r = batches[0].readings[0];
      assert.equal(r.temperature, 4.5);
      assert.equal(Date.parse(r.recordedAt), Date.parse(sent.recordedAt));
    }
    const live = onC.live.forUnit(unit.id);
    assert.equal(live.length, 1, `subscribed socket on C: exactly one sensor:reading, got ${JSON.stringify(live)}`);
    assert.equal(live[0].id, id);
    // Sockets not in the unit room get no sensor:reading, whichever node they are on.
    for (const [what, w] of [['socket on A', onA], ["user's socket on A", userOnA], ["user's socket on C", userOnC]]) {
      assert.deepEqual(w.live.forUnit(unit.id), [], `${what} is not subscribed to the unit: no sensor:reading`);
    }
    assertAlive(nodes);
  });

  it('readings posted to each of A, B and C reach every socket on every node exactly once', async () => {
    const unit = await freshUnit({ tempMin: 0, tempMax: 10 });
    const watchers = await Promise.all(nodes.map((n) => watcher(n, `w-${n.name}`, { subscribeUnit: unit.id })));
    const posted = await Promise.all(nodes.map(async (n, i) => {
      const { ids: [id] } = await ingestOk(n, operator, [reading(unit.id, 3 + i)]);
      return id;
    }));
    assert.equal(new Set(posted).size, 3, 'three distinct stored ids');
    await Promise.all(watchers.map((w, i) => Promise.all([
      w.batches.waitFor((l) => posted.every((id) => countInBatches(l, id) > 0), EVENT_MS, `socket on ${nodes[i].name}: batches with all three readings`),
      w.live.waitFor((l) => posted.every((id) => l.some((r) => r.id === id)), EVENT_MS, `socket on ${nodes[i].name}: sensor:reading for all three`),
    ])));
    await sleep(QUIET_MS);
    watchers.forEach((w, i) => {
      const batches = w.batches.forUnit(unit.id);
      batches.forEach(assertBatch);
      for (const id of posted) {
        assert.equal(countInBatches(batches, id), 1, `socket on ${nodes[i].name}: reading ${id} once in the batches`);
        assert.equal(w.live.forUnit(unit.id).filter((r) => r.id === id).length, 1, `socket on ${nodes[i].name}: one sensor:reading for ${id}`);
      }
      assert.ok(batches.length <= 3, `socket on ${nodes[i].name}: at most one batch per ingesting node (got ${batches.length})`);
    });
  });

  it('the same excursion posted concurrently to A, B and C opens exactly one alert', async () => {
    const unit = await freshUnit({ tempMin: 2, tempMax: 8 });
    // Bring the unit to "ok" first, so the excursion below is a change of state on every node.
    await ingestOk(B, operator, [reading(unit.id, 5)]);
    const watchers = await Promise.all(nodes.map((n) => watcher(n, `alerts-${n.name}`)));

    // Several above-max readings per node, all at once; plus one identical reading sent to all
    // three nodes (stored once, same id everywhere).
    const shared = reading(unit.id, 12.5);
    const requests = [];
    for (const n of nodes) {
      requests.push({ node: n, readings: [shared], shared: true });
      for (let i = 0; i < 4; i += 1) requests.push({ node: n, readings: [reading(unit.id, 10 + i + Math.random())] });
    }
    const answers = await Promise.all(requests.map((r) => ingestOk(r.node, operator, r.readings)));
    const sharedAnswers = answers.filter((_, i) => requests[i].shared);
    assert.equal(new Set(sharedAnswers.map((a) => a.ids[0])).size, 1,
      `the identical reading sent to A, B and C has one stored id: ${JSON.stringify(sharedAnswers)}`);
    assert.equal(sharedAnswers.reduce((s, a) => s + a.accepted, 0), 1, 'the identical reading is accepted once');
    assert.equal(sharedAnswers.reduce((s, a) => s + a.duplicates, 0), 2, 'and counted as a duplicate twice');

    const isHigh = (a) => a.unitId === unit.id && a.alertType === 'temp_high';
    await Promise.all(watchers.map((w, i) => w.alerts.waitFor((l) => l.some(isHigh), EVENT_MS, `socket on ${nodes[i].name}: alert:triggered`)));
    await sleep(QUIET_MS + 500);

    const seen = watchers.map((w, i) => {
      const mine = w.alerts.forUnit(unit.id);
      assert.equal(mine.length, 1, `socket on ${nodes[i].name}: exactly one alert:triggered for the excursion, got ${JSON.stringify(mine)}`);
      return mine[0];
    });
    assert.equal(new Set(seen.map((a) => a.alertId)).size, 1, 'every node delivered the same alert');
    const alert = seen[0];
    assert.equal(alert.alertType, 'temp_high');
    assert.equal(alert.severity, 'critical');
    assert.equal(alert.threshold, 8);
    assert.ok(alert.value > 8, `value ${alert.value} is above the maximum`);
    assert.equal(alert.siteId, unit.siteId);

    watchers.forEach((w, i) => {
      const excursions = w.status.forUnit(unit.id).filter((s) => s.status === 'excursion');
      assert.equal(excursions.length, 1, `socket on ${nodes[i].name}: one unit:status excursion, got ${JSON.stringify(w.status.forUnit(unit.id))}`);
    });
    for (const n of nodes) {
      const active = await activeAlerts(n, admin, unit.id);
      assert.equal(active.length, 1, `GET /api/alerts?status=active on ${n.name}: one active alert for the unit, got ${JSON.stringify(active)}`);
      assert.equal(active[0].alertId, alert.alertId);
    }
    const { rows } = await db.query('SELECT count(*)::int AS n FROM alerts WHERE org_id = $1 AND unit_id = $2', [org, unit.id]);
    assert.equal(rows[0].n, 1, 'one alert row stored');
  });

  it('a silent unit (offlineAfterSeconds = 1) opens exactly one offline alert with three nodes sweeping', async () => {
    const unit = await freshUnit({ offlineAfterSeconds: 1 });
    const watchers = await Promise.all([A, C].map((n) => watcher(n, `offline-${n.name}`)));
    await ingestOk(B, operator, [{ unitId: unit.id, temperature: 4, recordedAt: new Date().toISOString() }]);

    const isOffline = (a) => a.unitId === unit.id && a.alertType === 'offline';
    await Promise.all(watchers.map((w) => w.alerts.waitFor((l) => l.some(isOffline), 8000, 'offline alert:triggered')));
    await sleep(2500); // at least two more sweeps on every node
    const seen = watchers.map((w, i) => {
      const mine = w.alerts.forUnit(unit.id);
      assert.equal(mine.length, 1, `socket on ${['A', 'C'][i]}: exactly one alert:triggered, got ${JSON.stringify(mine)}`);
      return mine[0];
    });
    assert.equal(seen[0].alertId, seen[1].alertId, 'the same alert on A and C');
    assert.equal(seen[0].alertType, 'offline');
    assert.equal(seen[0].severity, 'warning');
    watchers.forEach((w) => {
      const offline = w.status.forUnit(unit.id).filter((s) => s.status === 'offline');
      assert.equal(offline.length, 1, `one unit:status offline, got ${JSON.stringify(w.status.forUnit(unit.id))}`);
    });
    const active = await activeAlerts(C, admin, unit.id);
    assert.equal(active.length, 1, `one active alert for the unit, got ${JSON.stringify(active)}`);
    assert.equal(active[0].alertType, 'offline');
    assert.equal(active[0].alertId, seen[0].alertId);
    const { rows } = await db.query("SELECT count(*)::int AS n FROM alerts WHERE org_id = $1 AND unit_id = $2 AND alert_type = 'offline'", [org, unit.id]);
    assert.equal(rows[0].n, 1, 'one offline alert row stored');
  });

  // A Redis outage, as ordered steps sharing one setup, so each behaviour is reported on its own
  // (a failing step does not hide the ones after it).
  describe('Redis killed while the nodes run, then restarted on the same port', () => {
    const sockets = new Set(); // not the nodes' sets: these sockets live across the steps
    const disconnects = [];
    let unit;
    let onA;
    let onC;
    const postedToA = []; // ids of readings ingested by A (A's socket must get each exactly once)
    let killedAt;
    let restartedAt;

    before(async () => {
      unit = await freshUnit({ tempMin: 0, tempMax: 10 });
      const open = async (node, sub) => {
        const socket = await connect({ url: node.url, sockets }, { token: viewerToken(sub), transports: ['websocket'] });
        socket.on('disconnect', (reason) => disconnects.push(`${node.name}: ${reason}`));
        assert.deepEqual(await emitAck(socket, 'subscribe:unit', unit.id), { ok: true });
        return {
          socket,
          batches: collect(socket, 'sensor:readings:batch', 'ReadingsBatch'),
          live: collect(socket, 'sensor:reading', 'SensorReading'),
        };
      };
      onA = await open(A, 'redis-a');
      onC = await open(C, 'redis-c');
    });

    after(() => {
      for (const s of sockets) s.disconnect();
    });

    const postA = async (temperature) => {
      const { ids: [id] } = await ingestOk(A, operator, [reading(unit.id, temperature)]);
      postedToA.push(id);
      return id;
    };

    it('baseline: every node ready, a reading on B reaches the socket on A', async () => {
      for (const n of nodes) {
        const res = await readyz(n);
        assertStatus(res, 200, `/readyz on ${n.name} before the outage:`);
        assert.deepEqual({ status: res.body.status, storage: res.body.storage, redis: res.body.redis },
          { status: 'ready', storage: 'ok', redis: 'ok' });
      }
      const { ids: [id] } = await ingestOk(B, operator, [reading(unit.id, 5)]);
      await onA.live.waitFor((l) => l.some((r) => r.id === id), EVENT_MS, 'reading on B reaches the socket on A');
    });

    it("Redis SIGKILLed: ingest on A answers 200 and the reading reaches A's own socket (local delivery continues)", async (t) => {
      await redis.kill('SIGKILL');
      killedAt = Date.now();
      const id = await postA(6);
      const postedAt = Date.now();
      await Promise.all([
        onA.live.waitFor((l) => l.some((r) => r.id === id), 3000,
          `Redis down: a reading posted to A must reach A's own subscribed socket (sensor:reading); posted ${Date.now() - killedAt} ms after the kill`),
        onA.batches.waitFor((l) => countInBatches(l, id) > 0, 3000,
          "Redis down: a reading posted to A must reach A's own socket in a batch"),
      ]);
      t.diagnostic(`first reading after the kill reached A's socket (live and batch) ${Date.now() - postedAt} ms after ingest answered`);
    });

    it('Redis down: /readyz on A turns 503 { redis: "unreachable" } within a few seconds; ingest keeps answering 200; no node exits', async () => {
      const down = await pollUntil(async () => {
        const r = await readyz(A);
        return r.status === 503 ? r : false;
      }, { ms: 8000, interval: 250, what: '/readyz on A turns 503 after Redis was killed' });
      assert.equal(down.body.status, 'unavailable', `/readyz body: ${down.text}`);
      assert.equal(down.body.redis, 'unreachable', `/readyz body: ${down.text}`);
      assert.equal(down.body.storage, 'ok', `/readyz body: ${down.text}`);
      // Redis is known to be down now: local delivery must be prompt, not held for Redis.
      const id = await postA(6.2);
      await Promise.all([
        onA.live.waitFor((l) => l.some((r) => r.id === id), 1000,
          "Redis known down (/readyz 503): a reading posted to A reaches A's own socket within 1 s (sensor:reading)"),
        onA.batches.waitFor((l) => countInBatches(l, id) > 0, FLUSH_MS + 1000,
          "Redis known down (/readyz 503): a reading posted to A reaches A's own socket in the next batch"),
      ]);
      assertStatus(await ingest(B, operator, [reading(unit.id, 6.5)]), 200, 'ingest on B while Redis is down:');
      assertStatus(await ingest(C, operator, [reading(unit.id, 6.6)]), 200, 'ingest on C while Redis is down:');
      assertAlive(nodes);
      assert.ok(onA.socket.connected && onC.socket.connected, `sockets stay connected (disconnects: ${JSON.stringify(disconnects)})`);
    });

    it('Redis restarted on the same port: /readyz answers 200 again on every node within 15 s', { timeout: 30_000 }, async () => {
      await postA(6.3); // posted just before Redis returns
      await redis.restart();
      restartedAt = Date.now();
      for (const n of nodes) {
        const ok = await pollUntil(async () => {
          const r = await readyz(n);
          return r.status === 200 ? r : false;
        }, { ms: 15_000 - (Date.now() - restartedAt), interval: 250, what: `/readyz on ${n.name} returns 200 after Redis came back` });
        assert.equal(ok.body.redis, 'ok');
      }
      assertAlive(nodes);
    });

    it('cross-node delivery resumes: B → socket on A and A → socket on C, once each', { timeout: 30_000 }, async (t) => {
      // Re-subscription may lag the reconnect: post on B until the socket on A sees one.
      await pollUntil(async () => {
        const { ids: [id] } = await ingestOk(B, operator, [reading(unit.id, 7)]);
        try {
          await onA.live.waitFor((l) => l.some((r) => r.id === id), 1000);
          return true;
        } catch {
          return false;
        }
      }, { ms: 15_000, interval: 0, what: `a reading posted to B reaches the socket on A after the Redis restart (restarted ${Date.now() - restartedAt} ms before this step)` });
      const resumedAfterMs = Date.now() - restartedAt;

      const { ids: [bToA] } = await ingestOk(B, operator, [reading(unit.id, 7.5)]);
      const aToC = await postA(7.6);
      await Promise.all([
        onA.live.waitFor((l) => l.some((r) => r.id === bToA), EVENT_MS, 'after recovery: B → socket on A (sensor:reading)'),
        onA.batches.waitFor((l) => countInBatches(l, bToA) > 0, EVENT_MS, 'after recovery: B → socket on A (batch)'),
        onC.live.waitFor((l) => l.some((r) => r.id === aToC), EVENT_MS, 'after recovery: A → socket on C (sensor:reading)'),
        onC.batches.waitFor((l) => countInBatches(l, aToC) > 0, EVENT_MS, 'after recovery: A → socket on C (batch)'),
      ]);
      await sleep(QUIET_MS);
      assert.equal(onA.live.all.filter((r) => r.id === bToA).length, 1, 'after recovery: sensor:reading once on A');
      assert.equal(countInBatches(onA.batches.all, bToA), 1, "after recovery: once in A's batches");
      assert.equal(onC.live.all.filter((r) => r.id === aToC).length, 1, 'after recovery: sensor:reading once on C');
      assert.equal(countInBatches(onC.batches.all, aToC), 1, "after recovery: once in C's batches");
      t.diagnostic(`cross-node delivery resumed ${resumedAfterMs} ms after redis-server restarted`);
    });

    it("through the whole outage, A's own socket got every reading posted to A exactly once, and no socket got any reading twice", async () => {
      await sleep(QUIET_MS);
      const problems = [];
      for (const id of postedToA) {
        const live = onA.live.all.filter((r) => r.id === id).length;
        const batched = countInBatches(onA.batches.all, id);
        if (live !== 1 || batched !== 1) problems.push(`reading ${id} (posted to A): ${live}× sensor:reading, ${batched}× in batches on A's socket`);
      }
      for (const [name, w] of [['A', onA], ['C', onC]]) {
        const counts = new Map();
        for (const r of w.live.all) counts.set(r.id, (counts.get(r.id) || 0) + 1);
        for (const [id, n] of counts) if (n > 1) problems.push(`socket on ${name}: sensor:reading ${id} ${n} times`);
        const inBatches = new Map();
        for (const r of w.batches.all.flatMap((b) => b.readings)) inBatches.set(r.id, (inBatches.get(r.id) || 0) + 1);
        for (const [id, n] of inBatches) if (n > 1) problems.push(`socket on ${name}: reading ${id} in batches ${n} times`);
      }
      assert.deepEqual(problems, [], `readings lost or duplicated around the Redis outage (posted to A: ${JSON.stringify(postedToA)})`);
      assertAlive(nodes);
      assert.deepEqual(disconnects, [], 'no socket was disconnected by the outage');
    });
  });
});

clusterSuite('cluster: PostgreSQL unreachable (a TCP proxy in front of it is broken, then restored)', () => {
  let redis;
  let db;
  let proxy;
  let node;
  let secret;
  let org;
  let admin;
  let operator;

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    proxy = await tcpProxy(db.host, db.port);
    secret = newSecret();
    node = await startNode({ name: 'D', databaseUrl: db.urlVia(proxy.port), redisUrl: redis.url, secret });
    org = `org-${randomId(4)}`;
    admin = mintToken({ secret, sub: 'admin', org, role: 'admin' });
    operator = mintToken({ secret, sub: 'operator', org, role: 'operator' });
  }, { timeout: 60_000 });

  after(async () => {
    await node?.stop().catch(() => {});
    await proxy?.close().catch(() => {});
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  const storedCount = async (unitId) => {
    const { rows } = await db.query('SELECT count(*)::int AS n FROM readings WHERE org_id = $1 AND unit_id = $2', [org, unitId]);
    return rows[0].n;
  };

  it('ingest answers 503 + Retry-After with nothing stored, the socket stays connected, and ingest recovers by itself', { timeout: 60_000 }, async (t) => {
    const siteId = `s-${randomId(4)}`;
    await createSite(node, admin, { id: siteId, name: 'Site' });
    const unit = await createUnit(node, admin, { id: `u-${randomId(4)}`, siteId, name: 'Fridge', tempMin: 0, tempMax: 10 });
    const socket = await connect(node, { token: mintToken({ secret, sub: 'viewer', org, role: 'viewer' }), transports: ['websocket'] });
    assert.deepEqual(await emitAck(socket, 'subscribe:unit', unit.id), { ok: true });
    const live = collect(socket, 'sensor:reading', 'SensorReading');
    const batches = collect(socket, 'sensor:readings:batch', 'ReadingsBatch');
    const disconnects = [];
    socket.on('disconnect', (reason) => disconnects.push(reason));

    const { ids: [firstId] } = await (async () => {
      const res = await ingest(node, operator, [reading(unit.id, 4)]);
      assertStatus(res, 200, 'baseline ingest:');
      return res.body;
    })();
    await live.waitFor((l) => l.some((r) => r.id === firstId), EVENT_MS, 'baseline sensor:reading');
    assert.equal(await storedCount(unit.id), 1);

    // --- break the connection
    await proxy.break();
    const blocked = [reading(unit.id, 5.1), reading(unit.id, 5.2), reading(unit.id, 5.3)];
    const t0 = Date.now();
    const res = await ingest(node, operator, blocked);
    const tookMs = Date.now() - t0;
    const body = assertApiError(res, 503, `ingest with PostgreSQL unreachable (answered after ${tookMs} ms):`);
    t.diagnostic(`503 answered after ${tookMs} ms, Retry-After: ${res.headers.get('retry-after')}`);
    assert.equal(body.error, 'unavailable');
    const retryAfter = res.headers.get('retry-after');
    assert.match(retryAfter ?? '', /^\d+$/, `Retry-After header is a number of seconds, got ${retryAfter}`);
    assert.ok(Number(retryAfter) >= 1, 'Retry-After >= 1');

    const notReady = await readyz(node);
    assert.equal(notReady.status, 503, `/readyz with PostgreSQL unreachable: ${notReady.status} ${notReady.text}`);
    assert.notEqual(notReady.body.storage, 'ok');

    // Nothing partial stored (counted directly, not through the proxy) and nothing broadcast.
    assert.equal(await storedCount(unit.id), 1, 'nothing of the refused request was stored');
    await sleep(FLUSH_MS * 2 + 300);
    const blockedTimes = new Set(blocked.map((r) => Date.parse(r.recordedAt)));
    const leaked = [...live.all, ...batches.all.flatMap((b) => b.readings)].filter((r) => blockedTimes.has(Date.parse(r.recordedAt)));
    assert.deepEqual(leaked, [], 'nothing of the refused request was broadcast');
    assert.ok(socket.connected, `the socket stays connected (disconnects: ${JSON.stringify(disconnects)})`);
    assert.ok(node.alive(), node.describeExit());

    // --- restore: the same request, retried as a client would, succeeds by itself.
    await proxy.restore();
    const restoredAt = Date.now();
    const ok = await pollUntil(async () => {
      const r = await ingest(node, operator, blocked);
      return r.status === 200 ? r : false;
    }, { ms: 20_000, interval: 500, what: 'ingest answers 200 again after PostgreSQL became reachable' });
    t.diagnostic(`ingest answered 200 again ${Date.now() - restoredAt} ms after the proxy was restored`);
    assertSchema('IngestResponse', ok.body);
    assert.equal(ok.body.accepted + ok.body.duplicates, 3);
    assert.equal(ok.body.accepted, 3, `the refused readings had not been stored, so all three are new: ${ok.text}`);
    assert.equal(await storedCount(unit.id), 4, 'baseline + the three retried readings, each once');
    await live.waitFor((l) => ok.body.ids.every((id) => l.some((r) => r.id === id)), EVENT_MS, 'retried readings broadcast');
    await sleep(FLUSH_MS * 2 + 300);
    for (const id of ok.body.ids) {
      assert.equal(live.all.filter((r) => r.id === id).length, 1, `sensor:reading ${id} once`);
      assert.equal(countInBatches(batches.all, id), 1, `reading ${id} once in the batches`);
    }
    const ready = await pollUntil(async () => {
      const r = await readyz(node);
      return r.status === 200 ? r : false;
    }, { ms: 10_000, what: '/readyz 200 again' });
    assert.equal(ready.body.storage, 'ok');
    assert.ok(socket.connected, 'the socket is still connected');
    assert.deepEqual(disconnects, []);
  });
});
