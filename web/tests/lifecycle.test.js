// Issue 17's dashboard in Chromium against the real gateway: the alerts view (history after an
// excursion resolves, its CSV export, acknowledging in one tab and seeing it in another, paging),
// the chart's time ranges, toasts that never cover the current reading, the phone layout, and
// what the page says about who is signed in, active alerts and a lost connection.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';

import {
  Gateway,
  attrOf,
  byTestId,
  launchBrowser,
  mintToken,
  screenshot,
  sleep,
  textOf,
  waitForAttr,
  waitForText,
  waitUntil,
  watchConsole,
} from './helpers.js';

const SITE = { id: 'store-1', name: 'Store 1' };
const UNITS = [
  { id: 'fridge-1', siteId: 'store-1', name: 'Dairy fridge', tempMin: 0, tempMax: 5 },
  { id: 'fridge-2', siteId: 'store-1', name: 'Produce cooler', tempMin: 1, tempMax: 6 },
  { id: 'freezer-1', siteId: 'store-1', name: 'Ice cream freezer', tempMin: -25, tempMax: -15 },
  { id: 'chiller-1', siteId: 'store-1', name: 'Meat chiller', tempMin: 0, tempMax: 4 },
].map((u) => ({ ...u, offlineAfterSeconds: 3600 })); // no offline alert while the suite runs
const MINUTE = 60_000;

