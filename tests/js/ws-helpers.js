// Helpers for the plain WebSocket protocol (CONTRACT.md "Plain WebSocket — GET /api/v2/ws?token=<JWT>")
// and for POST /api/events, shared by plain-ws.test.js and publish.test.js.
//
//   - openWs(): a `ws` client on `/api/v2/ws` that records every frame, validates each message
//     against `$defs/WsServerMessage` and lets a test wait for a message (or check that nothing
//     matching arrived), and for the close code/reason;
//   - expectClose(): connects and resolves with the close code and reason the server sends;
//   - freshOrg(): an organisation of its own (random id) with an admin token, a site and units,
//     so tests sharing one gateway never see each other's alerts or readings;
//   - publish()/collectAny(): `POST /api/events` and a socket.io recorder for every event name.
//
// A client opened with openWs(gw, ...) is added to `gw.sockets`, so the `afterEach` of
// harness.js `useGateway` (and cluster-helpers `disconnectSockets`) closes it after each test.

import assert from 'node:assert/strict';

import WebSocket from 'ws';

import { api, assertSchema, createSite, createUnit, mintToken, randomId, withTimeout } from './harness.js';

export const WS_PATH = '/api/v2/ws';

/** `ws://host:port/api/v2/ws` with `?token=` when `token` is given (a string, sent as is). */
export function wsUrl(gw, token) {
  const url = new URL(WS_PATH, gw.url);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  if (token !== undefined) url.searchParams.set('token', token);
  return url.toString();
}

/**
 * Opens a plain WebSocket client and resolves once the connection is open (rejects on an
 * upgrade failure or after 8 s). The handle:
 *   messages       every parsed server message so far (a schema failure is re-thrown here)
 *   send(obj)      sends `JSON.stringify(obj)`;  sendRaw(text) sends a text frame as is
 *   next(pred, ms) resolves with the first message from now on (or already received after
 *                  `from`) that satisfies `pred`
 *   waitFor(pred, ms, what)  resolves with the list once `pred(list)` holds
 *   request(obj, pred)       send + next
 *   closed         promise of `{ code, reason }`;  isOpen()
 *   disconnect()   closes (used by the harness' afterEach)
 */
