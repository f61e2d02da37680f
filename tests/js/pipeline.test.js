// The live pipeline as a dashboard sees it: `sensor:readings:batch` to the organisation,
// `sensor:reading` to unit/site subscribers, and `alert:*` / `unit:status` from thresholds and
// silence (CONTRACT.md: "Server → client", "Alerts and unit status").
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  api,
  assertSchema,
  assertStatus,
  forEachEngine,
  randomId,
  roomAck,
  sleep,
  useGateway,
} from './harness.js';
import {
  assertBatchShape,
  assertEachOnce,
  batchReadings,
  collect,
  freshSite,
  ingestOk,
  listAlerts,
  reading,
} from './pipeline-helpers.js';

const FLUSH_MS = 300;
// A batch must arrive within one flush interval (plus delivery) of the ingest acknowledgement.
const WINDOW_MS = FLUSH_MS + 700;
const SWEEP_MS = 250;

/** The `SensorReading` the server must push for an ingest reading stored under `id`. */
function expectedReading(sent, id) {
  return {
    id,
    unitId: sent.unitId,
    deviceId: sent.deviceId ?? null,
    temperature: sent.temperature,
    humidity: sent.humidity ?? null,
    battery: sent.battery ?? null,
    signalStrength: sent.signalStrength ?? null,
    recordedAt: sent.recordedAt,
    source: sent.source ?? 'api',
  };
}

/** Collectors for the alert/status events of one socket. */
function alertCollectors(socket) {
  return {
    triggered: collect(socket, 'alert:triggered', 'AlertTriggered'),
    resolved: collect(socket, 'alert:resolved', 'AlertResolved'),
    status: collect(socket, 'unit:status', 'UnitStatusChanged'),
  };
}

