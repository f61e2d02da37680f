// Missed events after a reconnect, in the browser: Chromium goes offline (DevTools network
// emulation) while a unit goes out of range; back online, the tabs catch up from the offset they
// kept — the toast, the card and every reading in the chart, without refetching through REST — or,
// when the offset is older than the gateway's retention, by refetching.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  Gateway,
  byTestId,
  launchBrowser,
  mintToken,
  openPage,
  screenshot,
  sleep,
  waitForAttr,
  waitForText,
  waitUntil,
} from './helpers.js';

const SITE = { id: 'store-north', name: 'North Street Store' };
const UNITS = [
  { id: 'fridge-1', siteId: 'store-north', name: 'Dairy fridge', tempMin: 0, tempMax: 5 },
  { id: 'fridge-2', siteId: 'store-north', name: 'Produce cooler', tempMin: 1, tempMax: 6 },
];

// How the tabs notice that they are offline. Chromium's offline emulation (what `setOffline` and
// CDP `Network.emulateNetworkConditions { offline: true }` do) does NOT close an open WebSocket: it
// holds its frames and delivers them once back online. It does fire the page's `offline` event,
// on which socket.io-client closes its transport at once — but only when the page's host is not
// `localhost`. So the dashboard tab (127.0.0.1) is cut by the `offline` event, and the detail tab is
// opened on `localhost`, where only the heartbeat notices: with the gateway's pings every 1 s and a
// 1 s timeout, the client gives the connection up within ~2 s without a ping (the default, 25 s +
// 20 s, would outlast the outage, and the held frames would simply arrive late).
const HEARTBEAT = { SOCKET_PING_INTERVAL_MS: '1000', SOCKET_PING_TIMEOUT_MS: '1000' };

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close().catch(() => {});
});

/**
 * A gateway seeded with one site, two units and some history, and two tabs: the dashboard
 * (127.0.0.1) and fridge-1's detail page (localhost), both live.
 */