export function openWs(gw, token, { register = true } = {}) {
  const ws = new WebSocket(wsUrl(gw, token));
  const items = [];
  const waiters = new Set();
  let problem;
  let closeInfo;
  const closed = new Promise((resolve) => {
    ws.on('close', (code, reason) => {
      closeInfo = { code, reason: reason.toString('utf8') };
      resolve(closeInfo);
      for (const w of waiters) w();
    });
  });
  ws.on('error', () => {}); // surfaced through `closed` / the open promise
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      problem ??= new Error(`server sent a binary frame (${data.length} bytes); the protocol is JSON text frames`);
    } else {
      const text = data.toString('utf8');
      let msg;
      try {
        msg = JSON.parse(text);
      } catch (err) {
        problem ??= new Error(`server sent a text frame that is not JSON: ${text}`);
      }
      if (msg !== undefined) {
        try {
          assertSchema('WsServerMessage', msg);
        } catch (err) {
          problem ??= err;
        }
        items.push({ msg, at: Date.now() });
      }
    }
    for (const w of waiters) w();
  });

  const checked = () => {
    if (problem) throw problem;
    return items.map((i) => i.msg);
  };

  const client = {
    ws,
    closed,
    get messages() {
      return checked();
    },
    get closeInfo() {
      return closeInfo;
    },
    isOpen: () => ws.readyState === WebSocket.OPEN,
    send(obj) {
      ws.send(JSON.stringify(obj));
    },
    sendRaw(text) {
      ws.send(text);
    },
    /** Messages of `type` received so far. */
    ofType(type) {
      return checked().filter((m) => m.type === type);
    },
    /** Resolves with the list once `predicate(list)` holds; rejects after `ms` or on close. */
    waitFor(predicate, ms = 5000, what = 'waiting for a plain WebSocket message') {
      let waiter;
      return withTimeout(new Promise((resolve, reject) => {
        waiter = () => {
          try {
            const list = checked();
            if (predicate(list)) return resolve(list);
            if (closeInfo) reject(new Error(`${what}: connection closed (code ${closeInfo.code}, reason ${JSON.stringify(closeInfo.reason)})`));
          } catch (err) {
            reject(err);
          }
        };
        waiters.add(waiter);
        waiter();
      }), ms, `${what}; received so far: ${JSON.stringify(items.map((i) => i.msg))}`)
        .finally(() => waiters.delete(waiter));
    },
    /**
     * Resolves with the first message matching `predicate` among those received after index
     * `from` (default: from now on).
     */
    async next(predicate = () => true, ms = 5000, what = 'waiting for the next plain WebSocket message', from = items.length) {
      const list = await client.waitFor((l) => l.slice(from).some(predicate), ms, what);
      return list.slice(from).find(predicate);
    },
    /** Sends `obj` and resolves with the first later message matching `predicate`. */
    request(obj, predicate = () => true, ms = 5000, what = `answer to ${JSON.stringify(obj)}`) {
      const from = items.length;
      client.send(obj);
      return client.next(predicate, ms, what, from);
    },
    /** Ping → pong round trip: proves the connection is open and the server still serves it. */
    async pingPong(ms = 3000) {
      const answer = await client.request({ type: 'ping' }, () => true, ms, 'answer to {"type":"ping"}');
      assert.deepEqual(answer, { type: 'pong' }, 'the answer to a ping is exactly {"type":"pong"}');
    },
    disconnect() {
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.terminate();
    },
  };
  if (register && gw.sockets) gw.sockets.add(client);

  return withTimeout(new Promise((resolve, reject) => {
    ws.once('open', () => resolve(client));
    ws.once('unexpected-response', (req, res) => reject(new Error(`the upgrade was refused with HTTP ${res.statusCode}`)));
    ws.once('error', (err) => reject(err));
  }), 8000, 'plain WebSocket did not open').catch((err) => {
    client.disconnect();
    throw err;
  });
}

/**
 * Connects with `token` (or none) and resolves `{ code, reason, messages }` once the server
 * closes the connection (rejects after `ms`). Also resolves when the upgrade itself is refused:
 * then `code` is the client-side 1006 and `refused` holds the HTTP status.
 */
export function expectClose(gw, token, ms = 5000) {
  const ws = new WebSocket(wsUrl(gw, token));
  const messages = [];
  ws.on('message', (data) => messages.push(data.toString('utf8')));
  ws.on('error', () => {});
  return withTimeout(new Promise((resolve) => {
    ws.on('unexpected-response', (req, res) => {
      resolve({ code: 1006, reason: '', messages, refused: res.statusCode });
      req.destroy();
    });
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString('utf8'), messages }));
  }), ms, 'the server did not close the plain WebSocket').finally(() => ws.terminate());
}

/** Asserts a close with `code` whose reason starts with `reasonPrefix` (when given). */
export function assertClosedWith(info, code, reasonPrefix, what = '') {
  assert.equal(info.refused, undefined, `${what} the upgrade must be accepted and then closed, but was refused with HTTP ${info.refused}`);
  assert.equal(info.code, code, `${what} close code (reason ${JSON.stringify(info.reason)})`);
  if (reasonPrefix !== undefined) {
    assert.ok(info.reason.startsWith(reasonPrefix), `${what} close reason should start with ${JSON.stringify(reasonPrefix)}, got ${JSON.stringify(info.reason)}`);
  }
}

/** Predicates for common messages. */
export const isType = (type) => (m) => m.type === type;
export const isTelemetryAt = (timestamp) => (m) => m.type === 'telemetry' && m.data && m.data.timestamp === timestamp;

