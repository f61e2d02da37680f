// Token lifetime in the browser: demo-mode sign-in, renewal with `auth:refresh` before `exp`, and
// what happens when a token runs out and cannot be renewed.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { Gateway, byTestId, launchBrowser, mintToken, openPage, screenshot, sleep, waitForAttr } from './helpers.js';

const LEEWAY_SECS = 30; // the gateway's, from the contract

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close().catch(() => {});
});

describe('demo mode (sensorwire demo)', () => {
  let gw;
  const opened = [];
  before(async () => {
    gw = new Gateway({ command: 'demo' });
    await gw.start();
  });
  after(async () => {
    for (const p of opened) await p.context.close().catch(() => {});
    await gw?.dispose();
  });

  it('signs in by itself through /api/demo/token and shows the simulated units', async () => {
    const p = await openPage(browser, 'demo');
    opened.push(p);
    await p.page.goto(`${gw.url}/`);
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    await p.page.locator('[data-testid^="unit-card-"]').first().waitFor({ timeout: 10_000 });
    // The simulator posts readings: some card shows a temperature within a few seconds.
    await p.page.waitForFunction(
      () => [...document.querySelectorAll('[data-testid^="unit-temp-"]')].some((e) => /°C/.test(e.textContent)),
      null,
      { timeout: 15_000 },
    );
    await sleep(2500);
    await screenshot(p.page, 'demo-dashboard');
    assert.deepEqual(p.console.errors, []);
  });

  it('renews the token with auth:refresh a minute before exp, on the same socket', async () => {
    // 65 s left: the handshake uses it; the renewal is due 5 s later.
    const short = mintToken(gw.secret, { sub: 'demo-viewer', org: 'demo', role: 'operator', expSeconds: 65 });
    const p = await openPage(browser, 'renew');
    opened.push(p);
    const sockets = [];
    const sent = [];
    const received = [];
    p.page.on('websocket', (ws) => {
      sockets.push(ws.url());
      ws.on('framesent', (f) => sent.push(String(f.payload)));
      ws.on('framereceived', (f) => received.push(String(f.payload)));
    });
    // Before the upgrade to WebSocket, packets travel over HTTP long-polling (separated by \x1e).
    p.page.on('request', (req) => {
      if (req.url().includes('/socket.io/') && req.method() === 'POST') sent.push(...(req.postData() ?? '').split('\x1e'));
    });
    p.page.on('response', async (res) => {
      if (!res.url().includes('/socket.io/') || res.request().method() !== 'GET') return;
      received.push(...(await res.text().catch(() => '')).split('\x1e'));
    });
    await p.page.goto(`${gw.url}/#token=${short}`);
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    assert.equal(await p.page.evaluate(() => sessionStorage.getItem('sensorwire.token')), short);

    // socket.io frames: `42<ackId>["auth:refresh","<jwt>"]`, answered by `43<ackId>[{"ok":true,…}]`.
    const refresh = await waitFor(
      () => sent.map((f) => /^42(\d+)\["auth:refresh","([^"]+)"\]$/.exec(f)).find(Boolean),
      12_000,
      'auth:refresh',
    ).catch((err) => {
      throw new Error(`${err.message}; sockets ${JSON.stringify(sockets)}; frames sent: ${JSON.stringify(sent)}`);
    });
    const [, ackId, newToken] = refresh;
    assert.notEqual(newToken, short, 'a new token was sent');
    const ack = await waitFor(() => received.find((f) => f.startsWith(`43${ackId}[`)), 3000, 'the auth:refresh ack');
    const [answer] = JSON.parse(ack.slice(2 + ackId.length));
    assert.equal(answer.ok, true, `auth:refresh answered ${ack}`);
    assert.ok(answer.exp > Math.floor(Date.now() / 1000) + 600, 'the new token lives longer');
    assert.equal(await p.page.evaluate(() => sessionStorage.getItem('sensorwire.token')), newToken);
    assert.ok(sockets.length <= 1, `WebSocket connections: ${sockets.length} (expected no reconnect)`);
    const handshakes = sent.filter((f) => /^40/.test(f));
    assert.equal(handshakes.length, 1, `Socket.io CONNECT packets: ${JSON.stringify(handshakes)}`);
    assert.equal(await p.page.locator(byTestId('connection-status')).getAttribute('data-state'), 'connected');
    assert.deepEqual(p.console.errors, []);
  });
});

