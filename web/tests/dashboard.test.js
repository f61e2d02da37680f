// The dashboard in Chromium against the real gateway: live cards, alerts, detail chart, site
// filter, two tabs, and a gateway restart — with no console errors.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  Gateway,
  attrOf,
  byTestId,
  launchBrowser,
  mintToken,
  openPage,
  screenshot,
  sleep,
  textOf,
  waitForAttr,
  waitForText,
  waitUntil,
} from './helpers.js';

const SITES = [
  { id: 'store-north', name: 'North Street Store' },
  { id: 'dc-south', name: 'South Distribution Centre' },
];
const UNITS = [
  { id: 'fridge-1', siteId: 'store-north', name: 'Dairy fridge', tempMin: 0, tempMax: 5 },
  { id: 'fridge-2', siteId: 'store-north', name: 'Produce cooler', tempMin: 1, tempMax: 6 },
  { id: 'freezer-1', siteId: 'store-north', name: 'Ice cream freezer', tempMin: -25, tempMax: -15 },
  { id: 'coldroom-a', siteId: 'dc-south', name: 'Cold room A', tempMin: 2, tempMax: 8 },
  { id: 'coldroom-b', siteId: 'dc-south', name: 'Cold room B', tempMin: 2, tempMax: 8 },
  { id: 'vaccine-1', siteId: 'dc-south', name: 'Vaccine fridge', tempMin: 2, tempMax: 8 },
];