describe('alert lifecycle and layout (Chromium, real gateway)', () => {
  /** @type {Gateway} */
  let gw;
  let browser;
  const opened = [];
  let operatorToken;
  let viewerToken;

  async function open(label, { token = operatorToken, path = '/', viewport = { width: 1440, height: 900 } } = {}) {
    const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
    const page = await context.newPage();
    const p = { context, page, console: watchConsole(page, label) };
    opened.push(p);
    await page.goto(`${gw.url}${path}#token=${token}`);
    await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
    return p;
  }

  /** No console errors in any tab of the test; then the tabs are closed. */
  async function done() {
    const errors = opened.flatMap((p) => p.console.errors);
    for (const p of opened.splice(0)) await p.context.close().catch(() => {});
    assert.deepEqual(errors, [], `console errors:\n${errors.join('\n')}`);
  }

  /** An excursion of `unitId` at `high`, resolved when `back` is given; returns the alert's id. */
  async function excursion(unitId, high, back) {
    await gw.ingest([{ unitId, temperature: high }]);
    const alertId = await waitUntil(
      async () => (await gw.api('GET', '/api/alerts?status=active')).find((a) => a.unitId === unitId)?.alertId,
      { timeout: 3000, message: `the alert of ${unitId}` },
    );
    if (back !== undefined) await gw.ingest([{ unitId, temperature: back }]);
    return alertId;
  }

  before(async () => {
    gw = new Gateway();
    await gw.start();
    await gw.createSite(SITE);
    for (const u of UNITS) await gw.createUnit(u);
    // History of fridge-1 over three days (for the chart's ranges): 2 days, 10 h, 40 min, 10 min
    // and 1 min ago, and some recent readings for every unit.
    const now = Date.now();
    const old = [2 * 24 * 60, 10 * 60, 40, 10, 1].map((m, i) => ({
      unitId: 'fridge-1',
      temperature: 2 + i * 0.3,
      recordedAt: new Date(now - m * MINUTE).toISOString(),
    }));
    const recent = [];
    for (const u of UNITS.slice(1)) {
      for (let i = 0; i < 10; i++) {
        const mid = (u.tempMin + u.tempMax) / 2;
        recent.push({ unitId: u.id, temperature: Math.round((mid + Math.sin(i) * 0.8) * 10) / 10, recordedAt: new Date(now - (10 - i) * 30_000).toISOString() });
      }
    }
    await gw.api('POST', '/api/readings/ingest', { readings: [...old, ...recent] });
    operatorToken = mintToken(gw.secret, { sub: 'olivia', org: 'acme', role: 'operator' });
    viewerToken = mintToken(gw.secret, { sub: 'victor', org: 'acme', role: 'viewer' });

    browser = await launchBrowser();
  });

  after(async () => {
    for (const p of opened) await p.context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await gw?.dispose();
  });

  it('the header shows who is signed in and the organisation; the tab title counts active alerts', async () => {
    const { page } = await open('header');
    assert.equal(await textOf(page, 'signed-in-sub'), 'olivia');
    assert.match(await textOf(page, 'signed-in-org'), /^acme/);
    assert.equal(await page.title(), 'sensorwire');
    const alertId = await excursion('fridge-2', 9.1);
    await page.waitForFunction(() => document.title === '(1) sensorwire', null, { timeout: 3000 });
    await gw.ingest([{ unitId: 'fridge-2', temperature: 3.5 }]);
    await page.waitForFunction(() => document.title === 'sensorwire', null, { timeout: 3000 });
    assert.ok(alertId);
    await done();
  });

  it('history: an excursion shows in the past alerts once it resolves, live and after a reload', async () => {
    const { page } = await open('history', { path: '/alerts' });
    await page.locator(byTestId('alerts-tab-resolved')).click();
    const startedAt = Date.now();
    const alertId = await excursion('chiller-1', 7.5);
    await gw.ingest([{ unitId: 'chiller-1', temperature: 9.4 }]); // the peak
    await sleep(1200); // a measurable duration
    await gw.ingest([{ unitId: 'chiller-1', temperature: 2.0 }]);
    // Live: the resolved alert appears in the open "Past" list without a reload.
    const row = page.locator(byTestId(`alert-row-${alertId}`));
    await row.waitFor({ timeout: 3000 });
    await waitForAttr(page, `alert-row-${alertId}`, 'data-status', 'resolved', 3000);
    assert.match(await textOf(page, `alert-duration-${alertId}`), /^\d+ s$/);
    // After a reload (REST): the stored alert, with its duration (and its peak once the gateway
    // reports `peakValue`; the triggering value before).
    await page.reload();
    await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
    await page.locator(byTestId('alerts-tab-resolved')).click();
    await row.waitFor({ timeout: 5000 });
    const stored = (await gw.api('GET', '/api/alerts?status=resolved')).find((a) => a.alertId === alertId);
    assert.ok(stored, 'the gateway lists the resolved alert');
    const seconds = (Date.parse(stored.resolvedAt) - Date.parse(stored.triggeredAt)) / 1000;
    assert.ok(seconds >= 1 && seconds < (Date.now() - startedAt) / 1000 + 1, `duration ${seconds} s`);
    assert.equal(await textOf(page, `alert-duration-${alertId}`), `${Math.round(seconds)} s`);
    const peak = await textOf(page, `alert-peak-${alertId}`);
    assert.equal(peak, '9.4 °C');
    await screenshot(page, 'alerts-history');
    // The auditor's copy: the tab's alerts as CSV, the excursion with its peak among them.
    const [download] = await Promise.all([
      page.waitForEvent('download', { timeout: 5000 }),
      page.locator(byTestId('alerts-export')).click(),
    ]);
    assert.equal(download.suggestedFilename(), 'alerts-resolved.csv');
    const csv = (await readFile(await download.path(), 'utf8')).trim().split('\n');
    assert.match(csv[0], /^alertId,unitId,siteId,alertType,/);
    const line = csv.find((l) => l.startsWith(`${alertId},`));
    assert.ok(line, 'the resolved excursion is in the export');
    assert.match(line, /,9\.4,/);
    await done();
  });

  it('only operators and admins get the Acknowledge action (role from the token)', async () => {
    const alertId = await excursion('freezer-1', -8.0);
    const viewer = await open('viewer', { token: viewerToken, path: '/alerts' });
    const operator = await open('operator', { path: '/alerts' });
    await viewer.page.locator(byTestId(`alert-row-${alertId}`)).waitFor({ timeout: 3000 });
    await operator.page.locator(byTestId(`ack-button-${alertId}`)).waitFor({ timeout: 3000 });
    assert.equal(await viewer.page.locator(byTestId(`ack-button-${alertId}`)).count(), 0);
    // Also on the unit's page.
    await operator.page.goto(`${gw.url}/units/freezer-1`);
    await operator.page.locator(`${byTestId('unit-alerts')} ${byTestId(`ack-button-${alertId}`)}`).waitFor({ timeout: 5000 });
    await gw.ingest([{ unitId: 'freezer-1', temperature: -19 }]);
    await done();
  });

  it('acknowledging in one tab is seen in another at once', async () => {
    const a = await open('ack-a', { path: '/alerts' });
    const b = await open('ack-b', { token: viewerToken, path: '/units/fridge-2' });
    const alertId = await excursion('fridge-2', 8.8);
    const probe = (await gw.api('GET', '/api/alerts?status=active')).find((x) => x.alertId === alertId);
    assert.equal(probe.acknowledgedAt, null, 'an active alert not yet acknowledged');
    await a.page.locator(byTestId(`ack-button-${alertId}`)).click();
    await a.page.locator(byTestId(`ack-note-${alertId}`)).fill('door left open, closed it');
    await a.page.locator(byTestId(`ack-confirm-${alertId}`)).click();
    for (const p of [a.page, b.page]) {
      await waitForText(p, `alert-ack-by-${alertId}`, 'olivia', 3000);
      await waitForText(p, `alert-note-${alertId}`, '“door left open, closed it”', 3000);
      await waitForAttr(p, `alert-row-${alertId}`, 'data-acknowledged', 'true', 3000);
    }
    // The acknowledgement closed no toast; dismissing it in one tab leaves it in the other (no
    // cross-tab dismissal).
    await a.page.locator(byTestId(`toast-${alertId}`)).locator('button[aria-label="Dismiss"]').click();
    await a.page.locator(byTestId(`toast-${alertId}`)).waitFor({ state: 'detached', timeout: 2000 });
    await sleep(500);
    assert.equal(await b.page.locator(byTestId(`toast-${alertId}`)).count(), 1, 'the other tab keeps its toast');
    // Stored: a second acknowledgement is refused, and the alert carries who and the note.
    const stored = (await gw.api('GET', '/api/alerts?status=active')).find((x) => x.alertId === alertId);
    assert.equal(stored.acknowledgedBy, 'olivia');
    assert.equal(stored.note, 'door left open, closed it');
    await screenshot(a.page, 'alert-acknowledged');
    await gw.ingest([{ unitId: 'fridge-2', temperature: 3.0 }]);
    // The acknowledgement stays with the resolved alert.
    await a.page.locator(byTestId('alerts-tab-resolved')).click();
    await waitForText(a.page, `alert-ack-by-${alertId}`, 'olivia', 3000);
    await done();
  });

  it('"Load more" pages through the history by X-Next-Cursor', async () => {
    // 55 short excursions of a unit of its own (the view asks for 50 at a time).
    await gw.createUnit({ id: 'paging-1', siteId: SITE.id, name: 'Paging fridge', tempMin: 0, tempMax: 5, offlineAfterSeconds: 3600 });
    const readings = [];
    const base = Date.now() - 60_000;
    for (let i = 0; i < 55; i++) {
      readings.push({ unitId: 'paging-1', temperature: 9, recordedAt: new Date(base + i * 100).toISOString() });
      readings.push({ unitId: 'paging-1', temperature: 3, recordedAt: new Date(base + i * 100 + 50).toISOString() });
    }
    await gw.api('POST', '/api/readings/ingest', { readings });
    const res = await fetch(`${gw.url}/api/alerts?status=resolved&limit=1`, { headers: { Authorization: `Bearer ${gw.adminToken()}` } });
    assert.ok(res.headers.get('x-next-cursor'), 'more than one page of resolved alerts');
    const { page } = await open('paging', { path: '/alerts' });
    await page.locator(byTestId('alerts-tab-resolved')).click();
    await waitForAttr(page, 'alerts-history', 'data-count', '50', 5000);
    await page.locator(byTestId('alerts-load-more')).click();
    const total = (await gw.api('GET', '/api/alerts?status=resolved&limit=1000')).length;
    await waitForAttr(page, 'alerts-history', 'data-count', String(Math.min(total, 100)), 5000);
    assert.ok(total > 50);
    const times = await page.locator(`${byTestId('alerts-history')} > li`).evaluateAll((els) => els.map((e) => e.dataset.testid));
    assert.equal(new Set(times).size, times.length, 'no alert twice across pages');
    await done();
  });

  it('the chart switches between 15 min, 1 h, 24 h and 7 days, with a tooltip and excursions shaded', async () => {
    const { page } = await open('chart', { path: '/units/fridge-1' });
    await page.locator(byTestId('unit-chart')).waitFor({ timeout: 5000 });
    // Readings 1, 10, 40 min, 10 h and 2 days old (seeded), and the excursion below.
    const alertId = await excursion('fridge-1', 6.5, 3.0);
    const expected = { '15m': 4, '1h': 5, '24h': 6, '7d': 7 }; // + the two readings of the excursion
    for (const [range, n] of Object.entries(expected)) {
      await page.locator(byTestId(`range-${range}`)).click();
      await waitForAttr(page, 'unit-chart', 'data-range', range, 5000);
      await waitForAttr(page, 'unit-chart', 'data-points', String(n), 5000);
      assert.equal(await page.locator(byTestId(`range-${range}`)).getAttribute('aria-pressed'), 'true');
    }
    // The excursion is shaded (from the unit's alerts).
    assert.ok(Number(await attrOf(page, 'unit-chart', 'data-excursions')) >= 1, 'an excursion band');
    assert.ok(alertId);
    // Hovering shows the nearest reading.
    const box = await page.locator(byTestId('unit-chart')).boundingBox();
    await page.mouse.move(box.x + box.width - 20, box.y + box.height / 2);
    await page.locator(byTestId('chart-tooltip')).waitFor({ timeout: 2000 });
    assert.match(await textOf(page, 'chart-tooltip'), /°C/);
    // A live reading joins the chosen range.
    await page.locator(byTestId('range-1h')).click();
    await waitForAttr(page, 'unit-chart', 'data-points', '5', 5000);
    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.3 }]);
    await waitForAttr(page, 'unit-chart', 'data-points', '6', 3000);
    await screenshot(page, 'chart-1h');
    // Back to the live view.
    await page.locator(byTestId('range-live')).click();
    await waitForAttr(page, 'unit-chart', 'data-range', 'live', 2000);
    // The cards show a sparkline.
    await page.goto(`${gw.url}/`);
    await page.locator(`${byTestId('unit-spark-fridge-2')} svg[data-points]`).waitFor({ timeout: 5000 });
    await done();
  });

  it('toasts never cover the current reading (desktop: beside the content); dismissing is per tab', async () => {
    const other = await open('toasts-other');
    const { page } = await open('toasts', { path: '/units/fridge-2' });
    await page.locator(byTestId('unit-temp-fridge-2')).waitFor({ timeout: 5000 });
    const ids = [];
    for (const u of ['fridge-2', 'freezer-1', 'chiller-1']) {
      ids.push(await excursion(u, u === 'freezer-1' ? -5 : 12));
    }
    for (const id of ids) await page.locator(byTestId(`toast-${id}`)).waitFor({ timeout: 3000 });
    await sleep(400); // the slide-in
    const reading = await page.locator(byTestId('unit-temp-fridge-2')).boundingBox();
    const chart = await page.locator(byTestId('unit-chart')).boundingBox();
    for (const id of ids) {
      const toast = await page.locator(byTestId(`toast-${id}`)).boundingBox();
      assert.ok(!overlaps(toast, reading), `toast ${id} covers the current reading: ${JSON.stringify({ toast, reading })}`);
      assert.ok(!overlaps(toast, chart), `toast ${id} covers the chart`);
    }
    // Stacked: no two toasts overlap each other.
    const boxes = await Promise.all(ids.map((id) => page.locator(byTestId(`toast-${id}`)).boundingBox()));
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) assert.ok(!overlaps(boxes[i], boxes[j]));
    // Dismissed in one tab, still shown in the other.
    await other.page.locator(byTestId(`toast-${ids[0]}`)).waitFor({ timeout: 3000 });
    await page.locator(byTestId(`toast-${ids[0]}`)).locator('button[aria-label="Dismiss"]').click();
    await page.locator(byTestId(`toast-${ids[0]}`)).waitFor({ state: 'detached', timeout: 2000 });
    await sleep(300);
    assert.equal(await other.page.locator(byTestId(`toast-${ids[0]}`)).count(), 1, 'the other tab keeps its toast');
    ids.shift();
    // On the dashboard too: no toast over any card's reading.
    await page.locator(byTestId('back-link')).click();
    await page.locator(byTestId('unit-temp-fridge-1')).waitFor({ timeout: 3000 });
    const toastBoxes = await Promise.all(ids.map((id) => page.locator(byTestId(`toast-${id}`)).boundingBox()));
    for (const u of UNITS) {
      const temp = await page.locator(byTestId(`unit-temp-${u.id}`)).boundingBox();
      for (const b of toastBoxes) assert.ok(!overlaps(b, temp), `a toast covers ${u.id}'s reading`);
    }
    await screenshot(page, 'toasts-desktop');
    await gw.ingest([
      { unitId: 'fridge-2', temperature: 3 },
      { unitId: 'freezer-1', temperature: -19 },
      { unitId: 'chiller-1', temperature: 2 },
    ]);
    for (const id of ids) await page.locator(byTestId(`toast-${id}`)).waitFor({ state: 'detached', timeout: 3000 });
    await done();
  });

  it('on a phone: active alerts first, no horizontal scroll, toasts as a bottom sheet, a compact table', async () => {
    const phone = { width: 390, height: 844 };
    const alertId = await excursion('chiller-1', 8.2);
    const { page } = await open('phone', { viewport: phone });
    await page.locator(byTestId(`active-alert-${alertId}`)).waitFor({ timeout: 5000 });
    const alerts = await page.locator(byTestId('active-alerts')).boundingBox();
    const firstCard = await page.locator('[data-testid^="unit-card-"]').first().boundingBox();
    assert.ok(alerts.y + alerts.height <= firstCard.y, 'the active alerts come before the units');
    const noHScroll = () => page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
    assert.ok(await noHScroll(), 'no horizontal scroll on the dashboard');
    // A new alert: its toast is a sheet at the bottom of the screen, the full width.
    const second = await excursion('fridge-2', 11);
    const toast = page.locator(byTestId(`toast-${second}`));
    await toast.waitFor({ timeout: 3000 });
    await sleep(400);
    const sheet = await page.locator('.toasts').boundingBox();
    assert.ok(Math.abs(sheet.y + sheet.height - phone.height) <= 1, `the sheet sits at the bottom: ${JSON.stringify(sheet)}`);
    assert.ok(sheet.width >= phone.width - 1, 'the sheet is the full width');
    assert.ok(sheet.height <= phone.height * 0.45, 'the sheet leaves most of the screen');
    await screenshot(page, 'phone-dashboard');
    // The unit page: readable chart, compact table, no horizontal scroll.
    await page.goto(`${gw.url}/units/chiller-1`);
    await page.locator(byTestId('unit-chart')).waitFor({ timeout: 5000 });
    const chart = await page.locator(byTestId('unit-chart')).boundingBox();
    assert.ok(chart.width >= phone.width - 60, `the chart uses the width: ${chart.width}`);
    assert.ok(chart.height >= 180, `the chart keeps a readable height: ${chart.height}`);
    // Drawn at its own size: the axis labels are not scaled down.
    const label = await page.locator(`${byTestId('unit-chart')} .chart-label`).first().boundingBox();
    assert.ok(label.height >= 10, `axis labels readable: ${label.height}px`);
    assert.ok(await noHScroll(), 'no horizontal scroll on the unit page');
    assert.equal(await page.locator(`${byTestId('recent-readings')} th.col-source`).isVisible(), false, 'the table drops the source column');
    await screenshot(page, 'phone-unit');
    await gw.ingest([
      { unitId: 'chiller-1', temperature: 2 },
      { unitId: 'fridge-2', temperature: 3 },
    ]);
    await done();
  });

  // Last: it stops the gateway.
  it('while disconnected, values are dimmed and the banner says the figures are not live', async () => {
    const p = await open('offline');
    p.console.expectNetworkErrors = true;
    await p.page.locator(byTestId('unit-temp-fridge-2')).waitFor({ timeout: 5000 });
    await gw.stop();
    await waitForAttr(p.page, 'connection-status', 'data-state', ['disconnected', 'connecting'], 10_000);
    await p.page.locator(byTestId('connection-banner')).waitFor({ timeout: 5000 });
    assert.match(await textOf(p.page, 'connection-banner'), /Not connected — the values below are not live\..*last updated/);
    // Dimmed (after a short fade).
    await p.page.waitForFunction(
      (sel) => Number(getComputedStyle(document.querySelector(sel)).opacity) < 0.6,
      byTestId('unit-temp-fridge-2'),
      { timeout: 2000 },
    );
    const last = await p.page.locator(byTestId('unit-last-fridge-2')).evaluate((e) => getComputedStyle(e, '::before').content);
    assert.equal(last, '"last updated "');
    await screenshot(p.page, 'stale');
    await gw.start();
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 15_000);
    await p.page.locator(byTestId('connection-banner')).waitFor({ state: 'detached', timeout: 3000 });
    p.console.expectNetworkErrors = false;
    await done();
  });
});

function overlaps(a, b) {
  return a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
}
