// Missed events after a reconnect (CONTRACT.md "Missed events after a reconnect", issue 9): every
// event sent to an organisation's rooms carries an `offset` (a string, increasing per
// organisation, the same on every node); a socket connecting with `auth: { token, offset }` gets
// every org-room and user-room event after that offset that it may see, in order and once each,
// before any live event, then `sync:complete { recovered: true, offset }`; an unknown offset, or
// one older than the retention window, gives `{ recovered: false }`; no offset, no
// `sync:complete`; `sync` with an ack returns the same replay on demand.
//
// The client is the stock socket.io-client with `auth` as a function returning the last offset it
// saw, as a dashboard does. "Exactly once and in order" is checked three ways: against a second
// socket of the same organisation that never disconnected (same events, same payloads, same
// offsets, same order), against what the REST reads say was stored (every reading and alert
// once), and by the offsets themselves (strictly increasing over everything the reconnecting
// client saw). Offsets are opaque to clients; the gateway documents them as `"<ms>-<seq>"`
// (Redis stream ids) and the tests compare them as such only to check "increasing".
//
// Ways of losing the connection: the engine closed under the Manager (it reconnects by itself),
// `disconnect()` + `connect()`, a dozen quick reconnects while events flood in (the seam), and a
// connection that dies silently behind a proxy, noticed only by the heartbeat
// (SOCKET_PING_INTERVAL_MS / SOCKET_PING_TIMEOUT_MS), so the server wrote events into it.
//
// Single node: every case against SQLite and PostgreSQL (retention is in memory). The retention
// window and cap (RECOVERY_WINDOW_SECS, RECOVERY_MAX_EVENTS) on a gateway of their own. Several
// nodes: a private redis-server and a fresh PostgreSQL database (skipped with a message when
// either is missing, failed instead with CI=true).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  SCHEMA_PATH,
  assertSchema,
  emitAck,
  forEachEngine,
  randomId,
  sleep,
  useGateway,
} from './harness.js';
import { ingestOk, listAlerts, ownDatabase, spawnGateway, storedReadings } from './pipeline-helpers.js';
import {
  clusterSkipReason,
  createDatabase,
  newSecret,
  requirePrerequisites,
  startNode,
  startRedis,
} from './cluster-helpers.js';
import { freshOrg, publish, publishOk } from './ws-helpers.js';
import {
  EXCURSION_CYCLE,
  ORG_EVENTS,
  assertStrictlyIncreasing,
  compareOffsets,
  freezableProxy,
  offsetClient,
  rawClient,
  startPump,
} from './recovery-helpers.js';

const FLUSH_MS = 200;
const EVENT_MS = 6000;
// Past a flush window and the outbox: anything arriving later than this would be a duplicate.
const QUIET_MS = FLUSH_MS * 2 + 500;
// Short heartbeats so a silently dead connection is noticed within ~1.5 s.
const PING_INTERVAL_MS = 500;
const PING_TIMEOUT_MS = 1000;
const GATEWAY_ENV = {
  FLUSH_INTERVAL_MS: String(FLUSH_MS),
  SOCKET_PING_INTERVAL_MS: String(PING_INTERVAL_MS),
  SOCKET_PING_TIMEOUT_MS: String(PING_TIMEOUT_MS),
};
// Units whose every EXCURSION_CYCLE opens and resolves a temp_high and a temp_low alert.
const RANGE = { tempMin: 0, tempMax: 10, offlineAfterSeconds: 3600 };
const MARK = 'test:mark';

const show = (entries) => entries.map((e) => `${e.event}@${e.offset}`).join(', ');
const after_ = (entries, offset) => entries.filter((e) => compareOffsets(e.offset, offset) > 0);

/**
 * `test:flood` events published to the org room by each of `tokens` (admins: each has its own
 * PUBLISH_PER_SECOND budget) as fast as allowed, until `stop()`, which resolves with how many
 * were accepted (202); a 429 just slows the publisher down.
 */
