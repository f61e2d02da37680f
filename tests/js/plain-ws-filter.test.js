// Plain WebSocket delivery filtered at the source (CONTRACT.md "Plain WebSocket — GET
// /api/v2/ws?token=<JWT>"; README "Without socket.io" and "Running several nodes"):
//
//   - a 2,000-unit organisation posting one reading per unit per second (1,000 readings per
//     request, some out of range so the alert list keeps changing): a client subscribed only to
//     `alerts` is never closed as a slow consumer and gets the alert lists; a client subscribed
//     to one unit, and one subscribed to one device, get exactly that telemetry, each reading
//     once, and nothing of the other 1,999 units;
//   - two nodes over one PostgreSQL database and a private Redis: with no plain WebSocket
//     subscriber anywhere, readings (and alert changes) posted to node A publish nothing on the
//     plain WebSocket channels (`sensorwire:ws*`, watched with Redis MONITOR); a client that then
//     subscribes to a unit on node B gets that unit's readings posted to node A, each once, and
//     only that unit's readings are published; once it leaves, publishing stops again.
//
// Every server message is validated against `$defs/WsServerMessage` (ws-helpers.js).
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  api,
  assertStatus,
  createUnit,
  forEachEngine,
  randomId,
  sleep,
  useGateway,
  withTimeout,
} from './harness.js';
import { ingestOk, reading } from './pipeline-helpers.js';
import {
  clusterSkipReason,
  createDatabase,
  newSecret,
  requirePrerequisites,
  startNode,
  startRedis,
} from './cluster-helpers.js';
import { expectedTelemetry, freshOrg, isTelemetryAt, isType, openWs } from './ws-helpers.js';

const UNITS = 2000;
const PER_REQUEST = 1000; // MAX_READINGS_PER_REQUEST
const SECONDS = 5;
const TELEMETRY_MS = 10_000;
// How long "nothing (more) arrives / is published" is watched after the path proved live.
const QUIET_MS = 1500;

/** Sends a subscribe and asserts the `subscribed` confirmation. */
async function subscribe(client, type, ids = {}) {
  const req = { action: 'subscribe', type };
  if (ids.deviceId !== undefined) req.device_id = ids.deviceId;
  if (ids.unitId !== undefined) req.unit_id = ids.unitId;
  const answer = await client.request(req, (m) => m.type === 'subscribed' || m.type === 'error', 5000);
  assert.equal(answer.type, 'subscribed', `subscribe ${JSON.stringify(req)}: ${JSON.stringify(answer)}`);
  return answer;
}

/** Creates `count` units (fresh ids) on `siteId`, `parallel` requests at a time. */
async function createUnits(gw, admin, siteId, count, spec, parallel = 25) {
  const ids = Array.from({ length: count }, (_, i) => `u-${String(i).padStart(4, '0')}-${randomId(3)}`);
  const units = new Array(count);
  let next = 0;
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < count) {
      const i = next;
      next += 1;
      units[i] = await createUnit(gw, admin, { id: ids[i], siteId, name: `Unit ${ids[i]}`, offlineAfterSeconds: 600, ...spec });
    }
  }));
  return units;
}

/** `/metrics` value of one sample line (`name{labels}`), 0 when absent. */
async function metric(gw, sample) {
  const res = await api(gw, 'GET', '/metrics');
  assertStatus(res, 200, 'GET /metrics:');
  const line = res.text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line ? Number(line.slice(sample.length + 1)) : 0;
}

const SLOW_PLAIN = 'sensorwire_slow_consumer_disconnects_total{client="plain_websocket"}';
const CONNECTED = 'sensorwire_plain_ws_connected';

/** Asserts each reading of `readings` arrived exactly once on `client`, with its values. */
function assertEachOnce(client, readings, what) {
  for (const r of readings) {
    const copies = client.messages.filter(isTelemetryAt(r.recordedAt)).filter((m) => m.unit_id === r.unitId);
    assert.equal(copies.length, 1, `${what}: the reading of ${r.unitId} at ${r.recordedAt} arrives exactly once (got ${copies.length})`);
    assert.deepEqual(copies[0], expectedTelemetry(r));
  }
}

