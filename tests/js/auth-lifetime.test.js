// Token lifetime on a live socket: auth:refresh and auth:expired.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  assertSchema,
  emitAck,
  forEachEngine,
  mintToken,
  nextEvent,
  nowSeconds,
  roomAck,
  seedStandardFixture,
  sleep,
  tokenExp,
  useGateway,
} from './harness.js';
import { collect, ingestOk, reading } from './pipeline-helpers.js';

forEachEngine('socket.io token lifetime', (engine) => {
  const gw = useGateway(engine);
  const userToken = (claims = {}) => gw.token({ sub: 'user-1', org: 'acme', role: 'viewer', ...claims });

  before(async () => {
    await seedStandardFixture(gw);
  });

  async function refresh(socket, token) {
    const ack = await emitAck(socket, 'auth:refresh', token);
    assertSchema('RefreshAck', ack);
    return ack;
  }

  function assertRefused(ack) {
    assert.equal(ack.ok, false, `expected a refused refresh, got ${JSON.stringify(ack)}`);
    assert.equal(typeof ack.error, 'string');
    assert.ok(ack.error.length > 0, 'error is a non-empty string');
  }

  describe('auth:refresh', () => {
    it("accepts a fresh token for the same sub/org_id and acks { ok: true, exp } with the new token's exp", async () => {
      const socket = await gw.connect({ token: userToken({ expSeconds: 600 }) });
      const fresh = userToken({ expSeconds: 7200 });
      const ack = await refresh(socket, fresh);
      assert.deepEqual(ack, { ok: true, exp: tokenExp(fresh) });
      assert.ok(socket.connected);
    });

    it('refuses a token for a different sub', async () => {
      const socket = await gw.connect({ token: userToken() });
      assertRefused(await refresh(socket, userToken({ sub: 'user-2' })));
      assert.ok(socket.connected, 'a refused refresh does not disconnect');
    });

    it('refuses a token for the same sub in a different org_id', async () => {
      const socket = await gw.connect({ token: userToken() });
      assertRefused(await refresh(socket, userToken({ org: 'other' })));
    });

    it('refuses garbage', async () => {
      const socket = await gw.connect({ token: userToken() });
      assertRefused(await refresh(socket, 'garbage'));
    });

    it('refuses a token signed with another secret', async () => {
      const socket = await gw.connect({ token: userToken() });
      const forged = mintToken({ sub: 'user-1', org: 'acme', secret: 'some-other-secret-0123456789abcdef0123' });
      assertRefused(await refresh(socket, forged));
    });

    it('with narrower site_ids: leaves the site and unit rooms the new token may not see, keeps the rest', async () => {
      const admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
      const socket = await gw.connect({ token: userToken({ siteIds: ['s-1', 's-2'] }) });
      for (const [event, id] of [['subscribe:site', 's-2'], ['subscribe:unit', 'u-2'], ['subscribe:unit', 'u-1']]) {
        assert.deepEqual(await roomAck(socket, event, id), { ok: true }, `${event} ${id}`);
      }
      const live = collect(socket, 'sensor:reading', 'SensorReading');
      const batches = collect(socket, 'sensor:readings:batch', 'ReadingsBatch');
      const ack = await refresh(socket, userToken({ siteIds: ['s-1'] }));
      assert.equal(ack.ok, true, JSON.stringify(ack));
      await ingestOk(gw, admin, [reading('u-1', 5), reading('u-2', 5)]);
      await batches.waitFor((all) => all.some((b) => b.unitId === 'u-1'), 5000, 'the u-1 batch');
      await sleep(500);
      assert.equal(live.forUnit('u-1').length, 1, 'u-1 (site s-1) is still live');
      assert.deepEqual(live.forUnit('u-2'), [], 'nothing live from u-2 (site s-2) after the refresh');
      assert.deepEqual(batches.forUnit('u-2'), [], 'no batch of u-2 after the refresh');
      // Subscribing again is refused like any out-of-scope room.
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-2'), { ok: false, error: 'forbidden' });
    });

    it('refuses a token that is already expired beyond the leeway', async () => {
      const socket = await gw.connect({ token: userToken() });
      assertRefused(await refresh(socket, userToken({ exp: nowSeconds() - 120 })));
    });
  });

  describe('auth:expired', () => {
    it("emits auth:expired {} when the token runs out (exp + 30 s) and then disconnects with 'io server disconnect'", async () => {
      // exp = now - 27: accepted thanks to the leeway, runs out about 3 s from now.
      const socket = await gw.connect({ token: userToken({ exp: nowSeconds() - 27 }) });
      const events = [];
      socket.on('auth:expired', (p) => events.push(['auth:expired', p]));
      const reason = await nextEvent(socket, 'disconnect', 8000);
      assert.equal(events.length, 1, `expected one auth:expired before the disconnect, got ${JSON.stringify(events)}`);
      assertSchema('AuthExpired', events[0][1]);
      assert.deepEqual(events[0][1], {});
      assert.equal(reason, 'io server disconnect');
    });

    it('is not emitted early: a socket whose token runs out in ~3 s is still served before then', async () => {
      const socket = await gw.connect({ token: userToken({ exp: nowSeconds() - 27 }) });
      let expired = false;
      socket.on('auth:expired', () => { expired = true; });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      assert.equal(expired, false);
      assert.ok(socket.connected);
    });

    it('a socket that refreshed its token in time is not disconnected at the old expiry', async () => {
      const socket = await gw.connect({ token: userToken({ exp: nowSeconds() - 27 }) });
      const seen = [];
      socket.on('auth:expired', () => seen.push('auth:expired'));
      socket.on('disconnect', (reason) => seen.push(`disconnect: ${reason}`));
      const ack = await refresh(socket, userToken({ expSeconds: 3600 }));
      assert.equal(ack.ok, true, JSON.stringify(ack));
      // The old token ran out ~3 s after connecting; wait past that.
      await sleep(5000);
      assert.deepEqual(seen, []);
      assert.ok(socket.connected);
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
    });
  });
});