function startFlood(target, tokens) {
  let stopped = false;
  let accepted = 0;
  const loops = tokens.map(async (token, p) => {
    for (let n = 0; !stopped; n += 1) {
      const res = await publish(target, { token }, { event: 'test:flood', data: { p, n }, room: 'org' });
      if (res.status === 202) accepted += 1;
      else if (res.status === 429) await sleep(200);
      else throw new Error(`POST /api/events: ${res.status} ${res.text}`);
      await sleep(20);
    }
  });
  return {
    async stop() {
      stopped = true;
      await Promise.all(loops);
      return accepted;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Shared checks

/**
 * Waits until each of `clients` (`[name, client, earlier?]`) has every posted reading in its batches, then
 * a quiet period. For `lenient` clients a timeout is not fatal: the assertions that follow show
 * exactly what is missing.
 */
async function settle(clients, posted, { lenient = [] } = {}) {
  const ids = posted.map((p) => p.id);
  // An entry may name earlier sockets of the same client (`[name, client, earlier]`): what they
  // received counts too.
  await Promise.all(clients.map(([name, c, earlier = []]) => c.rec.waitFor((rec) => {
    const have = new Set([...earlier.flatMap((e) => e.rec.batchReadings()), ...rec.batchReadings()].map((r) => r.id));
    return ids.every((id) => have.has(id));
  }, EVENT_MS, `${name}: waiting for every posted reading (${ids.length}) in its batches`).catch((err) => {
    if (!lenient.includes(c)) throw err;
  })));
  await sleep(QUIET_MS);
}

/** Every org-room event received carries an offset. */
function assertOrgEventsCarryOffsets(rec, what) {
  const missing = rec.events().filter((e) => ORG_EVENTS.includes(e.event) && e.offset === undefined);
  assert.deepEqual(missing.map((e) => ({ event: e.event, payload: e.payload })), [], `${what}: every ${ORG_EVENTS.join('/')} carries an offset`);
}

/**
 * The reconnect at timeline entry `connectIndex` of `rec` carried an offset: exactly one
 * `sync:complete` after it, `recovered: true`; the events between the connect and it (the replay)
 * are all <= its offset, which is the last replayed one (or the offset sent when nothing was
 * missed); everything after it is newer. Returns `{ sync, replayed, live }`.
 */
function assertRecoveredAt(rec, connectIndex, sentOffset, what) {
  const syncs = rec.syncs(connectIndex);
  assert.equal(syncs.length, 1, `${what}: exactly one sync:complete after the reconnect; timeline: ${rec.summary()}`);
  const sync = syncs[0];
  assert.equal(sync.payload.recovered, true, `${what}: sync:complete ${JSON.stringify(sync.payload)} must say recovered: true (offset sent: ${sentOffset})`);
  assert.equal(typeof sync.payload.offset, 'string', `${what}: a recovered sync:complete carries the offset the client now has`);
  const replayed = rec.offsetEvents(connectIndex).filter((e) => e.index < sync.index);
  const live = rec.offsetEvents(sync.index);
  for (const e of replayed) {
    assert.ok(compareOffsets(e.offset, sentOffset) > 0, `${what}: replayed ${e.event}@${e.offset} is not after the offset sent (${sentOffset})`);
    assert.ok(compareOffsets(e.offset, sync.payload.offset) <= 0, `${what}: replayed ${e.event}@${e.offset} is after sync:complete's offset ${sync.payload.offset}`);
  }
  const lastHad = replayed.length ? replayed.at(-1).offset : sentOffset;
  assert.ok(compareOffsets(sync.payload.offset, lastHad) >= 0,
    `${what}: sync:complete offset ${sync.payload.offset} is older than the last event the client has (${lastHad})`);
  for (const e of live) {
    assert.ok(compareOffsets(e.offset, sync.payload.offset) > 0,
      `${what}: ${e.event}@${e.offset} arrived after sync:complete but is not newer than its offset ${sync.payload.offset} (a duplicate or out of order)`);
  }
  return { sync, replayed, live };
}

/**
 * `mine` (what the reconnecting client received, in order) is exactly `theirs` (what a socket of
 * the same organisation that never disconnected received): same events, payloads, offsets, order.
 */
function assertSameSequence(mine, theirs, what) {
  assertStrictlyIncreasing(mine, `${what} (reconnecting client)`);
  const a = mine.map((e) => `${e.event}@${e.offset}`);
  const b = theirs.map((e) => `${e.event}@${e.offset}`);
  const missing = b.filter((x) => !a.includes(x));
  const extra = a.filter((x) => !b.includes(x));
  assert.deepEqual({ missing, extra }, { missing: [], extra: [] },
    `${what}: the reconnecting client must have received exactly what the never-disconnected client received`);
  assert.deepEqual(a, b, `${what}: same events in the same order`);
  assert.deepEqual(mine.map((e) => [e.event, e.payload]), theirs.map((e) => [e.event, e.payload]), `${what}: same payloads`);
}

/**
 * Against the REST reads: every stored reading of `unitIds` is in the batches of `events` exactly
 * once, in recordedAt order, equal to the stored one; every stored alert of those units was
 * triggered once (and resolved once when it is resolved).
 */
async function assertAgainstStore(target, token, events, unitIds, what) {
  for (const unitId of unitIds) {
    const stored = await storedReadings(target, token, unitId, '?limit=10000');
    const got = events.filter((e) => e.event === 'sensor:readings:batch' && e.payload.unitId === unitId).flatMap((e) => e.payload.readings);
    const counts = new Map();
    for (const r of got) counts.set(r.id, (counts.get(r.id) ?? 0) + 1);
    const twice = [...counts].filter(([, n]) => n > 1).map(([id, n]) => `${id} ×${n}`);
    assert.deepEqual(twice, [], `${what}: unit ${unitId}: readings received more than once`);
    const missing = stored.filter((r) => !counts.has(r.id)).map((r) => `${r.id} (${r.recordedAt}, ${r.temperature})`);
    assert.deepEqual(missing, [], `${what}: unit ${unitId}: stored readings never received (${stored.length} stored, ${got.length} received)`);
    const unknown = got.filter((r) => !stored.some((s) => s.id === r.id)).map((r) => r.id);
    assert.deepEqual(unknown, [], `${what}: unit ${unitId}: received readings that are not stored`);
    assert.deepEqual(got, stored, `${what}: unit ${unitId}: the readings arrive in recordedAt order and equal the stored ones`);
  }
  const alerts = (await listAlerts(target, token)).filter((a) => unitIds.includes(a.unitId));
  const triggered = events.filter((e) => e.event === 'alert:triggered' && unitIds.includes(e.payload.unitId));
  const resolved = events.filter((e) => e.event === 'alert:resolved' && unitIds.includes(e.payload.unitId));
  for (const a of alerts) {
    const t = triggered.filter((e) => e.payload.alertId === a.alertId);
    assert.equal(t.length, 1, `${what}: alert ${a.alertId} (${a.alertType} on ${a.unitId}) must be triggered exactly once, got ${t.length}`);
    assert.equal(t[0].payload.alertType, a.alertType);
    const r = resolved.filter((e) => e.payload.alertId === a.alertId);
    assert.equal(r.length, a.status === 'resolved' ? 1 : 0, `${what}: alert ${a.alertId} is ${a.status}: alert:resolved received ${r.length} times`);
  }
  assert.equal(triggered.length, alerts.length, `${what}: alert:triggered received ${triggered.length} times for ${alerts.length} stored alerts`);
  assert.equal(resolved.length, alerts.filter((a) => a.status === 'resolved').length, `${what}: alert:resolved count`);
  return { alerts };
}

/** The one `connect` entry after entry `from` (the reconnect). */
function reconnectEntry(rec, from) {
  const connects = rec.kinds('connect').filter((e) => e.index > from);
  assert.equal(connects.length, 1, `exactly one reconnect; timeline: ${rec.summary()}`);
  return connects[0];
}

// ---------------------------------------------------------------------------------------------
// One node, both storage engines

forEachEngine('recovery: offsets, replay and sync', (engine) => {
  const gw = useGateway(engine, { env: GATEWAY_ENV });

  /** A fresh organisation with one site of `n` units (safe range 0–10) and its tokens. */
  async function org(n = 2) {
    const o = await freshOrg(gw, [Array.from({ length: n }, () => ({ ...RANGE }))]);
    o.unitIds = o.sites[0].units.map((u) => u.id);
    o.operator = o.token({ sub: `op-${randomId(3)}`, role: 'operator' });
    o.viewer = (sub = `v-${randomId(3)}`, extra = {}) => o.token({ sub, role: 'viewer', ...extra });
    return o;
  }

  it('every batch, alert and status event carries a string offset, strictly increasing and identical for every socket; a published object gets one too; sensor:reading does not', async () => {
    const o = await org(2);
    const subscriber = o.token({ sub: 'sub', role: 'viewer' });
    const a = await offsetClient(gw, { token: o.viewer('a') });
    const b = await offsetClient(gw, { token: subscriber });
    assert.deepEqual(await emitAck(b.socket, 'subscribe:unit', o.unitIds[0]), { ok: true });
    const pump = startPump(gw, o.operator, o.unitIds);
    await a.rec.waitFor((rec) => rec.named('alert:resolved').length >= 2, EVENT_MS * 2, 'a full excursion cycle');
    await publishOk(gw, { token: o.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    // Non-object data (the contract: "plus offset when the data is an object"); not through
    // publishOk, whose PublishRequest schema types `data` as an object.
    for (const [event, data] of [['test:scalar', 'plain text'], ['test:list', [1, 2]]]) {
      const res = await publish(gw, { token: o.admin }, { event, data, room: 'org' });
      assert.equal(res.status, 202, `POST /api/events with ${JSON.stringify(data)} as data: ${res.status} ${res.text}`);
    }
    const posted = await pump.stop();
    await settle([['a', a], ['b', b]], posted);
    await a.rec.waitFor((rec) => rec.named('test:list').length === 1, EVENT_MS, 'the published events');
    await b.rec.waitFor((rec) => rec.named('test:list').length === 1, EVENT_MS, 'the published events');

    for (const [name, c] of [['a', a], ['b', b]]) {
      assertOrgEventsCarryOffsets(c.rec, name);
      for (const event of ORG_EVENTS) assert.ok(c.rec.named(event).length > 0, `${name} received some ${event}`);
      const [mark] = c.rec.named(MARK);
      assert.equal(typeof mark.offset, 'string', `${name}: a published object carries an offset: ${JSON.stringify(mark.payload)}`);
      assert.deepEqual({ ...mark.payload, offset: undefined }, { n: 1, offset: undefined }, 'the published data is otherwise unchanged');
      assert.deepEqual(c.rec.named('test:scalar').map((e) => e.payload), ['plain text'], 'non-object data arrives as published');
      assert.deepEqual(c.rec.named('test:list').map((e) => e.payload), [[1, 2]], 'non-object data arrives as published');
      assertStrictlyIncreasing(c.rec.offsetEvents(), name);
      assert.equal(c.rec.syncs().length, 0, `${name} connected without an offset: no sync:complete`);
    }
    assertSameSequence(a.rec.offsetEvents(), b.rec.offsetEvents(), 'two sockets of the organisation');
    const live = b.rec.named('sensor:reading');
    assert.ok(live.length > 0, 'the subscribed socket got sensor:reading');
    assert.deepEqual(live.filter((e) => Object.hasOwn(e.payload, 'offset')).map((e) => e.payload), [],
      'sensor:reading (unit/site rooms, not replayed) carries no offset');
  });

  it("transport killed while readings flow (engine closed, the Manager reconnects with the auth function's offset): every batch and alert emitted meanwhile arrives exactly once, in order", async (t) => {
    const o = await org(2);
    const ref = await offsetClient(gw, { token: o.viewer('ref') });
    const r = await offsetClient(gw, {
      token: o.viewer('r'),
      reconnection: true,
      reconnectionDelay: 1500,
      reconnectionDelayMax: 1500,
      randomizationFactor: 0,
    });
    const pump = startPump(gw, o.operator, o.unitIds);
    await r.rec.waitFor((rec) => rec.named('alert:triggered').length >= 1 && rec.offsetEvents().length >= 6, EVENT_MS, 'events before the cut');
    const cutIndex = r.rec.entries.length;
    const sentOffset = r.rec.lastOffset;
    const cutAt = Date.now();
    r.socket.io.engine.close(); // the transport dies; the socket.io session (and its auth function) lives on
    await r.rec.waitFor((rec) => rec.syncs(cutIndex).length >= 1, EVENT_MS * 2, 'sync:complete after the automatic reconnect');
    const back = reconnectEntry(r.rec, cutIndex);
    const postedWhileAway = pump.ackedBetween(cutAt, back.at);
    await sleep(800); // live events after the seam
    const posted = await pump.stop();
    await settle([['reference', ref], ['reconnecting', r]], posted, { lenient: [r] });

    assert.equal(r.authSent.length, 2, `one handshake, one reconnect: ${JSON.stringify(r.authSent)}`);
    assert.equal(r.authSent[0].offset, undefined, 'the first handshake has no offset yet');
    assert.equal(r.authSent[1].offset, sentOffset, 'the reconnect sends the last offset seen');
    assert.ok(postedWhileAway.length >= 5, `readings were posted while the client was away (${postedWhileAway.length})`);
    assertOrgEventsCarryOffsets(r.rec, 'reconnecting client');
    const { replayed } = assertRecoveredAt(r.rec, back.index, sentOffset, 'reconnect');
    t.diagnostic(`away ${back.at - cutAt} ms, ${postedWhileAway.length} readings posted meanwhile; replayed: ${replayed.length} events (${show(replayed).slice(0, 300)}…)`);
    assert.ok(replayed.some((e) => e.event === 'sensor:readings:batch'), `batches emitted while away were replayed: ${show(replayed)}`);
    assert.equal(r.rec.syncs().length, 1, 'the first connect (no offset) got no sync:complete');
    assertSameSequence(r.rec.offsetEvents(), ref.rec.offsetEvents(), 'whole session');
    await assertAgainstStore(gw, o.viewer(), r.rec.offsetEvents(), o.unitIds, 'reconnecting client');
    await assertAgainstStore(gw, o.viewer(), ref.rec.offsetEvents(), o.unitIds, 'reference client');
  });

  it('a connection that dies silently (no close, the server keeps writing into it) is noticed by the heartbeat (SOCKET_PING_INTERVAL_MS / SOCKET_PING_TIMEOUT_MS); what was written into it is replayed, once', async (t) => {
    const o = await org(1);
    const proxy = await freezableProxy(gw.url);
    try {
      const ref = await offsetClient(gw, { token: o.viewer('ref') });
      const r = await offsetClient(gw, {
        url: proxy.url,
        token: o.viewer('r'),
        reconnection: true,
        reconnectionDelay: 300,
        reconnectionDelayMax: 300,
        randomizationFactor: 0,
        timeout: 1000,
      });
      const pump = startPump(gw, o.operator, o.unitIds);
      await r.rec.waitFor((rec) => rec.offsetEvents().length >= 4, EVENT_MS, 'events before the network goes away');
      const cutIndex = r.rec.entries.length;
      const frozenAt = Date.now();
      proxy.freeze();
      const dropped = await r.rec.waitFor((rec) => rec.kinds('disconnect').some((e) => e.index >= cutIndex), (PING_INTERVAL_MS + PING_TIMEOUT_MS) * 3,
        'the client notices the dead connection by the heartbeat (does the gateway honour SOCKET_PING_INTERVAL_MS / SOCKET_PING_TIMEOUT_MS?)')
        .then((rec) => rec.kinds('disconnect').find((e) => e.index >= cutIndex));
      assert.equal(dropped.reason, 'ping timeout');
      const sentOffset = r.rec.lastOffset;
      await sleep(700);
      proxy.thaw();
      await r.rec.waitFor((rec) => rec.syncs(cutIndex).length >= 1, EVENT_MS * 2, 'sync:complete after the network is back');
      const back = reconnectEntry(r.rec, cutIndex);
      const postedWhileAway = pump.ackedBetween(frozenAt, back.at);
      await sleep(800);
      const posted = await pump.stop();
      await settle([['reference', ref], ['reconnecting', r]], posted, { lenient: [r] });

      assert.ok(postedWhileAway.length >= 5, `readings were posted while the network was away (${postedWhileAway.length})`);
      assert.equal(r.authSent.at(-1).offset, sentOffset, 'the reconnect sends the last offset received');
      const { replayed } = assertRecoveredAt(r.rec, back.index, sentOffset, 'reconnect after a silent drop');
      t.diagnostic(`frozen ${back.at - frozenAt} ms (dropped after ${dropped.at - frozenAt} ms), ${postedWhileAway.length} readings posted meanwhile; replayed ${replayed.length} events`);
      assert.ok(replayed.length > 0, 'the events written into the dead connection were replayed');
      assertSameSequence(r.rec.offsetEvents(), ref.rec.offsetEvents(), 'whole session');
      await assertAgainstStore(gw, o.viewer(), r.rec.offsetEvents(), o.unitIds, 'reconnecting client');
    } finally {
      await proxy.close();
    }
  });

  it('socket.disconnect() for a few seconds, then connect(): the replay (every missed reading and alert) comes before sync:complete and before any live event; subscribe:unit sent in the connect callback is handled after the replay; sensor:reading is not replayed', async (t) => {
    const o = await org(2);
    const [unitId] = o.unitIds;
    const ref = await offsetClient(gw, { token: o.viewer('ref') });
    const r = await offsetClient(gw, {
      token: o.viewer('r'),
      onConnect: (socket, rec) => {
        const sentAt = rec.mark('subscribe-sent');
        socket.emit('subscribe:unit', unitId, (ack) => rec.mark('subscribe-ack', { ack, after: sentAt.index }));
      },
    });
    await r.rec.waitFor((rec) => rec.kinds('subscribe-ack').length === 1, EVENT_MS, 'first subscribe ack');
    const pump = startPump(gw, o.operator, o.unitIds);
    await r.rec.waitFor((rec) => rec.offsetEvents().length >= 4 && rec.named('sensor:reading').length >= 2, EVENT_MS, 'events before the disconnect');
    const cutIndex = r.rec.entries.length;
    r.socket.disconnect();
    const cutAt = Date.now();
    const sentOffset = r.rec.lastOffset;
    // Away until at least one and a half excursion cycles were posted (alerts opened and resolved).
    const cycle = EXCURSION_CYCLE.length;
    for (let i = 0; i < 200 && pump.ackedBetween(cutAt, Date.now()).length < o.unitIds.length * (cycle + 5); i += 1) await sleep(50);
    await sleep(300);
    const reconnectAt = Date.now();
    r.socket.connect();
    await r.rec.waitFor((rec) => rec.syncs(cutIndex).length >= 1, EVENT_MS, 'sync:complete after connect()');
    await r.rec.waitFor((rec) => rec.kinds('subscribe-ack').length === 2, EVENT_MS, 'subscribe ack after the reconnect');
    await sleep(800);
    const posted = await pump.stop();
    await settle([['reference', ref], ['reconnecting', r]], posted, { lenient: [r] });

    assert.equal(r.authSent[1].offset, sentOffset, 'connect() sends the last offset seen');
    const back = reconnectEntry(r.rec, cutIndex);
    const { sync, replayed } = assertRecoveredAt(r.rec, back.index, sentOffset, 'connect() after disconnect()');
    t.diagnostic(`away ${back.at - cutAt} ms; replayed ${replayed.length} events: ${[...new Set(replayed.map((e) => e.event))].join(', ')}; live after sync: ${r.rec.offsetEvents(sync.index).length}`);
    const kinds = new Set(replayed.map((e) => e.event));
    for (const event of ['sensor:readings:batch', 'alert:triggered', 'alert:resolved', 'unit:status']) {
      assert.ok(kinds.has(event), `the replay contains the ${event} events emitted while away: ${show(replayed)}`);
    }
    // Everything between the connect and sync:complete is replay: no live event slipped in.
    const beforeSync = r.rec.events(back.index).filter((e) => e.index < sync.index);
    assert.deepEqual(beforeSync.filter((e) => e.offset === undefined).map((e) => e.event), [],
      'only replayed (offset-carrying) events before sync:complete');
    assertSameSequence(r.rec.offsetEvents(), ref.rec.offsetEvents(), 'whole session');
    await assertAgainstStore(gw, o.viewer(), r.rec.offsetEvents(), o.unitIds, 'reconnecting client');

    // subscribe:unit emitted in the connect callback: handled after the replay.
    const ack = r.rec.kinds('subscribe-ack')[1];
    assert.deepEqual(ack.data.ack, { ok: true });
    assert.ok(ack.index > replayed.at(-1).index,
      `the subscribe ack comes after the last replayed event (ack at #${ack.index}, last replayed at #${replayed.at(-1).index}); timeline: ${r.rec.summary()}`);
    // sensor:reading: never replayed; live again once re-subscribed.
    const liveReadings = r.rec.named('sensor:reading', back.index);
    assert.deepEqual(liveReadings.filter((e) => e.index < ack.index).map((e) => e.payload.id), [], 'no sensor:reading before the re-subscribe');
    const missedIds = new Set(pump.ackedBetween(cutAt, reconnectAt - 200).map((p) => p.id));
    assert.deepEqual(liveReadings.filter((e) => missedIds.has(e.payload.id)).map((e) => e.payload.id), [],
      'sensor:reading of readings stored while away is not replayed (they are in the replayed batches)');
    const lastOfUnit = posted.filter((p) => p.unitId === unitId).at(-1);
    assert.equal(liveReadings.filter((e) => e.payload.id === lastOfUnit.id).length, 1, 'sensor:reading flows again after the re-subscribe');
  });

  it('a dozen quick reconnects while events flood in (published events and batches): across every seam each event arrives exactly once, in order', async (t) => {
    const o = await org(1);
    const ref = await offsetClient(gw, { token: o.viewer('ref') });
    const r = await offsetClient(gw, { token: o.viewer('r') });
    const flood = startFlood(gw, [1, 2, 3].map((i) => o.token({ sub: `pub-${i}`, role: 'admin' })));
    const pump = startPump(gw, o.operator, o.unitIds, { pauseMs: 20 });
    await r.rec.waitFor((rec) => rec.offsetEvents().length >= 5, EVENT_MS, 'first events');
    let replayedTotal = 0;
    for (let i = 1; i <= 12; i += 1) {
      const cutIndex = r.rec.entries.length;
      const sentOffset = r.rec.lastOffset;
      r.socket.disconnect();
      await sleep(30 + (i % 4) * 60);
      r.socket.connect();
      await r.rec.waitFor((rec) => rec.syncs(cutIndex).length >= 1, EVENT_MS, `sync:complete after reconnect ${i}`);
      const { replayed } = assertRecoveredAt(r.rec, reconnectEntry(r.rec, cutIndex).index, sentOffset, `reconnect ${i}`);
      replayedTotal += replayed.length;
      await sleep(80);
    }
    const published = await flood.stop();
    const posted = await pump.stop();
    await settle([['reference', ref], ['reconnecting', r]], posted, { lenient: [r] });
    await ref.rec.waitFor((rec) => rec.named('test:flood').length === published, EVENT_MS, `reference: all ${published} published events`);
    t.diagnostic(`${published} events published, ${posted.length} readings; ${replayedTotal} events replayed over 12 reconnects`);
    assert.ok(replayedTotal > 0, 'some events were replayed');
    assertSameSequence(r.rec.offsetEvents(), ref.rec.offsetEvents(), 'twelve reconnects');
    await assertAgainstStore(gw, o.viewer(), r.rec.offsetEvents(), o.unitIds, 'reconnecting client');
  });

  it('a replay larger than the socket buffer (SOCKET_BUFFER_SIZE, 256 packets by default) arrives whole, over WebSocket and over long-polling', async (t) => {
    const o = await org(1);
    const ref = await offsetClient(gw, { token: o.viewer('ref') });
    const away = [
      ['websocket', await offsetClient(gw, { token: o.viewer('ws') })],
      ['polling', await offsetClient(gw, { token: o.viewer('poll'), transports: ['polling'] })],
    ];
    await publishOk(gw, { token: o.admin }, { event: MARK, data: { n: 0 }, room: 'org' });
    await Promise.all([ref, ...away.map(([, c]) => c)].map((c) => c.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'a first offset')));
    const sent = new Map(away.map(([, c]) => [c, c.rec.lastOffset]));
    const cuts = new Map(away.map(([, c]) => [c, c.rec.entries.length]));
    for (const [, c] of away) c.socket.disconnect();

    // 4 publishers × 90 events (within each publisher's burst of 2 × PUBLISH_PER_SECOND).
    const perPublisher = 90;
    await Promise.all([1, 2, 3, 4].map(async (p) => {
      const token = o.token({ sub: `bulk-${p}`, role: 'admin' });
      for (let n = 0; n < perPublisher; n += 1) {
        const res = await publish(gw, { token }, { event: 'test:bulk', data: { p, n, pad: 'x'.repeat(200) }, room: 'org' });
        assert.equal(res.status, 202, `publish ${p}/${n}: ${res.status} ${res.text}`);
      }
    }));
    const total = 4 * perPublisher;
    await ref.rec.waitFor((rec) => rec.named('test:bulk').length === total, EVENT_MS, `reference: all ${total} events`);

    for (const [, c] of away) c.socket.connect();
    await Promise.all(away.map(([what, c]) => c.rec.waitFor((rec) => rec.syncs(cuts.get(c)).length >= 1, EVENT_MS * 2, `${what}: sync:complete after a replay of ${total} events`)))
      .catch((err) => {
        err.message += `\ngateway stderr (tail):\n${gw.stderr().slice(-3000)}`;
        throw err;
      });
    await sleep(QUIET_MS);
    const expected = after_(ref.rec.offsetEvents(), ref.rec.named(MARK)[0].offset);
    for (const [what, c] of away) {
      const { replayed } = assertRecoveredAt(c.rec, reconnectEntry(c.rec, cuts.get(c)).index, sent.get(c), what);
      t.diagnostic(`${what}: ${replayed.length} events replayed`);
      assert.equal(replayed.length, total, `${what}: every one of the ${total} missed events is replayed`);
      assert.deepEqual(replayed.map((e) => [e.event, e.payload]), expected.map((e) => [e.event, e.payload]), `${what}: in order, as emitted`);
      assert.ok(c.socket.connected, `${what}: the socket is still connected after the replay; timeline: ${c.rec.summary(20)}`);
      assert.deepEqual(c.rec.kinds('disconnect').map((e) => e.reason), ['io client disconnect'], `${what}: no disconnect but the test's own`);
    }
  });

  it('unknown offsets (garbage, another organisation\'s, never issued) give sync:complete { recovered: false } and no replay; no offset gives no sync:complete; the current offset gives recovered: true with nothing to replay', async () => {
    const X = await org(1);
    const Y = await org(1);
    const x = await offsetClient(gw, { token: X.viewer('x') });
    const y = await offsetClient(gw, { token: Y.viewer('y') });
    // Y's offset falls between X's events: only knowing X's offsets tells it apart.
    await publishOk(gw, { token: X.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    await x.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'X event');
    await sleep(5);
    await publishOk(gw, { token: Y.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    await y.rec.waitFor((rec) => rec.lastOffset, EVENT_MS, 'an offset of Y');
    await sleep(5);
    for (let n = 2; n <= 3; n += 1) await publishOk(gw, { token: X.admin }, { event: MARK, data: { n }, room: 'org' });
    await x.rec.waitFor((rec) => rec.named(MARK).length === 3, EVENT_MS, 'X events');
    const yOffset = y.rec.lastOffset;
    const xOffset = x.rec.lastOffset;
    assert.notEqual(yOffset, xOffset);
    const future = `${Date.now() + 24 * 3600 * 1000}-0`;

    const cases = [
      ['garbage', 'garbage'],
      ['digits only', '12345'],
      ["an offset of another organisation", yOffset],
      ['a well-formed offset never issued (one day ahead)', future],
    ];
    const token = X.viewer('probe');
    const clients = cases.map(([what, offset]) => [what, rawClient(gw, { token, offset })]);
    const plain = rawClient(gw, { token });
    const current = rawClient(gw, { token, offset: xOffset });
    await Promise.all([...clients.map(([, c]) => c.connected), plain.connected, current.connected]);
    for (const [what, c] of clients) {
      await c.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, `${what}: sync:complete`);
      const [sync] = c.rec.syncs();
      assert.equal(sync.payload.recovered, false, `${what} (${JSON.stringify(c.socket.auth.offset)}): sync:complete ${JSON.stringify(sync.payload)}`);
      assert.deepEqual(c.rec.events().filter((e) => e.index < sync.index).map((e) => e.event), [], `${what}: nothing replayed`);
    }
    await current.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'current offset: sync:complete');
    const [sync] = current.rec.syncs();
    assert.deepEqual(sync.payload, { recovered: true, offset: xOffset }, 'nothing missed: recovered, at the offset sent');
    assert.deepEqual(current.rec.events().filter((e) => e.index < sync.index).map((e) => e.event), [], 'nothing replayed');

    // After recovered: false the socket works as usual; the plain one never gets sync:complete.
    await publishOk(gw, { token: X.admin }, { event: MARK, data: { n: 4 }, room: 'org' });
    for (const [what, c] of [...clients, ['no offset', plain], ['current offset', current]]) {
      await c.rec.waitFor((rec) => rec.named(MARK).some((e) => e.payload.n === 4), EVENT_MS, `${what}: live events after the handshake`);
      assert.equal(c.rec.named(MARK).length, 1, `${what}: only the live event`);
    }
    await sleep(700);
    assert.equal(plain.rec.syncs().length, 0, `a socket that connected without an offset gets no sync:complete: ${plain.rec.summary()}`);
    for (const [what, c] of [...clients, ['current offset', current]]) assert.equal(c.rec.syncs().length, 1, `${what}: one sync:complete`);
  });

  it('replay respects visibility: another organisation\'s events, sites outside site_ids and other users\' rooms are never replayed; the own ones are', async (t) => {
    const A = await freshOrg(gw, [[{ ...RANGE }], [{ ...RANGE }]]);
    const [a0, a1] = A.sites.map((s) => s.units[0].id);
    const B = await freshOrg(gw, [[{ ...RANGE, id: a0 }]]); // same unit id as A's, in another org
    const opA = A.token({ sub: 'op', role: 'operator' });
    const opB = B.token({ sub: 'op', role: 'operator' });
    const viewerA = A.token({ sub: 'ref', role: 'viewer' });

    const refA = await offsetClient(gw, { token: viewerA });
    const refB = await offsetClient(gw, { token: B.token({ sub: 'ref', role: 'viewer' }) });
    const carol = await offsetClient(gw, { token: A.token({ sub: 'carol', role: 'viewer', siteIds: [A.sites[0].id] }) });
    const dave = await offsetClient(gw, { token: A.token({ sub: 'dave', role: 'viewer' }) });
    const daveB = await offsetClient(gw, { token: B.token({ sub: 'dave', role: 'viewer' }) });
    const away = [['carol (A, site_ids)', carol], ['dave (A)', dave], ['dave (B)', daveB]];

    // A first offset for everyone.
    await publishOk(gw, { token: A.admin }, { event: MARK, data: { n: 0 }, room: 'org' });
    await publishOk(gw, { token: B.admin }, { event: MARK, data: { n: 0 }, room: 'org' });
    await Promise.all([refA, refB, ...away.map(([, c]) => c)].map((c) => c.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'first mark')));
    const sent = new Map(away.map(([, c]) => [c, c.rec.lastOffset]));
    const cutIndex = new Map(away.map(([, c]) => [c, c.rec.entries.length]));
    for (const [, c] of away) c.socket.disconnect();

    // While they are away: readings (alerts) in both sites of A and in B, user-room and org events.
    const pumpA = startPump(gw, opA, [a0, a1]);
    const pumpB = startPump(gw, opB, [a0]);
    await sleep(300);
    await publishOk(gw, { token: A.admin }, { event: 'test:dm', data: { to: 'carol' }, room: 'user:carol' });
    await publishOk(gw, { token: A.admin }, { event: 'test:dm', data: { to: 'dave-A' }, room: 'user:dave' });
    await publishOk(gw, { token: B.admin }, { event: 'test:dm', data: { to: 'dave-B' }, room: 'user:dave' });
    await publishOk(gw, { token: A.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    await publishOk(gw, { token: B.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    while (pumpA.posted.length < 2 * (EXCURSION_CYCLE.length + 2) || pumpB.posted.length < EXCURSION_CYCLE.length + 2) await sleep(50);
    const postedA = await pumpA.stop();
    const postedB = await pumpB.stop();
    await settle([['reference A', refA]], postedA);
    await settle([['reference B', refB]], postedB);

    for (const [, c] of away) c.socket.connect();
    await Promise.all(away.map(([what, c]) => c.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, `${what}: sync:complete`)));
    await sleep(QUIET_MS);

    const result = new Map();
    for (const [what, c] of away) {
      const back = reconnectEntry(c.rec, cutIndex.get(c));
      const r = assertRecoveredAt(c.rec, back.index, sent.get(c), what);
      assertStrictlyIncreasing(r.replayed, what);
      result.set(c, r.replayed);
    }
    t.diagnostic(away.map(([what, c]) => `${what}: ${result.get(c).length} replayed`).join('; '));
    const unitEvent = (e) => ORG_EVENTS.includes(e.event);
    const refAAfter = (c) => after_(refA.rec.offsetEvents(), sent.get(c));
    const refBAfter = (c) => after_(refB.rec.offsetEvents(), sent.get(c));
    const pick = (list) => list.map((e) => [e.event, e.payload]);

    // dave of A: everything of A's org room, plus his own user-room event only.
    const daveGot = result.get(dave);
    assert.deepEqual(pick(daveGot.filter((e) => e.event !== 'test:dm')), pick(refAAfter(dave)), 'dave (A): the org events of A he missed, in order');
    assert.deepEqual(daveGot.filter((e) => e.event === 'test:dm').map((e) => e.payload.to), ['dave-A'], "dave (A): his own user-room event, not carol's nor B's dave's");
    // carol of A, site_ids = [site of a0]: only a0's unit events, the org marks, her user event.
    const carolGot = result.get(carol);
    assert.deepEqual(carolGot.filter((e) => unitEvent(e) && e.payload.unitId !== a0).map((e) => `${e.event} ${e.payload.unitId}`), [],
      'carol (site_ids): nothing of a unit outside her sites');
    assert.deepEqual(pick(carolGot.filter(unitEvent)), pick(refAAfter(carol).filter((e) => unitEvent(e) && e.payload.unitId === a0)),
      'carol (site_ids): every event of her unit she missed, in order');
    assert.ok(carolGot.some((e) => e.event === 'alert:triggered'), 'carol got the alerts of her unit');
    assert.deepEqual(carolGot.filter((e) => e.event === MARK).map((e) => e.payload.n), [1], 'carol: the org event of A');
    assert.deepEqual(carolGot.filter((e) => e.event === 'test:dm').map((e) => e.payload.to), ['carol'], 'carol: her own user-room event only');
    // dave of B: only B's events (B's unit has the same id as A's a0).
    const daveBGot = result.get(daveB);
    const idsB = new Set(postedB.map((p) => p.id));
    assert.deepEqual(daveBGot.filter((e) => e.event === 'sensor:readings:batch').flatMap((e) => e.payload.readings).filter((r) => !idsB.has(r.id)).map((r) => r.id), [],
      "dave (B): no reading of A's unit with the same id");
    assert.deepEqual(pick(daveBGot.filter((e) => e.event !== 'test:dm')), pick(refBAfter(daveB)), 'dave (B): the org events of B he missed, in order');
    assert.deepEqual(daveBGot.filter((e) => e.event === 'test:dm').map((e) => e.payload.to), ['dave-B'], "dave (B): B's dave's user-room event only");

    // sync on demand respects site_ids too.
    const ack = await emitAck(carol.socket, 'sync', { offset: sent.get(carol) });
    assertSchema('SyncAck', ack);
    assert.equal(ack.recovered, true);
    assert.deepEqual(ack.events.map((e) => [e.event, e.data]), pick(carolGot), "carol: sync's events are her replay");
  });

  it('sync with an ack returns the missed events on demand: { recovered, events: [{ event, data }], offset }', async () => {
    const o = await org(1);
    const c = await offsetClient(gw, { token: o.viewer('c') });
    const pump = startPump(gw, o.operator, o.unitIds);
    await c.rec.waitFor((rec) => rec.offsetEvents().length >= 10 && rec.named('alert:resolved').length >= 1, EVENT_MS * 2, 'some events');
    const posted = await pump.stop();
    await publishOk(gw, { token: o.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    await settle([['client', c]], posted);
    await c.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'the mark');
    const received = c.rec.offsetEvents();
    const from = received[2].offset;
    const expected = received.slice(3).map((e) => ({ event: e.event, data: e.payload }));

    const ack = await emitAck(c.socket, 'sync', { offset: from });
    assertSchema('SyncAck', ack);
    assert.equal(ack.recovered, true, JSON.stringify(ack).slice(0, 500));
    assert.deepEqual(ack.events.map((e) => `${e.event}@${e.data?.offset}`), expected.map((e) => `${e.event}@${e.data.offset}`), 'the same events, in order');
    assert.deepEqual(ack.events, expected, 'with the same data (offset included)');
    assert.equal(ack.offset, received.at(-1).offset, 'the offset the client now has');

    const none = await emitAck(c.socket, 'sync', { offset: received.at(-1).offset });
    assertSchema('SyncAck', none);
    assert.deepEqual(none, { recovered: true, events: [], offset: received.at(-1).offset }, 'nothing missed');

    const bad = await emitAck(c.socket, 'sync', { offset: 'garbage' });
    assertSchema('SyncAck', bad);
    assert.equal(bad.recovered, false, `garbage offset: ${JSON.stringify(bad)}`);
    assert.deepEqual(bad.events ?? [], [], 'garbage offset: no events');

    await sleep(300);
    assert.equal(c.rec.offsetEvents().length, received.length, 'sync answers in its ack: no event is sent again');
    assert.equal(c.rec.syncs().length, 0, 'and no sync:complete');
  });

  it('an offset from before a restart of the node (same database, new process) gives recovered: false; offsets of the new process recover', { timeout: 60_000 }, async () => {
    const db = await ownDatabase(engine);
    let first;
    let second;
    try {
      first = await spawnGateway({ databaseUrl: db.url, env: GATEWAY_ENV });
      const X = await freshOrg(first, [[{ ...RANGE }]]);
      const token = X.token({ sub: 'v', role: 'viewer' });
      const c = await offsetClient(first, { token });
      await publishOk(first, { token: X.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
      await c.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'an event before the restart');
      const old = c.rec.lastOffset;
      await first.stop();

      second = await spawnGateway({ databaseUrl: db.url, secret: first.secret, env: GATEWAY_ENV });
      await publishOk(second, { token: X.admin }, { event: MARK, data: { n: 2 }, room: 'org' });
      const stale = rawClient(second, { token, offset: old });
      await stale.connected;
      await stale.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete for an offset of the previous process');
      const [sync] = stale.rec.syncs();
      assert.equal(sync.payload.recovered, false, `offset ${old} from before the restart: ${JSON.stringify(sync.payload)}`);
      assert.deepEqual(stale.rec.events().filter((e) => e.index < sync.index).map((e) => e.event), [], 'nothing replayed');

      const fresh = await offsetClient(second, { token });
      await publishOk(second, { token: X.admin }, { event: MARK, data: { n: 3 }, room: 'org' });
      await fresh.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'an event after the restart');
      const sentOffset = fresh.rec.lastOffset;
      const cutIndex = fresh.rec.entries.length;
      fresh.socket.disconnect();
      await publishOk(second, { token: X.admin }, { event: MARK, data: { n: 4 }, room: 'org' });
      await sleep(200);
      fresh.socket.connect();
      await fresh.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete after the restart');
      const back = reconnectEntry(fresh.rec, cutIndex);
      const { replayed } = assertRecoveredAt(fresh.rec, back.index, sentOffset, 'offset of the new process');
      assert.deepEqual(replayed.map((e) => e.payload.n), [4]);
    } finally {
      await first?.stop().catch(() => {});
      await second?.stop().catch(() => {});
      await db.drop().catch(() => {});
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Retention window and cap (in memory on one node; the storage engine plays no part)

describe('recovery: retention (RECOVERY_WINDOW_SECS=2, RECOVERY_MAX_EVENTS=25)', () => {
  const gw = useGateway('sqlite', { env: { ...GATEWAY_ENV, RECOVERY_WINDOW_SECS: '2', RECOVERY_MAX_EVENTS: '25' } });

  it('an offset older than the window, while events kept flowing, gives recovered: false; a recent one recovers', async () => {
    const X = await freshOrg(gw, [[{ ...RANGE }]]);
    const token = X.token({ sub: 'v', role: 'viewer' });
    const c = await offsetClient(gw, { token });
    await publishOk(gw, { token: X.admin }, { event: MARK, data: { n: 0 }, room: 'org' });
    await c.rec.waitFor((rec) => rec.named(MARK).length === 1, EVENT_MS, 'a first offset');
    const cutIndex = c.rec.entries.length;
    c.socket.disconnect();
    const watcher = await offsetClient(gw, { token: X.token({ sub: 'w', role: 'viewer' }) });
    const start = Date.now();
    let n = 1;
    let recent;
    while (Date.now() - start < 3500) {
      await publishOk(gw, { token: X.admin }, { event: MARK, data: { n }, room: 'org' });
      n += 1;
      await sleep(250);
      if (!recent && Date.now() - start > 2800) {
        await watcher.rec.waitFor((rec) => rec.named(MARK).length === n - 1, EVENT_MS, 'marks');
        recent = watcher.rec.lastOffset;
      }
    }
    await watcher.rec.waitFor((rec) => rec.named(MARK).length === n - 1, EVENT_MS, 'every mark');

    const r = rawClient(gw, { token, offset: recent });
    await r.connected;
    await r.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete for a recent offset');
    const [ok] = r.rec.syncs();
    assert.equal(ok.payload.recovered, true, `an offset well inside the window recovers: ${JSON.stringify(ok.payload)}`);
    const replayed = r.rec.offsetEvents().filter((e) => e.index < ok.index);
    assert.deepEqual(replayed.map((e) => e.payload), after_(watcher.rec.offsetEvents(), recent).map((e) => e.payload), 'the events after it');

    c.socket.connect();
    await c.rec.waitFor((rec) => rec.syncs(cutIndex).length >= 1, EVENT_MS, 'sync:complete for an offset ~3.5 s old');
    const [sync] = c.rec.syncs(cutIndex);
    assert.equal(sync.payload.recovered, false, `offset older than RECOVERY_WINDOW_SECS=2 with events since: ${JSON.stringify(sync.payload)}`);
    assert.deepEqual(c.rec.events(cutIndex).filter((e) => e.index < sync.index).map((e) => e.event), [], 'nothing replayed');
  });

  it('an offset whose following events were pushed out by RECOVERY_MAX_EVENTS gives recovered: false; one still within the cap recovers', async () => {
    const X = await freshOrg(gw, [[{ ...RANGE }]]);
    const token = X.token({ sub: 'v', role: 'viewer' });
    const c = await offsetClient(gw, { token });
    const total = 40;
    for (let n = 1; n <= total; n += 1) await publishOk(gw, { token: X.admin }, { event: MARK, data: { n }, room: 'org' });
    await c.rec.waitFor((rec) => rec.named(MARK).length === total, EVENT_MS, 'every mark');
    const marks = c.rec.named(MARK);
    const atOne = marks[0].offset; // 39 events after it, only 25 kept
    const atThirty = marks[29].offset; // 10 events after it

    const lost = rawClient(gw, { token, offset: atOne });
    const kept = rawClient(gw, { token, offset: atThirty });
    await Promise.all([lost.connected, kept.connected]);
    await lost.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete (cap exceeded)');
    await kept.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete (within the cap)');
    const [s1] = lost.rec.syncs();
    assert.equal(s1.payload.recovered, false, `39 events after the offset, RECOVERY_MAX_EVENTS=25: ${JSON.stringify(s1.payload)}`);
    assert.deepEqual(lost.rec.events().filter((e) => e.index < s1.index).map((e) => e.event), [], 'nothing replayed');
    const [s2] = kept.rec.syncs();
    assert.equal(s2.payload.recovered, true, `10 events after the offset: ${JSON.stringify(s2.payload)}`);
    assert.deepEqual(kept.rec.offsetEvents().filter((e) => e.index < s2.index).map((e) => e.payload.n), [31, 32, 33, 34, 35, 36, 37, 38, 39, 40]);
    assert.equal(s2.payload.offset, marks.at(-1).offset);
  });
});

// ---------------------------------------------------------------------------------------------
// Several nodes: offsets from the Redis stream

const clusterSkip = await clusterSkipReason();

describe('recovery across nodes (Redis stream per organisation)', () => {
  if (clusterSkip) {
    it('runs', (t) => t.skip(clusterSkip));
    return;
  }
  let redis;
  let db;
  let secret;
  let A;
  let B;
  const started = [];
  const sockets = new Set(); // sockets that must not be closed by a node's stop()

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    const start = async (name) => {
      const node = await startNode({ name, databaseUrl: db.url, redisUrl: redis.url, secret, env: GATEWAY_ENV });
      started.push(node);
      return node;
    };
    A = await start('A'); // runs the migrations
    B = await start('B');
  }, { timeout: 60_000 });

  afterEach(() => {
    for (const s of sockets) s.disconnect();
    sockets.clear();
    for (const n of started) n.disconnectSockets();
  });

  after(async () => {
    for (const s of sockets) s.disconnect();
    await Promise.all(started.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  /** A fresh organisation with one site of two units (safe range 0–10), created through A. */
  async function org() {
    const o = await freshOrg(A, [[{ ...RANGE }, { ...RANGE }]], { secret });
    o.unitIds = o.sites[0].units.map((u) => u.id);
    o.operator = o.token({ sub: 'op', role: 'operator' });
    o.viewer = (sub) => o.token({ sub, role: 'viewer' });
    return o;
  }

  it('the same event has the same offset on every node, whichever node emitted it', async () => {
    const o = await org();
    const onA = await offsetClient({ url: A.url, sockets }, { token: o.viewer('a') });
    const onB = await offsetClient({ url: B.url, sockets }, { token: o.viewer('b') });
    const both = (pred, what) => Promise.all([onA, onB].map((c) => c.rec.waitFor(pred, EVENT_MS, what)));
    // One step at a time, so the order is the same everywhere: a reading through A, an excursion
    // through B, published events through each.
    const { ids: [first] } = await ingestOk(A, o.operator, [{ unitId: o.unitIds[0], temperature: 4, recordedAt: new Date().toISOString() }]);
    await both((rec) => rec.batchReadings().some((r) => r.id === first), 'the batch emitted by A');
    const pump = startPump(B, o.operator, [o.unitIds[1]]);
    await both((rec) => rec.named('alert:resolved').length >= 1, 'an excursion through B');
    const posted = await pump.stop();
    await settle([['on A', onA], ['on B', onB]], posted);
    await publishOk(A, { token: o.admin }, { event: MARK, data: { n: 1 }, room: 'org' });
    await both((rec) => rec.named(MARK).length === 1, 'the event published through A');
    await publishOk(B, { token: o.admin }, { event: MARK, data: { n: 2 }, room: 'org' });
    await both((rec) => rec.named(MARK).length === 2, 'the event published through B');
    await sleep(QUIET_MS);

    for (const [name, c] of [['on A', onA], ['on B', onB]]) assertOrgEventsCarryOffsets(c.rec, name);
    assertSameSequence(onA.rec.offsetEvents(), onB.rec.offsetEvents(), 'a socket on A and a socket on B');
  });

  it('events emitted concurrently by A and B: sockets on either node get them in offset order, and a client hopping between the nodes with its offset gets each exactly once', { timeout: 60_000 }, async (t) => {
    const o = await org();
    const refA = await offsetClient({ url: A.url, sockets }, { token: o.viewer('ref-a') });
    const refB = await offsetClient({ url: B.url, sockets }, { token: o.viewer('ref-b') });
    const hops = [await offsetClient({ url: A.url, sockets }, { token: o.viewer('r') })];
    const pumpA = startPump(A, o.operator, [o.unitIds[0]], { pauseMs: 20 });
    const pumpB = startPump(B, o.operator, [o.unitIds[1]], { pauseMs: 20 });
    const floodA = startFlood(A, [o.token({ sub: 'pub-a', role: 'admin' })]);
    const floodB = startFlood(B, [o.token({ sub: 'pub-b', role: 'admin' })]);
    await hops[0].rec.waitFor((rec) => rec.offsetEvents().length >= 5, EVENT_MS, 'first events');
    for (let i = 1; i <= 4; i += 1) {
      const prev = hops.at(-1);
      await sleep(250);
      prev.socket.disconnect();
      await sleep(50 + (i % 3) * 100);
      const node = i % 2 === 1 ? B : A;
      const next = await offsetClient({ url: node.url, sockets }, { token: o.viewer('r'), offset: prev.rec.lastOffset });
      await next.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, `hop ${i} to ${node.name}: sync:complete`);
      assertRecoveredAt(next.rec, next.rec.kinds('connect')[0].index, prev.rec.lastOffset, `hop ${i} to ${node.name}`);
      hops.push(next);
    }
    await sleep(300);
    const published = (await floodA.stop()) + (await floodB.stop());
    const posted = [...(await pumpA.stop()), ...(await pumpB.stop())];
    await settle([['reference on A', refA], ['reference on B', refB], ['hopping client', hops.at(-1), hops.slice(0, -1)]], posted, { lenient: [hops.at(-1)] });
    await Promise.all([refA, refB].map((c) => c.rec.waitFor((rec) => rec.named('test:flood').length === published, EVENT_MS, `all ${published} published events`)));
    t.diagnostic(`${published} events published and ${posted.length} readings posted through A and B; the client hopped ${hops.length - 1} times`);

    assertStrictlyIncreasing(refA.rec.offsetEvents(), 'live delivery on A');
    assertStrictlyIncreasing(refB.rec.offsetEvents(), 'live delivery on B');
    assertSameSequence(refB.rec.offsetEvents(), refA.rec.offsetEvents(), 'a socket on B and a socket on A');
    const whole = hops.flatMap((h) => h.rec.offsetEvents());
    assertSameSequence(whole, refA.rec.offsetEvents(), 'the hopping client');
    await assertAgainstStore(A, o.viewer('x'), whole, o.unitIds, 'the hopping client');
  });

  it('node A stopped (SIGTERM) while readings flow through B: its client reconnects to B with its offset and gets every missed event once, in order, from the Redis stream', { timeout: 60_000 }, async (t) => {
    const o = await org();
    const ref = await offsetClient({ url: B.url, sockets }, { token: o.viewer('ref') });
    const r = await offsetClient({ url: A.url, sockets }, { token: o.viewer('r') });
    const pump = startPump(B, o.operator, o.unitIds);
    await r.rec.waitFor((rec) => rec.offsetEvents().length >= 6 && rec.named('alert:triggered').length >= 1, EVENT_MS, 'events on A before it stops');
    const stoppedAt = Date.now();
    await A.stop();
    t.diagnostic(`node A exited ${Date.now() - stoppedAt} ms after SIGTERM`);
    await r.rec.waitFor((rec) => rec.kinds('disconnect').length === 1, EVENT_MS, 'the client of A is disconnected');
    const sentOffset = r.rec.lastOffset;
    const cycle = EXCURSION_CYCLE.length;
    for (let i = 0; i < 200 && pump.ackedBetween(stoppedAt, Date.now()).length < o.unitIds.length * (cycle + 3); i += 1) await sleep(50);

    const r2 = await offsetClient({ url: B.url, sockets }, { token: o.viewer('r'), offset: sentOffset });
    await r2.rec.waitFor((rec) => rec.syncs().length >= 1, EVENT_MS, 'sync:complete on B');
    await sleep(800);
    const posted = await pump.stop();
    await settle([['reference on B', ref], ['reconnected on B', r2, [r]]], posted, { lenient: [r2] });

    assert.equal(r2.authSent[0].offset, sentOffset);
    const { replayed } = assertRecoveredAt(r2.rec, r2.rec.kinds('connect')[0].index, sentOffset, 'reconnect to B');
    t.diagnostic(`replayed from the stream: ${replayed.length} events; live after: ${r2.rec.offsetEvents().length - replayed.length}`);
    const kinds = new Set(replayed.map((e) => e.event));
    for (const event of ['sensor:readings:batch', 'alert:triggered', 'alert:resolved', 'unit:status']) {
      assert.ok(kinds.has(event), `the replay from the stream contains the ${event} events emitted while away: ${show(replayed)}`);
    }
    const whole = [...r.rec.offsetEvents(), ...r2.rec.offsetEvents()];
    assertSameSequence(whole, ref.rec.offsetEvents(), 'on A, then on B');
    await assertAgainstStore(B, o.viewer('x'), whole, o.unitIds, 'the client of A, then of B');
  });
});

// ---------------------------------------------------------------------------------------------
// proto/ documents it

describe('recovery: proto/ documents offsets and sync', () => {
  it('schema.json has offset on the org events, SyncComplete and SyncAck; index.ts types sync:complete and sync', () => {
    const schema = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8'));
    for (const name of ['ReadingsBatch', 'AlertTriggered', 'AlertResolved', 'UnitStatusChanged']) {
      assert.ok(schema.$defs[name]?.properties?.offset, `$defs/${name} documents offset`);
    }
    for (const name of ['SyncComplete', 'SyncAck']) assert.ok(schema.$defs[name], `$defs/${name} exists`);
    assertSchema('SyncComplete', { recovered: true, offset: '1700000000000-0' });
    assertSchema('SyncComplete', { recovered: false });
    assertSchema('SyncAck', { recovered: true, events: [{ event: 'alert:resolved', data: { alertId: '1', unitId: 'u', resolvedAt: '2026-01-01T00:00:00.000Z', offset: '1-0' } }], offset: '1-0' });
    const ts = readFileSync(fileURLToPath(new URL('../../proto/index.ts', import.meta.url)), 'utf8');
    assert.match(ts, /"sync:complete"\s*:/, 'ServerToClientEvents has sync:complete');
    assert.match(ts, /"sync"\s*:/, 'ClientToServerEvents has sync');
  });
});
