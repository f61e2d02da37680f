// Shared helpers of the dashboard's browser tests: the real gateway process, tokens, the admin
// API, and Chromium (Debian's, driven by playwright-core).
//
// Environment:
//   SENSORWIRE_BIN   gateway binary (default: <repo>/target/debug/sensorwire)
//   CHROMIUM_PATH    browser (default: /usr/bin/chromium)
//   WEB_DIST         the built app (default: web/dist — `npm test` builds it first)

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import jwt from 'jsonwebtoken';
import { chromium } from 'playwright-core';

export const WEB_DIR = fileURLToPath(new URL('..', import.meta.url));
export const DIST_DIR = process.env.WEB_DIST || path.join(WEB_DIR, 'dist');
export const SCREENSHOT_DIR = path.join(WEB_DIR, 'tests', 'screenshots');
export const GATEWAY_BIN =
  process.env.SENSORWIRE_BIN || fileURLToPath(new URL('../../target/debug/sensorwire', import.meta.url));
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const nowSeconds = () => Math.floor(Date.now() / 1000);
export const randomId = (n = 6) => randomBytes(n).toString('hex');

// ---------------------------------------------------------------------------------------------
// Tokens

export function mintToken(secret, { sub = 'alice', org = 'acme', role = 'viewer', expSeconds = 3600, siteIds } = {}) {
  const claims = { sub, org_id: org, role, exp: nowSeconds() + expSeconds };
  if (siteIds) claims.site_ids = siteIds;
  return jwt.sign(claims, secret, { algorithm: 'HS256', noTimestamp: true });
}

// ---------------------------------------------------------------------------------------------
// The gateway

/** A TCP port that is free right now (so the gateway can be restarted on the same one). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const live = new Set();
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/**
 * A gateway that can be stopped and started again on the same port and database.
 * `start()` resolves once it prints `sensorwire listening on …`.
 */
export class Gateway {
  constructor({ env = {}, command = 'serve' } = {}) {
    if (!existsSync(GATEWAY_BIN)) {
      throw new Error(`gateway binary not found at ${GATEWAY_BIN} (cd /work/main && cargo build, or set SENSORWIRE_BIN)`);
    }
    if (!existsSync(path.join(DIST_DIR, 'index.html'))) {
      throw new Error(`${DIST_DIR}/index.html is missing: run \`npm run build\` first (\`npm test\` does)`);
    }
    this.dir = mkdtempSync(path.join(tmpdir(), 'sensorwire-web-'));
    // A private copy, so a `cargo build` running meanwhile cannot swap the binary between a stop
    // and the restart.
    this.bin = path.join(this.dir, 'sensorwire');
    copyFileSync(GATEWAY_BIN, this.bin);
    this.secret = randomBytes(24).toString('base64url').slice(0, 32);
    this.command = command;
    this.extraEnv = env;
    this.child = null;
    this.log = '';
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      HOST: '127.0.0.1',
      PORT: String(this.port),
      JWT_SECRET: this.secret,
      DATABASE_URL: `sqlite://${this.dir}/t.db`,
      FLUSH_INTERVAL_MS: '500',
      WEB_DIR: DIST_DIR,
      RUST_LOG: 'warn',
      ...this.extraEnv,
    };
    const child = spawn(this.bin, [this.command], { env, cwd: this.dir, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    live.add(child);
    child.once('exit', () => live.delete(child));
    let out = '';
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`gateway did not start in 20 s:\n${out}`)), 20_000);
      const onData = (chunk) => {
        out += chunk;
        this.log += chunk;
        if (out.includes('sensorwire listening on')) {
          clearTimeout(timer);
          resolve();
        }
      };
      child.stdout.on('data', onData);
      child.stderr.on('data', (c) => (this.log += c));
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`gateway exited (${code ?? signal}) before listening:\n${this.log}`));
      });
    });
    child.removeAllListeners('exit');
    child.once('exit', () => live.delete(child));
  }

  /** SIGTERM, and wait for the process to exit (SIGKILL after 10 s). */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
    this.child = null;
  }

  async dispose() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  // ---- admin API --------------------------------------------------------------------------

  adminToken(org = 'acme') {
    return mintToken(this.secret, { sub: 'admin', org, role: 'admin' });
  }

  async api(method, path, body, token = this.adminToken()) {
    const res = await fetch(`${this.url}${path}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    const json = text ? JSON.parse(text) : null;
    if (!res.ok) throw new Error(`${method} ${path} → ${res.status} ${text}`);
    return json;
  }

  createSite(site) {
    return this.api('POST', '/api/sites', site);
  }

  createUnit(unit) {
    return this.api('POST', '/api/units', unit);
  }

  /** Posts readings; `recordedAt` defaults to now (each reading a millisecond apart). */
  ingest(readings) {
    const base = Date.now() - readings.length;
    return this.api('POST', '/api/readings/ingest', {
      readings: readings.map((r, i) => ({ recordedAt: new Date(base + i).toISOString(), ...r })),
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The browser

export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: apt-get update && apt-get install -y chromium (or set CHROMIUM_PATH)`);
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-quic',
    ],
  });
}

