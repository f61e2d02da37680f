// The plain WebSocket protocol (CONTRACT.md "Plain WebSocket — GET /api/v2/ws?token=<JWT>"):
// subscriptions to the org's open alerts, device and unit telemetry, ping/pong, error messages
// that keep the connection open, the 4001/4003 close codes, site_ids, and — with REDIS_URL and
// PostgreSQL — delivery across two gateway nodes.
//
// Every server message is validated against `$defs/WsServerMessage` of proto/schema.json (see
// ws-helpers.js). Tests that watch alerts use an organisation of their own, so they never see
// each other's alerts on the shared gateway.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';

import {
  api,
  assertSchema,
  assertStatus,
  forEachEngine,
  mintToken,
  nowSeconds,
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
import {
  assertClosedWith,
  expectClose,
  expectedTelemetry,
  freshOrg,
  isTelemetryAt,
  isType,
  openWs,
} from './ws-helpers.js';

// "pushed on every change (no polling delay)": the new list must arrive this soon after the
// ingest that caused the change has been answered.
const ALERT_PUSH_MS = 1000;
// How long "nothing (more) arrives" is watched after a later message proved the path is live.
const QUIET_MS = 400;
const TELEMETRY_MS = 5000;

/** The alerts of `list` sorted by id (for comparing a pushed list with GET /api/alerts). */
const byId = (list) => [...list].sort((a, b) => a.alertId.localeCompare(b.alertId));

/** GET /api/alerts?status=active as `token` (validated). */
async function activeAlerts(gw, token) {
  const res = await api(gw, 'GET', '/api/alerts?status=active', { token });
  assertStatus(res, 200, 'GET /api/alerts?status=active:');
  assert.ok(Array.isArray(res.body), 'alerts list is a bare JSON array');
  for (const a of res.body) assertSchema('Alert', a);
  return res.body;
}

/** Asserts a `subscribed`/`unsubscribed` confirmation for `channel` (and its id). */
function assertConfirmation(msg, type, channel, { deviceId, unitId } = {}) {
  assert.equal(msg.type, type, `expected a '${type}' message, got ${JSON.stringify(msg)}`);
  assert.equal(msg.channel, channel, `${type}.channel`);
  if (channel === 'device') assert.equal(msg.device_id, deviceId, `${type}.device_id`);
  else assert.ok(msg.device_id === undefined || msg.device_id === null, `${type}.device_id is absent for channel ${channel}: ${JSON.stringify(msg)}`);
  if (channel === 'unit') assert.equal(msg.unit_id, unitId, `${type}.unit_id`);
  else assert.ok(msg.unit_id === undefined || msg.unit_id === null, `${type}.unit_id is absent for channel ${channel}: ${JSON.stringify(msg)}`);
}

/** Sends a subscribe/unsubscribe and asserts the confirmation is the next message. */
async function confirm(client, action, type, ids = {}) {
  const req = { action, type };
  if (ids.deviceId !== undefined) req.device_id = ids.deviceId;
  if (ids.unitId !== undefined) req.unit_id = ids.unitId;
  const answer = await client.request(req, () => true, 5000);
  assertConfirmation(answer, action === 'subscribe' ? 'subscribed' : 'unsubscribed', type, ids);
  return answer;
}

/** Subscribes to alerts: `subscribed` and then the current list. Resolves with the list. */
async function subscribeAlerts(client) {
  const from = client.messages.length;
  client.send({ action: 'subscribe', type: 'alerts' });
  const list = await client.waitFor((l) => l.length >= from + 2, 5000, 'subscribed + alerts after subscribing to alerts');
  assertConfirmation(list[from], 'subscribed', 'alerts');
  const alerts = list[from + 1];
  assert.equal(alerts.type, 'alerts', `the list of open alerts follows 'subscribed' at once: ${JSON.stringify(alerts)}`);
  return alerts.alerts;
}

/** Sends `msg` and asserts the answer is an `error` message with a non-empty text. */
async function expectError(client, msg, raw = false) {
  const from = client.messages.length;
  if (raw) client.sendRaw(msg);
  else client.send(msg);
  const answer = await client.next(() => true, 3000, `answer to ${raw ? msg : JSON.stringify(msg)}`, from);
  assert.equal(answer.type, 'error', `expected an 'error' message for ${raw ? msg : JSON.stringify(msg)}, got ${JSON.stringify(answer)}`);
  assert.ok(answer.message.length > 0, 'error.message is a non-empty text');
  return answer;
}

forEachEngine('plain WebSocket /api/v2/ws', (engine) => {
  const gw = useGateway(engine);

  describe('alerts channel', () => {
    it('subscribe answers subscribed, then the list of open alerts (empty for an org without alerts)', async () => {
      const o = await freshOrg(gw);
      const client = await openWs(gw, o.token({ sub: 'viewer', role: 'viewer' }));
      const alerts = await subscribeAlerts(client);
      assert.deepEqual(alerts, []);
    });

    it('an excursion pushes the new list within 1 s, the recovery a list without it; clients not subscribed get none', async () => {
      const o = await freshOrg(gw, [[{ tempMin: 2, tempMax: 8 }]]);
      const site = o.sites[0];
      const unit = site.units[0];
      const viewer = o.token({ sub: 'viewer', role: 'viewer' });
      const client = await openWs(gw, viewer);
      assert.deepEqual(await subscribeAlerts(client), []);
      const bystander = await openWs(gw, viewer);
      await confirm(bystander, 'subscribe', 'unit', { unitId: unit.id });

      // Excursion.
      let from = client.messages.length;
      const hot = reading(unit.id, 12.5);
      await ingestOk(gw, o.admin, [hot]);
      const opened = await client.next(
        (m) => m.type === 'alerts' && m.alerts.some((a) => a.unitId === unit.id),
        ALERT_PUSH_MS, `the alert list with the new temp_high alert within ${ALERT_PUSH_MS} ms`, from,
      );
      assert.equal(opened.alerts.length, 1, `one open alert: ${JSON.stringify(opened.alerts)}`);
      const alert = opened.alerts[0];
      assert.equal(alert.unitId, unit.id);
      assert.equal(alert.siteId, site.id);
      assert.equal(alert.alertType, 'temp_high');
      assert.equal(alert.severity, 'critical');
      assert.equal(alert.status, 'active');
      assert.equal(alert.value, 12.5);
      assert.equal(alert.threshold, 8);
      assert.equal(alert.triggeredAt, hot.recordedAt, 'triggeredAt is the recordedAt of the reading');
      assert.equal(alert.resolvedAt, null);
      assert.deepEqual(byId(opened.alerts), byId(await activeAlerts(gw, o.admin)), 'the pushed list is GET /api/alerts?status=active');

      // Recovery.
      from = client.messages.length;
      await ingestOk(gw, o.admin, [reading(unit.id, 5)]);
      const resolved = await client.next(
        (m) => m.type === 'alerts' && !m.alerts.some((a) => a.alertId === alert.alertId),
        ALERT_PUSH_MS, `the alert list without ${alert.alertId} within ${ALERT_PUSH_MS} ms`, from,
      );
      assert.deepEqual(resolved.alerts, [], 'the resolved alert is no longer open');
      assert.deepEqual(await activeAlerts(gw, o.admin), []);

      // Only subscribers get lists; the bystander got its telemetry, and no 'alerts'.
      await bystander.waitFor((l) => l.filter(isType('telemetry')).length >= 2, TELEMETRY_MS, 'the bystander\'s telemetry of both readings');
      await sleep(QUIET_MS);
      assert.deepEqual(bystander.ofType('alerts'), [], 'a client that did not subscribe to alerts gets no alert lists');
      assert.ok(client.ofType('alerts').every((m) => m.alerts.every((a) => a.status === 'active')), 'lists hold only open alerts');
    });

    it('subscribing while an alert is open lists that alert', async () => {
      const o = await freshOrg(gw, [[{ tempMin: 2, tempMax: 8 }]]);
      const unit = o.sites[0].units[0];
      const cold = reading(unit.id, -3);
      await ingestOk(gw, o.admin, [cold]);
      // The alert is opened by the pipeline after the reading is stored: wait for REST to show it.
      let rest = [];
      for (let i = 0; i < 50 && rest.length === 0; i += 1) {
        rest = await activeAlerts(gw, o.admin);
        if (rest.length === 0) await sleep(100);
      }
      assert.equal(rest.length, 1, 'the excursion opened one alert');
      const client = await openWs(gw, o.token({ sub: 'late-viewer', role: 'viewer' }));
      const alerts = await subscribeAlerts(client);
      assert.deepEqual(byId(alerts), byId(rest));
      assert.equal(alerts[0].alertType, 'temp_low');
      assert.equal(alerts[0].triggeredAt, cold.recordedAt);
    });

    it('unsubscribe answers unsubscribed and stops the lists', async () => {
      const o = await freshOrg(gw, [[{ tempMin: 2, tempMax: 8 }]]);
      const unit = o.sites[0].units[0];
      const viewer = o.token({ sub: 'viewer', role: 'viewer' });
      const client = await openWs(gw, viewer);
      await subscribeAlerts(client);
      await confirm(client, 'unsubscribe', 'alerts');
      const watcher = await openWs(gw, viewer);
      await subscribeAlerts(watcher);
      const listsBefore = client.ofType('alerts').length;
      await ingestOk(gw, o.admin, [reading(unit.id, 20)]);
      await watcher.next((m) => m.type === 'alerts' && m.alerts.length === 1, ALERT_PUSH_MS + 1000, 'the watcher\'s new list');
      await sleep(QUIET_MS);
      assert.equal(client.ofType('alerts').length, listsBefore, `no list after unsubscribing: ${JSON.stringify(client.messages)}`);
    });
  });

  describe('telemetry', () => {
    it('a device subscription gets one telemetry message per reading of that device, with the reading\'s values', async () => {
      const o = await freshOrg(gw, [[{}, {}]]);
      const [u1, u2] = o.sites[0].units;
      const device = `dev-${randomId(4)}`;
      const client = await openWs(gw, o.token({ sub: 'viewer', role: 'viewer' }));
      await confirm(client, 'subscribe', 'device', { deviceId: device });
      const r1 = reading(u1.id, 4.25, { deviceId: device, humidity: 55.5, battery: 87, signalStrength: -67 });
      const r2 = reading(u2.id, -18.5, { deviceId: device, humidity: 12 });
      const notMine = reading(u1.id, 3, { deviceId: `dev-${randomId(4)}` });
      await ingestOk(gw, o.admin, [r1, notMine, r2]);
      const list = await client.waitFor((l) => l.some(isTelemetryAt(r2.recordedAt)), TELEMETRY_MS, 'telemetry of both readings of the device');
      assert.deepEqual(list.find(isTelemetryAt(r1.recordedAt)), expectedTelemetry(r1));
      assert.deepEqual(list.find(isTelemetryAt(r2.recordedAt)), expectedTelemetry(r2));
      await sleep(QUIET_MS);
      const telemetry = client.ofType('telemetry');
      assert.equal(telemetry.length, 2, `exactly the device's two readings: ${JSON.stringify(telemetry)}`);
    });

    it('a unit subscription gets every reading of the unit (device_id null and absent metrics null when not sent)', async () => {
      const o = await freshOrg(gw, [[{}, {}]]);
      const [u1, u2] = o.sites[0].units;
      const client = await openWs(gw, o.token({ sub: 'viewer', role: 'viewer' }));
      await confirm(client, 'subscribe', 'unit', { unitId: u1.id });
      const bare = reading(u1.id, 6.5);
      const other = reading(u2.id, 7);
      const full = reading(u1.id, 7.75, { deviceId: `dev-${randomId(4)}`, humidity: 40, battery: 99.5, signalStrength: -80 });
      await ingestOk(gw, o.admin, [bare, other, full]);
      const list = await client.waitFor((l) => l.some(isTelemetryAt(full.recordedAt)), TELEMETRY_MS, 'telemetry of the unit\'s readings');
      assert.deepEqual(list.find(isTelemetryAt(bare.recordedAt)), expectedTelemetry(bare));
      assert.deepEqual(list.find(isTelemetryAt(full.recordedAt)), expectedTelemetry(full));
      await sleep(QUIET_MS);
      const telemetry = client.ofType('telemetry');
      assert.equal(telemetry.length, 2, `only the subscribed unit's readings: ${JSON.stringify(telemetry)}`);
      assert.ok(!telemetry.some((m) => m.unit_id === u2.id), 'nothing of the unit not subscribed');
    });

    it('a reading matching both a device and a unit subscription arrives once', async () => {
      const o = await freshOrg(gw, [[{}, {}]]);
      const [u1, u2] = o.sites[0].units;
      const device = `dev-${randomId(4)}`;
      const client = await openWs(gw, o.token({ sub: 'viewer', role: 'viewer' }));
      await confirm(client, 'subscribe', 'device', { deviceId: device });
      await confirm(client, 'subscribe', 'unit', { unitId: u1.id });
      const both = reading(u1.id, 5.5, { deviceId: device, battery: 50 });
      await ingestOk(gw, o.admin, [both]);
      await client.next(isTelemetryAt(both.recordedAt), TELEMETRY_MS, 'telemetry of the reading', 0);
      // A later reading of the device (another unit) is delivered after any duplicate would be.
      const marker = reading(u2.id, 6, { deviceId: device });
      await ingestOk(gw, o.admin, [marker]);
      await client.next(isTelemetryAt(marker.recordedAt), TELEMETRY_MS, 'telemetry of the marker reading', 0);
      await sleep(QUIET_MS);
      const copies = client.messages.filter(isTelemetryAt(both.recordedAt));
      assert.equal(copies.length, 1, `the reading arrives exactly once: ${JSON.stringify(copies)}`);
      assert.deepEqual(copies[0], expectedTelemetry(both));
    });

    it('unsubscribe from a unit or a device answers unsubscribed and stops its telemetry', async () => {
      const o = await freshOrg(gw, [[{}, {}, {}]]);
      const [u1, u2, u3] = o.sites[0].units;
      const device = `dev-${randomId(4)}`;
      const client = await openWs(gw, o.token({ sub: 'viewer', role: 'viewer' }));
      await confirm(client, 'subscribe', 'unit', { unitId: u1.id });
      await confirm(client, 'subscribe', 'device', { deviceId: device });
      await confirm(client, 'subscribe', 'unit', { unitId: u3.id });
      const before1 = reading(u1.id, 4);
      const before2 = reading(u2.id, 4, { deviceId: device });
      await ingestOk(gw, o.admin, [before1, before2]);
      await client.waitFor((l) => l.some(isTelemetryAt(before1.recordedAt)) && l.some(isTelemetryAt(before2.recordedAt)), TELEMETRY_MS, 'telemetry while subscribed');

      await confirm(client, 'unsubscribe', 'unit', { unitId: u1.id });
      await confirm(client, 'unsubscribe', 'device', { deviceId: device });
      const after1 = reading(u1.id, 5);
      const after2 = reading(u2.id, 5, { deviceId: device });
      const marker = reading(u3.id, 5);
      await ingestOk(gw, o.admin, [after1, after2]);
      await ingestOk(gw, o.admin, [marker]);
      await client.next(isTelemetryAt(marker.recordedAt), TELEMETRY_MS, 'telemetry of the still-subscribed unit', 0);
      await sleep(QUIET_MS);
      assert.deepEqual(client.messages.filter(isTelemetryAt(after1.recordedAt)), [], 'nothing of the unsubscribed unit');
      assert.deepEqual(client.messages.filter(isTelemetryAt(after2.recordedAt)), [], 'nothing of the unsubscribed device');
    });

    it('readings of another organisation never arrive, even with the same unit and device ids', async () => {
      const unitId = `u-same-${randomId(3)}`;
      const device = `dev-same-${randomId(3)}`;
      const mine = await freshOrg(gw, [[{ id: unitId }]]);
      const theirs = await freshOrg(gw, [[{ id: unitId }]]);
      const client = await openWs(gw, mine.token({ sub: 'viewer', role: 'viewer' }));
      await confirm(client, 'subscribe', 'unit', { unitId });
      await confirm(client, 'subscribe', 'device', { deviceId: device });
      const foreign = reading(unitId, 9, { deviceId: device });
      await ingestOk(gw, theirs.admin, [foreign]);
      const own = reading(unitId, 3, { deviceId: device });
      await ingestOk(gw, mine.admin, [own]);
      await client.next(isTelemetryAt(own.recordedAt), TELEMETRY_MS, 'telemetry of the own org\'s reading', 0);
      await sleep(QUIET_MS);
      assert.deepEqual(client.messages.filter(isTelemetryAt(foreign.recordedAt)), [], 'the other organisation\'s reading is not delivered');
      assert.equal(client.ofType('telemetry').length, 1);
    });
  });

  describe('requests', () => {
    let viewer;
    let org;
    before(async () => {
      org = await freshOrg(gw, [[{}]]);
      viewer = org.token({ sub: 'viewer', role: 'viewer' });
    });

    it('{"type":"ping"} is answered with {"type":"pong"}', async () => {
      const client = await openWs(gw, viewer);
      await client.pingPong();
      await client.pingPong();
    });

    it('malformed JSON gets an error message and the connection stays open', async () => {
      const client = await openWs(gw, viewer);
      await expectError(client, '{"action":"subscribe",', true);
      await expectError(client, 'not json at all', true);
      assert.ok(client.isOpen(), 'still open');
      await client.pingPong();
    });

    it('an unknown type or action gets an error message and the connection stays open', async () => {
      const client = await openWs(gw, viewer);
      await expectError(client, { action: 'subscribe', type: 'weather' });
      await expectError(client, { action: 'explode', type: 'alerts' });
      await expectError(client, { action: 'subscribe' });
      assert.ok(client.isOpen(), 'still open');
      await client.pingPong();
      // Still serves subscriptions afterwards.
      await confirm(client, 'subscribe', 'unit', { unitId: org.sites[0].units[0].id });
    });

    it('subscribing to another organisation\'s unit, or an unknown one, gets an error and no subscription', async () => {
      const theirs = await freshOrg(gw, [[{}]]);
      const foreignUnit = theirs.sites[0].units[0].id;
      const client = await openWs(gw, viewer);
      await expectError(client, { action: 'subscribe', type: 'unit', unit_id: foreignUnit });
      await expectError(client, { action: 'subscribe', type: 'unit', unit_id: `u-missing-${randomId(3)}` });
      assert.ok(client.isOpen(), 'still open');
      await client.pingPong();
      assert.deepEqual(client.ofType('subscribed'), [], 'no subscription was confirmed');
      // And the other org's readings of that unit do not arrive.
      const foreign = reading(foreignUnit, 4);
      await ingestOk(gw, theirs.admin, [foreign]);
      await sleep(QUIET_MS);
      assert.deepEqual(client.ofType('telemetry'), []);
    });
  });

  describe('authentication', () => {
    it('a missing token closes with 4001 (unauthorized)', async () => {
      assertClosedWith(await expectClose(gw, undefined), 4001, 'unauthorized', 'no ?token:');
      assertClosedWith(await expectClose(gw, ''), 4001, 'unauthorized', 'empty ?token=:');
    });

    it('an invalid token closes with 4001 (unauthorized)', async () => {
      const forged = mintToken({ secret: 'not-the-gateway-secret', sub: 'mallory', org: 'acme', role: 'admin' });
      assertClosedWith(await expectClose(gw, forged), 4001, 'unauthorized', 'token signed with another secret:');
      assertClosedWith(await expectClose(gw, 'not.a.jwt'), 4001, 'unauthorized', 'garbage token:');
    });

    it('an expired token closes with 4001 (unauthorized)', async () => {
      const expired = gw.token({ sub: 'viewer', org: 'acme', role: 'viewer', expSeconds: -120 });
      const info = await expectClose(gw, expired);
      assertClosedWith(info, 4001, 'unauthorized', 'expired token:');
      assert.deepEqual(info.messages, [], 'nothing is sent before the close');
    });

    it('a live connection is closed with 4001 when its token runs out (exp + 30 s leeway)', async () => {
      const o = await freshOrg(gw, [[{}]]);
      // Inside the leeway for about 3 more seconds.
      const token = o.token({ sub: 'viewer', role: 'viewer', exp: nowSeconds() - 27 });
      const opened = Date.now();
      const client = await openWs(gw, token);
      await client.pingPong();
      await confirm(client, 'subscribe', 'unit', { unitId: o.sites[0].units[0].id });
      const info = await withTimeout(client.closed, 10_000, 'the server did not close the connection after the token ran out');
      const lived = Date.now() - opened;
      assert.equal(info.code, 4001, `close code (reason ${JSON.stringify(info.reason)})`);
      assert.ok(info.reason.startsWith('unauthorized'), `close reason starts with 'unauthorized': ${JSON.stringify(info.reason)}`);
      assert.ok(lived >= 1500, `the connection lived until the token ran out (closed after ${lived} ms)`);
    });

    it('a valid token with an empty site_ids closes with 4003', async () => {
      const token = gw.token({ sub: 'nobody', org: 'acme', role: 'admin', siteIds: [] });
      assertClosedWith(await expectClose(gw, token), 4003, undefined, 'site_ids []:');
    });

    it('a valid token is served (not closed)', async () => {
      const client = await openWs(gw, gw.token({ sub: 'viewer', org: `org-${randomId(3)}`, role: 'viewer' }));
      await client.pingPong();
      assert.ok(client.isOpen());
    });
  });

  describe('site_ids-restricted tokens', () => {
    it('see only the alerts of their sites', async () => {
      const o = await freshOrg(gw, [[{ tempMin: 2, tempMax: 8 }], [{ tempMin: 2, tempMax: 8 }]]);
      const [siteA, siteB] = o.sites;
      const restricted = await openWs(gw, o.token({ sub: 'restricted', role: 'viewer', siteIds: [siteA.id] }));
      const everyone = await openWs(gw, o.token({ sub: 'everyone', role: 'viewer' }));
      assert.deepEqual(await subscribeAlerts(restricted), []);
      assert.deepEqual(await subscribeAlerts(everyone), []);

      // An excursion on site B: the unrestricted client's list has it; the restricted one's never.
      await ingestOk(gw, o.admin, [reading(siteB.units[0].id, 15)]);
      await everyone.next((m) => m.type === 'alerts' && m.alerts.some((a) => a.siteId === siteB.id), ALERT_PUSH_MS + 1000, 'the site B alert', 0);

      // An excursion on site A: both see it; the restricted list holds only site A's alert.
      await ingestOk(gw, o.admin, [reading(siteA.units[0].id, 15)]);
      const got = await restricted.next((m) => m.type === 'alerts' && m.alerts.some((a) => a.siteId === siteA.id), ALERT_PUSH_MS + 1000, 'the site A alert', 0);
      assert.equal(got.alerts.length, 1, `only the site A alert: ${JSON.stringify(got.alerts)}`);
      await everyone.next((m) => m.type === 'alerts' && m.alerts.length === 2, ALERT_PUSH_MS + 1000, 'both alerts for the unrestricted client', 0);
      await sleep(QUIET_MS);
      for (const m of restricted.ofType('alerts')) {
        assert.ok(m.alerts.every((a) => a.siteId === siteA.id), `a restricted client's list holds only its sites' alerts: ${JSON.stringify(m.alerts)}`);
      }
      // Subscribing again gives the filtered current list too.
      const fresh = await openWs(gw, o.token({ sub: 'restricted', role: 'viewer', siteIds: [siteA.id] }));
      const list = await subscribeAlerts(fresh);
      assert.deepEqual(list.map((a) => a.siteId), [siteA.id]);
    });

    it('get no telemetry of other sites, through a device subscription or a unit subscription', async () => {
      const o = await freshOrg(gw, [[{}], [{}]]);
      const [siteA, siteB] = o.sites;
      const unitA = siteA.units[0].id;
      const unitB = siteB.units[0].id;
      const device = `dev-${randomId(4)}`;
      const restricted = await openWs(gw, o.token({ sub: 'restricted', role: 'viewer', siteIds: [siteA.id] }));
      const everyone = await openWs(gw, o.token({ sub: 'everyone', role: 'viewer' }));
      await expectError(restricted, { action: 'subscribe', type: 'unit', unit_id: unitB });
      await confirm(restricted, 'subscribe', 'device', { deviceId: device });
      await confirm(restricted, 'subscribe', 'unit', { unitId: unitA });
      await confirm(everyone, 'subscribe', 'device', { deviceId: device });

      const inB = reading(unitB, 4, { deviceId: device });
      const inA = reading(unitA, 5, { deviceId: device });
      await ingestOk(gw, o.admin, [inB]);
      await ingestOk(gw, o.admin, [inA]);
      await everyone.waitFor((l) => l.some(isTelemetryAt(inB.recordedAt)) && l.some(isTelemetryAt(inA.recordedAt)), TELEMETRY_MS, 'the unrestricted client gets both readings of the device');
      await restricted.next(isTelemetryAt(inA.recordedAt), TELEMETRY_MS, 'the site A reading', 0);
      await sleep(QUIET_MS);
      assert.deepEqual(restricted.messages.filter(isTelemetryAt(inB.recordedAt)), [], 'the site B reading does not reach a client restricted to site A');
      const copies = restricted.messages.filter(isTelemetryAt(inA.recordedAt));
      assert.equal(copies.length, 1, 'the site A reading (device and unit subscriptions) arrives once');
      assert.deepEqual(copies[0], expectedTelemetry(inA));
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Two nodes (CONTRACT.md "Many nodes": Redis pub/sub for the plain WebSocket clients)

const clusterSkip = await clusterSkipReason();

describe('plain WebSocket across two nodes (REDIS_URL + PostgreSQL)', { skip: clusterSkip }, () => {
  let redis;
  let db;
  let secret;
  let A;
  let B;
  let nodes = [];

  before(async () => {
    await requirePrerequisites();
    redis = await startRedis();
    db = await createDatabase();
    secret = newSecret();
    // One node first (it runs the migrations), then the other.
    A = await startNode({ name: 'A', databaseUrl: db.url, redisUrl: redis.url, secret });
    B = await startNode({ name: 'B', databaseUrl: db.url, redisUrl: redis.url, secret });
    nodes = [A, B];
  }, { timeout: 60_000 });

  afterEach(() => {
    for (const n of nodes) n.disconnectSockets();
  });

  after(async () => {
    await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
    await redis?.stop();
    await db?.drop().catch(() => {});
  }, { timeout: 30_000 });

  it('a client on node A gets the telemetry of a reading posted to node B, once (and so does a client on B)', async () => {
    const o = await freshOrg(A, [[{}, {}]], { secret });
    const [u1, u2] = o.sites[0].units;
    const viewer = o.token({ sub: 'viewer', role: 'viewer' });
    const onA = await openWs(A, viewer);
    const onB = await openWs(B, viewer);
    for (const c of [onA, onB]) {
      await confirm(c, 'subscribe', 'unit', { unitId: u1.id });
      await confirm(c, 'subscribe', 'unit', { unitId: u2.id });
    }
    const r = reading(u1.id, 3.5, { deviceId: `dev-${randomId(4)}`, humidity: 61 });
    await ingestOk(B, o.admin, [r]);
    for (const [name, c] of [['A', onA], ['B', onB]]) {
      const msg = await c.next(isTelemetryAt(r.recordedAt), TELEMETRY_MS, `telemetry on node ${name} of the reading posted to B`, 0);
      assert.deepEqual(msg, expectedTelemetry(r));
    }
    // A later reading through B arrives after any duplicate of the first would have.
    const marker = reading(u2.id, 4);
    await ingestOk(B, o.admin, [marker]);
    for (const [name, c] of [['A', onA], ['B', onB]]) {
      await c.next(isTelemetryAt(marker.recordedAt), TELEMETRY_MS, `telemetry on node ${name} of the marker`, 0);
    }
    await sleep(QUIET_MS);
    for (const [name, c] of [['A', onA], ['B', onB]]) {
      assert.equal(c.messages.filter(isTelemetryAt(r.recordedAt)).length, 1, `node ${name}: the reading arrives exactly once`);
    }
    for (const n of nodes) assert.ok(n.alive(), n.describeExit());
  });

  it('an excursion posted to node B pushes the alert list to a client on node A', async () => {
    const o = await freshOrg(A, [[{ tempMin: 2, tempMax: 8 }]], { secret });
    const unit = o.sites[0].units[0];
    const onA = await openWs(A, o.token({ sub: 'viewer', role: 'viewer' }));
    assert.deepEqual(await subscribeAlerts(onA), []);
    await ingestOk(B, o.admin, [reading(unit.id, 11)]);
    const opened = await onA.next((m) => m.type === 'alerts' && m.alerts.some((a) => a.unitId === unit.id), ALERT_PUSH_MS + 1000, 'the list with the alert opened on node B', 0);
    assert.equal(opened.alerts.length, 1);
    assert.equal(opened.alerts[0].alertType, 'temp_high');
    await ingestOk(B, o.admin, [reading(unit.id, 5)]);
    const from = onA.messages.indexOf(opened) + 1;
    const resolved = await onA.next((m) => m.type === 'alerts' && m.alerts.length === 0, ALERT_PUSH_MS + 1000, 'the list without the alert resolved on node B', from);
    assert.deepEqual(resolved.alerts, []);
  });
});