async function setup(env) {
  const gw = new Gateway({ env: { ...HEARTBEAT, ...env } });
  await gw.start();
  await gw.createSite(SITE);
  for (const u of UNITS) await gw.createUnit(u);
  const t0 = Date.now() - 10 * 60_000;
  const history = [];
  for (let i = 0; i < 10; i++) {
    history.push({ unitId: 'fridge-1', temperature: 3 + (i % 3) / 10, recordedAt: new Date(t0 + i * 60_000).toISOString() });
    history.push({ unitId: 'fridge-2', temperature: 4, recordedAt: new Date(t0 + i * 60_000 + 1).toISOString() });
  }
  await gw.api('POST', '/api/readings/ingest', { readings: history });
  const token = mintToken(gw.secret, { sub: 'viewer-1', org: 'acme', role: 'viewer' });

  const tabs = [];
  for (const [label, url] of [
    ['dashboard', `${gw.url}/`],
    ['detail', `http://localhost:${gw.port}/units/fridge-1`],
  ]) {
    const p = await openPage(browser, label);
    Object.assign(p, observe(p.page), { label });
    await p.page.goto(`${url}#token=${token}`);
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    tabs.push(p);
  }
  const [dash, detail] = tabs;
  await dash.page.locator(byTestId('unit-card-fridge-1')).waitFor({ timeout: 5000 });
  await waitForAttr(detail.page, 'unit-chart', 'data-points', '10', 5000);
  await detail.page.waitForSelector('.live-tag[data-live="true"]', { timeout: 5000 });

  // Live: a reading reaches both tabs (and gives them an offset to come back with).
  await gw.ingest([{ unitId: 'fridge-1', temperature: 3.9 }]);
  for (const { page } of tabs) await waitForText(page, 'unit-temp-fridge-1', '3.9 °C', 3000);
  await waitForAttr(detail.page, 'unit-chart', 'data-points', '11', 3000);
  for (const p of tabs) {
    await waitUntil(() => p.received.some((f) => /^42\["sensor:readings:batch",\{.*"offset":"/.test(f)), {
      message: `[${p.label}] a batch with an offset`,
    });
  }
  return { gw, tabs, dash, detail };
}

/** What a page receives on its socket (WebSocket or long-polling frames) and its REST calls. */
function observe(page) {
  const received = [];
  const apiRequests = [];
  page.on('websocket', (ws) => ws.on('framereceived', (f) => received.push(String(f.payload))));
  page.on('response', async (res) => {
    if (!res.url().includes('/socket.io/') || res.request().method() !== 'GET') return;
    received.push(...(await res.text().catch(() => '')).split('\x1e'));
  });
  page.on('request', (req) => {
    if (new URL(req.url()).pathname.startsWith('/api/')) apiRequests.push(new URL(req.url()).pathname);
  });
  return {
    received,
    apiRequests,
    /** The payloads of the `sync:complete` events received so far. */
    syncs: () =>
      received.map((f) => /^42\["sync:complete",(.*)\]$/.exec(f)).filter(Boolean).map((m) => JSON.parse(m[1])),
  };
}

/**
 * Takes the tabs offline, runs `whileOffline`, waits `extraMs`, and brings them back. Returns the
 * readings posted meanwhile (as the gateway stored them).
 */
async function offlineWhile(tabs, whileOffline, extraMs = 0) {
  for (const p of tabs) p.console.expectNetworkErrors = true; // failed reconnect attempts
  for (const p of tabs) await p.context.setOffline(true);
  // The socket notices: the indicator leaves "connected" (the `offline` event, or the heartbeat).
  for (const { page } of tabs) {
    await waitForAttr(page, 'connection-status', 'data-state', ['disconnected', 'connecting'], 5000);
  }
  await whileOffline();
  // The gateway has flushed the batches (FLUSH_INTERVAL_MS=500) while the tabs were away.
  await sleep(1200 + extraMs);
  await screenshot(tabs[0].page, 'recovery-offline');
  const marks = tabs.map((p) => ({ requests: p.apiRequests.length, syncs: p.syncs().length }));
  for (const p of tabs) await p.context.setOffline(false);
  for (const { page } of tabs) await waitForAttr(page, 'connection-status', 'data-state', 'connected', 15_000);
  return marks;
}

/** Four readings in two posts (two flush windows): in range, then out of range, rising. */
async function excursion(gw) {
  const a = await gw.ingest([
    { unitId: 'fridge-1', temperature: 4.6 },
    { unitId: 'fridge-1', temperature: 6.2 },
  ]);
  await sleep(700);
  const b = await gw.ingest([
    { unitId: 'fridge-1', temperature: 7.4 },
    { unitId: 'fridge-1', temperature: 8.8 },
  ]);
  return [...a.ids, ...b.ids];
}

/** The end state both tabs must reach: toast, status, temperature; the chart has every reading. */
async function assertCaughtUp(gw, { dash, detail }) {
  for (const { page } of [dash, detail]) {
    const toast = page.locator('[data-testid^="toast-"][role="alert"]');
    await toast.first().waitFor({ timeout: 5000 });
    assert.equal(await toast.count(), 1, 'one toast');
    const text = await toast.first().textContent();
    assert.match(text, /Dairy fridge/);
    assert.match(text, /critical/i);
    assert.match(text, /6\.2 °C/, 'the toast shows the reading that opened the alert');
    await waitForText(page, 'unit-status-fridge-1', 'excursion', 5000);
    await waitForText(page, 'unit-temp-fridge-1', '8.8 °C', 5000);
    await waitForAttr(page, 'alert-count', 'data-count', '1', 5000);
  }
  // The chart: exactly the stored readings, every one posted while offline included, no gap.
  const stored = await gw.api('GET', '/api/units/fridge-1/readings?limit=60');
  await waitForAttr(detail.page, 'unit-chart', 'data-points', String(stored.length), 5000);
  const newest = stored.slice(-15).reverse().map((r) => `${r.temperature.toFixed(1)} °C`);
  const rows = await detail.page.locator(`${byTestId('recent-readings')} tbody tr td:nth-child(2)`).allTextContents();
  assert.deepEqual(rows, newest, 'the recent readings are the stored ones');
}

function assertNoConsoleErrors(tabs) {
  const errors = tabs.flatMap((p) => p.console.errors);
  assert.deepEqual(errors, [], `console errors:\n${errors.join('\n')}`);
}

describe('back online within the retention window', () => {
  let ctx;
  before(async () => {
    ctx = await setup({});
  });
  after(async () => {
    for (const p of ctx?.tabs ?? []) await p.context.close().catch(() => {});
    await ctx?.gw.dispose();
  });

  it('replays what the tabs missed: toast, card, every reading in the chart, no REST refetch', async () => {
    const { gw, tabs, dash, detail } = ctx;
    let ids;
    const marks = await offlineWhile(tabs, async () => {
      ids = await excursion(gw);
    });
    await assertCaughtUp(gw, ctx);
    for (const p of tabs) p.console.expectNetworkErrors = false;
    assert.equal(ids.length, 4);

    // The gateway recovered them from the offset the tab sent…
    for (const [i, p] of tabs.entries()) {
      const syncs = p.syncs().slice(marks[i].syncs);
      // (One reconnect, normally; a tab that needed two must have recovered both times.)
      assert.ok(syncs.length >= 1, `[${p.label}] no sync:complete after the reconnect`);
      for (const s of syncs) {
        assert.equal(s.recovered, true, `[${p.label}] sync:complete ${JSON.stringify(s)}`);
        assert.equal(typeof s.offset, 'string', `[${p.label}] sync:complete ${JSON.stringify(s)}`);
      }
    }
    // …so neither tab read anything again through REST.
    await sleep(500);
    for (const [i, p] of tabs.entries()) {
      assert.deepEqual(p.apiRequests.slice(marks[i].requests), [], `[${p.label}] REST requests after the reconnect`);
    }
    await screenshot(detail.page, 'recovery-detail');
    await screenshot(dash.page, 'recovery-dashboard');

    // Still live afterwards, and the alert resolves.
    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.2 }]);
    for (const { page } of tabs) {
      await waitForText(page, 'unit-status-fridge-1', 'ok', 3000);
      await waitForAttr(page, 'alert-count', 'data-count', '0', 3000);
      await page.locator('[data-testid^="toast-"]').first().waitFor({ state: 'detached', timeout: 3000 });
    }
    assertNoConsoleErrors(tabs);
  });

  it('a second blip recovers from the offset of the first replay (no event twice, none missed)', async () => {
    const { gw, tabs, dash, detail } = ctx;
    const before = await gw.api('GET', '/api/units/fridge-1/readings?limit=60');
    const marks = await offlineWhile(tabs, async () => {
      await gw.ingest([{ unitId: 'fridge-1', temperature: 4.4 }]);
      await gw.ingest([{ unitId: 'fridge-2', temperature: 5.1 }]);
    });
    for (const { page } of tabs) await waitForText(page, 'unit-temp-fridge-1', '4.4 °C', 5000);
    await waitForText(dash.page, 'unit-temp-fridge-2', '5.1 °C', 5000);
    await waitForAttr(detail.page, 'unit-chart', 'data-points', String(before.length + 1), 5000);
    for (const p of tabs) p.console.expectNetworkErrors = false;
    for (const [i, p] of tabs.entries()) {
      const syncs = p.syncs().slice(marks[i].syncs);
      assert.ok(syncs.length >= 1 && syncs.every((s) => s.recovered === true), `[${p.label}] ${JSON.stringify(syncs)}`);
    }
    await sleep(500);
    for (const [i, p] of tabs.entries()) assert.deepEqual(p.apiRequests.slice(marks[i].requests), []);
    assertNoConsoleErrors(tabs);
  });
});