/**
 * Console errors and uncaught exceptions of a page. Errors that are only network noise (failed
 * loads, refused WebSockets) are tolerated while `expectNetworkErrors` is on, i.e. while a test
 * keeps the gateway down on purpose.
 */
export function watchConsole(page, label = 'page') {
  const state = { errors: [], expectNetworkErrors: false, ignored: [] };
  const networkNoise = /Failed to load resource|ERR_CONNECTION_REFUSED|ERR_CONNECTION_RESET|ERR_EMPTY_RESPONSE|WebSocket connection to .* failed|net::ERR_/i;
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    if (state.expectNetworkErrors && networkNoise.test(text)) {
      state.ignored.push(text);
      return;
    }
    state.errors.push(`[${label}] console.error: ${text}`);
  });
  page.on('pageerror', (err) => state.errors.push(`[${label}] pageerror: ${err.stack || err.message}`));
  return state;
}

export async function openPage(browser, label) {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const consoleState = watchConsole(page, label);
  return { context, page, console: consoleState };
}

export function byTestId(id) {
  return `[data-testid="${id}"]`;
}

export async function textOf(page, testId) {
  return page.locator(byTestId(testId)).first().textContent({ timeout: 5000 });
}

export async function attrOf(page, testId, attr) {
  return page.locator(byTestId(testId)).first().getAttribute(attr, { timeout: 5000 });
}

/** Waits until `fn(page)` returns a truthy value; fails with `message` after `timeout` ms. */
export async function waitUntil(fn, { timeout = 5000, interval = 50, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      assert.fail(`timed out after ${timeout} ms waiting for ${message} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await sleep(interval);
  }
}

/** Waits for an element's text (exact, trimmed) — in the page, without polling from Node. */
export async function waitForText(page, testId, text, timeout = 5000) {
  await page
    .waitForFunction(
      ([sel, want]) => document.querySelector(sel)?.textContent?.trim() === want,
      [byTestId(testId), text],
      { timeout, polling: 'raf' },
    )
    .catch(async (err) => {
      const got = await page.locator(byTestId(testId)).first().textContent({ timeout: 500 }).catch(() => '(absent)');
      throw new Error(`${testId}: wanted "${text}" within ${timeout} ms, have "${got}" (${err.message.split('\n')[0]})`);
    });
}

export async function waitForAttr(page, testId, attr, values, timeout = 5000) {
  const want = Array.isArray(values) ? values : [values];
  await page
    .waitForFunction(
      ([sel, a, w]) => w.includes(document.querySelector(sel)?.getAttribute(a)),
      [byTestId(testId), attr, want],
      { timeout, polling: 100 },
    )
    .catch(async (err) => {
      const got = await page.locator(byTestId(testId)).first().getAttribute(attr, { timeout: 500 }).catch(() => '(absent)');
      throw new Error(`${testId}[${attr}]: wanted ${want.join('|')} within ${timeout} ms, have "${got}" (${err.message.split('\n')[0]})`);
    });
}

export async function screenshot(page, name) {
  mkdirSync(SCREENSHOT_DIR, { recursive: true });
  const file = path.join(SCREENSHOT_DIR, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}
