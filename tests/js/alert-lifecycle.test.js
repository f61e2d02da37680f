// The alert lifecycle as dashboards see it (CONTRACT.md "Alert lifecycle: acknowledge, history,
// notify"): an acknowledgement posted by an operator reaches every dashboard of the organisation
// that may see the unit as `alert:acknowledged` with an offset, once; it is replayed to a socket
// reconnecting with an older offset; a user restricted to another site does not get it; and two
// nodes racing to acknowledge the same alert give exactly one 200, one 409 and one event.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { io } from 'socket.io-client';

import {
  api,
  assertApiError,
  assertSchema,
  assertStatus,
  forEachEngine,
  mintToken,
  randomId,
  sleep,
  useGateway,
  withTimeout,
} from './harness.js';
import { freshSite, ingestOk, reading } from './pipeline-helpers.js';
import {
  clusterSkipReason,
  createDatabase,
  newSecret,
  requirePrerequisites,
  startNode,
  startRedis,
} from './cluster-helpers.js';

const FLUSH_MS = 300;
const EVENT_MS = 5000;
// After the expected events arrived, anything more within this long would be a duplicate.
const QUIET_MS = FLUSH_MS * 2 + 900;

/**
 * A stock socket.io-client recording every event from before it connects (so replayed events
 * are seen), validating `alert:acknowledged` against the schema.
 */
function recorded(target, auth) {
  const socket = io(target.url, { forceNew: true, reconnection: false, timeout: 5000, transports: ['websocket'], auth });
  target.sockets?.add(socket);
  const events = [];
  socket.onAny((event, payload) => {
    if (event === 'alert:acknowledged') assertSchema('AlertAcknowledged', payload);
    events.push({ event, payload });
  });
  const connected = withTimeout(new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  }), 8000, 'socket did not connect');
  return {
    socket,
    events,
    connected,
    of: (name) => events.filter((e) => e.event === name).map((e) => e.payload),
    async waitFor(predicate, what, ms = EVENT_MS) {
      const end = Date.now() + ms;
      while (!predicate(this)) {
        if (Date.now() > end) assert.fail(`${what}; received: ${JSON.stringify(events)}`);
        await sleep(20);
      }
    },
  };
}

/** Opens an excursion on `unitId` (ingest on `node`) and resolves its `Alert` from the REST read. */
async function openAlert(node, token, unitId) {
  await ingestOk(node, token, [reading(unitId, 9)]);
  const res = await api(node, 'GET', `/api/alerts?unitId=${unitId}&status=active`, { token });
  assertStatus(res, 200, 'GET /api/alerts:');
  assert.equal(res.body.length, 1, JSON.stringify(res.body));
  assertSchema('Alert', res.body[0]);
  return res.body[0];
}

const acknowledge = (node, token, alertId, body = {}) =>
  api(node, 'POST', `/api/alerts/${alertId}/acknowledge`, { token, body });

forEachEngine('alert lifecycle: acknowledge', (engine) => {
  const gw = useGateway(engine, { env: { FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
  let admin;
  let operator;

  before(() => {
    admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
    operator = gw.token({ sub: 'olga', org: 'acme', role: 'operator' });
  });

  it('an acknowledgement reaches both tabs of the org once, with an offset, and not a user of another site', async () => {
    const { siteId, units: [unit] } = await freshSite(gw, admin, [{ tempMin: 0, tempMax: 5 }]);
    const other = await freshSite(gw, admin);
    const tab1 = recorded(gw, { token: operator });
    const tab2 = recorded(gw, { token: gw.token({ sub: 'vic', org: 'acme', role: 'viewer' }) });
    const mySite = recorded(gw, { token: gw.token({ sub: 'rita', org: 'acme', role: 'viewer', siteIds: [siteId] }) });
    const elsewhere = recorded(gw, { token: gw.token({ sub: 'eli', org: 'acme', role: 'operator', siteIds: [other.siteId] }) });
    const otherOrg = recorded(gw, { token: gw.token({ sub: 'oz', org: 'other', role: 'admin' }) });
    await Promise.all([tab1, tab2, mySite, elsewhere, otherOrg].map((t) => t.connected));

    const alert = await openAlert(gw, admin, unit.id);
    // A viewer may not acknowledge, nor a user who cannot see the site (404, as if unknown).
    assertApiError(await acknowledge(gw, gw.token({ sub: 'vic', org: 'acme', role: 'viewer' }), alert.alertId), 403);
    assertApiError(await acknowledge(gw, gw.token({ sub: 'eli', org: 'acme', role: 'operator', siteIds: [other.siteId] }), alert.alertId), 404);

    const res = await acknowledge(gw, operator, alert.alertId, { note: 'door was open' });
    assertStatus(res, 200, 'POST acknowledge:');
    assertSchema('Alert', res.body);
    assert.equal(res.body.acknowledgedBy, 'olga');

    const mine = [tab1, tab2, mySite];
    await Promise.all(mine.map((t, i) => t.waitFor((r) => r.of('alert:acknowledged').length >= 1, `tab ${i} waiting for alert:acknowledged`)));
    await sleep(QUIET_MS);
    for (const [i, t] of mine.entries()) {
      const got = t.of('alert:acknowledged');
      assert.equal(got.length, 1, `tab ${i}: exactly once: ${JSON.stringify(got)}`);
      const { offset, ...payload } = got[0];
      assert.equal(typeof offset, 'string', `tab ${i}: carries an offset`);
      assert.deepEqual(payload, {
        alertId: alert.alertId,
        unitId: unit.id,
        acknowledgedAt: res.body.acknowledgedAt,
        acknowledgedBy: 'olga',
        note: 'door was open',
      });
    }
    assert.equal(tab1.of('alert:acknowledged')[0].offset, tab2.of('alert:acknowledged')[0].offset, 'one event, one offset');
    assert.deepEqual(elsewhere.of('alert:acknowledged'), [], 'a user of another site does not get it');
    assert.deepEqual(otherOrg.of('alert:acknowledged'), [], 'another organisation does not get it');

    // A second acknowledgement is 409 and announces nothing.
    assertApiError(await acknowledge(gw, admin, alert.alertId), 409);
    await sleep(QUIET_MS);
    assert.equal(tab1.of('alert:acknowledged').length, 1);
  });

  it('a socket reconnecting with an older offset is replayed the acknowledgement, once, before sync:complete', async () => {
    const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 0, tempMax: 5 }]);
    const token = gw.token({ sub: 'nina', org: 'acme', role: 'viewer' });
    const first = recorded(gw, { token });
    await first.connected;
    const alert = await openAlert(gw, admin, unit.id);
    await first.waitFor((r) => r.of('alert:triggered').some((a) => a.alertId === alert.alertId), 'waiting for alert:triggered');
    const offset = first.of('alert:triggered').find((a) => a.alertId === alert.alertId).offset;
    assert.equal(typeof offset, 'string');
    first.socket.disconnect();

    assertStatus(await acknowledge(gw, operator, alert.alertId, { note: 'seen' }), 200, 'POST acknowledge:');
    await sleep(FLUSH_MS * 2); // announced before the reconnect

    const again = recorded(gw, { token, offset });
    await again.connected;
    await again.waitFor((r) => r.of('sync:complete').length >= 1, 'waiting for sync:complete');
    const sync = again.events.findIndex((e) => e.event === 'sync:complete');
    assert.equal(again.events[sync].payload.recovered, true, JSON.stringify(again.events[sync]));
    const replayed = again.events.slice(0, sync).filter((e) => e.event === 'alert:acknowledged');
    assert.equal(replayed.length, 1, `replayed once before sync:complete: ${JSON.stringify(again.events)}`);
    assert.equal(replayed[0].payload.alertId, alert.alertId);
    assert.equal(replayed[0].payload.note, 'seen');
    await sleep(QUIET_MS);
    assert.equal(again.of('alert:acknowledged').length, 1, 'and not again live');
  });
});

