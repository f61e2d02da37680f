// Helpers for recovery.test.js (CONTRACT.md "Missed events after a reconnect"):
//   - offsets: the gateway documents them as `"<ms>-<seq>"` (the form of Redis stream ids); the
//     contract calls them opaque, so the tests only parse them to check "increasing";
//   - offsetClient(): a stock socket.io-client whose `auth` is a function sending the last offset
//     it saw (what a dashboard does), with a recorder of everything it receives, in order:
//     events (validated against proto/schema.json), connects, disconnects and markers;
//   - startPump(): readings posted in a loop, in and out of range (alerts open and resolve);
//   - freezableProxy(): a TCP proxy that can silently drop all traffic, so the server keeps
//     writing into a connection that no longer reaches the client (a laptop lid closed, Wi-Fi
//     gone) until the heartbeat notices.

import assert from 'node:assert/strict';
import net from 'node:net';

import { io } from 'socket.io-client';

import { assertSchema, sleep, withTimeout } from './harness.js';
import { ingestOk, reading } from './pipeline-helpers.js';

// ---------------------------------------------------------------------------------------------
// Offsets

export const OFFSET_RE = /^(\d{1,20})-(\d{1,20})$/;

/** `[ms, seq]` as BigInts; fails the test when `offset` is not of the documented form. */
export function parseOffset(offset) {
  assert.equal(typeof offset, 'string', `an offset is a string, got ${JSON.stringify(offset)}`);
  const m = OFFSET_RE.exec(offset);
  assert.ok(m, `offset ${JSON.stringify(offset)} is not of the documented "<ms>-<seq>" form`);
  return [BigInt(m[1]), BigInt(m[2])];
}

