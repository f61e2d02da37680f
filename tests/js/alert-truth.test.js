// Alerts and unit status: one truth, on every node, through every failure (issue 13).
// CONTRACT.md "Alerts and unit status", "Many nodes", "HTTP API".
//
//   1. Two nodes on one PostgreSQL database and one Redis, a dashboard on each: excursions whose
//      readings alternate between the nodes (opened on one node, resolved on the other, high→low
//      jumps), and 20 units at once with readings sent to random nodes. Every dashboard gets
//      exactly one `alert:triggered` and one `alert:resolved` per excursion, the status changes,
//      and storage (`GET /api/alerts`, `GET /api/units/{id}`) agrees.
//   2. Offline detection with both nodes sweeping: one offline alert per silence, resolved by a
//      reading posted to the other node, in both directions.
//   3. A unit deleted and re-created with the same id starts from nothing: an out-of-range
//      reading timestamped before, at or after the old unit's last reading opens an alert (one
//      node on SQLite, and the two nodes).
//   4. A node SIGKILLed right after it acknowledged an excursion (naturally, and with the
//      debug-build fault `SENSORWIRE_FAULT=stall-announce`: commit, never announce): the other node
//      serves the stored alert and delivers `alert:triggered` once within 5 s.
//   5. A pipeline task that panics (debug-build faults `panic-fanout`, `panic-emitter`): /readyz
//      turns 503 within 1 s, no ingest is acknowledged afterwards, the process exits non-zero.
//   6. PostgreSQL stopped hard (a private server): /readyz and ingest answer 503 (ingest with
//      Retry-After) within 1000 ms; after a restart on the same port both recover within 15 s.
//
// Needs PostgreSQL (TEST_POSTGRES_URL), `redis-server`, and for 6 the PostgreSQL server binaries
// (initdb, pg_ctl; run as the `postgres` user when the tests run as root). Missing ones skip the
// suites that need them with a message, except with CI=true, where those suites fail.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  api,
  assertApiError,
  assertSchema,
  assertStatus,
  createSite,
  createUnit,
  mintToken,
  randomId,
  sleep,
  useGateway,
  withTimeout,
} from './harness.js';
import {
  clusterSkipReason,
  createDatabase,
  newSecret,
  pollUntil,
  requirePrerequisites,
  startNode,
  startRedis,
} from './cluster-helpers.js';
import { ownDatabase, spawnGateway, storedReadings } from './pipeline-helpers.js';
import {
  assertStoryInStorage,
  assertStoryOnDashboard,
  at,
  dashboard,
  describeAnswer,
  expectStory,
  privatePostgresProblem,
  privatePostgresSkipReason,
  sameInstant,
  startPrivatePostgres,
  storedAlerts,
  storedUnit,
  timed,
  waitForStories,
  watchAlerts,
} from './alert-truth-helpers.js';

const FLUSH_MS = 300;
const SWEEP_MS = 200;
// After the expected events arrived: past a flush window on every node and a Redis round trip,
// so a duplicate would have arrived too.
const QUIET_MS = 1500;
// How long a dashboard may take to receive everything a burst of readings caused.
const DELIVERY_MS = 8000;
const NODE_ENV = { FLUSH_INTERVAL_MS: String(FLUSH_MS), OFFLINE_SWEEP_MS: String(SWEEP_MS) };

const clusterSkip = await clusterSkipReason();
const privatePgSkip = privatePostgresSkipReason();

/** `describe`, or — when `skip` says why — one skipped test saying it. */
function suite(title, skip, body) {
  describe(title, () => {
    if (skip) it('runs', (t) => t.skip(skip));
    else body();
  });
}

/** Tokens of a fresh organisation (every test uses its own). */
function freshOrg(secret) {
  const org = `org-${randomId(4)}`;
  return {
    org,
    admin: mintToken({ secret, sub: 'admin', org, role: 'admin' }),
    operator: mintToken({ secret, sub: 'operator', org, role: 'operator' }),
    viewer: (sub) => mintToken({ secret, sub, org, role: 'viewer' }),
  };
}

const nameOf = (node) => node.name ?? node.url;

async function ingestOk(node, token, readings) {
  const res = await api(node, 'POST', '/api/readings/ingest', { token, body: { readings } });
  assertStatus(res, 200, `POST /api/readings/ingest on ${nameOf(node)}:`);
  assertSchema('IngestResponse', res.body);
  assert.equal(res.body.ids.length, readings.length, 'ids has one entry per reading');
  return res.body;
}

/** A site and one unit (fresh ids) created through `node`. */
async function freshUnit(node, admin, unit = {}) {
  const siteId = `s-${randomId(4)}`;
  await createSite(node, admin, { id: siteId, name: `Site ${siteId}` });
  const id = `u-${randomId(4)}`;
  return createUnit(node, admin, { id, siteId, name: `Unit ${id}`, ...unit });
}