/** The plain WebSocket telemetry message a stored `IngestReading` must produce. */
export function expectedTelemetry(r) {
  return {
    type: 'telemetry',
    device_id: r.deviceId ?? null,
    unit_id: r.unitId,
    data: {
      timestamp: r.recordedAt,
      metrics: {
        temperature: r.temperature,
        humidity: r.humidity ?? null,
        battery: r.battery ?? null,
        signal_strength: r.signalStrength ?? null,
      },
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Organisations of their own

/**
 * A fresh organisation on `gw` (which needs `url`/`secret`): an admin token, one site per entry
 * of `sites` — an array of unit specs, or `{ id, units }` to choose the site id — with fresh ids
 * unless given. Resolves `{ org, admin, token(claims), sites: [{ id, units: [Unit...] }] }`.
 */
export async function freshOrg(gw, sites = [[{}]], { secret = gw.secret } = {}) {
  const org = `org-${randomId(4)}`;
  const token = (claims) => mintToken({ secret, org, ...claims });
  const admin = token({ sub: `admin-${org}`, role: 'admin' });
  const created = [];
  for (const spec of sites) {
    const units = Array.isArray(spec) ? spec : spec.units ?? [];
    const siteId = (!Array.isArray(spec) && spec.id) || `s-${randomId(4)}`;
    await createSite(gw, admin, { id: siteId, name: `Site ${siteId}` });
    const list = [];
    for (const u of units) {
      const id = u.id ?? `u-${randomId(4)}`;
      list.push(await createUnit(gw, admin, { name: `Unit ${id}`, offlineAfterSeconds: 600, ...u, id, siteId }));
    }
    created.push({ id: siteId, units: list });
  }
  return { org, admin, token, sites: created };
}

// ---------------------------------------------------------------------------------------------
// POST /api/events

/**
 * `POST /api/events` with a JWT (`token`) or an API key (`apiKey`, sent as `X-API-Key`, or as
 * `Authorization: Bearer` with `keyAsBearer`).
 */
export function publish(gw, { token, apiKey, keyAsBearer = false }, body) {
  const headers = {};
  if (apiKey && keyAsBearer) headers.authorization = `Bearer ${apiKey}`;
  else if (apiKey) headers['x-api-key'] = apiKey;
  return api(gw, 'POST', '/api/events', { token, body, headers });
}

/** A publish that must be accepted: 202 `{ delivered: true }` (validated). */
export async function publishOk(gw, credentials, body) {
  assertSchema('PublishRequest', body);
  const res = await publish(gw, credentials, body);
  assert.equal(res.status, 202, `POST /api/events ${JSON.stringify(body).slice(0, 200)}: expected HTTP 202, got ${res.status}: ${res.text.slice(0, 500)}`);
  assertSchema('PublishResponse', res.body);
  assert.deepEqual(res.body, { delivered: true });
  return res.body;
}

/**
 * Records every event a socket.io client receives (any name) from now on:
 * `{ event, args }` entries; `named(event)` gives the first argument of each `event`.
 */
export function collectAny(socket) {
  const items = [];
  const waiters = new Set();
  const handler = (event, ...args) => {
    items.push({ event, args });
    for (const w of waiters) w();
  };
  socket.onAny(handler);
  return {
    get all() {
      return items.slice();
    },
    named(event) {
      return items.filter((i) => i.event === event);
    },
    waitFor(predicate, ms = 5000, what = 'waiting for a socket.io event') {
      let waiter;
      return withTimeout(new Promise((resolve) => {
        waiter = () => {
          if (predicate(items)) resolve(items);
        };
        waiters.add(waiter);
        waiter();
      }), ms, `${what}; received so far: ${JSON.stringify(items).slice(0, 2000)}`)
        .finally(() => waiters.delete(waiter));
    },
    stop() {
      socket.offAny(handler);
    },
  };
}

/**
 * The data of a published event as a client received it, for comparison with what was
 * published: CONTRACT.md lets the server add an `offset` string to object data ("Missed events
 * after a reconnect"), so that one field is removed when the publisher did not send it.
 */
export function receivedData(payload, published) {
  if (payload && typeof payload === 'object' && !Array.isArray(payload) && !('offset' in published)
    && Object.hasOwn(payload, 'offset')) {
    assert.equal(typeof payload.offset, 'string', `an added offset is a string: ${JSON.stringify(payload.offset)}`);
    const { offset, ...rest } = payload;
    return rest;
  }
  return payload;
}
