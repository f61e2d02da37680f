// `sync:complete { recovered: false }` on a live connection, in the browser: the gateway tells a
// connected socket — no reconnect — that it missed events it cannot replay; the tab refetches
// through REST, keeping its socket and its rooms, and forgets the offset it had.
//
// The gateway cannot be made to do that on demand from outside, so the test stands between each
// tab and the gateway with Playwright's `routeWebSocket` (no test hook in the app): it passes every
// frame through, except that while a "hole" is open it drops the event frames the gateway sends
// (the tab misses them, as a socket that fell behind would), and then hands the tab
// `42["sync:complete",{"recovered":false}]` as the gateway would.

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

/** An engine.io "message" carrying a socket.io EVENT: `42["name",…]`. */
const EVENT_FRAME = /^42\[/;

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close().catch(() => {});
});

/**
 * A tab whose WebSocket goes through the test. `sockets` are its WebSocket connections (one per
 * socket.io connection once upgraded); `received` every socket.io frame it got (WebSocket or
 * long-polling); `connects` the CONNECT packets it sent (`40{…auth…}`); `sent` its WebSocket
 * frames; `apiRequests` the paths of its REST calls.
 */
async function openTab(label) {
  const p = await openPage(browser, label);
  const tab = Object.assign(p, {
    label,
    hole: false,
    dropped: [],
    received: [],
    sent: [],
    connects: [],
    apiRequests: [],
    sockets: [],
  });
  await p.page.routeWebSocket(/\/socket\.io\//, (ws) => {
    const server = ws.connectToServer();
    const conn = { ws, server, upgraded: false, closed: false };
    tab.sockets.push(conn);
    ws.onMessage((m) => {
      const f = String(m);
      tab.sent.push(f);
      if (f === '5') conn.upgraded = true;
      if (f.startsWith('40')) tab.connects.push(f);
      server.send(m);
    });
    server.onMessage((m) => {
      const f = String(m);
      if (tab.hole && EVENT_FRAME.test(f)) {
        tab.dropped.push(f);
        return;
      }
      tab.received.push(f);
      ws.send(m);
    });
    ws.onClose(() => {
      conn.closed = true;
      server.close();
    });
    server.onClose(() => {
      conn.closed = true;
      ws.close();
    });
  });
  p.page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.pathname.startsWith('/api/')) tab.apiRequests.push(url.pathname);
    if (url.pathname.startsWith('/socket.io/') && req.method() === 'POST') {
      for (const f of (req.postData() ?? '').split('\x1e')) if (f.startsWith('40')) tab.connects.push(f);
    }
  });
  p.page.on('response', async (res) => {
    if (!res.url().includes('/socket.io/') || res.request().method() !== 'GET') return;
    tab.received.push(...(await res.text().catch(() => '')).split('\x1e'));
  });
  return tab;
}

/** The payloads of the `sync:complete` events a tab received (from the gateway or the test). */
const syncs = (tab) =>
  tab.received.map((f) => /^42\["sync:complete",(.*)\]$/.exec(f)).filter(Boolean).map((m) => JSON.parse(m[1]));