forEachEngine('plain WebSocket filtered at the source', (engine) => {
  const gw = useGateway(engine);

  it(`alerts-only clients stay connected through a ${UNITS}-unit burst, even one that pauses reading; unit and device subscribers get exactly theirs`, { timeout: 180_000 }, async () => {
    const o = await freshOrg(gw, [{ units: [] }]);
    const siteId = o.sites[0].id;
    const units = await createUnits(gw, o.admin, siteId, UNITS, { tempMin: 2, tempMax: 8 });
    const deviceOf = (unitId) => `dev-${unitId}`;
    const viewer = o.token({ sub: 'viewer', role: 'viewer' });

    const slowBefore = await metric(gw, SLOW_PLAIN);
    const connectedBefore = await metric(gw, CONNECTED);
    const alertsOnly = await openWs(gw, viewer);
    await subscribe(alertsOnly, 'alerts');
    await alertsOnly.next(isType('alerts'), 5000, 'the initial alert list', 0);
    // Subscribed to alerts too, but stops reading its socket for the burst: large alert lists
    // then back up on the server. Only the lists it asked for may count against its queue.
    const paused = await openWs(gw, viewer);
    await subscribe(paused, 'alerts');
    await paused.next(isType('alerts'), 5000, 'the initial alert list', 0);
    const mine = units[1234].id;
    const unitClient = await openWs(gw, viewer);
    await subscribe(unitClient, 'unit', { unitId: mine });
    const theirs = units[77].id;
    const deviceClient = await openWs(gw, viewer);
    await subscribe(deviceClient, 'device', { deviceId: deviceOf(theirs) });
    const connected = await metric(gw, CONNECTED);
    assert.ok(connected >= connectedBefore + 4, `${CONNECTED} counts the four clients (${connectedBefore} → ${connected})`);

    // One reading per unit per second, 1,000 per request (the requests of a second one after the
    // other). A failing cold room: most units stay out of range (large alert lists), and
    // FLAPPING units spread over both requests go out of range and back every other second, so
    // the list changes with every request.
    const flapping = (idx) => idx % 20 === 0;
    const failing = (idx) => idx % 10 !== 9;
    const temperature = (idx, s) => {
      if (flapping(idx)) return (idx / 20 + s) % 2 === 0 ? 15 + s : 4;
      return failing(idx) ? 12 + s : 4 + (s % 3);
    };
    const posted = [];
    // `ws` keeps its net.Socket in `_socket`: pausing it stops reading at the TCP level, so the
    // kernel buffers fill and the server's writes to this client block.
    paused.ws._socket.pause();
    const started = Date.now();
    for (let s = 0; s < SECONDS; s += 1) {
      const secondStart = Date.now();
      const all = units.map((u, idx) => reading(u.id, temperature(idx, s), { deviceId: deviceOf(u.id) }));
      posted.push(...all);
      for (let i = 0; i < all.length; i += PER_REQUEST) {
        await ingestOk(gw, o.admin, all.slice(i, i + PER_REQUEST));
      }
      const spent = Date.now() - secondStart;
      if (spent < 1000) await sleep(1000 - spent);
    }
    const burstMs = Date.now() - started;
    await sleep(500);
    paused.ws._socket.resume();
    const mineReadings = posted.filter((r) => r.unitId === mine);
    const theirReadings = posted.filter((r) => r.unitId === theirs);
    assert.equal(mineReadings.length, SECONDS);

    // The unit and device subscribers get each of their readings once.
    const lastMine = mineReadings.at(-1);
    await unitClient.waitFor((l) => l.some(isTelemetryAt(lastMine.recordedAt)), TELEMETRY_MS, 'the unit subscriber\'s last reading');
    const lastTheirs = theirReadings.at(-1);
    await deviceClient.waitFor((l) => l.some(isTelemetryAt(lastTheirs.recordedAt)), TELEMETRY_MS, 'the device subscriber\'s last reading');
    // Both alerts-only clients get the list as it stands after the last second.
    const openAtEnd = new Set(units.filter((u, idx) => temperature(idx, SECONDS - 1) > 8).map((u) => u.id));
    const isFinal = (m) => m.type === 'alerts' && m.alerts.length === openAtEnd.size && m.alerts.every((a) => openAtEnd.has(a.unitId));
    for (const [name, client] of [['reading', alertsOnly], ['paused', paused]]) {
      await client.waitFor((l) => l.some(isFinal), 20_000, `the ${name} alerts-only client gets the final list (${openAtEnd.size} open alerts)`);
    }
    await sleep(QUIET_MS);

    for (const [name, client] of [['reading', alertsOnly], ['paused', paused]]) {
      assert.equal(client.closeInfo, undefined, `the ${name} alerts-only client was closed: ${JSON.stringify(client.closeInfo)}`);
      await client.pingPong(10_000);
      assert.deepEqual(client.ofType('telemetry'), [], `the ${name} alerts-only client gets no telemetry`);
    }
    const lists = alertsOnly.ofType('alerts');
    assert.ok(lists.length >= SECONDS, `the alerts-only client got alert-list updates during the burst (${lists.length} lists)`);

    for (const [name, client, wanted] of [['unit', unitClient, mineReadings], ['device', deviceClient, theirReadings]]) {
      assert.equal(client.closeInfo, undefined, `the ${name} subscriber was closed: ${JSON.stringify(client.closeInfo)}`);
      const telemetry = client.ofType('telemetry');
      assert.deepEqual(
        [...new Set(telemetry.map((m) => m.unit_id))], [wanted[0].unitId],
        `the ${name} subscriber gets telemetry of its unit only`,
      );
      assert.equal(telemetry.length, SECONDS, `the ${name} subscriber gets ${SECONDS} readings, no more`);
      assertEachOnce(client, wanted, `${name} subscriber`);
      assert.deepEqual(client.ofType('alerts'), [], `the ${name} subscriber gets no alert lists`);
    }
    assert.equal(await metric(gw, SLOW_PLAIN), slowBefore, 'no plain WebSocket client was closed as a slow consumer');
    const bytes = paused.ofType('alerts').reduce((n, m) => n + JSON.stringify(m).length, 0);
    process.stderr.write(`  [${engine}] ${posted.length} readings in ${burstMs} ms; ${lists.length} alert lists; ${(bytes / 1e6).toFixed(1)} MB of lists to the paused client\n`);
  });

  it('unsubscribing and disconnecting stop deliveries to that client only', async () => {
    const o = await freshOrg(gw, [[{}, {}]]);
    const [u1, u2] = o.sites[0].units;
    const viewer = o.token({ sub: 'viewer', role: 'viewer' });
    const a = await openWs(gw, viewer);
    const b = await openWs(gw, viewer);
    for (const c of [a, b]) await subscribe(c, 'unit', { unitId: u1.id });
    await subscribe(b, 'unit', { unitId: u2.id });
    const first = reading(u1.id, 4);
    await ingestOk(gw, o.admin, [first]);
    for (const c of [a, b]) await c.next(isTelemetryAt(first.recordedAt), TELEMETRY_MS, 'the first reading', 0);

    const answer = await a.request({ action: 'unsubscribe', type: 'unit', unit_id: u1.id }, () => true);
    assert.equal(answer.type, 'unsubscribed');
    a.disconnect();
    const c = await openWs(gw, viewer);
    await subscribe(c, 'unit', { unitId: u2.id });
    const second = reading(u1.id, 5);
    const marker = reading(u2.id, 5);
    await ingestOk(gw, o.admin, [second, marker]);
    await b.next(isTelemetryAt(marker.recordedAt), TELEMETRY_MS, 'the marker on b', 0);
    await c.next(isTelemetryAt(marker.recordedAt), TELEMETRY_MS, 'the marker on c', 0);
    await sleep(400);
    assertEachOnce(b, [first, second, marker], 'b');
    assert.deepEqual(c.messages.filter(isTelemetryAt(second.recordedAt)), [], 'c did not subscribe to u1');
    assert.deepEqual(a.messages.filter(isTelemetryAt(second.recordedAt)), [], 'nothing after unsubscribing');
  });
});