const clusterSkip = await clusterSkipReason();

describe('alert lifecycle: two nodes racing to acknowledge', () => {
  if (clusterSkip) {
    it('runs', (t) => t.skip(clusterSkip));
    return;
  }
  let redis;
  let db;
  let secret;
  const nodes = [];

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    nodes.push(await startNode({ name: 'A', databaseUrl: db.url, redisUrl: redis.url, secret }));
    nodes.push(await startNode({ name: 'B', databaseUrl: db.url, redisUrl: redis.url, secret }));
  }, { timeout: 60_000 });

  after(async () => {
    await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  it('exactly one 200, one 409, and one alert:acknowledged on each dashboard of either node', async () => {
    const [A, B] = nodes;
    const org = `org-${randomId(4)}`;
    const admin = mintToken({ secret, sub: 'admin', org, role: 'admin' });
    const siteId = `s-${randomId(4)}`;
    const unitId = `u-${randomId(4)}`;
    assertStatus(await api(A, 'POST', '/api/sites', { token: admin, body: { id: siteId, name: 'Site' } }), 201);
    assertStatus(await api(A, 'POST', '/api/units', { token: admin, body: { id: unitId, siteId, name: 'Unit', tempMin: 0, tempMax: 5 } }), 201);
    const viewer = mintToken({ secret, sub: 'viewer', org, role: 'viewer' });
    const onA = recorded(A, { token: viewer });
    const onB = recorded(B, { token: viewer });
    await Promise.all([onA.connected, onB.connected]);

    const alert = await openAlert(A, admin, unitId);
    for (let round = 0; round < 3; round += 1) {
      const results = await Promise.all([
        acknowledge(A, mintToken({ secret, sub: 'op-a', org, role: 'operator' }), alert.alertId, { note: 'from A' }),
        acknowledge(B, mintToken({ secret, sub: 'op-b', org, role: 'operator' }), alert.alertId, { note: 'from B' }),
      ]);
      const statuses = results.map((r) => r.status).sort();
      if (round === 0) assert.deepEqual(statuses, [200, 409], results.map((r) => r.text).join('\n'));
      else assert.deepEqual(statuses, [409, 409], 'later rounds: already acknowledged');
    }
    await Promise.all([onA, onB].map((t) => t.waitFor((r) => r.of('alert:acknowledged').length >= 1, 'waiting for alert:acknowledged')));
    await sleep(QUIET_MS);
    const [a, b] = [onA.of('alert:acknowledged'), onB.of('alert:acknowledged')];
    assert.equal(a.length, 1, `node A's dashboard: once: ${JSON.stringify(a)}`);
    assert.equal(b.length, 1, `node B's dashboard: once: ${JSON.stringify(b)}`);
    assert.deepEqual(a[0], b[0], 'the same event, the same offset, on both nodes');
    const stored = await api(B, 'GET', `/api/alerts?unitId=${unitId}`, { token: viewer });
    assert.equal(stored.body[0].acknowledgedBy, a[0].acknowledgedBy, 'storage and the event agree on the winner');
    assert.equal(stored.body[0].note, a[0].note);
  });
});