/** The `offset` of the last org event a tab received. */
function lastOffsetOf(tab) {
  for (let i = tab.received.length - 1; i >= 0; i--) {
    const m = /^42\["[^"]+",\{.*"offset":"([^"]+)"/.exec(tab.received[i]);
    if (m && !tab.received[i].startsWith('42["sync:complete"')) return m[1];
  }
  return undefined;
}

/** The tab's current socket.io connection, once it runs over the WebSocket (after the upgrade). */
async function liveSocket(tab) {
  return waitUntil(
    () => {
      const c = tab.sockets.at(-1);
      return c && c.upgraded && !c.closed ? c : null;
    },
    { timeout: 10_000, message: `[${tab.label}] a socket upgraded to WebSocket` },
  );
}

/** What a tab's connection looks like now: to compare before and after. */
const mark = (tab) => ({
  sockets: tab.sockets.length,
  connects: tab.connects.length,
  subscribes: tab.sent.filter((f) => /^42\d*\["subscribe:/.test(f)).length,
  requests: tab.apiRequests.length,
  syncs: syncs(tab).length,
  received: tab.received.length,
});

/** The gateway, the dashboard and fridge-1's detail page, both live over WebSocket. */
async function setup() {
  const gw = new Gateway();
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

  const dash = await openTab('dashboard');
  const detail = await openTab('detail');
  await dash.page.goto(`${gw.url}/#token=${token}`);
  await detail.page.goto(`${gw.url}/units/fridge-1#token=${token}`);
  const tabs = [dash, detail];
  for (const { page } of tabs) await waitForAttr(page, 'connection-status', 'data-state', 'connected', 10_000);
  await dash.page.locator(byTestId('unit-card-fridge-1')).waitFor({ timeout: 5000 });
  await waitForAttr(detail.page, 'unit-chart', 'data-points', '10', 5000);
  await detail.page.waitForSelector('.live-tag[data-live="true"]', { timeout: 5000 });
  for (const t of tabs) await liveSocket(t);

  // Live: a reading reaches both tabs over the WebSocket (and gives them an offset).
  await gw.ingest([{ unitId: 'fridge-1', temperature: 3.9 }]);
  for (const { page } of tabs) await waitForText(page, 'unit-temp-fridge-1', '3.9 °C', 3000);
  await waitForAttr(detail.page, 'unit-chart', 'data-points', '11', 3000);
  for (const t of tabs) {
    await waitUntil(() => lastOffsetOf(t), { message: `[${t.label}] an event with an offset` });
  }
  return { gw, tabs, dash, detail };
}

/**
 * Opens the hole, runs `during` (which changes things on the gateway), waits until each tab has
 * missed the frames `missed(frame)` looks for, closes the hole. The tabs must not have noticed.
 */
async function hole(tabs, during, missed) {
  for (const t of tabs) t.dropped.length = 0;
  for (const t of tabs) t.hole = true;
  const before = tabs.map((t) => t.apiRequests.length);
  await during();
  for (const t of tabs) {
    await waitUntil(() => missed(t.dropped), { timeout: 5000, message: `[${t.label}] the gateway sent what it missed` });
  }
  await sleep(300);
  for (const t of tabs) t.hole = false;
  for (const [i, t] of tabs.entries()) {
    assert.deepEqual(t.apiRequests.slice(before[i]), [], `[${t.label}] REST requests while the events were missed`);
  }
}

/** Closes the tab's WebSocket (both ends), as a dropped connection would. */
async function dropConnection(tab) {
  const conn = await liveSocket(tab);
  conn.closed = true;
  conn.ws.close();
  conn.server.close();
}

/** Hands the tab a `sync:complete` on its live socket, as the gateway would. */
async function deliverSync(tab, payload) {
  const conn = await liveSocket(tab);
  const frame = `42${JSON.stringify(['sync:complete', payload])}`;
  tab.received.push(frame);
  conn.ws.send(frame);
}

function assertSameConnection(tab, m) {
  assert.equal(tab.sockets.length, m.sockets, `[${tab.label}] a new WebSocket: the tab reconnected`);
  assert.equal(tab.sockets.at(-1).closed, false, `[${tab.label}] its WebSocket closed`);
  assert.equal(tab.connects.length, m.connects, `[${tab.label}] a new CONNECT: the tab reconnected`);
  const subscribes = tab.sent.filter((f) => /^42\d*\["subscribe:/.test(f)).length;
  assert.equal(subscribes, m.subscribes, `[${tab.label}] subscribed again: its rooms were left or lost`);
}

function assertNoConsoleErrors(tabs) {
  const errors = tabs.flatMap((p) => p.console.errors);
  assert.deepEqual(errors, [], `console errors:\n${errors.join('\n')}`);
}

describe('sync:complete { recovered: false } on a live connection', () => {
  let ctx;
  before(async () => {
    ctx = await setup();
  });
  after(async () => {
    for (const p of ctx?.tabs ?? []) await p.context.close().catch(() => {});
    await ctx?.gw.dispose();
  });

  it('refetches what the tabs show through REST, on the same socket, in the same rooms', async () => {
    const { gw, tabs, dash, detail } = ctx;
    // Fridge-1 goes out of range while neither tab gets the events: batches, the alert, the status.
    await hole(
      tabs,
      async () => {
        await gw.ingest([
          { unitId: 'fridge-1', temperature: 4.6 },
          { unitId: 'fridge-1', temperature: 6.2 },
        ]);
        await sleep(700);
        await gw.ingest([
          { unitId: 'fridge-1', temperature: 7.4 },
          { unitId: 'fridge-1', temperature: 8.8 },
        ]);
      },
      (dropped) =>
        dropped.some((f) => f.startsWith('42["alert:triggered"')) &&
        dropped.some((f) => f.startsWith('42["unit:status"')) &&
        dropped.some((f) => f.startsWith('42["sensor:readings:batch"') && f.includes('"temperature":8.8')),
    );
    // The tabs missed it all.
    for (const { page } of tabs) {
      await waitForText(page, 'unit-temp-fridge-1', '3.9 °C', 1000);
      await waitForAttr(page, 'alert-count', 'data-count', '0', 1000);
    }
    await waitForAttr(detail.page, 'unit-chart', 'data-points', '11', 1000);

    const marks = tabs.map(mark);
    for (const t of tabs) await deliverSync(t, { recovered: false });

    // Each tab reads again what it shows, and ends up as the gateway stores it.
    for (const { page } of tabs) {
      const toast = page.locator('[data-testid^="toast-"][role="alert"]');
      await toast.first().waitFor({ timeout: 5000 });
      assert.equal(await toast.count(), 1, 'one toast');
      assert.match(await toast.first().textContent(), /6\.2 °C/, 'the toast shows the reading that opened the alert');
      await waitForText(page, 'unit-temp-fridge-1', '8.8 °C', 5000);
      await waitForText(page, 'unit-status-fridge-1', 'excursion', 5000);
      await waitForAttr(page, 'alert-count', 'data-count', '1', 5000);
    }
    const stored = await gw.api('GET', '/api/units/fridge-1/readings?limit=60');
    assert.equal(stored.length, 15);
    await waitForAttr(detail.page, 'unit-chart', 'data-points', String(stored.length), 5000);
    const newest = stored.slice(-15).reverse().map((r) => `${r.temperature.toFixed(1)} °C`);
    const rows = await detail.page.locator(`${byTestId('recent-readings')} tbody tr td:nth-child(2)`).allTextContents();
    assert.deepEqual(rows, newest, 'the recent readings are the stored ones');

    for (const [i, t] of tabs.entries()) {
      const requests = t.apiRequests.slice(marks[i].requests);
      assert.ok(requests.includes('/api/units'), `[${t.label}] refetched /api/units: ${JSON.stringify(requests)}`);
      assert.ok(requests.includes('/api/alerts'), `[${t.label}] refetched /api/alerts: ${JSON.stringify(requests)}`);
    }
    assert.ok(
      detail.apiRequests.slice(marks[1].requests).includes('/api/units/fridge-1/readings'),
      'the detail tab refetched the chart readings',
    );
    // …without a reconnect: same WebSocket, no CONNECT, no re-subscribe, never left "connected".
    for (const [i, t] of tabs.entries()) {
      assertSameConnection(t, marks[i]);
      await waitForAttr(t.page, 'connection-status', 'data-state', 'connected', 100);
    }
    await screenshot(dash.page, 'resync-dashboard');
    await screenshot(detail.page, 'resync-detail');

    // Still live, and the detail tab still in fridge-1's room (its `sensor:reading` stream).
    const live = mark(detail);
    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.2 }]);
    for (const { page } of tabs) {
      await waitForText(page, 'unit-temp-fridge-1', '3.2 °C', 3000);
      await waitForText(page, 'unit-status-fridge-1', 'ok', 3000);
      await waitForAttr(page, 'alert-count', 'data-count', '0', 3000);
      await page.locator('[data-testid^="toast-"]').first().waitFor({ state: 'detached', timeout: 3000 });
    }
    await waitForAttr(detail.page, 'unit-chart', 'data-points', String(stored.length + 1), 3000);
    await waitUntil(
      () => detail.received.slice(live.received).some((f) => f.startsWith('42["sensor:reading"') && f.includes('"temperature":3.2')),
      { message: "the unit room's sensor:reading after the resync" },
    );
    for (const [i, t] of tabs.entries()) assertSameConnection(t, marks[i]);
    assertNoConsoleErrors(tabs);
  });

  it('drops the offset: a reconnect before the next event sends none and refetches; the next event gives a new one', async () => {
    const { gw, tabs, dash } = ctx;
    const preHole = lastOffsetOf(dash);
    assert.ok(preHole);
    await hole(
      [dash],
      () => gw.ingest([{ unitId: 'fridge-2', temperature: 5.1 }]),
      (dropped) => dropped.some((f) => f.startsWith('42["sensor:readings:batch"') && f.includes('"temperature":5.1')),
    );
    await deliverSync(dash, { recovered: false });
    await waitForText(dash.page, 'unit-temp-fridge-2', '5.1 °C', 5000);

    // The connection drops (the test closes the WebSocket): socket.io-client reconnects by itself.
    dash.console.expectNetworkErrors = true;
    let m = mark(dash);
    await dropConnection(dash);
    await waitUntil(() => dash.connects.length > m.connects, { timeout: 10_000, message: 'a reconnect' });
    await waitForAttr(dash.page, 'connection-status', 'data-state', 'connected', 10_000);
    const connect = JSON.parse(dash.connects.at(-1).slice(2));
    assert.equal(typeof connect.token, 'string');
    assert.equal(connect.offset, undefined, `the handshake after recovered: false carried the offset from before the hole (${preHole})`);
    // No offset sent: no sync:complete to wait for; the tab refetched on connect.
    await waitUntil(() => dash.apiRequests.slice(m.requests).includes('/api/units'), { message: 'the refetch on connect' });
    await sleep(500);
    assert.equal(syncs(dash).length, m.syncs, 'no sync:complete after a handshake without an offset');
    await liveSocket(dash);

    // The next event gives the tab an offset to come back with, and the gateway recovers from it.
    await gw.ingest([{ unitId: 'fridge-2', temperature: 4.8 }]);
    await waitForText(dash.page, 'unit-temp-fridge-2', '4.8 °C', 3000);
    const fresh = lastOffsetOf(dash);
    assert.ok(fresh && fresh !== preHole);
    m = mark(dash);
    await dropConnection(dash);
    await waitUntil(() => dash.connects.length > m.connects, { timeout: 10_000, message: 'a second reconnect' });
    assert.equal(JSON.parse(dash.connects.at(-1).slice(2)).offset, fresh);
    await waitUntil(() => syncs(dash).length > m.syncs, { message: 'sync:complete after the second reconnect' });
    const after = syncs(dash).slice(m.syncs);
    assert.ok(after.length === 1 && after[0].recovered === true && typeof after[0].offset === 'string', JSON.stringify(after));
    await waitForAttr(dash.page, 'connection-status', 'data-state', 'connected', 5000);
    await sleep(500);
    assert.deepEqual(dash.apiRequests.slice(m.requests), [], 'REST requests after a recovered reconnect');
    dash.console.expectNetworkErrors = false;
    assertNoConsoleErrors(tabs);
  });

  it('recovered: true without a reconnect is harmless: no refetch, same socket and rooms, still live', async () => {
    const { gw, tabs, detail } = ctx;
    await liveSocket(detail);
    const offset = lastOffsetOf(detail);
    let m = mark(detail);
    await deliverSync(detail, { recovered: true, offset });
    await deliverSync(detail, { recovered: true });
    // Still live, in its room (frames arrive in order: these come after the two above).
    const points = Number(await detail.page.locator(byTestId('unit-chart')).getAttribute('data-points'));
    await gw.ingest([{ unitId: 'fridge-1', temperature: 3.4 }]);
    await waitForText(detail.page, 'unit-temp-fridge-1', '3.4 °C', 3000);
    await waitForAttr(detail.page, 'unit-chart', 'data-points', String(Math.min(points + 1, 60)), 3000);
    await sleep(500);
    assert.deepEqual(detail.apiRequests.slice(m.requests), [], 'REST requests after recovered: true');
    assertSameConnection(detail, m);

    // The offset stays the last event's: a reconnect recovers from it, without REST.
    const fresh = lastOffsetOf(detail);
    assert.ok(fresh && fresh !== offset);
    detail.console.expectNetworkErrors = true;
    m = mark(detail);
    await dropConnection(detail);
    await waitUntil(() => detail.connects.length > m.connects, { timeout: 10_000, message: 'a reconnect' });
    assert.equal(JSON.parse(detail.connects.at(-1).slice(2)).offset, fresh);
    await waitUntil(() => syncs(detail).length > m.syncs, { message: 'sync:complete after the reconnect' });
    assert.equal(syncs(detail).at(-1).recovered, true);
    await waitForAttr(detail.page, 'connection-status', 'data-state', 'connected', 5000);
    await sleep(500);
    assert.deepEqual(detail.apiRequests.slice(m.requests), [], 'REST requests after a recovered reconnect');
    detail.console.expectNetworkErrors = false;
    assertNoConsoleErrors(tabs);
  });
});