// ---------------------------------------------------------------------------------------------
// Two nodes: no Redis traffic for plain WebSocket clients nobody has

/**
 * A raw Redis connection in MONITOR mode: `lines` holds every command Redis executes from now
 * on (`+<time> [<db> <addr>] "<cmd>" "<arg>" ...`); `publishes(from)` the PUBLISH/SPUBLISH
 * commands to a plain WebSocket channel (`sensorwire:ws...`) since index `from`.
 */
async function redisMonitor(port) {
  const sock = net.connect({ port, host: '127.0.0.1' });
  const lines = [];
  let buf = '';
  let ok;
  const ready = new Promise((resolve) => {
    ok = resolve;
  });
  sock.setEncoding('utf8');
  sock.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\r\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (line === '+OK') ok();
      else lines.push(line);
    }
  });
  sock.on('error', () => {});
  await withTimeout(new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  }), 3000, 'MONITOR connection');
  sock.write('MONITOR\r\n');
  await withTimeout(ready, 3000, 'MONITOR did not answer +OK');
  const plainWs = /^\+\S+ \[[^\]]*\] "s?publish" "sensorwire:ws/i;
  return {
    lines,
    get length() {
      return lines.length;
    },
    publishes: (from = 0) => lines.slice(from).filter((l) => plainWs.test(l)),
    /** Any command at all since `from` (proves the monitor sees the nodes' traffic). */
    commands: (from = 0) => lines.slice(from),
    close: () => sock.destroy(),
  };
}