describe('back online after the retention window (RECOVERY_WINDOW_SECS=1)', () => {
  let ctx;
  before(async () => {
    ctx = await setup({ RECOVERY_WINDOW_SECS: '1' });
  });
  after(async () => {
    for (const p of ctx?.tabs ?? []) await p.context.close().catch(() => {});
    await ctx?.gw.dispose();
  });

  it('recovered: false → the tabs refetch through REST and end up the same', async () => {
    const { gw, tabs } = ctx;
    // Offline for about 4 s: the offset the tabs kept is older than the 1 s window by then.
    const marks = await offlineWhile(tabs, () => excursion(gw), 2000);
    await assertCaughtUp(gw, ctx);
    for (const p of tabs) p.console.expectNetworkErrors = false;
    for (const [i, p] of tabs.entries()) {
      const syncs = p.syncs().slice(marks[i].syncs);
      assert.ok(syncs.length >= 1 && syncs.every((s) => s.recovered === false), `[${p.label}] sync:complete after the reconnect: ${JSON.stringify(syncs)}`);
      const requests = p.apiRequests.slice(marks[i].requests);
      assert.ok(requests.includes('/api/units'), `[${p.label}] refetched /api/units: ${JSON.stringify(requests)}`);
      assert.ok(requests.includes('/api/alerts'), `[${p.label}] refetched /api/alerts: ${JSON.stringify(requests)}`);
    }
    assert.ok(
      ctx.detail.apiRequests.slice(marks[1].requests).includes('/api/units/fridge-1/readings'),
      'the detail tab refetched the readings',
    );
    assertNoConsoleErrors(tabs);
  });
});
