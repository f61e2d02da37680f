// Socket.io handshake: where the token is read from and how refusals reach the client.
import assert from 'node:assert/strict';
import { it } from 'node:test';

import { forEachEngine, mintToken, nowSeconds, roomAck, useGateway } from './harness.js';

const TRANSPORT_VARIANTS = [
  ['default transports', {}],
  ['websocket only', { transports: ['websocket'] }],
  ['polling only', { transports: ['polling'] }],
];

forEachEngine('socket.io handshake', (engine) => {
  const gw = useGateway(engine);
  const viewer = (claims = {}) => gw.token({ sub: 'user-1', org: 'acme', ...claims });

  for (const [label, transportOpts] of TRANSPORT_VARIANTS) {
    it(`connects with a valid token in auth.token (${label})`, async () => {
      const socket = await gw.connect({ token: viewer(), ...transportOpts });
      assert.ok(socket.connected);
      assert.ok(socket.id, 'socket has a server-assigned id');
    });

    it(`refuses a handshake without a token: 'unauthorized: missing token' (${label})`, async () => {
      const err = await gw.connectError({ ...transportOpts });
      assert.equal(err.message, 'unauthorized: missing token');
    });

    it(`refuses a token with a bad signature: 'unauthorized: invalid token' (${label})`, async () => {
      const forged = mintToken({ sub: 'user-1', org: 'acme', secret: 'not-the-gateway-secret-0123456789abcdef' });
      const err = await gw.connectError({ token: forged, ...transportOpts });
      assert.equal(err.message, 'unauthorized: invalid token');
    });

    it(`refuses a token expired beyond the 30 s leeway: 'unauthorized: token expired' (${label})`, async () => {
      const err = await gw.connectError({ token: viewer({ exp: nowSeconds() - 120 }), ...transportOpts });
      assert.equal(err.message, 'unauthorized: token expired');
    });
  }

  it("refuses garbage in auth.token: 'unauthorized: invalid token'", async () => {
    const err = await gw.connectError({ token: 'not-a-jwt' });
    assert.equal(err.message, 'unauthorized: invalid token');
  });

  it("does not read the token from the query string: 'unauthorized: missing token'", async () => {
    const err = await gw.connectError({ query: { token: viewer() } });
    assert.equal(err.message, 'unauthorized: missing token');
  });

  it('reads the token from an Authorization: Bearer header (Node client, polling)', async () => {
    const socket = await gw.connect({
      transports: ['polling'],
      extraHeaders: { Authorization: `Bearer ${viewer()}` },
    });
    assert.ok(socket.connected);
    // The connection is usable, not merely accepted.
    const ack = await roomAck(socket, 'unsubscribe:site', 's-1');
    assert.deepEqual(ack, { ok: true });
  });

  it('accepts a token expired 10 s ago (inside the 30 s leeway)', async () => {
    const socket = await gw.connect({ token: viewer({ exp: nowSeconds() - 10 }) });
    assert.ok(socket.connected);
  });

  it('accepts a token without a role claim (defaults to viewer)', async () => {
    const socket = await gw.connect({ token: viewer({ role: undefined }) });
    assert.ok(socket.connected);
  });

  it('refuses a token without org_id', async () => {
    const token = mintToken({ sub: 'user-1', org: undefined, secret: gw.secret });
    const err = await gw.connectError({ token });
    assert.match(err.message, /^unauthorized/);
  });

  it("answers an event emitted right in the 'connect' handler, every time (100 fresh websocket connections)", async () => {
    // Dashboards subscribe from socket.on('connect'); the server must be listening by then.
    const token = viewer();
    const lost = [];
    for (let i = 0; i < 100; i++) {
      const socket = await gw.connect({ token, transports: ['websocket'] });
      try {
        assert.deepEqual(await roomAck(socket, 'unsubscribe:site', 's-1'), { ok: true });
      } catch (err) {
        lost.push(`#${i}: ${err.message}`);
      } finally {
        socket.disconnect();
        gw.sockets.delete(socket);
      }
      if (lost.length >= 3) break; // each loss costs the 3 s ack timeout
    }
    assert.deepEqual(lost, [], `first events not answered: ${lost.join('; ')}`);
  });

  it('lets two tabs of the same user stay connected at the same time', async () => {
    const token = viewer();
    const tab1 = await gw.connect({ token });
    const tab2 = await gw.connect({ token });
    assert.notEqual(tab1.id, tab2.id);
    assert.ok(tab1.connected && tab2.connected);
    // Both tabs are served after the second one connected.
    assert.deepEqual(await roomAck(tab1, 'unsubscribe:site', 's-1'), { ok: true });
    assert.deepEqual(await roomAck(tab2, 'unsubscribe:site', 's-1'), { ok: true });
  });
});