/** Negative, zero or positive, comparing `(ms, seq)`. */
export function compareOffsets(a, b) {
  const [am, as] = parseOffset(a);
  const [bm, bs] = parseOffset(b);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

export const maxOffset = (a, b) => (a === undefined ? b : b === undefined ? a : compareOffsets(a, b) >= 0 ? a : b);

/** Asserts that `entries` (each with `.offset`, `.event`) have strictly increasing offsets. */
export function assertStrictlyIncreasing(entries, what) {
  for (let i = 1; i < entries.length; i += 1) {
    const a = entries[i - 1];
    const b = entries[i];
    assert.ok(compareOffsets(a.offset, b.offset) < 0,
      `${what}: offsets must strictly increase, but #${i - 1} ${a.event} ${a.offset} is followed by #${i} ${b.event} ${b.offset}\n` +
      `sequence: ${entries.map((e) => `${e.event}@${e.offset}`).join(', ')}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Recording a socket

/** Events of the organisation's rooms: they carry an `offset`. */
export const ORG_EVENTS = ['sensor:readings:batch', 'alert:triggered', 'alert:resolved', 'unit:status'];

const SCHEMAS = {
  'sensor:readings:batch': 'ReadingsBatch',
  'sensor:reading': 'SensorReading',
  'alert:triggered': 'AlertTriggered',
  'alert:resolved': 'AlertResolved',
  'unit:status': 'UnitStatusChanged',
  'sync:complete': 'SyncComplete',
  error: 'ErrorEvent',
};

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/**
 * Records everything `socket` receives, in arrival order, as entries
 *   { kind: 'event', event, payload, offset?, nargs } | { kind: 'connect' } |
 *   { kind: 'disconnect', reason } | { kind: 'connect_error', message } | { kind: <marker>, data }
 * and keeps `lastOffset`: the greatest offset seen in any payload (events and `sync:complete`).
 * A schema failure or a malformed offset is kept and re-thrown by every accessor.
 */
export function recordSocket(socket) {
  const entries = [];
  const waiters = new Set();
  let problem;
  const rec = {
    entries,
    lastOffset: undefined,
    push(entry) {
      entry.index = entries.length;
      entry.at = Date.now();
      entries.push(entry);
      for (const w of waiters) w();
      return entry;
    },
    /** A marker of the test's own (e.g. an ack arriving) at its place in the timeline. */
    mark(kind, data) {
      return rec.push({ kind, data });
    },
    check() {
      if (problem) throw problem;
      return rec;
    },
    /** Every received event (from entry `from` on). */
    events(from = 0) {
      rec.check();
      return entries.filter((e) => e.kind === 'event' && e.index >= from);
    },
    named(event, from = 0) {
      return rec.events(from).filter((e) => e.event === event);
    },
    /** Received events that carry an offset (the organisation's events), from entry `from` on. */
    offsetEvents(from = 0) {
      return rec.events(from).filter((e) => e.offset !== undefined && e.event !== 'sync:complete');
    },
    syncs(from = 0) {
      return rec.named('sync:complete', from);
    },
    kinds(kind) {
      return entries.filter((e) => e.kind === kind);
    },
    /** Readings of every batch received (from entry `from` on), in arrival order. */
    batchReadings(from = 0) {
      return rec.named('sensor:readings:batch', from).flatMap((e) => e.payload.readings);
    },
    /** Resolves once `predicate(rec)` holds; rejects after `ms` with `what` and a summary. */
    waitFor(predicate, ms, what) {
      let waiter;
      return withTimeout(new Promise((resolve, reject) => {
        waiter = () => {
          try {
            rec.check();
            if (predicate(rec)) resolve(rec);
          } catch (err) {
            reject(err);
          }
        };
        waiters.add(waiter);
        waiter();
      }), ms, `${what}; timeline so far: ${rec.summary()}`).finally(() => waiters.delete(waiter));
    },
    /** One line per entry, for failure messages. */
    summary(max = 120) {
      const lines = entries.map((e) => {
        if (e.kind !== 'event') return `[${e.kind}${e.reason ? ` ${e.reason}` : ''}${e.message ? ` ${e.message}` : ''}${e.transport ? ` ${e.transport}` : ''}]`;
        if (e.event === 'sync:complete') return `sync:complete${JSON.stringify(e.payload)}`;
        return `${e.event}${e.offset ? `@${e.offset}` : ''}`;
      });
      const shown = lines.length > max ? ['…', ...lines.slice(-max)] : lines;
      const engine = socket.io.engine;
      const state = `{connected: ${socket.connected}, manager: ${socket.io._readyState}, engine: ${engine?.readyState} ${engine?.transport?.name ?? ''}}`;
      return `${shown.join(' ')} ${state}`;
    },
  };
  socket.onAny((event, ...args) => {
    const payload = args[0];
    const schema = SCHEMAS[event];
    if (schema) {
      try {
        assertSchema(schema, payload);
      } catch (err) {
        problem ??= new Error(`'${event}' payload: ${err.message}`);
      }
    }
    let offset;
    if (isObject(payload) && Object.hasOwn(payload, 'offset')) {
      offset = payload.offset;
      if (typeof offset !== 'string' || !OFFSET_RE.test(offset)) {
        problem ??= new Error(`'${event}' carries an offset that is not a "<ms>-<seq>" string: ${JSON.stringify(payload)}`);
        offset = undefined;
      } else {
        rec.lastOffset = maxOffset(rec.lastOffset, offset);
      }
    }
    rec.push({ kind: 'event', event, payload, offset, nargs: args.length });
  });
  // The Manager's view (engine.io connection), for failure messages.
  socket.io.on('open', () => rec.push({ kind: 'engine-open', transport: socket.io.engine?.transport?.name }));
  socket.io.on('close', (reason) => rec.push({ kind: 'engine-close', reason }));
  socket.on('connect', () => rec.push({ kind: 'connect', sid: socket.id }));
  socket.on('disconnect', (reason) => rec.push({ kind: 'disconnect', reason }));
  socket.on('connect_error', (err) => rec.push({ kind: 'connect_error', message: err.message }));
  return rec;
}

/**
 * A stock socket.io-client on `target.url` (a harness gateway or a cluster node; the socket is
 * added to `target.sockets` so the harness closes it) whose `auth` is a function sending
 * `{ token, offset: <the last offset seen> }` on every (re)connect — `offset` is left out while
 * none has been seen, unless `offset` gives a first one. Resolves once connected (rejects on
 * `connect_error`) with `{ socket, rec, authSent }`; `authSent` lists every auth object sent.
 * `url` overrides `target.url` (e.g. a proxy in front of it). `reconnection` defaults to false.
 */
export async function offsetClient(target, { token, offset, url, onConnect, ...opts } = {}) {
  const authSent = [];
  let rec;
  const socket = io(url ?? target.url, {
    forceNew: true,
    reconnection: false,
    timeout: 5000,
    transports: ['websocket'],
    auth: (cb) => {
      const last = rec ? maxOffset(offset, rec.lastOffset) : offset;
      const auth = last === undefined ? { token } : { token, offset: last };
      authSent.push(auth);
      cb(auth);
    },
    ...opts,
  });
  target.sockets?.add(socket);
  rec = recordSocket(socket);
  if (onConnect) socket.on('connect', () => onConnect(socket, rec));
  await withTimeout(new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  }), 8000, 'socket did not connect').catch((err) => {
    socket.disconnect();
    throw err;
  });
  return { socket, rec, authSent };
}

/** Opens a socket with `auth` given as is (no function), recording from the start. */
export function rawClient(target, auth, opts = {}) {
  const socket = io(target.url, { forceNew: true, reconnection: false, timeout: 5000, transports: ['websocket'], auth, ...opts });
  target.sockets?.add(socket);
  const rec = recordSocket(socket);
  const connected = withTimeout(new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  }), 8000, 'socket did not connect');
  return { socket, rec, connected };
}

// ---------------------------------------------------------------------------------------------
// Readings in a loop

/** In range, out above (temp_high opens), back (resolves), out below (temp_low), back. */
export const EXCURSION_CYCLE = [4, 5, 12, 13, 6, 3, -2, -3, 4];

/**
 * Posts one reading per unit of `unitIds` per request, `pauseMs` apart, cycling through `temps`
 * (for units with tempMin 0 / tempMax 10 every cycle opens and resolves two alerts), until
 * `stop()`. `posted` lists `{ id, unitId, temperature, recordedAt, ackedAt }` in posting order.
 * `stop()` resolves with `posted` (and re-throws an ingest failure).
 */
export function startPump(target, token, unitIds, { temps = EXCURSION_CYCLE, pauseMs = 40 } = {}) {
  const posted = [];
  let stopped = false;
  let failure;
  let step = 0;
  const done = (async () => {
    while (!stopped) {
      const sent = unitIds.map((u) => reading(u, temps[step % temps.length]));
      step += 1;
      try {
        const { ids } = await ingestOk(target, token, sent);
        const ackedAt = Date.now();
        sent.forEach((r, i) => posted.push({ ...r, id: ids[i], ackedAt }));
      } catch (err) {
        failure = err;
        return;
      }
      await sleep(pauseMs);
    }
  })();
  return {
    posted,
    get failure() {
      return failure;
    },
    /** Readings acknowledged within [from, to] (ms timestamps). */
    ackedBetween(from, to) {
      return posted.filter((p) => p.ackedAt >= from && p.ackedAt <= to);
    },
    async stop() {
      stopped = true;
      await done;
      if (failure) throw failure;
      return posted;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// A proxy that can silently swallow traffic

/**
 * A TCP proxy on 127.0.0.1 (free port) to the gateway at `targetUrl`. `freeze()` makes every
 * connection (open or opened later) a black hole: bytes in either direction are read and
 * dropped, nothing is closed or passed on — a network that went away without telling anyone
 * (neither a close of the client nor the server's giving up reaches the other side). `thaw()` resets
 * the frozen connections (as the OS eventually does) and forwards new ones normally again.
 */
export async function freezableProxy(targetUrl) {
  const target = new URL(targetUrl);
  const conns = new Set();
  let frozen = false;
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: target.hostname, port: Number(target.port) });
    const pair = { client, upstream, frozen };
    conns.add(pair);
    // A close or error on one side is passed on to the other, except while frozen: then the
    // other side hears nothing (the server giving up on the client must not tell the client).
    const end = () => {
      if (pair.frozen) return;
      client.destroy();
      upstream.destroy();
      conns.delete(pair);
    };
    for (const s of [client, upstream]) {
      s.on('error', end);
      s.on('close', end);
    }
    client.on('data', (d) => {
      if (!pair.frozen) upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (!pair.frozen) client.write(d);
    });
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    get frozen() {
      return frozen;
    },
    freeze() {
      frozen = true;
      for (const p of conns) p.frozen = true;
    },
    thaw() {
      frozen = false;
      for (const p of [...conns]) {
        if (p.frozen) {
          p.client.destroy();
          p.upstream.destroy();
          conns.delete(p);
        }
      }
    },
    async close() {
      for (const p of conns) {
        p.client.destroy();
        p.upstream.destroy();
      }
      conns.clear();
      await new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
