// POST /api/events (CONTRACT.md "HTTP API"): a backend service (admin JWT or an API key with the
// `publish` scope) emits its own event to a room of its organisation — `org`, `site:{id}`,
// `unit:{id}` or `user:{sub}` — and stock socket.io clients in that room receive it with the name
// and data the publisher gave, once each. Reserved names are 422, a site or unit the caller's org
// does not have is 403, viewers/operators and keys without `publish` are 403, data over 64 KiB
// is 413, and more than PUBLISH_PER_SECOND (burst 2×) per publisher is 429 with Retry-After.
//
// Delivery is checked with "barriers": after the event under test, the same publisher path sends
// a `test:barrier` event to the org room of each organisation involved; events of one gateway
// leave through one ordered outbox, so once a socket has the barrier it has everything published
// before it — "exactly once" and "not delivered" are then exact, not timing guesses.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  api,
  assertApiError,
  assertSchema,
  assertStatus,
  forEachEngine,
  randomId,
  roomAck,
  sleep,
  useGateway,
} from './harness.js';
import { collectAny, freshOrg, publish, publishOk, receivedData } from './ws-helpers.js';

const BARRIER = 'test:barrier';
const EVENT_MS = 5000;

/** A payload exercising every JSON type, nesting and non-ASCII text. */
const richData = () => ({
  id: randomId(4),
  text: 'héllo ✓ — 温度',
  int: 42,
  float: -1.5,
  big: 1234567890123,
  yes: true,
  no: false,
  nothing: null,
  list: [1, 'two', { three: 3 }, [], null],
  nested: { deep: { deeper: { empty: {} } } },
});