forEachEngine('ingest pipeline: batches, live readings, alerts', (engine) => {
  const gw = useGateway(engine, { env: { FLUSH_INTERVAL_MS: String(FLUSH_MS), OFFLINE_SWEEP_MS: String(SWEEP_MS) } });
  let admin;
  let otherAdmin;
  const viewer = (sub = `viewer-${randomId(3)}`, extra = {}) => gw.token({ sub, org: 'acme', role: 'viewer', ...extra });

  before(() => {
    admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
    otherAdmin = gw.token({ sub: 'admin-other', org: 'other', role: 'admin' });
  });

  describe('sensor:readings:batch', () => {
    it('a posted reading arrives as exactly one batch { unitId, readings, count } at every socket of the org, within the flush window', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const alice = await gw.connect({ token: viewer('alice') });
      const bob = await gw.connect({ token: gw.token({ sub: 'bob', org: 'acme', role: 'operator' }) });
      const batches = [alice, bob].map((s) => collect(s, 'sensor:readings:batch', 'ReadingsBatch'));

      const sent = reading(unit.id, 4.25, { humidity: 41.5, battery: 88, signalStrength: -67, deviceId: 'dev-7', source: 'gateway-a' });
      const { ids } = await ingestOk(gw, admin, [sent]);
      await Promise.all(batches.map((c, i) => c.waitFor((l) => l.some((b) => b.unitId === unit.id), WINDOW_MS,
        `socket ${i} waiting for the batch of ${unit.id}`)));
      await sleep(WINDOW_MS); // anything more would be a duplicate

      for (const c of batches) {
        const mine = c.forUnit(unit.id);
        assert.equal(mine.length, 1, `exactly one batch for ${unit.id}: ${JSON.stringify(mine)}`);
        assertBatchShape(mine[0], unit.id);
        assert.equal(mine[0].count, 1);
        assert.deepEqual(mine[0].readings[0], expectedReading(sent, ids[0]));
      }
    });

    it('two tabs of the same user each receive the batch exactly once', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const token = viewer('carol');
      const tab1 = await gw.connect({ token });
      const tab2 = await gw.connect({ token });
      const tabs = [tab1, tab2].map((s) => collect(s, 'sensor:readings:batch', 'ReadingsBatch'));

      const sent = [reading(unit.id, 3), reading(unit.id, 3.5)];
      const { ids } = await ingestOk(gw, admin, sent);
      await Promise.all(tabs.map((c) => c.waitFor((l) => batchReadings(l.filter((b) => b.unitId === unit.id)).length >= 2, WINDOW_MS)));
      await sleep(WINDOW_MS);

      for (const [i, c] of tabs.entries()) {
        const mine = c.forUnit(unit.id);
        for (const b of mine) assertBatchShape(b, unit.id);
        assertEachOnce(batchReadings(mine), ids, `tab ${i + 1}`);
        assert.equal(batchReadings(mine).length, 2, `tab ${i + 1} got exactly the two readings`);
      }
    });

    it("a socket of another organisation gets nothing, even though its org has a unit with the same id", async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const otherSite = `s-${randomId(4)}`;
      assertStatus(await api(gw, 'POST', '/api/sites', { token: otherAdmin, body: { id: otherSite, name: 'Other' } }), 201);
      assertStatus(await api(gw, 'POST', '/api/units', { token: otherAdmin, body: { id: unit.id, siteId: otherSite, name: 'Clash' } }), 201);

      const acme = collect(await gw.connect({ token: viewer('dave') }), 'sensor:readings:batch', 'ReadingsBatch');
      const otherSocket = await gw.connect({ token: gw.token({ sub: 'eve', org: 'other', role: 'admin' }) });
      assert.deepEqual(await roomAck(otherSocket, 'subscribe:unit', unit.id), { ok: true }, "other org's own unit with the clashing id");
      assert.deepEqual(await roomAck(otherSocket, 'subscribe:site', otherSite), { ok: true });
      const other = {
        batch: collect(otherSocket, 'sensor:readings:batch', 'ReadingsBatch'),
        live: collect(otherSocket, 'sensor:reading', 'SensorReading'),
        triggered: collect(otherSocket, 'alert:triggered', 'AlertTriggered'),
        status: collect(otherSocket, 'unit:status', 'UnitStatusChanged'),
      };

      await ingestOk(gw, admin, [reading(unit.id, 5)]);
      await acme.waitFor((l) => l.some((b) => b.unitId === unit.id), WINDOW_MS, 'control: the acme socket gets the batch');
      await sleep(WINDOW_MS);
      assert.deepEqual(other.batch.all, [], 'no batch crosses organisations');
      assert.deepEqual(other.live.all, [], 'no sensor:reading crosses organisations');
      assert.deepEqual(other.status.all, [], 'no unit:status crosses organisations');
      assert.deepEqual(other.triggered.all, []);
    });

    it('a site-restricted user (site_ids) receives batches only for units of its sites', async () => {
      const a = await freshSite(gw, admin);
      const b = await freshSite(gw, admin);
      const unitA = a.units[0].id;
      const unitB = b.units[0].id;
      const restricted = collect(await gw.connect({ token: viewer('frank', { siteIds: [b.siteId] }) }), 'sensor:readings:batch', 'ReadingsBatch');
      const everyone = collect(await gw.connect({ token: viewer('grace') }), 'sensor:readings:batch', 'ReadingsBatch');

      await ingestOk(gw, admin, [reading(unitA, 4), reading(unitB, 4)]);
      await everyone.waitFor((l) => l.some((x) => x.unitId === unitA) && l.some((x) => x.unitId === unitB), WINDOW_MS);
      await restricted.waitFor((l) => l.some((x) => x.unitId === unitB), WINDOW_MS, 'restricted socket waiting for its own site');
      await sleep(WINDOW_MS);
      assert.deepEqual(restricted.forUnit(unitA), [], 'a unit outside site_ids is not delivered');
      assert.equal(restricted.forUnit(unitB).length, 1);
    });

    it('a socket that also subscribed to the unit and its site still gets each batch once (and each sensor:reading once)', async () => {
      const { siteId, units: [unit] } = await freshSite(gw, admin);
      const socket = await gw.connect({ token: viewer('heidi') });
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', unit.id), { ok: true });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', siteId), { ok: true });
      const batches = collect(socket, 'sensor:readings:batch', 'ReadingsBatch');
      const live = collect(socket, 'sensor:reading', 'SensorReading');

      const first = await ingestOk(gw, admin, [reading(unit.id, 4), reading(unit.id, 4.5)]);
      await batches.waitFor((l) => batchReadings(l.filter((x) => x.unitId === unit.id)).length >= 2, WINDOW_MS);
      const second = await ingestOk(gw, admin, [reading(unit.id, 5)]);
      const ids = [...first.ids, ...second.ids];
      await batches.waitFor((l) => batchReadings(l.filter((x) => x.unitId === unit.id)).length >= 3, WINDOW_MS);
      await sleep(WINDOW_MS);

      const mine = batches.forUnit(unit.id);
      assert.equal(mine.length, 2, `one batch per flush window, not one per room: ${JSON.stringify(mine)}`);
      for (const b of mine) assertBatchShape(b, unit.id);
      assertEachOnce(batchReadings(mine), ids, 'batches');
      assert.equal(live.all.length, 3, `one sensor:reading per reading despite two matching rooms: ${JSON.stringify(live.all)}`);
      assertEachOnce(live.all, ids, 'sensor:reading');
    });
  });

  describe('sensor:reading', () => {
    it('is received once per reading by a unit subscriber and by a site subscriber, not by an unsubscribed socket', async () => {
      const { siteId, units: [unit] } = await freshSite(gw, admin);
      const unitSub = await gw.connect({ token: viewer('ivan') });
      const siteSub = await gw.connect({ token: viewer('judy') });
      const plain = await gw.connect({ token: viewer('ken') });
      const leaver = await gw.connect({ token: viewer('leo') });
      assert.deepEqual(await roomAck(unitSub, 'subscribe:unit', unit.id), { ok: true });
      assert.deepEqual(await roomAck(siteSub, 'subscribe:site', siteId), { ok: true });
      assert.deepEqual(await roomAck(leaver, 'subscribe:unit', unit.id), { ok: true });
      assert.deepEqual(await roomAck(leaver, 'unsubscribe:unit', unit.id), { ok: true });
      const [u, s, p, l] = [unitSub, siteSub, plain, leaver].map((x) => collect(x, 'sensor:reading', 'SensorReading'));
      const plainBatches = collect(plain, 'sensor:readings:batch', 'ReadingsBatch');

      const sent = [reading(unit.id, 4, { deviceId: 'probe-1' }), reading(unit.id, 4.1), reading(unit.id, 4.2, { source: 'lorawan' })];
      const { ids } = await ingestOk(gw, admin, sent);
      await u.waitFor((list) => list.length >= 3, WINDOW_MS, 'unit subscriber');
      await s.waitFor((list) => list.length >= 3, WINDOW_MS, 'site subscriber');
      await plainBatches.waitFor((list) => list.some((b) => b.unitId === unit.id), WINDOW_MS, 'control: the plain socket gets the batch');
      await sleep(WINDOW_MS);

      const expected = sent.map((r, i) => expectedReading(r, ids[i]));
      for (const [name, c] of [['unit subscriber', u], ['site subscriber', s]]) {
        assert.equal(c.all.length, 3, `${name}: one event per reading: ${JSON.stringify(c.all)}`);
        assertEachOnce(c.all, ids, name);
        const byId = new Map(c.all.map((r) => [r.id, r]));
        for (const e of expected) assert.deepEqual(byId.get(e.id), e, `${name}: payload of ${e.id}`);
      }
      assert.deepEqual(p.all, [], 'a socket that did not subscribe gets no sensor:reading');
      assert.deepEqual(l.all, [], 'a socket that unsubscribed gets no sensor:reading');
    });
  });

  describe('batch ordering', () => {
    it('readings within one batch are in recordedAt order even when posted out of order', async () => {
      const { units: [unit] } = await freshSite(gw, admin);
      const batches = collect(await gw.connect({ token: viewer('mallory') }), 'sensor:readings:batch', 'ReadingsBatch');
      const ordered = Array.from({ length: 6 }, (_, i) => reading(unit.id, 3 + i / 10));
      const shuffled = [ordered[3], ordered[0], ordered[5], ordered[1], ordered[4], ordered[2]];
      const { ids } = await ingestOk(gw, admin, shuffled);
      await batches.waitFor((l) => batchReadings(l.filter((b) => b.unitId === unit.id)).length >= 6, WINDOW_MS);
      await sleep(WINDOW_MS);

      const mine = batches.forUnit(unit.id);
      assert.equal(mine.length, 1, 'one request is one flush window: one batch');
      assertBatchShape(mine[0], unit.id);
      assert.deepEqual(mine[0].readings.map((r) => r.recordedAt), ordered.map((r) => r.recordedAt));
      const idOf = new Map(shuffled.map((r, i) => [r.recordedAt, ids[i]]));
      assert.deepEqual(mine[0].readings.map((r) => r.id), ordered.map((r) => idOf.get(r.recordedAt)),
        'each reading keeps the id the ingest answer gave it');
    });
  });

  describe('alerts and unit status', () => {
    it('three readings above tempMax open exactly one temp_high alert and one excursion; a reading back in range resolves it', async () => {
      const { siteId, units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('nina') }));

      const okReading = reading(unit.id, 5);
      await ingestOk(gw, admin, [okReading]);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'first reading: unknown → ok');
      const high = [reading(unit.id, 9), reading(unit.id, 10), reading(unit.id, 11)];
      for (const r of high) await ingestOk(gw, admin, [r]);
      await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'alert:triggered');
      await ev.status.waitFor((l) => l.filter((x) => x.unitId === unit.id).length >= 2, WINDOW_MS, 'unit:status excursion');
      await sleep(WINDOW_MS);

      const triggered = ev.triggered.forUnit(unit.id);
      assert.equal(triggered.length, 1, `exactly one alert per excursion: ${JSON.stringify(triggered)}`);
      const alert = triggered[0];
      assert.equal(alert.alertType, 'temp_high');
      assert.equal(alert.severity, 'critical');
      assert.equal(alert.value, 9, 'value is the first high reading');
      assert.equal(alert.threshold, 8, 'threshold is tempMax');
      assert.equal(alert.siteId, siteId);
      assert.equal(alert.triggeredAt, high[0].recordedAt, 'triggeredAt is the recordedAt of the reading that caused it');
      assert.ok(alert.message.length > 0);
      assert.deepEqual(ev.status.forUnit(unit.id).map(({ unitId, status, since }) => ({ unitId, status, since })), [
        { unitId: unit.id, status: 'ok', since: okReading.recordedAt },
        { unitId: unit.id, status: 'excursion', since: high[0].recordedAt },
      ], 'unit:status on change only, since = recordedAt of the reading that changed it');

      const active = await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id });
      assert.equal(active.length, 1);
      assert.equal(active[0].alertId, alert.alertId);
      assert.equal(active[0].status, 'active');
      assert.equal(active[0].resolvedAt, null);
      assert.equal(active[0].value, 9);
      assert.equal(active[0].threshold, 8);

      const back = reading(unit.id, 6);
      await ingestOk(gw, admin, [back]);
      const [resolved] = await ev.resolved.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'alert:resolved');
      await ev.status.waitFor((l) => l.filter((x) => x.unitId === unit.id).length >= 3, WINDOW_MS, 'unit:status ok');
      await sleep(WINDOW_MS);
      assert.equal(ev.resolved.forUnit(unit.id).length, 1, 'resolved once');
      assert.equal(resolved.alertId, alert.alertId, 'alert:resolved carries the alertId of alert:triggered');
      assert.equal(resolved.resolvedAt, back.recordedAt);
      const statuses = ev.status.forUnit(unit.id);
      assert.equal(statuses.length, 3, `status changes only: ${JSON.stringify(statuses)}`);
      assert.equal(statuses[2].status, 'ok');
      assert.equal(statuses[2].since, back.recordedAt);
      assert.equal(ev.triggered.forUnit(unit.id).length, 1);

      assert.deepEqual(await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id }), []);
      const done = await listAlerts(gw, viewer(), { status: 'resolved', unitId: unit.id });
      assert.equal(done.length, 1);
      assert.equal(done[0].alertId, alert.alertId);
      assert.equal(done[0].status, 'resolved');
      assert.equal(done[0].resolvedAt, back.recordedAt);
      const unitNow = await api(gw, 'GET', `/api/units/${unit.id}`, { token: viewer() });
      assertStatus(unitNow, 200);
      assertSchema('Unit', unitNow.body);
      assert.equal(unitNow.body.status, 'ok');
    });

    it('a reading equal to tempMax (or tempMin) is in range: no alert', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('olivia') }));
      await ingestOk(gw, admin, [reading(unit.id, 8)]);
      await ingestOk(gw, admin, [reading(unit.id, 2)]);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'first reading: unknown → ok');
      await sleep(WINDOW_MS);
      assert.deepEqual(ev.triggered.forUnit(unit.id), [], 'a reading equal to a limit opens no alert');
      assert.deepEqual(ev.status.forUnit(unit.id).map((s) => s.status), ['ok']);

      // Control: just above the limit does alert, so the silence above was meaningful.
      await ingestOk(gw, admin, [reading(unit.id, 8.01)]);
      const [alert] = await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'control alert');
      assert.equal(alert.alertType, 'temp_high');
      assert.equal(alert.value, 8.01);
    });

    it('a reading below tempMin opens a temp_low alert; back in range resolves it', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('peggy') }));
      const low = reading(unit.id, 1.5);
      await ingestOk(gw, admin, [low]);
      const [alert] = await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'temp_low alert');
      assert.equal(alert.alertType, 'temp_low');
      assert.equal(alert.severity, 'critical');
      assert.equal(alert.value, 1.5);
      assert.equal(alert.threshold, 2);
      assert.equal(alert.triggeredAt, low.recordedAt);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id && x.status === 'excursion'), WINDOW_MS);

      await ingestOk(gw, admin, [reading(unit.id, 1.0)]); // still low: no second alert
      const back = reading(unit.id, 2.5);
      await ingestOk(gw, admin, [back]);
      const [resolved] = await ev.resolved.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'alert:resolved');
      assert.equal(resolved.alertId, alert.alertId);
      assert.equal(resolved.resolvedAt, back.recordedAt);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id && x.status === 'ok'), WINDOW_MS);
      await sleep(WINDOW_MS);
      assert.equal(ev.triggered.forUnit(unit.id).length, 1);
      assert.deepEqual(ev.status.forUnit(unit.id).map((s) => s.status), ['excursion', 'ok']);
    });

    it('a jump from above tempMax to below tempMin resolves temp_high and opens temp_low; status stays excursion', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('quinn') }));
      await ingestOk(gw, admin, [reading(unit.id, 9)]);
      const [high] = await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'temp_high');
      const jump = reading(unit.id, 0);
      await ingestOk(gw, admin, [jump]);
      const [resolved] = await ev.resolved.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'temp_high resolved');
      const both = await ev.triggered.waitFor((l) => l.filter((x) => x.unitId === unit.id).length >= 2, WINDOW_MS, 'temp_low');
      await sleep(WINDOW_MS);
      assert.equal(high.alertType, 'temp_high');
      assert.equal(resolved.alertId, high.alertId);
      assert.equal(resolved.resolvedAt, jump.recordedAt);
      const low = both.filter((x) => x.unitId === unit.id)[1];
      assert.equal(low.alertType, 'temp_low');
      assert.notEqual(low.alertId, high.alertId);
      assert.equal(low.value, 0);
      assert.equal(low.threshold, 2);
      assert.deepEqual(ev.status.forUnit(unit.id).map((s) => s.status), ['excursion'], 'status stays excursion (no unit:status)');
      const active = await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id });
      assert.deepEqual(active.map((a) => a.alertType), ['temp_low']);
    });

    it('a unit silent for offlineAfterSeconds gets an offline alert (warning); the next reading resolves it', async () => {
      const { siteId, units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8, offlineAfterSeconds: 1 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('rupert') }));
      const first = reading(unit.id, 5);
      await ingestOk(gw, admin, [first]);
      const silentSince = Date.now();
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id && x.status === 'ok'), WINDOW_MS);

      const [offline] = await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), 1000 + SWEEP_MS + 1500, 'offline alert');
      assert.ok(Date.now() - silentSince >= 900, `offline only after offlineAfterSeconds (${Date.now() - silentSince} ms)`);
      assert.equal(offline.alertType, 'offline');
      assert.equal(offline.severity, 'warning');
      assert.equal(offline.value, null);
      assert.equal(offline.threshold, null);
      assert.equal(offline.siteId, siteId);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id && x.status === 'offline'), WINDOW_MS, 'unit:status offline');
      await sleep(3 * SWEEP_MS);
      assert.equal(ev.triggered.forUnit(unit.id).length, 1, 'still silent: no second offline alert');
      const active = await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id });
      assert.deepEqual(active.map((a) => [a.alertId, a.alertType, a.severity]), [[offline.alertId, 'offline', 'warning']]);

      const next = reading(unit.id, 5);
      await ingestOk(gw, admin, [next]);
      const [resolved] = await ev.resolved.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'offline resolved');
      assert.equal(resolved.alertId, offline.alertId);
      assert.equal(resolved.resolvedAt, next.recordedAt);
      await ev.status.waitFor((l) => l.filter((x) => x.unitId === unit.id).length >= 3, WINDOW_MS, 'unit:status ok again');
      assert.deepEqual(ev.status.forUnit(unit.id).slice(0, 3).map((s) => s.status), ['ok', 'offline', 'ok']);
      assert.equal(ev.status.forUnit(unit.id)[2].since, next.recordedAt);
    });

    it('20 concurrent requests with an above-max reading for the same unit open exactly one alert', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('sybil') }));
      const sent = Array.from({ length: 20 }, (_, i) => reading(unit.id, 9 + i / 10));
      await Promise.all(sent.map((r) => ingestOk(gw, admin, [r])));
      await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'alert:triggered');
      await sleep(2 * WINDOW_MS);

      const triggered = ev.triggered.forUnit(unit.id);
      assert.equal(triggered.length, 1, `exactly one alert: ${JSON.stringify(triggered)}`);
      assert.equal(triggered[0].alertType, 'temp_high');
      assert.ok(sent.some((r) => r.temperature === triggered[0].value), 'value is one of the readings sent');
      assert.deepEqual(ev.status.forUnit(unit.id).map((s) => s.status), ['excursion']);
      const active = await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id });
      assert.equal(active.length, 1, `one active alert: ${JSON.stringify(active)}`);
      assert.equal(active[0].alertId, triggered[0].alertId);
    });

    it('an older above-max reading after a newer in-range one is stored and broadcast but opens no alert', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const socket = await gw.connect({ token: viewer('trent') });
      const ev = alertCollectors(socket);
      const batches = collect(socket, 'sensor:readings:batch', 'ReadingsBatch');

      const newer = reading(unit.id, 5);
      await ingestOk(gw, admin, [newer]);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'unit:status ok');
      const older = { unitId: unit.id, temperature: 12, recordedAt: new Date(Date.parse(newer.recordedAt) - 10_000).toISOString() };
      const { ids: [olderId] } = await ingestOk(gw, admin, [older]);
      await batches.waitFor((l) => batchReadings(l).some((r) => r.id === olderId), WINDOW_MS, 'the older reading is broadcast');
      await sleep(WINDOW_MS);

      assert.deepEqual(ev.triggered.forUnit(unit.id), [], 'an out-of-order reading never moves alert state backwards');
      assert.deepEqual(ev.status.forUnit(unit.id).map((s) => s.status), ['ok']);
      assert.deepEqual(await listAlerts(gw, viewer(), { status: 'active', unitId: unit.id }), []);
      const stored = await api(gw, 'GET', `/api/units/${unit.id}/readings`, { token: viewer() });
      assertStatus(stored, 200);
      assert.ok(stored.body.some((r) => r.id === olderId && r.temperature === 12), 'the older reading is stored');

      // Control: a newer above-max reading does alert.
      await ingestOk(gw, admin, [reading(unit.id, 12)]);
      await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'control alert');
    });

    it('PATCH /api/units/{id} lowering tempMax makes the next reading alert', async () => {
      const { units: [unit] } = await freshSite(gw, admin, [{ tempMin: 2, tempMax: 8 }]);
      const ev = alertCollectors(await gw.connect({ token: viewer('uma') }));
      await ingestOk(gw, admin, [reading(unit.id, 6)]);
      await ev.status.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'unit:status ok');

      const patched = await api(gw, 'PATCH', `/api/units/${unit.id}`, { token: admin, body: { tempMax: 5 } });
      assertStatus(patched, 200, 'PATCH /api/units/{id}:');
      assertSchema('Unit', patched.body);
      assert.equal(patched.body.tempMax, 5);
      assert.equal(patched.body.tempMin, 2, 'absent fields are left alone');
      assert.deepEqual(ev.triggered.forUnit(unit.id), [], 'no alert before the next reading');

      const next = reading(unit.id, 6);
      await ingestOk(gw, admin, [next]);
      const [alert] = await ev.triggered.waitFor((l) => l.some((x) => x.unitId === unit.id), WINDOW_MS, 'alert after the PATCH');
      assert.equal(alert.alertType, 'temp_high');
      assert.equal(alert.threshold, 5, 'the new tempMax applies');
      assert.equal(alert.value, 6);
      assert.equal(alert.triggeredAt, next.recordedAt);
    });
  });
});

