// Helpers shared by pipeline.test.js, ingest.test.js and shutdown.test.js (the ingest → batches
// → alerts pipeline). Everything generic lives in harness.js; this file adds:
//   - readings with unique, increasing `recordedAt` times, and the ingest call;
//   - event collectors that validate every payload against proto/schema.json and let a test wait
//     for a condition or check that nothing (more) arrives within a bounded window;
//   - a per-test fixture (site + units with fresh ids) so tests sharing one gateway never see
//     each other's traffic;
//   - a gateway starter on a database the test owns (restart on the same DATABASE_URL, or make
//     the database unreachable), with the same conventions as harness.startGateway.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import pg from 'pg';

import {
  GATEWAY_BIN,
  POSTGRES_URL,
  api,
  assertSchema,
  assertStatus,
  createSite,
  createUnit,
  probePostgres,
  randomId,
  sleep,
  withTimeout,
} from './harness.js';

// ---------------------------------------------------------------------------------------------
// Readings

// A process-wide clock for `recordedAt`: every reading gets a distinct, increasing millisecond,
// starting a little in the past (so even a few thousand readings stay well before "now + 5 min").
let clock = Date.now() - 120_000;

/** A fresh, unique `recordedAt` (ISO string, ms precision), later than every previous one. */
export function nextTime() {
  clock = Math.max(clock + 1, Date.now() - 60_000);
  return new Date(clock).toISOString();
}

/** An ingest reading for `unitId` at `temperature`; `recordedAt` defaults to `nextTime()`. */
export function reading(unitId, temperature, extra = {}) {
  return { unitId, temperature, recordedAt: nextTime(), ...extra };
}

/** `POST /api/readings/ingest` → `{ status, headers, body, text }`. */
export function ingest(gw, credentials, readings, { headers = {} } = {}) {
  const opts = { body: { readings }, headers: { ...headers } };
  if (typeof credentials === 'string') opts.token = credentials;
  else if (credentials && credentials.apiKey) opts.headers['x-api-key'] = credentials.apiKey;
  return api(gw, 'POST', '/api/readings/ingest', opts);
}

/** Ingest that must succeed: asserts 200 and an `IngestResponse` of the right length. */
export async function ingestOk(gw, credentials, readings) {
  const res = await ingest(gw, credentials, readings);
  assertStatus(res, 200, 'POST /api/readings/ingest:');
  assertSchema('IngestResponse', res.body);
  assert.equal(res.body.ids.length, readings.length, 'ids has one entry per reading');
  return res.body;
}

