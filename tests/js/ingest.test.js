// `POST /api/readings/ingest` (CONTRACT.md "HTTP API"): the answer, idempotency, auth, limits,
// validation, all-or-nothing, API keys, and 503 when storage is gone.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  api,
  assertApiError,
  assertSchema,
  assertStatus,
  forEachEngine,
  mintToken,
  randomId,
  roomAck,
  sleep,
  useGateway,
} from './harness.js';
import {
  assertEachOnce,
  batchReadings,
  collect,
  freshSite,
  ingest,
  ingestOk,
  ownDatabase,
  pgAdmin,
  rawPost,
  reading,
  spawnGateway,
  storedReadings,
} from './pipeline-helpers.js';

const FLUSH_MS = 300;
const WINDOW_MS = FLUSH_MS + 700;

/** Creates an API key (admin) and returns the key string. */
async function createKey(gw, adminToken, body) {
  const res = await api(gw, 'POST', '/api/keys', { token: adminToken, body });
  assertStatus(res, 201, 'POST /api/keys:');
  assertSchema('ApiKeyCreated', res.body);
  return res.body;
}

forEachEngine('POST /api/readings/ingest', (engine) => {
  const gw = useGateway(engine, { env: { FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
  let admin;
  let operator;
  let viewer;

  before(() => {
    admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
    operator = gw.token({ sub: 'op-acme', org: 'acme', role: 'operator' });
    viewer = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
  });

  /** An org socket subscribed to `unitId`, collecting batches and live readings. */
  async function watch(unitId) {
    const socket = await gw.connect({ token: gw.token({ sub: `w-${randomId(3)}`, org: 'acme', role: 'viewer' }) });
    assert.deepEqual(await roomAck(socket, 'subscribe:unit', unitId), { ok: true });
    return {
      batches: collect(socket, 'sensor:readings:batch', 'ReadingsBatch'),
      live: collect(socket, 'sensor:reading', 'SensorReading'),
    };
  }

  /** Asserts that nothing about `unitId` was stored or broadcast (after a bounded wait). */
  async function assertNothingFor(unitId, watcher) {
    await sleep(WINDOW_MS);
    assert.deepEqual(watcher.batches.forUnit(unitId), [], 'nothing broadcast as a batch');
    assert.deepEqual(watcher.live.forUnit(unitId), [], 'nothing broadcast as sensor:reading');
    assert.deepEqual(await storedReadings(gw, viewer, unitId), [], 'nothing stored');
    const latest = await api(gw, 'GET', `/api/units/${unitId}/latest`, { token: viewer });
    assertStatus(latest, 200);
    assert.equal(latest.body, null, '/latest is still null');
  }

  describe('200', () => {
    it('answers { accepted, duplicates, ids } with ids[i] the stored id of readings[i] (operator role)', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const sent = [reading(unit.id, 3.1), reading(unit.id, 3.2, { deviceId: 'd-1' }), reading(unit.id, 3.3, { source: 'modbus' })];
      const res = await ingestOk(gw, operator, sent);
      assert.equal(res.accepted, 3);
      assert.equal(res.duplicates, 0);
      assert.equal(res.ids.length, 3);
      for (const id of res.ids) assert.equal(typeof id, 'string');
      assert.equal(new Set(res.ids).size, 3, 'distinct ids');

      const stored = await storedReadings(gw, viewer, unit.id);
      assert.equal(stored.length, 3);
      const byId = new Map(stored.map((r) => [r.id, r]));
      sent.forEach((r, i) => {
        const s = byId.get(res.ids[i]);
        assert.ok(s, `ids[${i}] is readable`);
        assert.equal(s.temperature, r.temperature);
        assert.equal(s.recordedAt, r.recordedAt);
        assert.equal(s.deviceId, r.deviceId ?? null);
        assert.equal(s.source, r.source ?? 'api');
      });
    });

    it('a resend counts duplicates, returns the first ids, and is not broadcast again', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      const sent = [reading(unit.id, 4), reading(unit.id, 4.5, { deviceId: 'd-9' })];
      const first = await ingestOk(gw, admin, sent);
      assert.deepEqual([first.accepted, first.duplicates], [2, 0]);
      await w.batches.waitFor((l) => batchReadings(l.filter((b) => b.unitId === unit.id)).length >= 2, WINDOW_MS, 'first batch');

      const again = await ingestOk(gw, admin, sent);
      assert.deepEqual([again.accepted, again.duplicates], [0, 2], 'the resend is all duplicates');
      assert.deepEqual(again.ids, first.ids, 'a duplicate answers the id stored the first time');

      // Same key (unitId, recordedAt, deviceId, source) with another temperature is still a duplicate;
      // another deviceId at the same time is a different reading.
      const sameKey = { ...sent[0], temperature: 99 };
      const otherDevice = { ...sent[0], deviceId: 'd-other' };
      const mixed = await ingestOk(gw, admin, [sameKey, otherDevice]);
      assert.deepEqual([mixed.accepted, mixed.duplicates], [1, 1]);
      assert.equal(mixed.ids[0], first.ids[0]);
      assert.ok(!first.ids.includes(mixed.ids[1]));
      await w.batches.waitFor((l) => batchReadings(l).some((r) => r.id === mixed.ids[1]), WINDOW_MS, 'batch with the new reading');
      await sleep(WINDOW_MS);

      const all = [...first.ids, mixed.ids[1]];
      assertEachOnce(batchReadings(w.batches.forUnit(unit.id)), all, 'batches');
      assert.equal(batchReadings(w.batches.forUnit(unit.id)).length, 3, 'duplicates are not re-broadcast in batches');
      assertEachOnce(w.live.forUnit(unit.id), all, 'sensor:reading');
      assert.equal(w.live.forUnit(unit.id).length, 3, 'duplicates are not re-broadcast live');
      const stored = await storedReadings(gw, viewer, unit.id);
      assert.equal(stored.length, 3, 'stored once');
      assert.equal(stored.find((r) => r.id === first.ids[0]).temperature, 4, 'the first value is kept');
    });

    it('exactly MAX_READINGS_PER_REQUEST (1000) readings are accepted', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const sent = Array.from({ length: 1000 }, () => reading(unit.id, 5));
      const res = await ingestOk(gw, admin, sent);
      assert.equal(res.accepted, 1000);
      assert.equal(new Set(res.ids).size, 1000);
    });
  });

  describe('errors (nothing stored, nothing broadcast)', () => {
    it('400 for malformed JSON', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      const body = `{"readings":[{"unitId":"${unit.id}","temperature":4,"recordedAt":"${new Date().toISOString()}"}`;
      const res = await rawPost(gw, '/api/readings/ingest', { token: admin, body });
      assert.equal(assertApiError(res, 400).error, 'bad_request');
      await assertNothingFor(unit.id, w);
    });

    it('401 without credentials, with an invalid token, or with an unknown API key', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const readings = [reading(unit.id, 4)];
      const cases = [
        ['no credentials', {}],
        ['a malformed token', { token: 'not-a-jwt' }],
        ['a token signed with another secret', { token: mintToken({ sub: 'x', org: 'acme', role: 'admin', secret: 'another-secret-of-32-bytes-length!!' }) }],
        ['an expired token', { token: gw.token({ sub: 'x', org: 'acme', role: 'admin', expSeconds: -3600 }) }],
        ['an unknown API key', { headers: { 'x-api-key': `swk_${randomId(16)}` } }],
      ];
      for (const [what, opts] of cases) {
        const res = await api(gw, 'POST', '/api/readings/ingest', { ...opts, body: { readings } });
        assert.equal(assertApiError(res, 401, what).error, 'unauthorized', what);
      }
      assert.deepEqual(await storedReadings(gw, viewer, unit.id), []);
    });

    it('403 for a viewer and for an API key without the ingest scope', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      const readings = [reading(unit.id, 4)];
      const asViewer = await ingest(gw, viewer, readings);
      assert.equal(assertApiError(asViewer, 403, 'viewer').error, 'forbidden');
      const publishOnly = await createKey(gw, admin, { name: 'publisher', scopes: ['publish'] });
      assert.deepEqual(publishOnly.scopes, ['publish']);
      const asKey = await ingest(gw, { apiKey: publishOnly.key }, readings);
      assert.equal(assertApiError(asKey, 403, 'publish-only key').error, 'forbidden');
      await assertNothingFor(unit.id, w);
    });

    it('413 for a body over 1 MiB', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      // A valid reading plus an ignored field that pushes the body over MAX_BODY_BYTES.
      const readings = [{ ...reading(unit.id, 4), padding: 'x'.repeat(1024 * 1024 + 16) }];
      const res = await ingest(gw, admin, readings);
      assert.equal(assertApiError(res, 413).error, 'payload_too_large');
      await assertNothingFor(unit.id, w);
    });

    it('413 for more readings than MAX_READINGS_PER_REQUEST (default 1000)', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      const readings = Array.from({ length: 1001 }, () => reading(unit.id, 4));
      assert.ok(JSON.stringify({ readings }).length < 1024 * 1024, 'the body itself is under the byte limit');
      const res = await ingest(gw, admin, readings);
      assert.equal(assertApiError(res, 413).error, 'payload_too_large');
      await assertNothingFor(unit.id, w);
    });

    it('422 names index and field: unknown unit (including another org\'s), recordedAt > 5 min ahead, bad values', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const otherAdmin = gw.token({ sub: 'admin-other', org: 'other', role: 'admin' });
      const other = await freshSite(gw, otherAdmin);
      const readings = [
        reading(unit.id, 4),
        reading(`u-missing-${randomId(3)}`, 4),
        reading(other.units[0].id, 4),
        { unitId: unit.id, temperature: 4, recordedAt: new Date(Date.now() + 10 * 60_000).toISOString() },
      ];
      const res = await ingest(gw, admin, readings);
      const body = assertApiError(res, 422);
      assert.equal(body.error, 'validation_failed');
      assert.ok(Array.isArray(body.details), 'details is a list');
      // Field problems and unknown units may be reported together or field problems first; either
      // way every entry must name one of the real problems, and never the valid reading 0.
      const allowed = new Set(['1:unitId', '2:unitId', '3:recordedAt']);
      assert.ok(body.details.length > 0, 'details is not empty');
      for (const d of body.details) {
        assert.ok(allowed.has(`${d.index}:${d.field}`), `unexpected detail ${JSON.stringify(d)} in ${JSON.stringify(body.details)}`);
      }
      for (const d of body.details) assert.ok(typeof d.message === 'string' && d.message.length > 0);

      const unknownOnly = await ingest(gw, admin, [readings[0], readings[1], readings[2]]);
      const b2 = assertApiError(unknownOnly, 422);
      assert.deepEqual(b2.details.map((d) => [d.index, d.field]), [[1, 'unitId'], [2, 'unitId']],
        'an unknown unit and another org\'s unit are both simply unknown');

      const future = await ingest(gw, admin, [readings[0], readings[3]]);
      const b3 = assertApiError(future, 422);
      assert.deepEqual(b3.details.map((d) => [d.index, d.field]), [[1, 'recordedAt']]);

      assert.deepEqual(await storedReadings(gw, viewer, unit.id), [], 'no refused request stored anything');
      const soon = await ingestOk(gw, admin, [{ unitId: unit.id, temperature: 4, recordedAt: new Date(Date.now() + 4 * 60_000).toISOString() }]);
      assert.equal(soon.accepted, 1, '4 minutes ahead is within the 5-minute allowance');
    });

    it('422 lists every invalid field of every reading', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const readings = [
        reading(unit.id, 4),
        { unitId: unit.id, recordedAt: new Date().toISOString() },
        { unitId: unit.id, temperature: 'hot', recordedAt: 'yesterday' },
        { ...reading(unit.id, 4), humidity: 140 },
      ];
      const body = assertApiError(await ingest(gw, admin, readings), 422);
      const named = body.details.map((d) => `${d.index}:${d.field}`).sort();
      assert.deepEqual(named, ['1:temperature', '2:recordedAt', '2:temperature', '3:humidity'], JSON.stringify(body.details));
      assert.deepEqual(await storedReadings(gw, viewer, unit.id), []);
    });

    it('a request mixing valid and invalid readings stores nothing and broadcasts nothing', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const w = await watch(unit.id);
      const alerts = collect(await gw.connect({ token: viewer }), 'alert:triggered', 'AlertTriggered');
      const valid = [reading(unit.id, 4), reading(unit.id, 20)]; // 20 would open an alert
      const res = await ingest(gw, admin, [...valid, { unitId: unit.id, temperature: 'warm', recordedAt: new Date().toISOString() }]);
      const body = assertApiError(res, 422);
      assert.deepEqual(body.details.map((d) => [d.index, d.field]), [[2, 'temperature']]);
      await assertNothingFor(unit.id, w);
      assert.deepEqual(alerts.forUnit(unit.id), [], 'no alert from a refused request');
      const u = await api(gw, 'GET', `/api/units/${unit.id}`, { token: viewer });
      assertStatus(u, 200);
      assert.equal(u.body.status, 'unknown', 'a refused request does not change the unit status');
      assert.equal(u.body.lastReadingAt, null);

      // The valid part was really not stored: sending it alone now stores both (no duplicates).
      const retry = await ingestOk(gw, admin, valid);
      assert.deepEqual([retry.accepted, retry.duplicates], [2, 0]);
    });
  });

  describe('API keys', () => {
    it('a key with the ingest scope (the default) works as X-API-Key and as Authorization: Bearer; a revoked key is 401', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const w = await watch(unit.id);
      const key = await createKey(gw, admin, { name: `device-${randomId(3)}` });
      assert.deepEqual(key.scopes, ['ingest'], 'ingest is the default scope');
      const both = await createKey(gw, admin, { name: 'both', scopes: ['ingest', 'publish'] });

      const a = await ingestOk(gw, { apiKey: key.key }, [reading(unit.id, 4)]);
      const bearer = await api(gw, 'POST', '/api/readings/ingest', { token: key.key, body: { readings: [reading(unit.id, 4.1)] } });
      assertStatus(bearer, 200, 'Authorization: Bearer <key>:');
      assertSchema('IngestResponse', bearer.body);
      const c = await ingestOk(gw, { apiKey: both.key }, [reading(unit.id, 4.2)]);
      const ids = [a.ids[0], bearer.body.ids[0], c.ids[0]];
      await w.batches.waitFor((l) => batchReadings(l.filter((b) => b.unitId === unit.id)).length >= 3, 2 * WINDOW_MS, 'batches of key-ingested readings');
      assertEachOnce(batchReadings(w.batches.forUnit(unit.id)), ids, 'key-ingested readings');
      assert.equal((await storedReadings(gw, viewer, unit.id)).length, 3);

      assertStatus(await api(gw, 'DELETE', `/api/keys/${key.id}`, { token: admin }), 204);
      const revoked = await ingest(gw, { apiKey: key.key }, [reading(unit.id, 4.3)]);
      assertApiError(revoked, 401, 'revoked key');
    });

    it("a key only reaches its own organisation's units", async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const otherAdmin = gw.token({ sub: 'admin-other', org: 'other', role: 'admin' });
      const otherKey = await createKey(gw, otherAdmin, { name: 'other-device' });
      const res = await ingest(gw, { apiKey: otherKey.key }, [reading(unit.id, 4)]);
      const body = assertApiError(res, 422);
      assert.deepEqual(body.details.map((d) => [d.index, d.field]), [[0, 'unitId']]);
      assert.deepEqual(await storedReadings(gw, viewer, unit.id), []);
    });
  });

  if (engine === 'postgres') {
    describe('storage unavailable', () => {
      let db;
      let own;
      after(async () => {
        if (own) await own.stop();
        if (db) await db.drop();
      });

      it('answers 503 with Retry-After and error "unavailable" once the database is gone (DROP DATABASE … WITH (FORCE))', async () => {
        db = await ownDatabase('postgres');
        own = await spawnGateway({ databaseUrl: db.url, env: { FLUSH_INTERVAL_MS: String(FLUSH_MS) } });
        const ownAdmin = mintToken({ sub: 'admin', org: 'acme', role: 'admin', secret: own.secret });
        const { units: [warm, cold] } = await freshSite(own, ownAdmin, [{}, {}]);
        await ingestOk(own, ownAdmin, [reading(warm.id, 4)]);

        await pgAdmin((c) => c.query(`DROP DATABASE ${db.name} WITH (FORCE)`));

        // Both paths: a unit whose details the gateway still holds in memory (the commit fails), and
        // one it must look up in storage first.
        const problems = [];
        for (const [what, unitId] of [['a unit that just ingested', warm.id], ['a unit never ingested', cold.id]]) {
          const res = await ingest(own, ownAdmin, [reading(unitId, 4)]);
          try {
            const body = assertApiError(res, 503, `${what}:`);
            assert.equal(body.error, 'unavailable', what);
            const retryAfter = res.headers.get('retry-after');
            assert.ok(retryAfter !== null, `${what}: 503 carries Retry-After`);
            assert.ok(/^\d+$/.test(retryAfter) ? Number(retryAfter) > 0 : !Number.isNaN(Date.parse(retryAfter)),
              `${what}: Retry-After is delay-seconds or an HTTP date, got ${retryAfter}`);
          } catch (err) {
            problems.push(err.message);
          }
        }
        assert.deepEqual(problems, [], problems.join('\n'));
      });
    });
  }
});