forEachEngine('ingest pipeline: per-event cap (BATCH_MAX_READINGS=5)', (engine) => {
  const gw = useGateway(engine, { env: { FLUSH_INTERVAL_MS: String(FLUSH_MS), BATCH_MAX_READINGS: '5' } });
  let admin;
  before(() => {
    admin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
  });

  async function checkSplit(post) {
    const { units: [unit] } = await freshSite(gw, admin);
    const batches = collect(await gw.connect({ token: gw.token({ sub: 'v', org: 'acme', role: 'viewer' }) }), 'sensor:readings:batch', 'ReadingsBatch');
    const ids = await post(unit.id);
    assert.equal(new Set(ids).size, 12, 'twelve distinct ids');
    await batches.waitFor((l) => batchReadings(l.filter((b) => b.unitId === unit.id)).length >= 12, 2 * WINDOW_MS,
      'all 12 readings in batches');
    await sleep(WINDOW_MS);
    const mine = batches.forUnit(unit.id);
    for (const b of mine) {
      assertBatchShape(b, unit.id);
      assert.ok(b.count <= 5, `at most 5 readings per event, got ${b.count}`);
    }
    assert.ok(mine.length >= 3, `12 readings with a cap of 5 need at least 3 events, got ${mine.length}`);
    assertEachOnce(batchReadings(mine), ids, 'split batches');
    assert.equal(batchReadings(mine).length, 12, 'no reading dropped or repeated');
  }

  it('12 readings of one unit in one request arrive as several events of at most 5, together all 12, each once', async () => {
    await checkSplit(async (unitId) => {
      const sent = Array.from({ length: 12 }, (_, i) => reading(unitId, 4 + i / 100));
      return (await ingestOk(gw, admin, sent)).ids;
    });
  });

  it('12 readings of one unit in 12 concurrent requests arrive split at 5 per event, none dropped', async () => {
    await checkSplit(async (unitId) => {
      const sent = Array.from({ length: 12 }, (_, i) => reading(unitId, 4 + i / 100));
      const answers = await Promise.all(sent.map((r) => ingestOk(gw, admin, [r])));
      return answers.map((a) => a.ids[0]);
    });
  });
});
