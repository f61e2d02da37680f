// Per-socket protection: event rate limit, abuse disconnect, and the cap on subscribed rooms.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  assertSchema,
  emitAck,
  forEachEngine,
  nextEvent,
  roomAck,
  seedStandardFixture,
  useGateway,
} from './harness.js';

forEachEngine('socket.io limits', (engine) => {
  describe('event rate limit (SOCKET_EVENTS_PER_SECOND=5, SOCKET_EVENTS_BURST=5)', () => {
    const gw = useGateway(engine, { env: { SOCKET_EVENTS_PER_SECOND: '5', SOCKET_EVENTS_BURST: '5' } });
    let token;
    before(async () => {
      await seedStandardFixture(gw);
      token = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    });

    it("serves a burst of SOCKET_EVENTS_BURST events, in the order sent, and answers the rest with 'rate_limited'", async () => {
      const socket = await gw.connect({ token });
      const acks = await Promise.all(
        Array.from({ length: 30 }, () => emitAck(socket, 'subscribe:site', 's-1')),
      );
      for (const ack of acks) assertSchema('SubscribeAck', ack);
      const shape = acks.map((a) => (a.ok ? 'ok' : a.error)).join(' ');
      for (const ack of acks) {
        assert.ok(ack.ok === true || ack.error === 'rate_limited', `unexpected ack ${JSON.stringify(ack)} in: ${shape}`);
      }
      assert.ok(acks.some((a) => a.error === 'rate_limited'), `expected at least one rate_limited ack, got: ${shape}`);
      assert.deepEqual(acks.slice(0, 5), Array(5).fill({ ok: true }), `the first 5 events are served; acks were: ${shape}`);
      assert.ok(socket.connected, '25 refused events stay under the default abuse limit of 50');
    });

    for (const [label, transportOpts] of [
      ['default transports', {}],
      ['websocket only', { transports: ['websocket'] }],
      ['polling only', { transports: ['polling'] }],
    ]) {
      it(`disconnects a socket that keeps flooding after being refused (${label})`, async () => {
        const socket = await gw.connect({ token, ...transportOpts });
        const errorEvents = [];
        socket.on('error', (e) => errorEvents.push(e));
        const disconnected = nextEvent(socket, 'disconnect', 5000);
        for (let i = 0; i < 300; i++) socket.emit('subscribe:site', 's-1');
        const reason = await disconnected;
        for (const e of errorEvents) assertSchema('ErrorEvent', e);
        // The server disconnects the socket; when the client is still flooding at that moment,
        // socketioxide closes the whole transport on the packets that keep arriving for the
        // removed socket, so the client may see the transport close before the disconnect packet.
        assert.ok(
          ['io server disconnect', 'transport close', 'transport error'].includes(reason),
          `disconnect reason was '${reason}' (after ${errorEvents.length} 'error' events)`,
        );
        // Every 'error' event that made it before the close says why.
        for (const e of errorEvents) assert.equal(e.code, 'rate_limited');
        if (reason === 'io server disconnect') {
          assert.ok(
            errorEvents.some((e) => e.code === 'rate_limited'),
            `refused events without an ack get an 'error' event { code: 'rate_limited' }; got ${JSON.stringify(errorEvents)}`,
          );
        }
      });
    }

    it('a new socket of the same user is served after a flooding one was disconnected', async () => {
      const socket = await gw.connect({ token });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
    });
  });

  describe('SOCKET_ABUSE_LIMIT', () => {
    const gw = useGateway(engine, {
      env: { SOCKET_EVENTS_PER_SECOND: '5', SOCKET_EVENTS_BURST: '5', SOCKET_ABUSE_LIMIT: '3' },
    });
    let token;
    before(async () => {
      await seedStandardFixture(gw);
      token = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    });

    it('disconnects the socket once SOCKET_ABUSE_LIMIT events were refused within 10 s', async () => {
      const socket = await gw.connect({ token });
      const disconnected = nextEvent(socket, 'disconnect', 5000);
      // 5 served by the burst, then refusals; a limit of 3 is passed well within these 20 events.
      for (let i = 0; i < 20 && socket.connected; i++) socket.emit('subscribe:site', 's-1');
      assert.equal(await disconnected, 'io server disconnect');
    });
  });

  describe('room cap (MAX_ROOMS_PER_SOCKET=2)', () => {
    const gw = useGateway(engine, { env: { MAX_ROOMS_PER_SOCKET: '2' } });
    let token;
    before(async () => {
      await seedStandardFixture(gw);
      token = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    });

    it("refuses a third distinct subscription with 'rate_limited'", async () => {
      const socket = await gw.connect({ token });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-2'), { ok: false, error: 'rate_limited' });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-2'), { ok: false, error: 'rate_limited' });
    });

    it('subscribing again to a room already joined does not count against the cap', async () => {
      const socket = await gw.connect({ token });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: true });
    });

    it('unsubscribing frees a slot', async () => {
      const socket = await gw.connect({ token });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-2'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: false, error: 'rate_limited' });
      assert.deepEqual(await roomAck(socket, 'unsubscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: true });
    });

    it('handles one socket\'s events in the order sent: subscribe immediately followed by unsubscribe leaves no subscription', async () => {
      const socket = await gw.connect({ token });
      // Sent back to back, as a dashboard component that mounts and unmounts at once does.
      const burst = await Promise.all([
        roomAck(socket, 'subscribe:site', 's-1'),
        roomAck(socket, 'unsubscribe:site', 's-1'),
        roomAck(socket, 'subscribe:site', 's-2'),
        roomAck(socket, 'unsubscribe:site', 's-2'),
      ]);
      assert.deepEqual(burst, Array(4).fill({ ok: true }));
      // Both slots must be free again: were s-1 or s-2 still joined, the cap of 2 would refuse these.
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), { ok: true }, 'first slot free');
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-2'), { ok: true }, 'second slot free');
    });

    it('the cap is per socket: another tab of the same user has its own slots', async () => {
      const tab1 = await gw.connect({ token });
      const tab2 = await gw.connect({ token });
      assert.deepEqual(await roomAck(tab1, 'subscribe:site', 's-1'), { ok: true });
      assert.deepEqual(await roomAck(tab1, 'subscribe:site', 's-2'), { ok: true });
      assert.deepEqual(await roomAck(tab2, 'subscribe:unit', 'u-1'), { ok: true });
      assert.deepEqual(await roomAck(tab2, 'subscribe:unit', 'u-2'), { ok: true });
    });
  });
  describe('events waiting for their turn (SOCKET_EVENTS_BURST=2, a rate that never refuses)', () => {
    // The limiter admits everything (one token per nanosecond), so a refusal here can only come
    // from the cap on events waiting behind the one being served: as many as the burst.
    const gw = useGateway(engine, { env: { SOCKET_EVENTS_PER_SECOND: '1000000000', SOCKET_EVENTS_BURST: '2' } });
    let token;
    before(async () => {
      await seedStandardFixture(gw);
      token = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    });

    it("answers events beyond the cap with 'rate_limited' at once and serves the rest in order", async () => {
      // Long-polling sends the whole burst in one request: every event arrives while the first
      // one's lookup holds the turn.
      const socket = await gw.connect({ token, transports: ['polling'] });
      const acks = await Promise.all(
        Array.from({ length: 20 }, () => emitAck(socket, 'subscribe:site', 's-1')),
      );
      for (const ack of acks) assertSchema('SubscribeAck', ack);
      const shape = acks.map((a) => (a.ok ? 'ok' : a.error)).join(' ');
      for (const ack of acks) {
        assert.ok(ack.ok === true || ack.error === 'rate_limited', `unexpected ack ${JSON.stringify(ack)} in: ${shape}`);
      }
      assert.deepEqual(acks[0], { ok: true }, `the first event is served; acks were: ${shape}`);
      assert.ok(acks.some((a) => a.error === 'rate_limited'), `expected events over the cap refused, got: ${shape}`);
      assert.ok(socket.connected, 'refusals under the abuse limit keep the socket');
      // Nothing is left waiting: the next event is served.
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
    });
  });
});