/** Posts `temps` for `unitId` one request at a time, each to `pickNode(i)`; the readings sent. */
async function postSequence(unitId, temps, pickNode, token) {
  const sent = [];
  for (const [i, temperature] of temps.entries()) {
    const node = pickNode(i);
    const r = at(unitId, temperature);
    await ingestOk(node, token, [r]);
    sent.push({ ...r, node: nameOf(node) });
  }
  return sent;
}

const directions = (story) => story.excursions.filter((e) => e.resolvedAt).map((e) => `${e.openNode}→${e.resolveNode}`);

// ---------------------------------------------------------------------------------------------
// 3. Delete and re-create (shared by the single-node and the two-node suites)

const isoAt = (ms) => new Date(ms).toISOString();

/**
 * Rounds of: the unit (same id every round) gets readings at T..T+10 s, is deleted and
 * re-created with the same id and thresholds, then gets one above-max reading at `newAt(T)`.
 * Each round the new unit must start from nothing: `unknown` after the re-create, and the
 * reading opens an alert (`alert:triggered` on every dashboard, once) and makes it `excursion`.
 * With several nodes, readings, deletes, creates and reads go through different nodes.
 */
async function deleteAndRecreateRounds(nodes, o, t) {
  const dashes = await Promise.all(nodes.map((n, i) => dashboard(n, o.viewer(`dash-${i}`))));
  const siteId = `s-${randomId(4)}`;
  await createSite(nodes[0], o.admin, { id: siteId, name: 'Cold room' });
  const unitId = `u-${randomId(4)}`;
  const spec = { id: unitId, siteId, name: 'Fridge', tempMin: 0, tempMax: 5, offlineAfterSeconds: 300 };
  const rounds = [
    { what: 'timestamped before the old unit\'s last reading', newAt: (T) => T + 5_000 },
    { what: 'timestamped exactly at the old unit\'s last reading', newAt: (T) => T + 10_000 },
    { what: 'timestamped after the old unit\'s last reading', newAt: (T) => T + 12_000 },
    { what: 'after the old unit was deleted in the middle of an excursion', newAt: (T) => T + 12_000, oldEndsHigh: true },
  ];
  const base = Date.now() - 150_000;
  let exists = false;
  for (const [r, round] of rounds.entries()) {
    const label = `round ${r + 1} (new reading ${round.what})`;
    const T = base + r * 30_000;
    const via = (k) => nodes[(r + k) % nodes.length];
    if (exists) assertStatus(await api(via(0), 'DELETE', `/api/units/${unitId}`, { token: o.admin }), 204, `${label}: DELETE the previous round's unit:`);
    await createUnit(via(1), o.admin, spec);
    exists = true;
    const watchers = dashes.map((d) => watchAlerts(d.socket, d.node));
    try {
      // The old unit: 11 readings one second apart, in range (the last three above tempMax in
      // the last round), split over the nodes.
      const old = Array.from({ length: 11 }, (_, k) => ({
        unitId, temperature: round.oldEndsHigh && k >= 8 ? 8 : 3, recordedAt: isoAt(T + k * 1000), deviceId: 'probe-old',
      }));
      await ingestOk(via(0), o.operator, old.slice(0, 6));
      await ingestOk(via(1), o.operator, old.slice(6));
      await Promise.all(watchers.map((w) => w.status.waitFor(
        (l) => l.some((s) => s.unitId === unitId && s.status === 'ok' && sameInstant(s.since, old[0].recordedAt)),
        DELIVERY_MS, `${label}, dashboard on ${nameOf(w.node)}: the old unit's unit:status ok`)));
      let oldAlertId;
      if (round.oldEndsHigh) {
        const lists = await Promise.all(watchers.map((w) => w.triggered.waitFor(
          (l) => l.some((a) => a.unitId === unitId && sameInstant(a.triggeredAt, old[8].recordedAt)),
          DELIVERY_MS, `${label}, dashboard on ${nameOf(w.node)}: the old unit's alert:triggered`)));
        oldAlertId = lists[0].find((a) => a.unitId === unitId).alertId;
      }
      for (const n of nodes) {
        const u = await storedUnit(n, o.viewer('reader'), unitId);
        assert.ok(sameInstant(u.lastReadingAt, old[10].recordedAt),
          `${label}: before the delete, ${nameOf(n)} shows the old unit's last reading (${old[10].recordedAt}), got ${u.lastReadingAt}`);
      }

      // Delete, re-create with the same id and thresholds.
      assertStatus(await api(via(1), 'DELETE', `/api/units/${unitId}`, { token: o.admin }), 204, `${label}: DELETE /api/units/${unitId} on ${nameOf(via(1))}:`);
      for (const n of nodes) {
        const gone = await api(n, 'GET', `/api/units/${unitId}`, { token: o.viewer('reader') });
        assertApiError(gone, 404, `${label}: GET the deleted unit on ${nameOf(n)}:`);
      }
      const created = await createUnit(via(0), o.admin, spec);
      assert.deepEqual({ status: created.status, lastReadingAt: created.lastReadingAt, lastTemperature: created.lastTemperature },
        { status: 'unknown', lastReadingAt: null, lastTemperature: null }, `${label}: the re-created unit starts from nothing (201 body)`);
      for (const n of nodes) {
        const u = await storedUnit(n, o.viewer('reader'), unitId);
        assert.deepEqual({ status: u.status, lastReadingAt: u.lastReadingAt, lastTemperature: u.lastTemperature },
          { status: 'unknown', lastReadingAt: null, lastTemperature: null }, `${label}: the re-created unit starts from nothing (GET on ${nameOf(n)})`);
      }

      // One above-max reading (another device, so it can never be a duplicate of an old one).
      const fresh = { unitId, temperature: 9, recordedAt: isoAt(round.newAt(T)), deviceId: 'probe-new' };
      const answer = await ingestOk(via(1), o.operator, [fresh]);
      assert.equal(answer.accepted, 1, `${label}: the new reading is stored as new: ${JSON.stringify(answer)}`);
      const isNew = (a) => a.unitId === unitId && sameInstant(a.triggeredAt, fresh.recordedAt);
      await Promise.all(watchers.map((w) => Promise.all([
        w.triggered.waitFor((l) => l.some(isNew), DELIVERY_MS,
          `${label}, dashboard on ${nameOf(w.node)}: alert:triggered for the re-created unit's above-max reading`),
        w.status.waitFor((l) => l.some((s) => s.unitId === unitId && s.status === 'excursion' && sameInstant(s.since, fresh.recordedAt)),
          DELIVERY_MS, `${label}, dashboard on ${nameOf(w.node)}: unit:status excursion for the re-created unit`),
      ])));
      await sleep(QUIET_MS);

      const seen = watchers.map((w) => {
        const mine = w.triggered.forUnit(unitId);
        const expected = round.oldEndsHigh ? [old[8].recordedAt, fresh.recordedAt] : [fresh.recordedAt];
        assert.deepEqual(mine.map((a) => Date.parse(a.triggeredAt)).sort(), expected.map((x) => Date.parse(x)),
          `${label}, dashboard on ${nameOf(w.node)}: one alert:triggered for the new reading (and none other): ${JSON.stringify(mine)}`);
        const alert = mine.find(isNew);
        assert.deepEqual({ alertType: alert.alertType, severity: alert.severity, value: alert.value, threshold: alert.threshold },
          { alertType: 'temp_high', severity: 'critical', value: 9, threshold: 5 }, `${label}: the new alert`);
        const excursions = w.status.forUnit(unitId).filter((s) => s.status === 'excursion' && sameInstant(s.since, fresh.recordedAt));
        assert.equal(excursions.length, 1, `${label}, dashboard on ${nameOf(w.node)}: one unit:status excursion: ${JSON.stringify(w.status.forUnit(unitId))}`);
        assert.equal(w.status.forUnit(unitId).at(-1).status, 'excursion', `${label}: the last unit:status received is excursion`);
        return alert.alertId;
      });
      assert.equal(new Set(seen).size, 1, `${label}: every dashboard names the new alert the same: ${JSON.stringify(seen)}`);
      if (oldAlertId) assert.notEqual(seen[0], oldAlertId, `${label}: the new unit's alert is a new alert, not the old unit's`);
      for (const n of nodes) {
        const u = await storedUnit(n, o.viewer('reader'), unitId);
        assert.equal(u.status, 'excursion', `${label}: GET /api/units/${unitId} on ${nameOf(n)}: ${JSON.stringify(u)}`);
        assert.ok(sameInstant(u.lastReadingAt, fresh.recordedAt), `${label}: lastReadingAt is the new reading's on ${nameOf(n)}: ${u.lastReadingAt}`);
        assert.equal(u.lastTemperature, 9);
        const active = await storedAlerts(n, o.viewer('reader'), unitId, 'active');
        assert.ok(active.some((a) => a.alertId === seen[0] && a.alertType === 'temp_high'),
          `${label}: GET /api/alerts?status=active on ${nameOf(n)} lists the new alert ${seen[0]}: ${JSON.stringify(active)}`);
      }
      t.diagnostic(`${label}: alert ${seen[0]} on every dashboard`);
    } finally {
      watchers.forEach((w) => w.stop());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 1–3 on two nodes

suite('alert truth: two nodes sharing one PostgreSQL database and one Redis', clusterSkip, () => {
  let redis;
  let db;
  let secret;
  let A;
  let B;
  let nodes = [];
  const started = [];

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    A = await startNode({ name: 'A', databaseUrl: db.url, redisUrl: redis.url, secret, env: NODE_ENV });
    started.push(A);
    B = await startNode({ name: 'B', databaseUrl: db.url, redisUrl: redis.url, secret, env: NODE_ENV });
    started.push(B);
    nodes = [A, B];
  }, { timeout: 60_000 });

  afterEach(() => {
    for (const n of nodes) n.disconnectSockets();
    for (const n of nodes) assert.ok(n.alive(), n.describeExit());
  });

  after(async () => {
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  it('one unit, readings alternating between A and B: every excursion (opened on one node, resolved on the other, high→low jumps) is triggered and resolved exactly once on both dashboards, and storage agrees', { timeout: 60_000 }, async (t) => {
    const o = freshOrg(secret);
    const unit = await freshUnit(A, o.admin, { tempMin: 0, tempMax: 5 });
    const dashes = [await dashboard(A, o.viewer('on-a')), await dashboard(B, o.viewer('on-b'))];
    // tempMin 0 / tempMax 5. Reading i goes to A when i is even, to B when odd: single and
    // double out-of-range readings make excursions open and close on either node; -1 after 7 and
    // -3 after 6 are high→low jumps; 0 and 5 are in range (equal to a limit).
    const temps = [3, 7, 8, 3, 7, 2, 9, 8.5, 1, 6, 4, 7, -1, -2, 3, -0.5, 0, 5.5, 5.01, 5, 12, 2.5, 6, -3, 4];
    const sent = await postSequence(unit.id, temps, (i) => nodes[i % 2], o.operator);
    const story = expectStory(sent, unit);
    t.diagnostic(`${story.excursions.length} excursions; opened→resolved on: ${directions(story).join(' ')}`);

    await Promise.all(dashes.map((d) => waitForStories(d, [[unit.id, story]], DELIVERY_MS, `dashboard on ${d.node.name}`).catch(() => {})));
    await sleep(QUIET_MS);
    const ids = dashes.map((d) => assertStoryOnDashboard(d, unit.id, story, `dashboard on ${d.node.name}`));
    assert.deepEqual(ids[1], ids[0], 'both dashboards name every excursion with the same alertId');
    for (const n of nodes) await assertStoryInStorage(n, o.viewer('reader'), unit.id, story, ids[0], 'after the last reading');
  });

  it('20 units at once, each reading to a random node: every excursion of every unit is triggered and resolved exactly once on both dashboards, and storage agrees', { timeout: 90_000 }, async (t) => {
    const o = freshOrg(secret);
    const siteId = `s-${randomId(4)}`;
    await createSite(A, o.admin, { id: siteId, name: 'Warehouse' });
    const units = [];
    for (let i = 0; i < 20; i += 1) {
      units.push(await createUnit(nodes[i % 2], o.admin, { id: `u-${i}-${randomId(3)}`, siteId, name: `Fridge ${i}`, tempMin: 0, tempMax: 5 }));
    }
    const dashes = [await dashboard(A, o.viewer('on-a')), await dashboard(B, o.viewer('on-b'))];
    // Each unit: in range, then three excursion patterns (a high→low jump among them for some).
    const patterns = [[7, 8, 3], [7, 3], [-1, 2], [-1, -2, 4], [9, -1, 3], [6, -0.5, -1, 1]];
    const plans = units.map(() => [3, ...[0, 1, 2].flatMap(() => patterns[Math.floor(Math.random() * patterns.length)])]);
    const sentByUnit = await Promise.all(units.map((u, i) =>
      postSequence(u.id, plans[i], () => nodes[Math.floor(Math.random() * 2)], o.operator)));
    const stories = units.map((u, i) => [u.id, expectStory(sentByUnit[i], u)]);
    const total = stories.reduce((s, [, story]) => s + story.excursions.length, 0);
    const crossing = stories.flatMap(([, story]) => directions(story)).filter((d) => d === 'A→B' || d === 'B→A').length;
    t.diagnostic(`${sentByUnit.flat().length} readings, ${total} excursions (${crossing} resolved on the other node than opened)`);

    await Promise.all(dashes.map((d) => waitForStories(d, stories, 15_000, `dashboard on ${d.node.name}`).catch(() => {})));
    await sleep(QUIET_MS);
    for (const [unitId, story] of stories) {
      const ids = dashes.map((d) => assertStoryOnDashboard(d, unitId, story, `dashboard on ${d.node.name}`));
      assert.deepEqual(ids[1], ids[0], `unit ${unitId}: both dashboards name every excursion with the same alertId`);
      for (const n of nodes) await assertStoryInStorage(n, o.viewer('reader'), unitId, story, ids[0], `unit ${unitId}`);
    }
  });

  it('offline with both nodes sweeping: one offline alert per silence on every dashboard and in storage, resolved by a reading on the other node (A→B, then B→A)', { timeout: 60_000 }, async (t) => {
    const o = freshOrg(secret);
    const unit = await freshUnit(A, o.admin, { tempMin: 0, tempMax: 10, offlineAfterSeconds: 1 });
    const dashes = [await dashboard(A, o.viewer('on-a')), await dashboard(B, o.viewer('on-b'))];
    const offlineOf = (list) => list.filter((a) => a.unitId === unit.id && a.alertType === 'offline');

    /** The `n`-th silence after `last`: exactly one offline alert everywhere. */
    async function silence(n, last) {
      await Promise.all(dashes.map((d) => d.triggered.waitFor((l) => offlineOf(l).length >= n, 1000 + 4 * SWEEP_MS + 4000,
        `dashboard on ${d.node.name}: offline alert:triggered #${n} (the last reading was posted at ${last.recordedAt})`)));
      await sleep(6 * SWEEP_MS); // several more sweeps on both nodes
      const alerts = dashes.map((d) => {
        const mine = offlineOf(d.triggered.all);
        assert.equal(mine.length, n, `dashboard on ${d.node.name}: exactly one alert:triggered per silence (silence #${n}): ${JSON.stringify(mine)}`);
        return mine[n - 1];
      });
      assert.equal(alerts[1].alertId, alerts[0].alertId, `silence #${n}: the same offline alert on both dashboards`);
      const alert = alerts[0];
      assert.deepEqual({ severity: alert.severity, value: alert.value, threshold: alert.threshold, siteId: alert.siteId },
        { severity: 'warning', value: null, threshold: null, siteId: unit.siteId });
      const silentMs = Date.parse(alert.triggeredAt) - Date.parse(last.recordedAt);
      assert.ok(silentMs >= 950, `silence #${n}: offline only after offlineAfterSeconds (1 s); triggeredAt is ${silentMs} ms after the last reading`);
      for (const d of dashes) {
        const offline = d.status.forUnit(unit.id).filter((s) => s.status === 'offline');
        assert.equal(offline.length, n, `dashboard on ${d.node.name}: one unit:status offline per silence: ${JSON.stringify(d.status.forUnit(unit.id))}`);
      }
      for (const node of nodes) {
        const active = await storedAlerts(node, o.viewer('reader'), unit.id, 'active');
        assert.deepEqual(active.map((a) => [a.alertId, a.alertType]), [[alert.alertId, 'offline']],
          `silence #${n}: GET /api/alerts?status=active on ${node.name} lists exactly the one offline alert`);
        assert.equal((await storedUnit(node, o.viewer('reader'), unit.id)).status, 'offline', `silence #${n}: GET /api/units/{id} on ${node.name}`);
      }
      return alert;
    }

    /** A reading posted to `node` resolves `alert` on every dashboard, once; the unit is ok again. */
    async function wake(node, alert) {
      const r = at(unit.id, 4);
      await ingestOk(node, o.operator, [r]);
      const ackedAt = Date.now();
      // The unit is due offline again 1 s after this reading: look at it before that.
      const other = nodes.find((x) => x !== node);
      await pollUntil(async () => (await storedUnit(other, o.viewer('reader'), unit.id)).status === 'ok',
        { ms: Math.max(0, ackedAt + 700 - Date.now()), interval: 50, what: `GET /api/units/{id} on ${other.name} says ok within 700 ms of the acknowledgement of the reading on ${node.name}` });
      await Promise.all(dashes.map((d) => d.resolved.waitFor((l) => l.some((x) => x.alertId === alert.alertId), 3000,
        `dashboard on ${d.node.name}: alert:resolved for offline alert ${alert.alertId} after a reading on ${node.name}`)));
      const stored = (await storedAlerts(other, o.viewer('reader'), unit.id)).find((a) => a.alertId === alert.alertId);
      assert.ok(stored, `GET /api/alerts on ${other.name} lists ${alert.alertId}`);
      assert.equal(stored.status, 'resolved');
      assert.ok(sameInstant(stored.resolvedAt, r.recordedAt), `stored resolvedAt ${stored.resolvedAt} is the waking reading's ${r.recordedAt}`);
      return r;
    }

    const first = at(unit.id, 4);
    await ingestOk(A, o.operator, [first]);
    const one = await silence(1, first); // last reading on A
    const second = await wake(B, one); // resolved by B
    const two = await silence(2, second); // last reading on B
    assert.notEqual(two.alertId, one.alertId, 'a new silence is a new alert');
    const third = await wake(A, two); // resolved by A
    await sleep(800);

    for (const d of dashes) {
      for (const [alert, r] of [[one, second], [two, third]]) {
        const res = d.resolved.all.filter((x) => x.alertId === alert.alertId);
        assert.equal(res.length, 1, `dashboard on ${d.node.name}: alert:resolved once for ${alert.alertId}: ${JSON.stringify(res)}`);
        assert.ok(sameInstant(res[0].resolvedAt, r.recordedAt), 'resolvedAt is the recordedAt of the waking reading');
      }
      const statuses = d.status.forUnit(unit.id);
      assert.deepEqual(statuses.slice(0, 5).map((s) => s.status), ['ok', 'offline', 'ok', 'offline', 'ok'],
        `dashboard on ${d.node.name}: unit:status on each change: ${JSON.stringify(statuses)}`);
      assert.ok(sameInstant(statuses[2].since, second.recordedAt) && sameInstant(statuses[4].since, third.recordedAt),
        `dashboard on ${d.node.name}: back to ok since the waking readings: ${JSON.stringify(statuses)}`);
    }
    t.diagnostic(`offline alerts ${one.alertId} (A silent, B woke it) and ${two.alertId} (B silent, A woke it)`);
  });

  it('a unit deleted and re-created with the same id (through the other node) starts from nothing: its out-of-range reading before, at or after the old unit\'s last one opens an alert', { timeout: 90_000 }, async (t) => {
    await deleteAndRecreateRounds(nodes, freshOrg(secret), t);
  });
});

// ---------------------------------------------------------------------------------------------
// 3 on a single node

describe('alert truth: delete and re-create a unit with the same id [sqlite, one node]', () => {
  const gw = useGateway('sqlite', { env: { FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
  it('the re-created unit starts from nothing: its out-of-range reading before, at or after the old unit\'s last one opens an alert', { timeout: 60_000 }, async (t) => {
    gw.name = 'the gateway';
    await deleteAndRecreateRounds([gw], freshOrg(gw.secret), t);
  });
});

// ---------------------------------------------------------------------------------------------
// 4. SIGKILL right after the acknowledgement

suite('alert truth: the node that acknowledged an excursion is SIGKILLed at once', clusterSkip, () => {
  let redis;
  let db;
  let secret;
  let B;
  const started = [];

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    B = await startNode({ name: 'B', databaseUrl: db.url, redisUrl: redis.url, secret, env: NODE_ENV });
    started.push(B);
  }, { timeout: 60_000 });

  afterEach(() => B?.disconnectSockets());

  after(async () => {
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  async function killRightAfterAck(t, env) {
    const A = await startNode({ name: 'A', databaseUrl: db.url, redisUrl: redis.url, secret, env: { ...NODE_ENV, ...env } });
    started.push(A);
    const o = freshOrg(secret);
    const unit = await freshUnit(B, o.admin, { tempMin: 0, tempMax: 5 });
    const d = await dashboard(B, o.viewer('on-b'));

    const r = at(unit.id, 9);
    const res = await api(A, 'POST', '/api/readings/ingest', { token: o.operator, body: { readings: [r] } });
    A.child.kill('SIGKILL');
    const killedAt = Date.now();
    assertStatus(res, 200, 'ingest on A (answered just before A was SIGKILLed):');
    assertSchema('IngestResponse', res.body);
    const [readingId] = res.body.ids;
    await A.exited;
    const left = () => Math.max(0, killedAt + 5000 - Date.now());

    const stored = await pollUntil(async () => {
      const active = await storedAlerts(B, o.viewer('reader'), unit.id, 'active');
      return active.length ? active : false;
    }, { ms: left(), interval: 100, what: 'GET /api/alerts?status=active on B lists the alert of the acknowledged reading within 5 s of the kill' });
    const storedAfterMs = Date.now() - killedAt;
    assert.equal(stored.length, 1, `one active alert: ${JSON.stringify(stored)}`);
    assert.equal(stored[0].alertType, 'temp_high');
    assert.equal(stored[0].value, 9);
    assert.ok(sameInstant(stored[0].triggeredAt, r.recordedAt), `triggeredAt ${stored[0].triggeredAt} is the reading's ${r.recordedAt}`);

    await d.triggered.waitFor((l) => l.some((a) => a.unitId === unit.id), left(),
      "B's dashboard receives alert:triggered for the acknowledged excursion within 5 s of the kill");
    const deliveredAfterMs = Date.now() - killedAt;
    await d.status.waitFor((l) => l.some((s) => s.unitId === unit.id && s.status === 'excursion'), left(),
      "B's dashboard receives unit:status excursion within 5 s of the kill");
    await sleep(QUIET_MS);

    const got = d.triggered.forUnit(unit.id);
    assert.equal(got.length, 1, `exactly one alert:triggered on B's dashboard: ${JSON.stringify(got)}`);
    assert.equal(got[0].alertId, stored[0].alertId, 'the announced alert is the stored one');
    assert.ok(sameInstant(got[0].triggeredAt, r.recordedAt));
    assert.deepEqual(d.status.forUnit(unit.id).map((s) => [s.status, Date.parse(s.since)]), [['excursion', Date.parse(r.recordedAt)]],
      `one unit:status excursion since the reading on B's dashboard: ${JSON.stringify(d.status.forUnit(unit.id))}`);
    const u = await storedUnit(B, o.viewer('reader'), unit.id);
    assert.equal(u.status, 'excursion', `GET /api/units/{id} on B: ${JSON.stringify(u)}`);
    const readings = await storedReadings(B, o.viewer('reader'), unit.id);
    assert.ok(readings.some((x) => x.id === readingId), `the acknowledged reading ${readingId} is stored: ${JSON.stringify(readings)}`);
    t.diagnostic(`stored alert visible on B ${storedAfterMs} ms and delivered by B ${deliveredAfterMs} ms after the kill`);
  }

  it('no fault switch: B lists the alert and its dashboard gets alert:triggered exactly once within 5 s', { timeout: 60_000 }, async (t) => {
    await killRightAfterAck(t, {});
  });

  it('SENSORWIRE_FAULT=stall-announce on A (committed, never announced): B still delivers alert:triggered exactly once within 5 s', { timeout: 60_000 }, async (t) => {
    await killRightAfterAck(t, { SENSORWIRE_FAULT: 'stall-announce' });
  });
});

// ---------------------------------------------------------------------------------------------
// 5. A pipeline task that panics

describe('alert truth: a panicking pipeline task takes the node out of service [sqlite, one node]', () => {
  for (const fault of ['panic-fanout', 'panic-emitter']) {
    it(`SENSORWIRE_FAULT=${fault}: /readyz 503 within 1 s, no ingest acknowledged after that, the process exits non-zero within 15 s`, { timeout: 60_000 }, async (t) => {
      const db = await ownDatabase('sqlite');
      let gw;
      try {
        gw = await spawnGateway({ databaseUrl: db.url, env: { SENSORWIRE_FAULT: fault, FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
        const o = freshOrg(gw.secret);
        const unit = await freshUnit(gw, o.admin, { tempMin: 0, tempMax: 5 });
        await dashboard(gw, o.viewer('watching'));
        const ready = await timed(gw, 'GET', '/readyz');
        assert.equal(ready.status, 200, `/readyz before any reading: ${describeAnswer(ready)}`);

        const first = await timed(gw, 'POST', '/api/readings/ingest', { token: o.operator, body: { readings: [at(unit.id, 4)] } });
        const answeredAt = Date.now();
        assert.ok(first.status === 200 || first.status === 503, `the reading that trips the fault answers 200 or 503: ${describeAnswer(first)}`);

        // /readyz must stop saying 200 within 1 s.
        const probes = [];
        let notReadyAt;
        while (!notReadyAt) {
          const r = await timed(gw, 'GET', '/readyz', { timeoutMs: 1000 });
          probes.push(`${Date.now() - answeredAt} ms: ${r.status ?? r.error}`);
          if (r.status !== 200) notReadyAt = Date.now();
          else if (Date.now() - answeredAt > 1000) break;
          else await sleep(50);
        }
        assert.ok(notReadyAt, `/readyz still answers 200 more than 1 s after the faulted pipeline took a reading: ${probes.join(', ')}`);

        // From then on: nothing acknowledged, /readyz never ready again, until the process exits.
        const deadline = answeredAt + 15_000;
        const problems = [];
        const seen = [];
        const alive = () => gw.child.exitCode === null && gw.child.signalCode === null;
        while (alive() && Date.now() < deadline) {
          const r = await timed(gw, 'GET', '/readyz', { timeoutMs: 2000 });
          const ing = await timed(gw, 'POST', '/api/readings/ingest', { token: o.operator, body: { readings: [at(unit.id, 4)] }, timeoutMs: 3000 });
          seen.push(`readyz ${r.status ?? r.error} / ingest ${ing.status ?? ing.error}`);
          if (r.status === 200) problems.push(`/readyz answered 200 again ${Date.now() - answeredAt} ms after the fault`);
          if (ing.status !== null && ing.status !== 503) problems.push(`ingest ${describeAnswer(ing)} (${Date.now() - answeredAt} ms after the fault)`);
          if (ing.status === null && /no answer/.test(ing.error)) problems.push(`ingest hung: ${ing.error}`);
          await sleep(100);
        }
        const exit = await withTimeout(gw.exited, Math.max(50, deadline - Date.now()),
          `the process is still running 15 s after the fault (readyz/ingest seen: ${seen.slice(-5).join('; ')})`);
        assert.ok(exit.code !== 0, `the process exits with a non-zero code, got ${JSON.stringify(exit)}\nstderr:\n${gw.stderr().slice(-2000)}`);
        assert.deepEqual(problems, [], 'after /readyz went 503 no ingest is acknowledged and /readyz never says ready again');
        t.diagnostic(`first ingest: ${first.status ?? first.error}; not ready ${notReadyAt - answeredAt} ms after it; exited ${JSON.stringify(exit)} ` +
          `${Date.now() - answeredAt} ms after it; answers meanwhile: ${seen.length ? seen.join('; ') : 'none'}`);
      } finally {
        await gw?.stop().catch(() => {});
        await db.drop().catch(() => {});
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------
// 6. PostgreSQL stopped hard

suite('alert truth: PostgreSQL stopped hard under a node (a private PostgreSQL server)', privatePgSkip, () => {
  let server;
  let gw;
  let o;
  let unit;
  let apiKey;
  const refused = [];

  before(async () => {
    const problem = privatePostgresProblem();
    if (problem) throw new Error(`a private PostgreSQL server is required: ${problem}`);
    server = await startPrivatePostgres();
    gw = await spawnGateway({ databaseUrl: server.url, env: { FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
    gw.name = 'the gateway';
    o = freshOrg(gw.secret);
    unit = await freshUnit(gw, o.admin, { tempMin: 0, tempMax: 5 });
    const key = await api(gw, 'POST', '/api/keys', { token: o.admin, body: { name: 'probe', scopes: ['ingest'] } });
    assertStatus(key, 201, 'POST /api/keys:');
    assertSchema('ApiKeyCreated', key.body);
    apiKey = key.body.key;
    const baseline = await timed(gw, 'POST', '/api/readings/ingest', { apiKey, body: { readings: [at(unit.id, 3)] } });
    assert.equal(baseline.status, 200, `baseline ingest with the API key: ${describeAnswer(baseline)}`);
    const ready = await timed(gw, 'GET', '/readyz');
    assert.equal(ready.status, 200, `baseline /readyz: ${describeAnswer(ready)}`);
  }, { timeout: 120_000 });

  after(async () => {
    await gw?.stop().catch(() => {});
    await server?.destroy();
  }, { timeout: 60_000 });

  it('stopped (pg_ctl stop -m immediate): /readyz answers 503 and ingest 503 + Retry-After, each within 1000 ms', { timeout: 60_000 }, async (t) => {
    await server.stopHard();
    const latencies = [];
    for (let i = 0; i < 5; i += 1) {
      const r = await timed(gw, 'GET', '/readyz');
      latencies.push(`readyz ${r.ms}`);
      assert.equal(r.status, 503, `/readyz #${i + 1} with PostgreSQL down: ${describeAnswer(r)}`);
      assert.ok(r.ms <= 1000, `/readyz #${i + 1} with PostgreSQL down answered after ${r.ms} ms (at most 1000)`);
      await sleep(100);
    }
    const attempts = [['API key', { apiKey }], ['JWT', { token: o.operator }], ['API key', { apiKey }], ['JWT', { token: o.operator }]];
    for (const [i, [how, creds]] of attempts.entries()) {
      const readings = [at(unit.id, 4 + i / 10), at(unit.id, 9)];
      const r = await timed(gw, 'POST', '/api/readings/ingest', { ...creds, body: { readings } });
      latencies.push(`ingest ${r.ms}`);
      assert.equal(r.status, 503, `ingest #${i + 1} (${how}) with PostgreSQL down: ${describeAnswer(r)}`);
      assert.ok(r.ms <= 1000, `ingest #${i + 1} (${how}) with PostgreSQL down answered after ${r.ms} ms (at most 1000)`);
      assertSchema('ApiError', r.body);
      const retryAfter = r.headers.get('retry-after');
      assert.match(retryAfter ?? '', /^\d+$/, `ingest #${i + 1}: Retry-After is a number of seconds, got ${retryAfter}`);
      assert.ok(Number(retryAfter) >= 1, 'Retry-After >= 1');
      refused.push(...readings);
      await sleep(100);
    }
    t.diagnostic(`latencies (ms): ${latencies.join(', ')}`);
  });

  it('restarted on the same port and data directory: /readyz 200 and ingest 200 within 15 s, and nothing of the refused requests was stored', { timeout: 60_000 }, async (t) => {
    await server.start();
    const restartedAt = Date.now();
    const left = () => Math.max(0, restartedAt + 15_000 - Date.now());
    /** `request()` until it answers 200; the last other answer is in the failure message. */
    const until200 = (request, what) => pollUntil(async () => {
      const r = await request();
      if (r.status !== 200) throw new Error(describeAnswer(r));
      return r;
    }, { ms: left(), interval: 250, what });
    await until200(() => timed(gw, 'GET', '/readyz'), '/readyz answers 200 after PostgreSQL came back');
    const readyAfterMs = Date.now() - restartedAt;
    await until200(() => timed(gw, 'POST', '/api/readings/ingest', { apiKey, body: { readings: [at(unit.id, 3.5)] } }),
      'ingest answers 200 after PostgreSQL came back');
    t.diagnostic(`ready ${readyAfterMs} ms and ingesting ${Date.now() - restartedAt} ms after PostgreSQL was restarted`);
    if (refused.length) {
      const again = await timed(gw, 'POST', '/api/readings/ingest', { apiKey, body: { readings: refused } });
      assert.equal(again.status, 200, `the refused readings sent again: ${describeAnswer(again)}`);
      assert.equal(again.body.accepted, refused.length, `none of the refused readings had been stored: ${again.text}`);
    }
  });
});