describe('dashboard (Chromium, real gateway)', () => {
  /** @type {Gateway} */
  let gw;
  let browser;
  let viewerToken;
  const pages = [];

  async function open(label, { token = viewerToken, path = '/' } = {}) {
    const p = await openPage(browser, label);
    pages.push(p);
    await p.page.goto(`${gw.url}${path}${token ? `#token=${token}` : ''}`);
    return p;
  }

  function assertNoConsoleErrors() {
    const errors = pages.flatMap((p) => p.console.errors);
    assert.deepEqual(errors, [], `console errors:\n${errors.join('\n')}`);
  }

  before(async () => {
    gw = new Gateway();
    await gw.start();
    for (const s of SITES) await gw.createSite(s);
    for (const u of UNITS) await gw.createUnit(u);
    // Some history, so the dashboard has something to show.
    const t0 = Date.now() - 20 * 60_000;
    const history = [];
    for (let i = 0; i < 20; i++) {
      const at = (k) => new Date(t0 + i * 60_000 + k).toISOString();
      const wave = Math.sin(i / 3);
      history.push(
        { unitId: 'fridge-1', temperature: round(3 + wave * 0.8), recordedAt: at(1) },
        { unitId: 'fridge-2', temperature: round(4 + wave * 0.6), recordedAt: at(2) },
        { unitId: 'freezer-1', temperature: round(-19 + wave * 1.5), recordedAt: at(3) },
        { unitId: 'coldroom-a', temperature: round(5 + wave), recordedAt: at(4) },
        { unitId: 'coldroom-b', temperature: round(4.2 + wave * 0.4), recordedAt: at(5) },
      );
    }
    await gw.api('POST', '/api/readings/ingest', { readings: history });
    viewerToken = mintToken(gw.secret, { sub: 'viewer-1', org: 'acme', role: 'viewer' });
    browser = await launchBrowser();
  });

  after(async () => {
    for (const p of pages) await p.context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await gw?.dispose();
  });

  it('serves the app at / and connects (the indicator turns green)', async () => {
    const res = await fetch(`${gw.url}/`);
    assert.equal(res.status, 200, 'GET / should serve web/dist/index.html');
    assert.match(await res.text(), /<div id="root">/);

    const { page } = await open('tab-1');
    await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
    assert.equal(await textOf(page, 'connection-status'), 'Connected');
    // The token left the address bar.
    assert.ok(!page.url().includes('token='), `token still in the URL: ${page.url()}`);
    // Cards of every unit, with the last temperature from GET /api/units.
    for (const u of UNITS) await page.locator(byTestId(`unit-card-${u.id}`)).waitFor({ timeout: 5000 });
    assert.equal(await textOf(page, 'unit-temp-vaccine-1'), '—');
    assert.equal(await textOf(page, 'unit-status-vaccine-1'), 'unknown');
    assert.equal(await textOf(page, 'unit-status-fridge-1'), 'ok');
    assert.match(await textOf(page, 'unit-temp-fridge-1'), /^-?\d+\.\d °C$/);
    assert.equal(await attrOf(page, 'active-alerts', 'data-count'), '0');
    await page.evaluate(() => {
      window.__sameDocument = true;
    });
    // Some live movement before the screenshot.
    await gw.ingest([
      { unitId: 'fridge-1', temperature: 3.4 },
      { unitId: 'vaccine-1', temperature: 4.6 },
    ]);
    await waitForText(page, 'unit-temp-vaccine-1', '4.6 °C', 3000);
    await waitForText(page, 'unit-status-vaccine-1', 'ok', 3000);
    await screenshot(page, 'dashboard');
    assertNoConsoleErrors();
  });

  it('a reading posted through the API updates the card within 2 s, without a reload', async () => {
    const { page } = pages[0];
    const before = await textOf(page, 'unit-temp-fridge-1');
    const started = Date.now();
    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.7 }]);
    await waitForText(page, 'unit-temp-fridge-1', '3.7 °C', 2000);
    const took = Date.now() - started;
    assert.notEqual(before, '3.7 °C');
    assert.equal(await page.evaluate(() => window.__sameDocument), true, 'the page was reloaded');
    assert.equal(await textOf(page, 'unit-last-fridge-1'), 'just now');
    console.log(`    card updated ${took} ms after the POST`);
    assertNoConsoleErrors();
  });

  it('an excursion raises a toast and turns the card red; recovery clears both', async () => {
    const { page } = pages[0];
    await gw.ingest([{ unitId: 'fridge-1', temperature: 9.4 }]);
    const toast = page.locator('[data-testid^="toast-"][role="alert"]');
    await toast.first().waitFor({ timeout: 3000 });
    assert.equal(await toast.count(), 1);
    const toastId = await toast.first().getAttribute('data-testid');
    const alertId = toastId.replace(/^toast-/, '');
    const text = await toast.first().textContent();
    assert.match(text, /Dairy fridge/, 'the toast names the unit');
    assert.match(text, /9\.4 °C/);
    await waitForText(page, 'unit-status-fridge-1', 'excursion', 3000);
    await waitForText(page, 'unit-temp-fridge-1', '9.4 °C', 3000);
    await waitForAttr(page, 'active-alerts', 'data-count', '1', 3000);
    await page.locator(byTestId(`active-alert-${alertId}`)).waitFor({ timeout: 3000 });
    await waitForAttr(page, 'alert-count', 'data-count', '1', 3000);
    // The stored alert is the one the toast shows.
    const active = await gw.api('GET', '/api/alerts?status=active');
    assert.deepEqual(active.map((a) => a.alertId), [alertId]);
    await sleep(300); // let the toast's slide-in finish
    await screenshot(page, 'alert-toast');

    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.1 }]);
    await page.locator(byTestId(toastId)).waitFor({ state: 'detached', timeout: 3000 });
    await waitForText(page, 'unit-status-fridge-1', 'ok', 3000);
    await waitForText(page, 'unit-temp-fridge-1', '3.1 °C', 3000);
    await waitForAttr(page, 'active-alerts', 'data-count', '0', 3000);
    await waitForAttr(page, 'alert-count', 'data-count', '0', 3000);
    assertNoConsoleErrors();
  });

  it('a toast can be dismissed by hand', async () => {
    const { page } = pages[0];
    await gw.ingest([{ unitId: 'freezer-1', temperature: -9.5 }]);
    const toast = page.locator('[data-testid^="toast-"]');
    await toast.first().waitFor({ timeout: 3000 });
    await toast.first().locator('button[aria-label="Dismiss"]').click();
    await toast.first().waitFor({ state: 'detached', timeout: 2000 });
    // The alert itself is still active.
    await waitForAttr(page, 'active-alerts', 'data-count', '1', 2000);
    await gw.ingest([{ unitId: 'freezer-1', temperature: -18.5 }]);
    await waitForAttr(page, 'active-alerts', 'data-count', '0', 3000);
    await waitForText(page, 'unit-status-freezer-1', 'ok', 3000);
    assertNoConsoleErrors();
  });

  it('two tabs stay in sync', async () => {
    const a = pages[0].page;
    const { page: b } = await open('tab-2');
    await waitForAttr(b, 'connection-status', 'data-state', 'connected', 10_000);
    await waitForText(b, 'unit-temp-fridge-1', '3.1 °C', 5000);

    await gw.ingest([{ unitId: 'coldroom-a', temperature: 6.6 }]);
    await Promise.all([waitForText(a, 'unit-temp-coldroom-a', '6.6 °C', 2000), waitForText(b, 'unit-temp-coldroom-a', '6.6 °C', 2000)]);

    await gw.ingest([{ unitId: 'coldroom-a', temperature: 11.2 }]);
    for (const p of [a, b]) {
      await p.locator('[data-testid^="toast-"][role="alert"]').first().waitFor({ timeout: 3000 });
      await waitForText(p, 'unit-status-coldroom-a', 'excursion', 3000);
    }
    const idA = await a.locator('[data-testid^="toast-"]').first().getAttribute('data-testid');
    const idB = await b.locator('[data-testid^="toast-"]').first().getAttribute('data-testid');
    assert.equal(idA, idB, 'both tabs show the same alert');

    await gw.ingest([{ unitId: 'coldroom-a', temperature: 5.5 }]);
    for (const p of [a, b]) {
      await p.locator(byTestId(idA)).waitFor({ state: 'detached', timeout: 3000 });
      await waitForText(p, 'unit-status-coldroom-a', 'ok', 3000);
      await waitForText(p, 'unit-temp-coldroom-a', '5.5 °C', 3000);
    }
    assertNoConsoleErrors();
  });

  it('the unit detail view subscribes and its chart gains points from sensor:reading', async () => {
    const { page } = pages[0];
    await page.locator(byTestId('unit-card-fridge-1')).click();
    await waitUntil(async () => new URL(page.url()).pathname === '/units/fridge-1', { message: 'the /units/fridge-1 route' });
    const chart = page.locator(byTestId('unit-chart'));
    await chart.waitFor({ timeout: 5000 });
    const stored = await gw.api('GET', '/api/units/fridge-1/readings?limit=60');
    await waitForAttr(page, 'unit-chart', 'data-points', String(stored.length), 3000);
    const n = stored.length;
    // The live tag turns on once subscribe:unit is acknowledged.
    await page.waitForSelector('.live-tag[data-live="true"]', { timeout: 3000 });

    await gw.ingest([{ unitId: 'fridge-1', temperature: 4.1 }]);
    await waitForAttr(page, 'unit-chart', 'data-points', String(n + 1), 2000);
    await gw.ingest([{ unitId: 'fridge-1', temperature: 4.4 }, { unitId: 'fridge-1', temperature: 4.8 }]);
    await waitForAttr(page, 'unit-chart', 'data-points', String(n + 3), 2000);
    await waitForText(page, 'unit-temp-fridge-1', '4.8 °C', 2000);
    const firstRow = await page.locator(`${byTestId('recent-readings')} tbody tr`).first().textContent();
    assert.match(firstRow, /4\.8 °C/, 'newest reading first in the list');
    await screenshot(page, 'unit-detail');

    // Deep link + reload works (SPA fallback) and the back link returns to the dashboard.
    await page.locator(byTestId('back-link')).click();
    await page.locator(byTestId('unit-card-fridge-1')).waitFor({ timeout: 3000 });
    assert.equal(new URL(page.url()).pathname, '/');
    assertNoConsoleErrors();
  });

  it('a deep link to /units/:id loads (SPA fallback)', async () => {
    const { page } = await open('deep-link', { path: '/units/coldroom-b' });
    await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
    await page.locator(byTestId('unit-chart')).waitFor({ timeout: 5000 });
    assert.equal(await attrOf(page, 'unit-chart', 'data-points'), '20');
    await pages.pop().context.close();
    assertNoConsoleErrors();
  });

  it('the site filter shows only that site’s units', async () => {
    const { page } = pages[0];
    const select = page.locator(byTestId('site-filter'));
    assert.equal(await select.inputValue(), '');
    await select.selectOption('dc-south');
    await page.locator(byTestId('unit-card-fridge-1')).waitFor({ state: 'detached', timeout: 2000 });
    for (const u of UNITS) {
      const count = await page.locator(byTestId(`unit-card-${u.id}`)).count();
      assert.equal(count, u.siteId === 'dc-south' ? 1 : 0, `${u.id} visible: ${count}`);
    }
    // Live updates keep flowing (now also as sensor:reading of the site room).
    await gw.ingest([{ unitId: 'coldroom-b', temperature: 3.3 }]);
    await waitForText(page, 'unit-temp-coldroom-b', '3.3 °C', 2000);
    await select.selectOption('');
    await page.locator(byTestId('unit-card-fridge-1')).waitFor({ timeout: 2000 });
    assertNoConsoleErrors();
  });

  it('survives a gateway restart: disconnected, then connected again without a reload', async () => {
    const tabs = pages.map((p) => p.page);
    for (const p of pages) p.console.expectNetworkErrors = true;
    await gw.stop();
    for (const page of tabs) {
      await waitForAttr(page, 'connection-status', 'data-state', ['disconnected', 'connecting'], 10_000);
    }
    const title = await attrOf(tabs[0], 'connection-status', 'title');
    assert.ok(title && title.length > 0, 'the indicator explains the error in its tooltip');
    await sleep(1500);
    await screenshot(tabs[0], 'disconnected');

    await gw.start(); // same port, same database
    for (const page of tabs) {
      await waitForAttr(page, 'connection-status', 'data-state', 'connected', 15_000);
    }
    for (const p of pages) p.console.expectNetworkErrors = false;
    assert.equal(await tabs[0].evaluate(() => window.__sameDocument), true, 'the page was reloaded');

    await gw.ingest([{ unitId: 'fridge-2', temperature: 5.2 }]);
    for (const page of tabs) await waitForText(page, 'unit-temp-fridge-2', '5.2 °C', 2000);
    // Alerts after the restart still arrive.
    await gw.ingest([{ unitId: 'fridge-2', temperature: 7.9 }]);
    for (const page of tabs) await waitForText(page, 'unit-status-fridge-2', 'excursion', 3000);
    await gw.ingest([{ unitId: 'fridge-2', temperature: 4.0 }]);
    for (const page of tabs) {
      await waitForText(page, 'unit-status-fridge-2', 'ok', 3000);
      await waitForAttr(page, 'active-alerts', 'data-count', '0', 3000);
    }
    assertNoConsoleErrors();
  });

  it('catches up on what happened while the gateway was unreachable', async () => {
    const tabs = pages.map((p) => p.page);
    for (const p of pages) p.console.expectNetworkErrors = true;
    await gw.stop();
    for (const page of tabs) await waitForAttr(page, 'connection-status', 'data-state', ['disconnected', 'connecting'], 10_000);
    // Long enough for socket.io's backoff to reach several seconds, so the tabs are still away
    // when the gateway is back and the reading below is posted: they miss its live events and
    // must pick it up from the REST refetch that follows every (re)connect.
    await sleep(7000);
    await gw.start();
    await gw.ingest([{ unitId: 'coldroom-b', temperature: 12.5 }]);
    const states = await Promise.all(tabs.map((p) => attrOf(p, 'connection-status', 'data-state')));
    console.log(`    tab states when the reading was stored: ${states.join(', ')}`);
    for (const page of tabs) await waitForAttr(page, 'connection-status', 'data-state', 'connected', 15_000);
    for (const p of pages) p.console.expectNetworkErrors = false;
    for (const page of tabs) {
      await waitForText(page, 'unit-temp-coldroom-b', '12.5 °C', 3000);
      await waitForText(page, 'unit-status-coldroom-b', 'excursion', 3000);
      await waitForAttr(page, 'active-alerts', 'data-count', '1', 3000);
    }
    await gw.ingest([{ unitId: 'coldroom-b', temperature: 4.5 }]);
    for (const page of tabs) await waitForAttr(page, 'active-alerts', 'data-count', '0', 3000);
    assertNoConsoleErrors();
  });

  it('without a token it asks for one; a pasted token connects', async () => {
    const p = await open('no-token', { token: null });
    // Not in demo mode: GET /api/demo/token is a 404, which Chromium logs.
    const { page } = p;
    await page.locator(byTestId('token-screen')).waitFor({ timeout: 5000 });
    p.console.errors = p.console.errors.filter((e) => !/Failed to load resource: .* 404/.test(e));
    await page.locator(byTestId('token-input')).fill('not a token');
    await page.getByRole('button', { name: 'Connect' }).click();
    await page.getByText('does not look like a JWT').waitFor({ timeout: 2000 });
    await page.locator(byTestId('token-input')).fill(viewerToken);
    await page.getByRole('button', { name: 'Connect' }).click();
    await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
    await page.locator(byTestId('unit-card-fridge-1')).waitFor({ timeout: 5000 });
    await pages.pop().context.close();
    assertNoConsoleErrors();
  });

  it('a token the gateway refuses sends the user back to the token screen', async () => {
    const wrong = mintToken('another-secret-another-secret-123', { sub: 'x', org: 'acme' });
    const p = await open('bad-token', { token: wrong });
    p.console.expectNetworkErrors = true; // the REST reads answer 401 and the demo token 404
    await p.page.locator(byTestId('token-screen')).waitFor({ timeout: 10_000 });
    await p.page.getByText(/refused|expired/).first().waitFor({ timeout: 2000 }).catch(() => {});
    await pages.pop().context.close();
    assertNoConsoleErrors();
  });
});

function round(x) {
  return Math.round(x * 10) / 10;
}