describe('demo mode: a token of another user is never swapped for the demo identity', () => {
  let gw;
  let p;
  before(async () => {
    gw = new Gateway({ command: 'demo' });
    await gw.start();
  });
  after(async () => {
    await p?.context.close().catch(() => {});
    await gw?.dispose();
  });

  it('keeps the pasted user past the renewal point (the demo token is for someone else)', async () => {
    // 65 s left: the renewal is due 5 s after the handshake. The demo endpoint would hand out
    // `demo-viewer`; this token is carol's, so the app keeps it (and asks for a new one at expiry).
    const carol = mintToken(gw.secret, { sub: 'carol', org: 'demo', role: 'operator', expSeconds: 65 });
    p = await openPage(browser, 'same-user');
    const sent = [];
    p.page.on('websocket', (ws) => ws.on('framesent', (f) => sent.push(String(f.payload))));
    await p.page.goto(`${gw.url}/#token=${carol}`);
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    assert.equal(await p.page.locator(byTestId('signed-in-sub')).textContent(), 'carol');
    await sleep(8000);
    assert.equal(await p.page.evaluate(() => sessionStorage.getItem('sensorwire.token')), carol, 'the token was swapped');
    assert.equal(await p.page.locator(byTestId('signed-in-sub')).textContent(), 'carol');
    assert.deepEqual(sent.filter((f) => f.includes('auth:refresh')), [], 'no auth:refresh with another identity');
    assert.equal(await p.page.locator(byTestId('connection-status')).getAttribute('data-state'), 'connected');
    assert.deepEqual(p.console.errors, []);
  });
});

async function waitFor(fn, timeout, what) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(50);
  }
}

describe('serve mode: an expired token that cannot be renewed', () => {
  let gw;
  let p;
  before(async () => {
    gw = new Gateway();
    await gw.start();
    await gw.createSite({ id: 's1', name: 'Site 1' });
    await gw.createUnit({ id: 'u1', siteId: 's1', name: 'Unit 1', tempMin: 0, tempMax: 5 });
  });
  after(async () => {
    await p?.context.close().catch(() => {});
    await gw?.dispose();
  });

  it('after auth:expired and the server disconnect, asks for a new token; a pasted one reconnects', async () => {
    const short = mintToken(gw.secret, { sub: 'bob', org: 'acme', expSeconds: 3 });
    p = await openPage(browser, 'expiry');
    // No demo mode: GET /api/demo/token is a 404 (asked once, as the token is already within a
    // minute of exp), which Chromium logs.
    p.console.expectNetworkErrors = true;
    await p.page.goto(`${gw.url}/#token=${short}`);
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    await p.page.locator(byTestId('token-screen')).waitFor({ timeout: (3 + LEEWAY_SECS + 10) * 1000 });
    await p.page.getByText('Your token has expired').waitFor({ timeout: 1000 });
    p.console.expectNetworkErrors = false;
    const ignored = p.console.ignored.filter((e) => !/404/.test(e));
    assert.deepEqual(ignored, [], 'only the demo-token 404 was expected');

    const fresh = mintToken(gw.secret, { sub: 'bob', org: 'acme' });
    await p.page.locator(byTestId('token-input')).fill(fresh);
    await p.page.getByRole('button', { name: 'Connect' }).click();
    await waitForAttr(p.page, 'connection-status', 'data-state', 'connected', 10_000);
    await gw.ingest([{ unitId: 'u1', temperature: 2.5 }]);
    await p.page.waitForFunction(() => document.querySelector('[data-testid="unit-temp-u1"]')?.textContent === '2.5 °C', null, {
      timeout: 3000,
    });
    assert.deepEqual(p.console.errors, []);
  });
});