/** Asserts that `lines` (MONITOR lines of PUBLISH commands) is empty; shows the first ones. */
function assertNoPublish(lines, what) {
  assert.equal(lines.length, 0, `no plain WebSocket PUBLISH ${what}, got ${lines.length}:\n${lines.slice(0, 3).map((l) => l.slice(0, 400)).join('\n')}`);
}

const clusterSkip = await clusterSkipReason();

describe('plain WebSocket across two nodes: nothing published without a subscriber (REDIS_URL + PostgreSQL)', { skip: clusterSkip }, () => {
  let redis;
  let db;
  let secret;
  let A;
  let B;
  let monitor;
  let nodes = [];

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    A = await startNode({ name: 'A', databaseUrl: db.url, redisUrl: redis.url, secret });
    B = await startNode({ name: 'B', databaseUrl: db.url, redisUrl: redis.url, secret });
    nodes = [A, B];
    monitor = await redisMonitor(redis.port);
  }, { timeout: 60_000 });

  afterEach(() => {
    for (const n of nodes) n.disconnectSockets();
  });

  after(async () => {
    monitor?.close();
    await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  it('no PUBLISH without a subscriber; a unit subscriber on B then gets readings posted to A (each once), and only its unit is published', { timeout: 60_000 }, async () => {
    const o = await freshOrg(A, [[{ tempMin: 2, tempMax: 8 }, { tempMin: 2, tempMax: 8 }]], { secret });
    const [u1, u2] = o.sites[0].units;
    const viewer = o.token({ sub: 'viewer', role: 'viewer' });

    // Nobody subscribed anywhere: readings (an excursion and its recovery among them) posted
    // to A over a few seconds — several refreshes of the nodes' view — publish nothing.
    const quietFrom = monitor.length;
    const quiet = [];
    for (let i = 0; i < 6; i += 1) {
      const batch = [reading(u1.id, i === 2 ? 14 : 4), reading(u2.id, 5)];
      quiet.push(...batch);
      await ingestOk(A, o.admin, batch);
      await sleep(400);
    }
    await sleep(QUIET_MS);
    assert.ok(monitor.commands(quietFrom).length > 0, 'MONITOR sees the nodes\' Redis commands');
    assertNoPublish(monitor.publishes(quietFrom), 'while no node has a plain WebSocket subscriber');

    // A client subscribes to u1 on B: from its confirmation on, readings of u1 posted to A reach
    // it, each once; u2's (in the same requests) are neither delivered nor published.
    const onB = await openWs(B, viewer);
    await subscribe(onB, 'unit', { unitId: u1.id });
    const subscribedAt = Date.now();
    const liveFrom = monitor.length;
    const live = [];
    const others = [];
    for (let i = 0; i < 5; i += 1) {
      const r = reading(u1.id, 3 + i, { deviceId: `dev-${randomId(3)}`, humidity: 50 + i });
      const other = reading(u2.id, 6);
      live.push(r);
      others.push(other);
      await ingestOk(A, o.admin, [other, r]);
      if (i === 0) {
        await onB.next(isTelemetryAt(r.recordedAt), TELEMETRY_MS, 'the first reading of u1 posted to A right after subscribing on B', 0);
        const lag = Date.now() - subscribedAt;
        assert.ok(lag < 3000, `a new subscriber receives within a couple of seconds (first reading after ${lag} ms)`);
      }
      await sleep(300);
    }
    await onB.waitFor((l) => l.some(isTelemetryAt(live.at(-1).recordedAt)), TELEMETRY_MS, 'every reading of u1 posted to A');
    await sleep(QUIET_MS);
    assertEachOnce(onB, live, 'client on B');
    assert.deepEqual(onB.ofType('telemetry').filter((m) => m.unit_id !== u1.id), [], 'nothing of u2 reaches the client on B');
    const published = monitor.publishes(liveFrom);
    assert.ok(published.some((l) => l.includes(live[0].recordedAt)), `the readings of u1 are published for B (${published.length} plain WebSocket PUBLISH commands: ${published.join('\n').slice(0, 1000)})`);
    assertNoPublish(published.filter((l) => l.includes(u2.id)), 'of readings of u2 (nobody subscribed to it)');

    // Once the client leaves, publishing stops again (interest expires within a few seconds).
    onB.disconnect();
    await sleep(4000);
    const afterFrom = monitor.length;
    for (let i = 0; i < 3; i += 1) {
      await ingestOk(A, o.admin, [reading(u1.id, 4), reading(u2.id, 4)]);
      await sleep(300);
    }
    await sleep(QUIET_MS);
    assertNoPublish(monitor.publishes(afterFrom), 'after the last subscriber left');
    for (const n of nodes) assert.ok(n.alive(), n.describeExit());
  });
});
