// Hostile input: malformed engine.io / Socket.io frames, oversized packets and bodies, deeply
// nested JSON, wrong argument types, invalid UTF-8, unknown events and a flood of handshakes.
// Every case checks the documented refusal and that the gateway then still serves a normal
// client (GET /healthz 200, a fresh socket connects and subscribes). SQLite only: nothing here
// depends on the storage engine.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { before, describe, it } from 'node:test';

import {
  api,
  assertApiError,
  assertStatus,
  emitAck,
  roomAck,
  seedStandardFixture,
  sleep,
  useGateway,
  withTimeout,
} from './harness.js';
import { assertClosed, assertStillServing, openRaw, openRawConnected } from './hostile-helpers.js';

const HANDSHAKE_TIMEOUT_SECS = 2;

describe('hostile input [sqlite]', () => {
  const gw = useGateway('sqlite', { env: { HANDSHAKE_TIMEOUT_SECS: String(HANDSHAKE_TIMEOUT_SECS) } });
  let viewer;
  let operator;

  before(async () => {
    await seedStandardFixture(gw);
    viewer = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    operator = gw.token({ sub: 'op-acme', org: 'acme', role: 'operator' });
  });

  /** Raw POST with the body sent as given (string or Buffer). */
  async function rawPost(urlPath, body, token = operator) {
    const res = await fetch(new URL(urlPath, gw.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body,
      signal: AbortSignal.timeout(10_000),
    });
    const text = await res.text();
    const json = (res.headers.get('content-type') || '').includes('json');
    return { status: res.status, headers: res.headers, text, body: json ? JSON.parse(text) : text };
  }

  describe('malformed engine.io / Socket.io frames over a raw WebSocket', () => {
    const beforeConnect = [
      ['garbage text', 'hello, this is not engine.io'],
      ['engine.io MESSAGE with invalid JSON (`4{not json`)', '4{not json'],
      ['unknown engine.io packet type (`9`)', '9'],
      ['unknown Socket.io packet type (`47`)', '47'],
      ['a binary frame of random bytes', () => randomBytes(512)],
      ['an EVENT before any namespace CONNECT', '42["subscribe:site","s-1"]'],
    ];
    for (const [label, frame] of beforeConnect) {
      it(`closes the connection on ${label}`, async () => {
        const raw = await openRaw(gw);
        raw.send(typeof frame === 'function' ? frame() : frame);
        await assertClosed(raw, 1500, label);
        await assertStillServing(gw, viewer);
      });
    }

    const afterConnect = [
      ['an EVENT with invalid JSON (`42["x",{bad`)', '42["x",{bad'],
      ['an unknown Socket.io packet type (`49[]`)', '49[]'],
      ['a binary frame of random bytes', () => randomBytes(512)],
      ['an EVENT whose argument is 100k unclosed `[`', () => `42["subscribe:site",${'['.repeat(100_000)}`],
    ];
    for (const [label, frame] of afterConnect) {
      it(`closes a connected socket on ${label}`, async () => {
        const raw = await openRawConnected(gw, viewer);
        raw.send(typeof frame === 'function' ? frame() : frame);
        await assertClosed(raw, 1500, label);
        await assertStillServing(gw, viewer);
      });
    }

    it('answers a CONNECT to an unknown namespace (`40/nope,`) with a CONNECT_ERROR', async () => {
      const raw = await openRaw(gw);
      raw.send('40/nope,');
      const err = await raw.next((f) => f.startsWith('44/nope,'), 2000, 'CONNECT_ERROR for /nope');
      assert.deepEqual(JSON.parse(err.slice('44/nope,'.length)), { message: 'Invalid namespace' });
      // Nothing was connected: the handshake timeout then closes the connection.
      await assertClosed(raw, HANDSHAKE_TIMEOUT_SECS * 1000 + 2000, 'unknown namespace');
      await assertStillServing(gw, viewer);
    });

    it('an EVENT argument of 100k balanced `[`…`]` is refused (ack not_found) or closes the socket', async () => {
      const raw = await openRawConnected(gw, viewer);
      const depth = 100_000;
      raw.send(`427["subscribe:site",${'['.repeat(depth)}${']'.repeat(depth)}]`);
      const outcome = await Promise.race([
        raw.closed.then(() => 'closed'),
        raw.next((f) => f.startsWith('437'), 3000, 'ack 7').then((f) => JSON.parse(f.slice(3))),
      ]);
      if (outcome !== 'closed') {
        assert.deepEqual(outcome, [{ ok: false, error: 'not_found' }]);
        assert.ok(raw.isOpen(), 'the socket stays connected after a refused argument');
      }
      await assertStillServing(gw, viewer);
    });
  });

  describe('SOCKET_MAX_PAYLOAD (65536)', () => {
    it('WebSocket: a message over the limit closes the connection; one under it is answered', async () => {
      const under = await openRawConnected(gw, viewer);
      under.send(`428${JSON.stringify(['subscribe:site', 'x'.repeat(60_000)])}`);
      assert.equal(await under.next((f) => f.startsWith('438'), 3000, 'ack of a 60 KB event'), '438[{"ok":false,"error":"not_found"}]');
      assert.ok(under.isOpen(), 'a message under the limit keeps the connection');
      under.disconnect();

      const over = await openRawConnected(gw, viewer);
      over.send(`429${JSON.stringify(['subscribe:site', 'x'.repeat(70_000)])}`);
      await assertClosed(over, 3000, 'a 70 KB message over WebSocket');
      assert.equal(over.frames.some((f) => f.startsWith('439')), false, 'the oversized event was not handled');
      await assertStillServing(gw, viewer);
    });

    it('HTTP long-polling: a packet over the limit is refused with 413 and the session is closed', async () => {
      const base = new URL('/socket.io/?EIO=4&transport=polling', gw.url).toString();
      const open = await fetch(base);
      assertStatus({ status: open.status, text: '' }, 200);
      const sid = JSON.parse((await open.text()).slice(1)).sid;
      const url = `${base}&sid=${sid}`;
      let res = await fetch(url, { method: 'POST', body: `40${JSON.stringify({ token: viewer })}` });
      assert.equal(res.status, 200);
      await res.text();
      // engine.io's first heartbeat ping ("2") may come before the CONNECT answer, as a stock
      // client would see it: poll until the answer is there.
      let polled = '';
      for (let i = 0; i < 5 && !/(^|\x1e)40\{"sid"/.test(polled); i++) {
        res = await fetch(url);
        polled += `\x1e${await res.text()}`;
      }
      assert.match(polled, /(^|\x1e)40\{"sid"/, 'CONNECT answered');
      res = await fetch(url, { method: 'POST', body: `421${JSON.stringify(['subscribe:site', 'x'.repeat(70_000)])}` });
      assert.equal(res.status, 413, 'a POST over maxPayload is refused');
      await res.text();
      res = await fetch(url);
      assert.equal(res.status, 400, 'the session is gone');
      assert.equal((await res.json()).message, 'Session ID unknown');
      await assertStillServing(gw, viewer);
    });
  });

  describe('HTTP bodies', () => {
    it('deeply nested JSON (100k `[`) to POST /api/readings/ingest → 400 ApiError', async () => {
      const depth = 100_000;
      for (const body of [`{"readings":${'['.repeat(depth)}${']'.repeat(depth)}}`, '['.repeat(depth)]) {
        const res = await rawPost('/api/readings/ingest', body);
        const err = assertApiError(res, 400, 'nested JSON:');
        assert.equal(err.error, 'bad_request');
      }
      await assertStillServing(gw, viewer);
    });

    it('a body over MAX_BODY_BYTES (1 MiB) → 413 ApiError', async () => {
      const res = await rawPost('/api/readings/ingest', `{"readings":[],"pad":"${'x'.repeat(1_100_000)}"}`);
      const err = assertApiError(res, 413, '1.1 MB body:');
      assert.equal(err.error, 'payload_too_large');
      const admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
      const site = await rawPost('/api/sites', `{"id":"big","name":"${'x'.repeat(2_000_000)}"}`, admin);
      assertApiError(site, 413, '2 MB POST /api/sites:');
      await assertStillServing(gw, viewer);
    });

    it('invalid UTF-8 (0xff 0xfe inside a string) → 400 ApiError', async () => {
      const body = Buffer.concat([
        Buffer.from('{"readings":[{"unitId":"u-'),
        Buffer.from([0xff, 0xfe]),
        Buffer.from(`1","temperature":4,"recordedAt":"${new Date().toISOString()}"}]}`),
      ]);
      const err = assertApiError(await rawPost('/api/readings/ingest', body), 400, 'invalid UTF-8:');
      assert.equal(err.error, 'bad_request');
      await assertStillServing(gw, viewer);
    });

    it('"temperature": 1e999 (number overflow) → 400, nothing stored', async () => {
      const body = `{"readings":[{"unitId":"u-1","temperature":1e999,"recordedAt":"${new Date().toISOString()}"}]}`;
      const res = await rawPost('/api/readings/ingest', body);
      assert.ok([400, 422].includes(res.status), `expected 400 or 422, got ${res.status}: ${res.text}`);
      assertApiError(res, res.status);
      const latest = await api(gw, 'GET', '/api/units/u-1/latest', { token: viewer });
      assertStatus(latest, 200);
      assert.equal(latest.body, null, 'no reading was stored for u-1');
      await assertStillServing(gw, viewer);
    });
  });

  describe('client events with hostile arguments', () => {
    it('wrong argument types get refusal acks and the socket stays connected', async () => {
      const socket = await gw.connect({ token: viewer });
      for (const arg of [42, {}, [], null, 'x'.repeat(10 * 1024), true, { id: 's-1' }, ['s-1']]) {
        assert.deepEqual(
          await roomAck(socket, 'subscribe:site', arg),
          { ok: false, error: 'not_found' },
          `subscribe:site ${JSON.stringify(arg).slice(0, 40)}`,
        );
      }
      assert.equal(await emitAck(socket, 'get:latest', { unitId: 'u-1' }), null, 'get:latest with an object');
      const refresh = await emitAck(socket, 'auth:refresh', 12345);
      assert.equal(refresh.ok, false, `auth:refresh 12345 → ${JSON.stringify(refresh)}`);
      assert.equal(typeof refresh.error, 'string');
      assert.ok(socket.connected, 'the socket is still connected');
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      await assertStillServing(gw, viewer);
    });

    it('unknown events (30 names, with and without arguments) are ignored; the socket stays usable', async () => {
      const socket = await gw.connect({ token: viewer });
      const names = [
        'nope', 'subscribe:', 'subscribe:everything', 'SUBSCRIBE:SITE', 'admin:drop', 'auth:expired',
        'sensor:reading', 'alert:triggered', '__proto__', 'constructor', 'toString', ' ', 'é',
        '💥', 'a'.repeat(1000), 'x:y:z', 'get:all', 'unsubscribe:', 'connected', 'error2', 'ping',
        'pong', 'message', 'disconnect2', '0', '42', '[]', '{}', 'null', 'subscribe:site ',
      ];
      for (const [i, name] of names.entries()) socket.emit(name, i % 2 ? { x: i } : `arg-${i}`);
      await sleep(300);
      assert.ok(socket.connected, 'the socket is still connected');
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), { ok: true });
      await assertStillServing(gw, viewer);
    });
  });

  describe('a flood of handshakes', () => {
    it('300 incomplete handshakes + 100 bad tokens: a normal client is served during and after; incomplete ones are closed after HANDSHAKE_TIMEOUT_SECS', async () => {
      const incomplete = await Promise.all(Array.from({ length: 300 }, () => openRaw(gw)));
      const badTokens = await Promise.all(Array.from({ length: 100 }, () => openRaw(gw)));
      const forged = gw.token({ sub: 'x', org: 'acme', role: 'admin' }).replace(/.$/, (c) => (c === 'A' ? 'B' : 'A'));
      const tokens = ['garbage', '', forged, `${forged}x`, 'a.b.c'];
      badTokens.forEach((raw, i) => raw.send(`40${JSON.stringify({ token: tokens[i % tokens.length] })}`));
      const refusals = await Promise.all(badTokens.map((raw) => raw.next((f) => f.startsWith('44'), 3000, 'CONNECT_ERROR')));
      for (const f of refusals) assert.match(JSON.parse(f.slice(2)).message, /^unauthorized/);

      // During: all 400 are still open (the handshake timeout has not run out yet).
      const during = Date.now();
      await assertStillServing(gw, viewer);
      assert.ok(Date.now() - during < HANDSHAKE_TIMEOUT_SECS * 1000, 'a normal client is served quickly during the flood');

      // After: every connection that never completed the handshake is closed by the gateway.
      const all = [...incomplete, ...badTokens];
      await withTimeout(Promise.all(all.map((r) => r.closed)), HANDSHAKE_TIMEOUT_SECS * 1000 + 5000,
        'incomplete handshakes still open');
      for (const raw of incomplete) {
        const after = (await raw.closed).at - raw.openedAt;
        assert.ok(after >= HANDSHAKE_TIMEOUT_SECS * 1000 - 500, `closed after ${after} ms, before the handshake timeout`);
      }
      await assertStillServing(gw, viewer);
    });
  });

  it('the gateway process is alive after everything above', async () => {
    assertStatus(await api(gw, 'GET', '/healthz'), 200);
    assert.doesNotMatch(gw.stderr(), /panicked/);
  });
});
