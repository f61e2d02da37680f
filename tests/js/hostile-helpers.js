// Raw engine.io / Socket.io clients for hostile.test.js: frames are sent as given, so a test can
// send what socket.io-client never would (garbage, bad JSON, unknown packet types, random bytes).
import assert from 'node:assert/strict';

import WebSocket from 'ws';

import { api, assertStatus, roomAck, withTimeout } from './harness.js';

/** `ws://host:port/socket.io/?EIO=4&transport=websocket`. */
export function engineWsUrl(gw) {
  const url = new URL('/socket.io/', gw.url);
  url.protocol = 'ws:';
  url.search = '?EIO=4&transport=websocket';
  return url.toString();
}

/**
 * Opens a raw engine.io WebSocket and resolves once the engine.io OPEN packet (`0{...}`) arrived.
 * Handle: frames (text frames received), send(data), next(pred, ms), closed (promise of
 * `{ code, at }`), isOpen(), openedAt, disconnect().
 */
export function openRaw(gw, { register = true } = {}) {
  const ws = new WebSocket(engineWsUrl(gw));
  const frames = [];
  const waiters = new Set();
  let closeInfo;
  const closed = new Promise((resolve) => {
    ws.on('close', (code) => {
      closeInfo = { code, at: Date.now() };
      resolve(closeInfo);
      for (const w of waiters) w();
    });
  });
  ws.on('error', () => {}); // surfaced through `closed`
  const handle = {
    ws,
    frames,
    closed,
    openedAt: undefined,
    isOpen: () => ws.readyState === WebSocket.OPEN,
    send: (data) => ws.send(data),
    disconnect: () => ws.terminate(),
    /** Resolves with the first received text frame (so far or later) satisfying `pred`. */
    next(pred, ms = 3000, what = 'frame') {
      let check;
      return withTimeout(new Promise((resolve, reject) => {
        check = () => {
          const hit = frames.find(pred);
          if (hit !== undefined) resolve(hit);
          else if (closeInfo) reject(new Error(`connection closed (${closeInfo.code}) before ${what}; frames: ${JSON.stringify(frames)}`));
        };
        waiters.add(check);
        check();
      }), ms, `no ${what}; frames: ${JSON.stringify(frames)}`).finally(() => waiters.delete(check));
    },
  };
  ws.on('message', (data, isBinary) => {
    frames.push(isBinary ? `<binary ${data.length}>` : data.toString('utf8'));
    for (const w of waiters) w();
  });
  if (register) gw.sockets.add(handle);
  return withTimeout(new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('close', (code) => reject(new Error(`closed (${code}) before the engine.io OPEN packet`)));
    handle.next((f) => f.startsWith('0{'), 5000, 'engine.io OPEN packet').then(() => {
      handle.openedAt = Date.now();
      resolve(handle);
    }, reject);
  }), 8000, 'raw engine.io connection did not open').catch((err) => {
    ws.terminate();
    throw err;
  });
}

/** Opens a raw connection and completes the Socket.io CONNECT on `/` with `token`. */
export async function openRawConnected(gw, token) {
  const raw = await openRaw(gw);
  raw.send(`40${JSON.stringify({ token })}`);
  await raw.next((f) => f.startsWith('40{'), 3000, 'Socket.io CONNECT answer');
  return raw;
}

/** Asserts the server closes `raw` within `ms`. */
export async function assertClosed(raw, ms, what) {
  await withTimeout(raw.closed, ms, `${what}: the gateway did not close the connection; frames: ${JSON.stringify(raw.frames)}`);
  assert.equal(raw.isOpen(), false);
}

/**
 * The gateway still serves a normal client: `GET /healthz` 200, a fresh socket.io-client connects
 * and `subscribe:site` of its own site acks `{ ok: true }`, and the process has not panicked.
 */
export async function assertStillServing(gw, token, siteId = 's-1') {
  assertStatus(await api(gw, 'GET', '/healthz'), 200, 'GET /healthz:');
  const socket = await gw.connect({ token });
  try {
    assert.deepEqual(await roomAck(socket, 'subscribe:site', siteId), { ok: true });
  } finally {
    socket.disconnect();
    gw.sockets.delete(socket);
  }
  assert.doesNotMatch(gw.stderr(), /panicked/, 'the gateway logged a panic');
}
