// Graceful shutdown on SIGTERM: acknowledged readings are durable, and what the gateway holds for
// the next flush still reaches connected dashboards before they are disconnected.
import assert from 'node:assert/strict';
import { afterEach, it } from 'node:test';

import { assertStatus, connect, forEachEngine, mintToken, withTimeout } from './harness.js';
import {
  batchReadings,
  collect,
  freshSite,
  ingest,
  ownDatabase,
  reading,
  sleep,
  spawnGateway,
  storedReadings,
  terminate,
} from './pipeline-helpers.js';

forEachEngine('graceful shutdown (SIGTERM)', (engine) => {
  const cleanups = [];
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()().catch(() => {});
  });

  /** A database and a first gateway on it; both are cleaned up after the test. */
  async function setup(env = {}) {
    const db = await ownDatabase(engine);
    cleanups.push(() => db.drop());
    const gw = await spawnGateway({ databaseUrl: db.url, env });
    cleanups.push(() => gw.stop());
    const admin = mintToken({ sub: 'admin', org: 'acme', role: 'admin', secret: gw.secret });
    return { db, gw, admin };
  }

  it('every reading acknowledged before SIGTERM is in the database after the process exits (code 0)', async () => {
    const { db, gw, admin } = await setup();
    const { units: [unit] } = await freshSite(gw, admin);

    // 20 concurrent requests of 5 readings each, all acknowledged...
    const requests = Array.from({ length: 20 }, () => Array.from({ length: 5 }, () => reading(unit.id, Math.round((4 + Math.random()) * 100) / 100)));
    const answers = await Promise.all(requests.map((readings) => ingest(gw, admin, readings)));
    answers.forEach((res, i) => assertStatus(res, 200, `request ${i}:`));
    // ...then SIGTERM at once, while 20 more requests are still on their way.
    const late = Array.from({ length: 20 }, () => [reading(unit.id, 6)]);
    const lateAnswers = late.map((readings) => ingest(gw, admin, readings).catch((err) => ({ status: 0, error: err })));
    const exit = await terminate(gw);
    assert.deepEqual(exit, { code: 0, signal: null }, `graceful exit; stderr:\n${gw.stderr()}`);
    const settled = await Promise.all(lateAnswers);

    const acknowledged = new Map(); // id → the reading sent
    requests.forEach((readings, i) => readings.forEach((r, j) => acknowledged.set(answers[i].body.ids[j], r)));
    const refused = [];
    settled.forEach((res, i) => {
      if (res.status === 200) late[i].forEach((r, j) => acknowledged.set(res.body.ids[j], r));
      else if (res.status >= 400) refused.push(late[i][0]);
    });
    assert.ok(acknowledged.size >= 100);

    const again = await spawnGateway({ databaseUrl: db.url, secret: gw.secret });
    cleanups.push(() => again.stop());
    const viewer = mintToken({ sub: 'v', org: 'acme', role: 'viewer', secret: again.secret });
    const stored = await storedReadings(again, viewer, unit.id, '?limit=10000');
    const byId = new Map(stored.map((r) => [r.id, r]));
    const missing = [...acknowledged.keys()].filter((id) => !byId.has(id));
    assert.deepEqual(missing, [], `${missing.length} of ${acknowledged.size} acknowledged readings are missing after the restart`);
    for (const [id, sent] of acknowledged) {
      assert.equal(byId.get(id).recordedAt, sent.recordedAt, `reading ${id}`);
      assert.equal(byId.get(id).temperature, sent.temperature, `reading ${id}`);
    }
    const refusedTimes = new Set(refused.map((r) => r.recordedAt));
    assert.deepEqual(stored.filter((r) => refusedTimes.has(r.recordedAt)), [],
      'a request answered with an error stored nothing');
  });

  // FLUSH_INTERVAL_MS=60000 (the maximum): the flush timer's first tick is at start-up, the next one
  // a minute later, so within this test only the shutdown flush can deliver the pending batch.
  for (const transports of [undefined, ['polling']]) {
    const label = transports ? 'a polling-only socket' : 'a socket (upgraded to websocket)';
    it(`${label} connected during shutdown receives the pending batch before it is disconnected`, async () => {
      const { gw, admin } = await setup({ FLUSH_INTERVAL_MS: '60000' });
      const { units: [unit] } = await freshSite(gw, admin);
      const token = mintToken({ sub: 'dash', org: 'acme', role: 'viewer', secret: gw.secret });
      const socket = await connect(gw, { token, ...(transports ? { transports } : {}) });
      if (!transports) {
        await withTimeout((async () => {
          while (socket.io.engine.transport.name !== 'websocket') await sleep(20);
        })(), 5000, 'the socket did not upgrade to websocket');
      }
      // Steady state: the unit already reports (its first reading's unit:status has arrived), so
      // the reading below changes no status and only the batch is pending.
      const status = new Promise((resolve) => socket.once('unit:status', resolve));
      const primed = await ingest(gw, admin, [reading(unit.id, 4)]);
      assertStatus(primed, 200);
      await withTimeout(status, 3000, 'unit:status of the first reading');

      const order = [];
      const batches = collect(socket, 'sensor:readings:batch', 'ReadingsBatch');
      socket.on('sensor:readings:batch', () => order.push('batch'));
      let reason;
      const disconnected = new Promise((resolve) => socket.once('disconnect', (r) => {
        order.push('disconnect');
        reason = r;
        resolve(r);
      }));

      const sent = [reading(unit.id, 4.2), reading(unit.id, 4.4)];
      const res = await ingest(gw, admin, sent);
      assertStatus(res, 200);
      const started = Date.now();
      gw.child.kill('SIGTERM');

      const outcome = await withTimeout(disconnected, 6000, 'disconnect').then(() => 'disconnected', () => 'still connected');
      const elapsed = Date.now() - started;
      const what = `after SIGTERM: ${outcome} at ${elapsed} ms, events ${JSON.stringify(order)}, disconnect reason ${reason}`;
      assert.ok(order.includes('batch'), `the pending batch never arrived (${what})`);
      assert.deepEqual(order.slice(0, 2), ['batch', 'disconnect'], `the batch must arrive before the disconnect (${what})`);
      const mine = batches.forUnit(unit.id);
      // Nothing was flushed since start-up: the batch holds the first reading too.
      assert.deepEqual(batchReadings(mine).map((r) => r.id).sort(), [...primed.body.ids, ...res.body.ids].sort(),
        'every pending reading, once each');
      const exit = await withTimeout(gw.exited, 5000, 'gateway exit');
      assert.deepEqual(exit, { code: 0, signal: null }, `graceful exit; stderr:\n${gw.stderr()}`);
    });
  }
});
