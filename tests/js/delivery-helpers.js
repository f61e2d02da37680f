// Helpers for delivery.test.js (issue 14, "Delivery without silent loss"; CONTRACT.md
// `sensor:readings:batch` — "every reading arrives exactly once, none is ever dropped" — and
// "Missed events after a reconnect": a connected socket may get `sync:complete { recovered: false }`
// at any time when it missed events that cannot be replayed; short of that, nothing is skipped).
//
// What this file adds to harness.js, pipeline-helpers.js, cluster-helpers.js, recovery-helpers.js
// and ws-helpers.js:
//   - createUnits(): many units at once (a few requests in parallel);
//   - startPoster(): one reading per unit per tick (`recordedAt` = now, requests of at most
//     MAX_READINGS_PER_REQUEST), remembering the id and acknowledgement time of every accepted
//     reading and every refused request;
//   - deliveryReport() / assertDelivered(): what a dashboard (a recordSocket() timeline) got of
//     the accepted readings — missing, duplicated, unknown, `sync:complete` — and the verdict
//     "exactly once, or the gateway said `recovered: false` (and sent nothing twice before)";
//   - throttleWebSocket() / throttlePolling(): a stock socket.io-client that reads slowly;
//   - scrapeMetrics(): `/metrics` as a Map of samples.

import assert from 'node:assert/strict';

import { api, assertSchema, assertStatus, createUnit, randomId, sleep } from './harness.js';
import { ingest } from './pipeline-helpers.js';

export const MAX_PER_REQUEST = 1000; // MAX_READINGS_PER_REQUEST (default)

// ---------------------------------------------------------------------------------------------
// Units

/**
 * Creates `count` units (fresh ids, `offlineAfterSeconds` 600, no thresholds unless `spec` says)
 * on `siteId`, `parallel` requests at a time. Resolves with their ids, in creation order.
 */
export async function createUnits(target, admin, siteId, count, spec = {}, parallel = 16) {
  const prefix = randomId(3);
  const ids = Array.from({ length: count }, (_, i) => `u-${prefix}-${String(i).padStart(4, '0')}`);
  let next = 0;
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < count) {
      const id = ids[next];
      next += 1;
      await createUnit(target, admin, { id, siteId, name: `Unit ${id}`, offlineAfterSeconds: 600, ...spec });
    }
  }));
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Readings posted on a clock

/**
 * Every `periodMs` (fixed rate: a late tick is posted at once, never skipped) posts one reading
 * per unit of `unitIds` to `target`, `recordedAt` = the tick's wall-clock time, in requests of at
 * most `perRequest` readings sent together. Stops after `ticks` ticks, or on `stop()`.
 *
 *   accepted   `{ id, unitId, ackedAt }` of every reading a 200 answer acknowledged (`ids[i]`)
 *   refused    `{ status, text, at }` of every request not answered 200 (nothing of it counts)
 *   onAck(n)   called after each 200 answer with the number of requests answered so far;
 *              `stop()` from there means no further request is sent
 *   done       resolves once the last tick's requests are answered
 *
 * `strict`: a non-200 answer (or a network error) ends the poster and `done` rejects with it.
 */