/** Raw POST (body sent as given, not JSON-encoded). */
export async function rawPost(gw, urlPath, { token, body, headers = {} }) {
  const h = { 'content-type': 'application/json', ...headers };
  if (token) h.authorization = `Bearer ${token}`;
  const res = await fetch(new URL(urlPath, gw.url), {
    method: 'POST',
    headers: h,
    body,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let parsed = text;
  if ((res.headers.get('content-type') || '').includes('json')) parsed = JSON.parse(text);
  return { status: res.status, headers: res.headers, body: parsed, text };
}

/** `GET /api/units/{id}/readings` (validated), oldest first. */
export async function storedReadings(gw, token, unitId, query = '') {
  const res = await api(gw, 'GET', `/api/units/${encodeURIComponent(unitId)}/readings${query}`, { token });
  assertStatus(res, 200, `GET /api/units/${unitId}/readings:`);
  assert.ok(Array.isArray(res.body), 'readings list is a bare JSON array');
  for (const r of res.body) assertSchema('SensorReading', r);
  return res.body;
}

/** `GET /api/alerts?status=...` (validated), optionally only those of `unitId`. */
export async function listAlerts(gw, token, { status, unitId } = {}) {
  // Filtered by the server (a shared gateway may hold more alerts than one page).
  const q = new URLSearchParams({ limit: '1000' });
  if (status) q.set('status', status);
  if (unitId) q.set('unitId', unitId);
  const res = await api(gw, 'GET', `/api/alerts?${q}`, { token });
  assertStatus(res, 200, 'GET /api/alerts:');
  assert.ok(Array.isArray(res.body), 'alerts list is a bare JSON array');
  for (const a of res.body) assertSchema('Alert', a);
  return unitId ? res.body.filter((a) => a.unitId === unitId) : res.body;
}

// ---------------------------------------------------------------------------------------------
// Fixture

/**
 * Creates (as `adminToken`) a site and one unit per entry of `units` (`{ tempMin, tempMax,
 * offlineAfterSeconds }`), all with fresh ids. Resolves `{ siteId, units: [Unit...] }`.
 */
export async function freshSite(gw, adminToken, units = [{}]) {
  const siteId = `s-${randomId(4)}`;
  await createSite(gw, adminToken, { id: siteId, name: `Site ${siteId}` });
  const created = [];
  for (const u of units) {
    const id = u.id ?? `u-${randomId(4)}`;
    created.push(await createUnit(gw, adminToken, { name: `Unit ${id}`, ...u, id, siteId }));
  }
  return { siteId, units: created };
}

// ---------------------------------------------------------------------------------------------
// Event collection

/**
 * Records every `event` a socket receives from now on, validating each payload against
 * `$defs/<schema>`. A schema failure is kept and re-thrown by every accessor, so it fails the
 * test that reads the events instead of crashing the process.
 */
export function collect(socket, event, schema) {
  const items = [];
  const waiters = new Set();
  let schemaError;
  const handler = (payload, ...rest) => {
    if (schema) {
      try {
        assertSchema(schema, payload);
      } catch (err) {
        schemaError ??= new Error(`'${event}' payload: ${err.message}`);
      }
    }
    items.push({ payload, extraArgs: rest.length, at: Date.now() });
    for (const w of waiters) w();
  };
  socket.on(event, handler);
  const checked = () => {
    if (schemaError) throw schemaError;
    return items.map((i) => i.payload);
  };
  return {
    event,
    get all() {
      return checked();
    },
    /** Payloads whose `unitId` is `unitId`. */
    forUnit(unitId) {
      return checked().filter((p) => p && p.unitId === unitId);
    },
    /** Resolves with the payload list once `predicate(list)` is true; rejects after `ms`. */
    waitFor(predicate, ms, what) {
      let waiter;
      return withTimeout(new Promise((resolve, reject) => {
        waiter = () => {
          try {
            const list = checked();
            if (predicate(list)) resolve(list);
          } catch (err) {
            reject(err);
          }
        };
        waiters.add(waiter);
        waiter();
      }), ms, `${what ?? `waiting for '${event}'`}; received so far: ${JSON.stringify(items.map((i) => i.payload))}`)
        .finally(() => waiters.delete(waiter));
    },
    stop() {
      socket.off(event, handler);
    },
  };
}

/** Every reading of every batch in `batches` (flattened). */
export const batchReadings = (batches) => batches.flatMap((b) => b.readings);

/** Asserts the batch invariants of the contract for one `sensor:readings:batch` payload. */
export function assertBatchShape(batch, unitId) {
  assertSchema('ReadingsBatch', batch);
  assert.equal(batch.unitId, unitId, 'batch.unitId');
  assert.equal(batch.count, batch.readings.length, 'batch.count equals readings.length');
  assert.ok(batch.readings.length > 0, 'a batch is never empty');
  for (const r of batch.readings) assert.equal(r.unitId, unitId, 'every reading of a batch belongs to its unit');
  const times = batch.readings.map((r) => Date.parse(r.recordedAt));
  for (let i = 1; i < times.length; i += 1) {
    assert.ok(times[i - 1] <= times[i], `readings within a batch are in recordedAt order: ${JSON.stringify(batch.readings.map((r) => r.recordedAt))}`);
  }
}

/** Asserts that each id appears exactly once among `readings`. */
export function assertEachOnce(readings, ids, what) {
  const seen = new Map();
  for (const r of readings) seen.set(r.id, (seen.get(r.id) || 0) + 1);
  for (const id of ids) {
    assert.equal(seen.get(id) ?? 0, 1, `${what}: reading ${id} must arrive exactly once (seen ${seen.get(id) ?? 0} times)`);
  }
}

// ---------------------------------------------------------------------------------------------
// A gateway on a database the test owns

/**
 * A fresh database of `engine` that outlives gateway processes: `{ url, drop() }`
 * (`name` for PostgreSQL). SQLite: a file in a temporary directory.
 */
export async function ownDatabase(engine) {
  if (engine === 'sqlite') {
    const dir = mkdtempSync(path.join(tmpdir(), 'sensorwire-own-'));
    return {
      engine,
      url: `sqlite://${path.join(dir, 'own.db')}`,
      drop: async () => rmSync(dir, { recursive: true, force: true }),
    };
  }
  const unreachable = await probePostgres();
  if (unreachable) throw new Error(`postgres not reachable: ${unreachable}`);
  const name = `sw_test_own_${randomId(8)}`;
  await pgAdmin((c) => c.query(`CREATE DATABASE ${name}`));
  const url = new URL(POSTGRES_URL);
  url.pathname = `/${name}`;
  return {
    engine,
    name,
    url: url.toString(),
    drop: () => pgAdmin((c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)),
  };
}

/** Runs `fn(client)` on the maintenance database (TEST_POSTGRES_URL). */
export async function pgAdmin(fn) {
  const client = new pg.Client({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

const SCRUBBED_ENV = [
  'REDIS_URL', 'JWT_PUBLIC_KEY_FILE', 'JWKS_FILE', 'JWT_ISSUER', 'JWT_AUDIENCE', 'CORS_ORIGINS',
  'LOG_FORMAT', 'FLUSH_INTERVAL_MS', 'SOCKET_EVENTS_PER_SECOND', 'SOCKET_EVENTS_BURST',
  'SOCKET_ABUSE_LIMIT', 'MAX_ROOMS_PER_SOCKET', 'DATABASE_URL', 'JWT_SECRET', 'HOST', 'PORT',
  'MAX_BODY_BYTES', 'MAX_READINGS_PER_REQUEST', 'BATCH_MAX_READINGS', 'OFFLINE_SWEEP_MS',
  'MAX_BUFFERED_READINGS', 'INGEST_QUEUE',
];

/**
 * Starts `sensorwire serve` (HOST=127.0.0.1, PORT=0) on `databaseUrl` with `secret` and waits
 * for its `sensorwire listening on http://…` line. Resolves `{ url, secret, child, exited,
 * sockets, stop(), stderr() }`; `exited` resolves `{ code, signal }`. The same shape as a
 * `useGateway` handle, so `api`/`connect` from harness.js work on it.
 */
export async function spawnGateway({ databaseUrl, secret = randomBytes(32).toString('hex'), env = {} }) {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary not found at ${GATEWAY_BIN} (run \`cargo build\` or set SENSORWIRE_BIN)`);
  }
  const workDir = mkdtempSync(path.join(tmpdir(), 'sensorwire-proc-'));
  const childEnv = { ...process.env };
  for (const key of SCRUBBED_ENV) delete childEnv[key];
  Object.assign(childEnv, {
    HOST: '127.0.0.1',
    PORT: '0',
    JWT_SECRET: secret,
    DATABASE_URL: databaseUrl,
    RUST_LOG: 'warn',
    ...env,
  });
  const child = spawn(GATEWAY_BIN, ['serve'], { cwd: workDir, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (c) => {
    stderr = (stderr + c).slice(-64 * 1024);
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const gw = {
    url: undefined,
    secret,
    child,
    exited,
    sockets: new Set(),
    stderr: () => stderr,
    stdout: () => stdout,
    async stop() {
      for (const s of gw.sockets) s.disconnect();
      gw.sockets.clear();
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const done = await withTimeout(exited, 5000, 'gateway did not exit on SIGTERM').catch(() => null);
        if (!done) {
          child.kill('SIGKILL');
          await exited;
        }
      }
      rmSync(workDir, { recursive: true, force: true });
    },
  };
  try {
    gw.url = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`gateway did not print its listening line in time\nstdout:\n${stdout}\nstderr:\n${stderr}`)), 20_000);
      child.stdout.on('data', (chunk) => {
        stdout += chunk;
        const m = /^sensorwire listening on (http:\/\/127\.0\.0\.1:(\d+))\r?$/m.exec(stdout);
        if (m && Number(m[2]) > 0) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`gateway exited early (code ${code}, signal ${signal})\nstderr:\n${stderr}`));
      });
    });
  } catch (err) {
    await gw.stop().catch(() => {});
    throw err;
  }
  return gw;
}

/** Sends SIGTERM and resolves `{ code, signal }` when the process has exited (bounded). */
export async function terminate(gw, ms = 15_000) {
  gw.child.kill('SIGTERM');
  return withTimeout(gw.exited, ms, 'gateway did not exit after SIGTERM');
}

export { sleep };