forEachEngine('POST /api/events', (engine) => {
  const gw = useGateway(engine);

  /** Connects a socket.io client and records every event it receives. */
  async function client(token) {
    const socket = await gw.connect({ token });
    const rec = collectAny(socket);
    rec.socket = socket;
    return rec;
  }

  /**
   * Publishes a barrier to the org room of `admin`'s organisation and waits until each recorder
   * in `recorders` has it.
   */
  async function barrier(admin, recorders) {
    const data = { barrier: randomId(6) };
    await publishOk(gw, { token: admin }, { event: BARRIER, data, room: 'org' });
    await Promise.all(recorders.map((rec) => rec.waitFor(
      (items) => items.some((i) => i.event === BARRIER && i.args[0] && i.args[0].barrier === data.barrier),
      EVENT_MS, 'the barrier event',
    )));
  }

  /** Asserts `rec` received `event` exactly once, with exactly `data` as its one argument. */
  function assertOnce(rec, event, data, who) {
    const got = rec.named(event);
    assert.equal(got.length, 1, `${who}: '${event}' must arrive exactly once, got ${got.length}: ${JSON.stringify(got)}`);
    assert.equal(got[0].args.length, 1, `${who}: the event carries one argument (the data)`);
    assert.deepEqual(receivedData(got[0].args[0], data), data, `${who}: the data arrives as published`);
  }

  function assertNone(rec, event, who) {
    const got = rec.named(event);
    assert.deepEqual(got, [], `${who}: must not receive '${event}'`);
  }

  describe('delivery', () => {
    let X;
    let Y;
    // Same site and unit ids in both organisations ("ids are unique within an organisation").
    const siteId = `s-pub-${randomId(3)}`;
    const otherSiteId = `s-pub2-${randomId(3)}`;
    const unitId = `u-pub-${randomId(3)}`;
    const otherUnitId = `u-pub2-${randomId(3)}`;

    before(async () => {
      const sites = [{ id: siteId, units: [{ id: unitId }, { id: otherUnitId }] }, { id: otherSiteId, units: [] }];
      X = await freshOrg(gw, sites);
      Y = await freshOrg(gw, sites);
    });

    it('an org event reaches every socket of the organisation exactly once (several rooms, site-restricted too) and no other organisation', async () => {
      // In the org, user, site and unit rooms at once.
      const everywhere = await client(X.token({ sub: 'alice', role: 'viewer' }));
      await roomAck(everywhere.socket, 'subscribe:site', siteId);
      await roomAck(everywhere.socket, 'subscribe:unit', unitId);
      const restricted = await client(X.token({ sub: 'carol', role: 'viewer', siteIds: [otherSiteId] }));
      const admin = await client(X.admin);
      // Another org: same sub, same site and unit rooms.
      const foreign = await client(Y.token({ sub: 'alice', role: 'viewer' }));
      await roomAck(foreign.socket, 'subscribe:site', siteId);
      await roomAck(foreign.socket, 'subscribe:unit', unitId);

      const event = 'service:status';
      const data = richData();
      await publishOk(gw, { token: X.admin }, { event, data, room: 'org' });
      await barrier(X.admin, [everywhere, restricted, admin]);
      await barrier(Y.admin, [foreign]);
      assertOnce(everywhere, event, data, 'a socket in the org, user, site and unit rooms');
      assertOnce(restricted, event, data, 'a site-restricted socket');
      assertOnce(admin, event, data, 'the publisher\'s own socket');
      assertNone(foreign, event, 'a socket of another organisation (same sub, same room names)');
    });

    it('a user room reaches every tab of that user in the caller\'s organisation and nobody else', async () => {
      const tab1 = await client(X.token({ sub: 'alice', role: 'viewer' }));
      const tab2 = await client(X.token({ sub: 'alice', role: 'operator' }));
      const bob = await client(X.token({ sub: 'bob', role: 'viewer' }));
      const aliceElsewhere = await client(Y.token({ sub: 'alice', role: 'viewer' }));
      const event = `notify:${randomId(3)}`;
      const data = { to: 'alice', body: richData() };
      await publishOk(gw, { token: X.admin }, { event, data, room: 'user:alice' });
      await barrier(X.admin, [tab1, tab2, bob]);
      await barrier(Y.admin, [aliceElsewhere]);
      assertOnce(tab1, event, data, 'alice, tab 1');
      assertOnce(tab2, event, data, 'alice, tab 2');
      assertNone(bob, event, 'another user of the organisation');
      assertNone(aliceElsewhere, event, 'the same sub in another organisation');
    });

    it('a site room reaches the sockets that subscribed to that site only', async () => {
      const subscriber = await client(X.token({ sub: 'site-sub', role: 'viewer' }));
      await roomAck(subscriber.socket, 'subscribe:site', siteId);
      const twice = await client(X.token({ sub: 'site-twice', role: 'viewer' }));
      await roomAck(twice.socket, 'subscribe:site', siteId);
      await roomAck(twice.socket, 'subscribe:unit', unitId);
      const unsubscribed = await client(X.token({ sub: 'site-none', role: 'viewer' }));
      const otherSite = await client(X.token({ sub: 'site-other', role: 'viewer' }));
      await roomAck(otherSite.socket, 'subscribe:site', otherSiteId);
      const unitOnly = await client(X.token({ sub: 'unit-only', role: 'viewer' }));
      await roomAck(unitOnly.socket, 'subscribe:unit', unitId);
      const left = await client(X.token({ sub: 'site-left', role: 'viewer' }));
      await roomAck(left.socket, 'subscribe:site', siteId);
      await roomAck(left.socket, 'unsubscribe:site', siteId);
      const foreign = await client(Y.token({ sub: 'site-sub', role: 'viewer' }));
      await roomAck(foreign.socket, 'subscribe:site', siteId);

      const event = `site:note:${randomId(3)}`;
      const data = richData();
      await publishOk(gw, { token: X.admin }, { event, data, room: `site:${siteId}` });
      await barrier(X.admin, [subscriber, twice, unsubscribed, otherSite, unitOnly, left]);
      await barrier(Y.admin, [foreign]);
      assertOnce(subscriber, event, data, 'a subscriber of the site');
      assertOnce(twice, event, data, 'a subscriber of the site and of one of its units');
      assertNone(unsubscribed, event, 'a socket that did not subscribe');
      assertNone(otherSite, event, 'a subscriber of another site');
      assertNone(unitOnly, event, 'a subscriber of a unit of the site (not of the site)');
      assertNone(left, event, 'a socket that unsubscribed from the site');
      assertNone(foreign, event, 'a subscriber of the same site id in another organisation');
    });

    it('a unit room reaches the sockets that subscribed to that unit only', async () => {
      const subscriber = await client(X.token({ sub: 'unit-sub', role: 'viewer' }));
      await roomAck(subscriber.socket, 'subscribe:unit', unitId);
      const siteOnly = await client(X.token({ sub: 'site-only', role: 'viewer' }));
      await roomAck(siteOnly.socket, 'subscribe:site', siteId);
      const otherUnit = await client(X.token({ sub: 'unit-other', role: 'viewer' }));
      await roomAck(otherUnit.socket, 'subscribe:unit', otherUnitId);
      const unsubscribed = await client(X.token({ sub: 'unit-none', role: 'viewer' }));
      const foreign = await client(Y.token({ sub: 'unit-sub', role: 'viewer' }));
      await roomAck(foreign.socket, 'subscribe:unit', unitId);

      const event = `maintenance:${randomId(3)}`;
      const data = { window: '02:00-03:00', details: richData() };
      await publishOk(gw, { token: X.admin }, { event, data, room: `unit:${unitId}` });
      await barrier(X.admin, [subscriber, siteOnly, otherUnit, unsubscribed]);
      await barrier(Y.admin, [foreign]);
      assertOnce(subscriber, event, data, 'a subscriber of the unit');
      assertNone(siteOnly, event, 'a subscriber of the unit\'s site (not of the unit)');
      assertNone(otherUnit, event, 'a subscriber of another unit');
      assertNone(unsubscribed, event, 'a socket that did not subscribe');
      assertNone(foreign, event, 'a subscriber of the same unit id in another organisation');
    });

    it('reserved event names are refused with 422 and never emitted', async () => {
      const watcher = await client(X.token({ sub: 'reserved-watch', role: 'viewer' }));
      await roomAck(watcher.socket, 'subscribe:site', siteId);
      await roomAck(watcher.socket, 'subscribe:unit', unitId);
      const reserved = [
        'sensor:reading', 'sensor:readings:batch', 'sensor:anything',
        'alert:triggered', 'alert:resolved', 'alert:x',
        'unit:status', 'unit:custom',
        'auth:expired', 'auth:refresh',
        'sync:complete', 'sync:x',
        'error',
      ];
      for (const event of reserved) {
        for (const room of ['org', `site:${siteId}`, `unit:${unitId}`, 'user:reserved-watch']) {
          const res = await publish(gw, { token: X.admin }, { event, data: { fake: true }, room });
          const body = assertApiError(res, 422, `reserved event ${JSON.stringify(event)} to ${room}:`);
          assert.equal(body.error, 'validation_failed', `error code for reserved ${event}`);
        }
      }
      await barrier(X.admin, [watcher]);
      const leaked = watcher.all.filter((i) => reserved.includes(i.event));
      assert.deepEqual(leaked, [], 'no reserved event reached a client');
      // Names that merely contain a reserved word are fine.
      await publishOk(gw, { token: X.admin }, { event: 'my-sensor:reading', data: {}, room: 'org' });
      await publishOk(gw, { token: X.admin }, { event: 'errors', data: {}, room: 'org' });
    });

    it('a site or unit the organisation does not have is 403 and nothing is emitted', async () => {
      const onlyY = await freshOrg(gw, [[{}]]);
      const ySite = onlyY.sites[0].id;
      const yUnit = onlyY.sites[0].units[0].id;
      const foreign = await client(onlyY.token({ sub: 'y-watch', role: 'viewer' }));
      await roomAck(foreign.socket, 'subscribe:site', ySite);
      await roomAck(foreign.socket, 'subscribe:unit', yUnit);
      const event = `probe:${randomId(3)}`;
      for (const room of [`site:${ySite}`, `unit:${yUnit}`, `site:s-missing-${randomId(3)}`, `unit:u-missing-${randomId(3)}`]) {
        const res = await publish(gw, { token: X.admin }, { event, data: { probe: room }, room });
        const body = assertApiError(res, 403, `POST /api/events to ${room} of another/no organisation:`);
        assert.equal(body.error, 'forbidden');
      }
      await barrier(onlyY.admin, [foreign]);
      assertNone(foreign, event, 'the other organisation\'s subscribers');
    });

    it('a room that is none of org, site:{id}, unit:{id}, user:{sub} is 422', async () => {
      for (const room of ['everyone', 'org:acme', 'galaxy:1', '', 'site:', 'unit:']) {
        const res = await publish(gw, { token: X.admin }, { event: 'service:status', data: {}, room });
        assertApiError(res, 422, `room ${JSON.stringify(room)}:`);
      }
    });
  });

  describe('who may publish', () => {
    let X;
    before(async () => {
      X = await freshOrg(gw, [[{}]]);
    });

    const body = () => ({ event: 'service:status', data: { ok: true, n: randomId(3) }, room: 'org' });

    it('a viewer or operator JWT is 403; no credentials is 401', async () => {
      for (const role of ['viewer', 'operator']) {
        const res = await publish(gw, { token: X.token({ sub: `a-${role}`, role }) }, body());
        const err = assertApiError(res, 403, `${role} JWT:`);
        assert.equal(err.error, 'forbidden');
      }
      const anon = await publish(gw, {}, body());
      assertApiError(anon, 401, 'no credentials:');
      const bogusKey = await publish(gw, { apiKey: 'sw_not_a_real_key' }, body());
      assertApiError(bogusKey, 401, 'unknown API key:');
    });

    it('an admin JWT publishes (202 { delivered: true })', async () => {
      const watcher = await client(X.token({ sub: 'w', role: 'viewer' }));
      const b = body();
      await publishOk(gw, { token: X.admin }, b);
      await barrier(X.admin, [watcher]);
      assertOnce(watcher, b.event, b.data, 'org socket');
    });

    it('an API key without the publish scope is 403; one with it is 202 (X-API-Key or Bearer) and its event is delivered', async () => {
      const watcher = await client(X.token({ sub: 'key-watch', role: 'viewer' }));

      const ingestKey = await api(gw, 'POST', '/api/keys', { token: X.admin, body: { name: 'ingest only' } });
      assertStatus(ingestKey, 201, 'POST /api/keys (default scopes):');
      assertSchema('ApiKeyCreated', ingestKey.body);
      assert.deepEqual(ingestKey.body.scopes, ['ingest'], 'a key defaults to the ingest scope');
      const denied = body();
      for (const keyAsBearer of [false, true]) {
        const res = await publish(gw, { apiKey: ingestKey.body.key, keyAsBearer }, denied);
        const err = assertApiError(res, 403, `ingest-only key (${keyAsBearer ? 'Bearer' : 'X-API-Key'}):`);
        assert.equal(err.error, 'forbidden');
      }

      const publishKey = await api(gw, 'POST', '/api/keys', { token: X.admin, body: { name: 'publisher', scopes: ['publish'] } });
      assertStatus(publishKey, 201, 'POST /api/keys { scopes: [publish] }:');
      assertSchema('ApiKeyCreated', publishKey.body);
      assert.deepEqual(publishKey.body.scopes, ['publish']);
      const viaHeader = { event: 'service:via-header', data: richData(), room: 'org' };
      const viaBearer = { event: 'service:via-bearer', data: richData(), room: 'org' };
      await publishOk(gw, { apiKey: publishKey.body.key }, viaHeader);
      await publishOk(gw, { apiKey: publishKey.body.key, keyAsBearer: true }, viaBearer);

      const both = await api(gw, 'POST', '/api/keys', { token: X.admin, body: { name: 'both', scopes: ['ingest', 'publish'] } });
      assertStatus(both, 201, 'POST /api/keys { scopes: [ingest, publish] }:');
      const viaBoth = { event: 'service:via-both', data: { both: true }, room: `site:${X.sites[0].id}` };
      await roomAck(watcher.socket, 'subscribe:site', X.sites[0].id);
      await publishOk(gw, { apiKey: both.body.key }, viaBoth);

      await barrier(X.admin, [watcher]);
      assertNone(watcher, denied.event, 'the refused publish');
      assertOnce(watcher, viaHeader.event, viaHeader.data, 'key via X-API-Key');
      assertOnce(watcher, viaBearer.event, viaBearer.data, 'key via Authorization: Bearer');
      assertOnce(watcher, viaBoth.event, viaBoth.data, 'key with ingest and publish, to a site room');
    });
  });

  describe('limits', () => {
    it('data over 64 KiB is 413 and not emitted; exactly 64 KiB is accepted and delivered intact', async () => {
      const X = await freshOrg(gw, [[{}]]);
      const watcher = await client(X.token({ sub: 'big-watch', role: 'viewer' }));
      const overhead = JSON.stringify({ blob: '' }).length;
      const exact = { blob: 'x'.repeat(64 * 1024 - overhead) };
      assert.equal(JSON.stringify(exact).length, 64 * 1024);
      const over = { blob: 'y'.repeat(64 * 1024 - overhead + 1) };
      const huge = { blob: 'z'.repeat(200 * 1024) };

      const r1 = await publish(gw, { token: X.admin }, { event: 'big:over', data: over, room: 'org' });
      assert.equal(assertApiError(r1, 413, 'data of 64 KiB + 1 byte:').error, 'payload_too_large');
      const r2 = await publish(gw, { token: X.admin }, { event: 'big:huge', data: huge, room: 'org' });
      assert.equal(assertApiError(r2, 413, 'data of 200 KiB:').error, 'payload_too_large');
      await publishOk(gw, { token: X.admin }, { event: 'big:exact', data: exact, room: 'org' });

      await barrier(X.admin, [watcher]);
      assertNone(watcher, 'big:over', 'an oversize publish');
      assertNone(watcher, 'big:huge', 'an oversize publish');
      assertOnce(watcher, 'big:exact', exact, 'a 64 KiB publish');
    });
  });

  describe('rate limit (PUBLISH_PER_SECOND=2, burst 4)', () => {
    const limited = useGateway(engine, { env: { PUBLISH_PER_SECOND: '2' } });

    it('answers 429 with Retry-After beyond the burst, per publisher; refused events are not emitted; later publishes pass again', async () => {
      const X = await freshOrg(limited, [[{}]]);
      const socket = await limited.connect({ token: X.token({ sub: 'rl-watch', role: 'viewer' }) });
      const watcher = collectAny(socket);
      const event = `burst:${randomId(3)}`;

      const started = Date.now();
      const results = [];
      for (let i = 0; i < 10; i += 1) {
        const res = await publish(limited, { token: X.admin }, { event, data: { i }, room: 'org' });
        results.push(res);
      }
      const elapsed = (Date.now() - started) / 1000;
      const statuses = results.map((r) => r.status);
      assert.deepEqual(statuses.slice(0, 4), [202, 202, 202, 202], `the burst (2 × 2) passes: ${statuses}`);
      assert.ok(statuses.every((s) => s === 202 || s === 429), `only 202 or 429: ${statuses}`);
      const accepted = results.filter((r) => r.status === 202);
      const refused = results.filter((r) => r.status === 429);
      assert.ok(refused.length > 0, `10 publishes in ${elapsed.toFixed(2)} s must exceed 2/s with a burst of 4: ${statuses}`);
      assert.ok(accepted.length <= 4 + Math.ceil(elapsed * 2), `at most burst + rate × elapsed pass: ${accepted.length} in ${elapsed.toFixed(2)} s`);
      let retryAfter = 0;
      for (const r of refused) {
        const err = assertApiError(r, 429, 'over the publish rate:');
        assert.equal(err.error, 'rate_limited');
        const header = r.headers.get('retry-after');
        assert.match(String(header), /^\d+$/, `Retry-After is a number of seconds: ${header}`);
        assert.ok(Number(header) >= 1, `Retry-After ≥ 1: ${header}`);
        retryAfter = Math.max(retryAfter, Number(header));
      }

      // Another publisher (another admin of the same org) has its own budget.
      const otherAdmin = X.token({ sub: 'second-admin', role: 'admin' });
      await publishOk(limited, { token: otherAdmin }, { event: `${event}:other`, data: {}, room: 'org' });

      // After Retry-After the first publisher may publish again.
      await sleep(retryAfter * 1000 + 100);
      await publishOk(limited, { token: X.admin }, { event: `${event}:later`, data: {}, room: 'org' });

      // Only the accepted publishes were emitted (barrier by the second admin, whose budget is fresh enough).
      const data = { barrier: randomId(6) };
      await publishOk(limited, { token: otherAdmin }, { event: BARRIER, data, room: 'org' });
      await watcher.waitFor((items) => items.some((i) => i.event === BARRIER && i.args[0]?.barrier === data.barrier), EVENT_MS, 'the barrier');
      const got = watcher.named(event).map((i) => receivedData(i.args[0], { i: 0 }).i);
      const expected = results.map((r, i) => (r.status === 202 ? i : null)).filter((i) => i !== null);
      assert.deepEqual(got, expected, 'exactly the accepted publishes were emitted, in order');
      assert.equal(watcher.named(`${event}:later`).length, 1);
    });
  });
});