export function startPoster(target, token, unitIds, {
  periodMs = 1000, ticks = Infinity, perRequest = MAX_PER_REQUEST, strict = false, temperature = () => 4.5, onAck,
} = {}) {
  const accepted = [];
  const refused = [];
  let stopped = false;
  let answered = 0;
  let tick = 0;
  const chunks = [];
  for (let i = 0; i < unitIds.length; i += perRequest) chunks.push(unitIds.slice(i, i + perRequest));
  const started = Date.now();
  const done = (async () => {
    while (!stopped && tick < ticks) {
      const due = started + tick * periodMs;
      if (Date.now() < due) await sleep(due - Date.now());
      if (stopped) break;
      const recordedAt = new Date().toISOString();
      const n = tick;
      tick += 1;
      await Promise.all(chunks.map(async (chunk) => {
        const readings = chunk.map((unitId) => ({ unitId, temperature: temperature(n, unitId), recordedAt }));
        let res;
        try {
          res = await ingest(target, token, readings);
        } catch (err) {
          if (strict) throw err;
          refused.push({ status: 'network', text: err.message, at: Date.now() });
          return;
        }
        if (res.status !== 200) {
          if (strict) assertStatus(res, 200, `POST /api/readings/ingest (${readings.length} readings, tick ${n}):`);
          refused.push({ status: res.status, text: res.text.slice(0, 300), at: Date.now() });
          return;
        }
        const ackedAt = Date.now();
        assertSchema('IngestResponse', res.body);
        assert.equal(res.body.ids.length, readings.length, 'ids has one entry per reading');
        assert.equal(res.body.accepted, readings.length, `every reading of tick ${n} is new: ${res.text.slice(0, 300)}`);
        res.body.ids.forEach((id, i) => accepted.push({ id, unitId: readings[i].unitId, ackedAt }));
        answered += 1;
        if (onAck) onAck(answered);
      }));
    }
  })();
  return {
    accepted,
    refused,
    done,
    get ticks() {
      return tick;
    },
    ackedBefore(t) {
      return accepted.filter((a) => a.ackedAt <= t);
    },
    /** Stops after the requests in flight; resolves like `done`. */
    async stop() {
      stopped = true;
      return done;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// What a dashboard got

const idList = (ids, max = 10) => (ids.length > max ? `${ids.slice(0, max).join(', ')}, … (${ids.length} in all)` : ids.join(', '));

/**
 * What the dashboard recorded by `rec` (recovery-helpers `recordSocket`) got of the readings in
 * `accepted` (`{ id }`...), walking its timeline in order:
 *   readings       readings received in `sensor:readings:batch` events (all of them)
 *   missing        accepted ids never received
 *   duplicated     ids received more than once
 *   unknown        received ids that no 200 answer acknowledged
 *   lost           `sync:complete { recovered: false }` entries (reconnect or live)
 *   recovered      `sync:complete { recovered: true }` entries
 *   twiceBeforeLost  ids whose second copy arrived before the first `recovered: false`
 *   batchProblems  batches breaking the contract's batch invariants (count, unit, order)
 *   disconnects    `disconnect` reasons
 *   maxLagMs       the longest time from a reading's `recordedAt` to its arrival
 */
export function deliveryReport(rec, accepted) {
  const wanted = new Set(accepted.map((a) => a.id));
  const counts = new Map();
  const twiceBeforeLost = [];
  const batchProblems = [];
  const lost = [];
  const recovered = [];
  let readings = 0;
  let batches = 0;
  let maxLagMs = 0;
  for (const e of rec.entries) {
    if (e.kind !== 'event') continue;
    if (e.event === 'sync:complete') {
      (e.payload && e.payload.recovered === true ? recovered : lost).push(e);
      continue;
    }
    if (e.event !== 'sensor:readings:batch') continue;
    batches += 1;
    const b = e.payload;
    if (batchProblems.length < 5) {
      if (b.count !== b.readings.length) batchProblems.push(`batch of ${b.unitId}: count ${b.count} but ${b.readings.length} readings`);
      if (b.readings.some((r) => r.unitId !== b.unitId)) batchProblems.push(`batch of ${b.unitId} holds readings of other units`);
      for (let i = 1; i < b.readings.length; i += 1) {
        if (Date.parse(b.readings[i - 1].recordedAt) > Date.parse(b.readings[i].recordedAt)) {
          batchProblems.push(`batch of ${b.unitId}: readings not in recordedAt order`);
          break;
        }
      }
    }
    for (const r of b.readings) {
      maxLagMs = Math.max(maxLagMs, e.at - Date.parse(r.recordedAt));
      readings += 1;
      const n = (counts.get(r.id) ?? 0) + 1;
      counts.set(r.id, n);
      if (n === 2 && lost.length === 0) twiceBeforeLost.push(r.id);
    }
  }
  const missing = [...wanted].filter((id) => !counts.has(id));
  const duplicated = [...counts].filter(([, n]) => n > 1).map(([id, n]) => `${id}×${n}`);
  const unknown = [...counts.keys()].filter((id) => !wanted.has(id));
  return {
    batches,
    readings,
    maxLagMs,
    distinct: counts.size,
    counts,
    missing,
    duplicated,
    unknown,
    lost,
    recovered,
    twiceBeforeLost,
    batchProblems,
    disconnects: rec.entries.filter((e) => e.kind === 'disconnect').map((e) => e.reason),
    /** Every accepted reading received (at least once). */
    get complete() {
      return missing.length === 0;
    },
  };
}

/** One line for diagnostics and failure messages. */
export function describeReport(name, r, expected) {
  const syncs = [...r.lost, ...r.recovered].sort((a, b) => a.index - b.index).map((e) => JSON.stringify(e.payload));
  return `${name}: ${r.distinct}/${expected} accepted readings received (${r.readings} in ${r.batches} batches); ` +
    `missing ${r.missing.length}${r.missing.length ? ` [${idList(r.missing, 5)}]` : ''}, ` +
    `duplicated ${r.duplicated.length}${r.duplicated.length ? ` [${idList(r.duplicated, 5)}]` : ''}, ` +
    `unknown ${r.unknown.length}; max lag ${r.maxLagMs} ms; sync:complete ${syncs.length ? syncs.join(' ') : 'none'}; ` +
    `disconnects ${JSON.stringify(r.disconnects)}`;
}

/**
 * The verdict for one dashboard. Without `allowLost`: every accepted reading (`{ id, ackedAt }`)
 * exactly once, no reading nobody acknowledged, no `sync:complete { recovered: false }`. With
 * `allowLost`: the same, unless the gateway said `recovered: false` — then no reading may have
 * arrived twice before it, and every reading acknowledged after the last one (the dashboard
 * refetched there and goes on live) arrives exactly once. Batch invariants and `rec`'s schema
 * checks always apply.
 */
export function assertDelivered(name, rec, accepted, { allowLost = false, allowUnknown = false } = {}) {
  rec.check(); // schema failures and malformed offsets seen by recordSocket
  const r = deliveryReport(rec, accepted);
  const line = describeReport(name, r, accepted.length);
  assert.deepEqual(r.batchProblems, [], `${name}: sensor:readings:batch invariants`);
  if (!allowLost) {
    assert.deepEqual(r.lost.map((e) => e.payload), [],
      `${name}: the gateway gave up on this dashboard (sync:complete { recovered: false }) although nothing was beyond the retention window — ${line}`);
  }
  if (r.lost.length > 0) {
    assert.deepEqual(r.twiceBeforeLost, [], `${name}: readings arrived twice before the gateway said recovered: false — ${line}`);
    // The dashboard refetched then and relies on live events from there on: what was
    // acknowledged after the last `recovered: false` arrives, once.
    const lastLost = r.lost.at(-1);
    const later = accepted.filter((a) => a.ackedAt > lastLost.at);
    const missingLater = later.filter((a) => !r.counts.has(a.id)).map((a) => a.id);
    const twiceLater = later.filter((a) => (r.counts.get(a.id) ?? 0) > 1).map((a) => a.id);
    assert.deepEqual(missingLater.slice(0, 20), [],
      `${name}: ${missingLater.length} of the ${later.length} readings acknowledged after the last sync:complete { recovered: false } never arrived — ${line}`);
    assert.deepEqual(twiceLater.slice(0, 20), [],
      `${name}: readings acknowledged after the last sync:complete { recovered: false } arrived twice — ${line}`);
    return r;
  }
  assert.deepEqual(r.missing.slice(0, 20), [], `${name}: accepted readings never delivered, and no sync:complete { recovered: false } said so (silent loss) — ${line}`);
  assert.deepEqual(r.duplicated.slice(0, 20), [], `${name}: readings delivered more than once — ${line}`);
  if (!allowUnknown) assert.deepEqual(r.unknown.slice(0, 20), [], `${name}: readings no ingest answer acknowledged — ${line}`);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Slow readers

/**
 * Makes a stock socket.io-client connected over WebSocket read slowly: at most `bytesPerSecond`
 * of WebSocket messages a second (a token bucket holding a tenth of a second). Whenever the
 * budget is spent, the client stops reading its connection — `ws.pause()` of the `ws` WebSocket
 * under engine.io-client's transport, which stops reading the TCP socket — until the budget
 * allows the next bytes. Pausing on a fixed duty cycle instead would not slow it down: the
 * kernel buffers of a loopback connection (hundreds of KB, growing) absorb a burst during any
 * short pause and are read in one go afterwards; a bounded read rate below the rate the gateway
 * sends at makes the kernel buffers fill and stay full, so the gateway's queue for this socket
 * fills. The client still reads something every fraction of a second, so it is a slow reader,
 * not a dead one (the slow-consumer grace of no progress never runs out). `stop()` lifts the
 * limit for good.
 */
export function throttleWebSocket(socket, { bytesPerSecond }) {
  const transport = socket.io.engine?.transport;
  assert.equal(transport?.name, 'websocket', 'throttleWebSocket needs a socket connected over WebSocket');
  const { ws } = transport;
  assert.ok(ws && typeof ws.pause === 'function' && typeof ws.on === 'function',
    'the WebSocket transport does not expose a `ws` WebSocket with pause()/resume(): cannot throttle it');
  const capacity = bytesPerSecond / 10;
  let tokens = capacity;
  let last = Date.now();
  let timer = null;
  let stopped = false;
  let pauses = 0;
  let bytes = 0;
  const refill = () => {
    const now = Date.now();
    tokens = Math.min(capacity, tokens + ((now - last) * bytesPerSecond) / 1000);
    last = now;
  };
  const wait = () => {
    timer = setTimeout(() => {
      timer = null;
      if (stopped) return;
      refill();
      if (tokens < 0) wait();
      else ws.resume();
    }, Math.max(5, Math.ceil((-tokens * 1000) / bytesPerSecond)));
  };
  const onMessage = (data) => {
    const size = data.length ?? data.byteLength ?? 0;
    bytes += size;
    if (stopped) return;
    refill();
    tokens -= size;
    if (tokens < 0 && timer === null) {
      ws.pause();
      pauses += 1;
      wait();
    }
  };
  ws.on('message', onMessage);
  return {
    get pauses() {
      return pauses;
    },
    get bytes() {
      return bytes;
    },
    stop() {
      stopped = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      ws.off('message', onMessage);
      ws.resume();
    },
  };
}

/**
 * Makes a stock socket.io-client connected over long-polling read slowly: each poll (the GET
 * that fetches what the gateway queued for it) is sent `delayMs` after the previous one was
 * answered, instead of at once — a browser with a congested connection. Meanwhile the gateway
 * can only queue. Patches the engine's polling transport instance (`doPoll`); `stop()` undoes it.
 */
export function throttlePolling(socket, delayMs = 300) {
  const transport = socket.io.engine?.transport;
  assert.equal(transport?.name, 'polling', 'throttlePolling needs a socket connected over long-polling');
  assert.equal(typeof transport.doPoll, 'function', 'the polling transport has no doPoll(): cannot throttle it');
  const original = transport.doPoll;
  const timers = new Set();
  let polls = 0;
  transport.doPoll = function delayedPoll(...args) {
    const timer = setTimeout(() => {
      timers.delete(timer);
      if (transport.readyState === 'closed') return;
      polls += 1;
      original.apply(transport, args);
    }, delayMs);
    timers.add(timer);
  };
  return {
    get polls() {
      return polls;
    },
    stop() {
      transport.doPoll = original;
      // A poll held back now is sent at once, so the cycle goes on.
      for (const t of timers) {
        clearTimeout(t);
        if (transport.readyState !== 'closed') original.apply(transport);
      }
      timers.clear();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// /metrics

function sampleKey(name, labels = {}) {
  const parts = Object.keys(labels).sort().map((k) => `${k}="${labels[k]}"`);
  return parts.length ? `${name}{${parts.join(',')}}` : name;
}

/** `GET /metrics` → `{ text, value(name, labels) (0 when absent), has(name, labels), types }`. */
export async function scrapeMetrics(target) {
  const res = await api(target, 'GET', '/metrics');
  assertStatus(res, 200, 'GET /metrics:');
  const samples = new Map();
  const types = new Map();
  for (const line of res.text.split('\n')) {
    const t = /^# TYPE (\S+) (\S+)/.exec(line);
    if (t) types.set(t[1], t[2]);
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
    assert.ok(m, `not a Prometheus sample line: ${JSON.stringify(line)}`);
    const labels = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.set(sampleKey(m[1], labels), Number(m[3]));
  }
  return {
    text: res.text,
    types,
    has: (name, labels) => samples.has(sampleKey(name, labels)),
    value: (name, labels) => samples.get(sampleKey(name, labels)) ?? 0,
    /** Sum over every label set of `name` (e.g. every `reason`). */
    sum: (name) => [...samples].filter(([k]) => k === name || k.startsWith(`${name}{`)).reduce((s, [, v]) => s + v, 0),
    /** The sample lines of `name`, for failure messages. */
    lines: (name) => res.text.split('\n').filter((l) => l.startsWith(name)).join('\n'),
  };
}
