// Shared harness for the sensorwire conformance suite.
//
// Each test file calls `forEachEngine(title, (engine) => { ... })`, which declares one `describe`
// per storage engine (SQLite and PostgreSQL). Inside it, `useGateway(engine, { env })` starts one
// gateway process for the whole describe block (in `before`) and stops it (in `after`).
//
// Environment:
//   SENSORWIRE_BIN     gateway binary (default: <repo>/target/debug/sensorwire)
//   SENSORWIRE_SCHEMA  JSON Schema document (default: <repo>/proto/schema.json)
//   TEST_POSTGRES_URL  maintenance database used to CREATE/DROP the per-suite database
//                      (default: postgres://root@127.0.0.1:5432/test)
//   CI=true            an unreachable PostgreSQL fails the postgres variant instead of skipping it

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, describe, it } from 'node:test';

import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import jwt from 'jsonwebtoken';
import pg from 'pg';
import { io } from 'socket.io-client';

export const ENGINES = ['sqlite', 'postgres'];

export const GATEWAY_BIN =
  process.env.SENSORWIRE_BIN || fileURLToPath(new URL('../../target/debug/sensorwire', import.meta.url));
export const SCHEMA_PATH =
  process.env.SENSORWIRE_SCHEMA || fileURLToPath(new URL('../../proto/schema.json', import.meta.url));
export const POSTGRES_URL = process.env.TEST_POSTGRES_URL || 'postgres://root@127.0.0.1:5432/test';

const IN_CI = process.env.CI === 'true';
const STARTUP_TIMEOUT_MS = 20_000;
const ACK_TIMEOUT_MS = 3_000;

// ---------------------------------------------------------------------------------------------
// Small utilities

export const nowSeconds = () => Math.floor(Date.now() / 1000);
export const randomId = (bytes = 6) => randomBytes(bytes).toString('hex');
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves with `promise`, or rejects with `message` after `ms`. */
export function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${message} (timed out after ${ms} ms)`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// JSON Schema validation (proto/schema.json, draft 2020-12)

let ajv;
let schemaId;
const validators = new Map();

function loadSchema() {
  if (ajv) return;
  if (!existsSync(SCHEMA_PATH)) {
    throw new Error(`JSON Schema document not found at ${SCHEMA_PATH} (the project must ship proto/schema.json)`);
  }
  const doc = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8'));
  assert.ok(typeof doc.$id === 'string' && doc.$id.length > 0, `${SCHEMA_PATH} has no $id`);
  assert.ok(doc.$defs && typeof doc.$defs === 'object', `${SCHEMA_PATH} has no $defs`);
  const instance = new Ajv2020({
    allErrors: true,
    strict: true,
    strictTypes: false,
    strictTuples: false,
    allowUnionTypes: true,
  });
  addFormats(instance);
  instance.addSchema(doc);
  ajv = instance;
  schemaId = doc.$id.replace(/#$/, '');
}

/** Asserts that `value` is valid against `$defs/<name>` of proto/schema.json. */
export function assertSchema(name, value) {
  loadSchema();
  let validate = validators.get(name);
  if (!validate) {
    validate = ajv.compile({ $ref: `${schemaId}#/$defs/${name}` });
    validators.set(name, validate);
  }
  if (!validate(value)) {
    const errors = validate.errors
      .map((e) => `  ${e.instancePath || '(root)'} ${e.message} ${JSON.stringify(e.params)}`)
      .join('\n');
    assert.fail(`payload does not match schema ${name}:\n${errors}\npayload: ${JSON.stringify(value)}`);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Tokens

/**
 * Mints an HS256 JWT. `expSeconds` is relative to now (negative = already expired); `exp` may be
 * given as an absolute Unix time instead. `role` and `siteIds` are omitted when undefined.
 */
export function mintToken({ sub, org, role, siteIds, expSeconds = 3600, exp, secret, extra = {} }) {
  assert.ok(secret, 'mintToken needs a secret');
  const claims = { ...extra, sub, org_id: org, exp: exp ?? nowSeconds() + expSeconds };
  if (role !== undefined) claims.role = role;
  if (siteIds !== undefined) claims.site_ids = siteIds;
  return jwt.sign(claims, secret, { algorithm: 'HS256', noTimestamp: true });
}

export const tokenExp = (token) => jwt.decode(token).exp;

// ---------------------------------------------------------------------------------------------
// PostgreSQL

let postgresProbe;

/** `null` when the maintenance database answers, otherwise the error message. Memoised. */
export function probePostgres() {
  postgresProbe ??= (async () => {
    const client = new pg.Client({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 3000 });
    try {
      await client.connect();
      await client.query('SELECT 1');
      return null;
    } catch (err) {
      return `${POSTGRES_URL}: ${err.message || err.code || String(err)}`;
    } finally {
      await client.end().catch(() => {});
    }
  })();
  return postgresProbe;
}

async function withAdminClient(fn) {
  const client = new pg.Client({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

async function createPostgresDatabase() {
  const unreachable = await probePostgres();
  if (unreachable) throw new Error(`postgres not reachable: ${unreachable}`);
  const name = `sw_test_${randomId(8)}`;
  await withAdminClient((c) => c.query(`CREATE DATABASE ${name}`));
  const url = new URL(POSTGRES_URL);
  url.pathname = `/${name}`;
  return { name, url: url.toString() };
}

async function dropPostgresDatabase(name) {
  await withAdminClient((c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`));
}

/**
 * Skip reason for an engine (passed to `describe`), or `false`. With CI=true an unreachable
 * PostgreSQL is not skipped: the suite's `before` hook then fails with the connection error.
 */
async function skipReason(engine) {
  if (engine !== 'postgres' || IN_CI) return false;
  const unreachable = await probePostgres();
  return unreachable ? `postgres not reachable: ${unreachable}` : false;
}

const skipReasons = Object.fromEntries(await Promise.all(ENGINES.map(async (e) => [e, await skipReason(e)])));

// ---------------------------------------------------------------------------------------------
// Gateway process

// Variables from the outer environment that would change what the gateway does.
const SCRUBBED_ENV = [
  'REDIS_URL', 'JWT_PUBLIC_KEY_FILE', 'JWKS_FILE', 'JWT_ISSUER', 'JWT_AUDIENCE', 'CORS_ORIGINS',
  'LOG_FORMAT', 'FLUSH_INTERVAL_MS', 'SOCKET_EVENTS_PER_SECOND', 'SOCKET_EVENTS_BURST',
  'SOCKET_ABUSE_LIMIT', 'MAX_ROOMS_PER_SOCKET', 'DATABASE_URL', 'JWT_SECRET', 'HOST', 'PORT',
];

// Gateways still running when this test process exits (a crash, a cancelled run) are killed.
const liveChildren = new Set();
process.once('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL');
});

/**
 * Starts `sensorwire serve` on an ephemeral port with a fresh database of `engine`.
 * Resolves with `{ url, secret, engine, stop(), stderr() }`.
 */
export async function startGateway(engine, envOverrides = {}) {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary not found at ${GATEWAY_BIN} (run \`cargo build\` or set SENSORWIRE_BIN)`);
  }
  const workDir = mkdtempSync(path.join(tmpdir(), 'sensorwire-test-'));
  let pgDb;
  let databaseUrl;
  if (engine === 'sqlite') {
    databaseUrl = `sqlite://${path.join(workDir, 'test.db')}`;
  } else if (engine === 'postgres') {
    pgDb = await createPostgresDatabase();
    databaseUrl = pgDb.url;
  } else {
    throw new Error(`unknown engine ${engine}`);
  }

  const secret = randomBytes(32).toString('hex');
  const env = { ...process.env };
  for (const key of SCRUBBED_ENV) delete env[key];
  Object.assign(env, {
    HOST: '127.0.0.1',
    PORT: '0',
    JWT_SECRET: secret,
    DATABASE_URL: databaseUrl,
    RUST_LOG: 'warn',
    ...envOverrides,
  });

  const child = spawn(GATEWAY_BIN, ['serve'], { cwd: workDir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
  let stdout = '';
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-64 * 1024);
  });
  child.stdout.setEncoding('utf8');
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));

  const cleanup = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const done = await withTimeout(exited, 5000, 'gateway did not exit on SIGTERM').catch(() => null);
      if (!done) {
        child.kill('SIGKILL');
        await exited;
      }
    }
    if (pgDb) await dropPostgresDatabase(pgDb.name);
    rmSync(workDir, { recursive: true, force: true });
  };

  try {
    const url = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`gateway did not print its listening line within ${STARTUP_TIMEOUT_MS} ms\n` +
          `stdout:\n${stdout}\nstderr:\n${stderr}`));
      }, STARTUP_TIMEOUT_MS);
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
        reject(new Error(`could not start ${GATEWAY_BIN}: ${err.message}`));
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`gateway exited early (code ${code}, signal ${signal})\nstdout:\n${stdout}\nstderr:\n${stderr}`));
      });
    });
    return { engine, url, secret, stop: cleanup, stderr: () => stderr, stdout: () => stdout };
  } catch (err) {
    await cleanup().catch(() => {});
    throw err;
  }
}

/**
 * Declares `describe("<title> [<engine>]")` once per storage engine. The postgres variant is
 * skipped with a message when PostgreSQL is unreachable (unless CI=true, where it fails).
 */
export function forEachEngine(title, body) {
  for (const engine of ENGINES) {
    const skip = skipReasons[engine];
    describe(`${title} [${engine}]`, () => {
      if (skip) {
        it(`runs against ${engine}`, (t) => t.skip(skip));
      } else {
        body(engine);
      }
    });
  }
}

/**
 * Registers before/after hooks that run one gateway for the enclosing describe block.
 * Returns a handle whose fields (`url`, `secret`, ...) are filled in by `before`, plus helpers
 * bound to that gateway. Sockets opened through the handle are disconnected after each test.
 */
export function useGateway(engine, { env = {} } = {}) {
  const gw = {
    engine,
    url: undefined,
    secret: undefined,
    sockets: new Set(),
    token(claims) {
      return mintToken({ secret: gw.secret, ...claims });
    },
    connect(opts) {
      return connect(gw, opts);
    },
    connectError(opts) {
      return connectError(gw, opts);
    },
    api(method, urlPath, opts) {
      return api(gw, method, urlPath, opts);
    },
  };
  let proc;
  before(async () => {
    proc = await startGateway(engine, env);
    gw.url = proc.url;
    gw.secret = proc.secret;
    gw.stderr = proc.stderr;
  }, { timeout: STARTUP_TIMEOUT_MS + 15_000 });
  afterEach(() => {
    for (const s of gw.sockets) s.disconnect();
    gw.sockets.clear();
  });
  after(async () => {
    for (const s of gw.sockets) s.disconnect();
    gw.sockets.clear();
    if (proc) await proc.stop();
  }, { timeout: 20_000 });
  return gw;
}

// ---------------------------------------------------------------------------------------------
// HTTP

/** `fetch` wrapper: resolves `{ status, headers, body }` with `body` parsed as JSON when it is. */
export async function api(gw, method, urlPath, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  if (token) h.authorization = `Bearer ${token}`;
  if (body !== undefined) h['content-type'] = 'application/json';
  const res = await fetch(new URL(urlPath, gw.url), {
    method,
    headers: h,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let parsed = text;
  if ((res.headers.get('content-type') || '').includes('json')) {
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      assert.fail(`${method} ${urlPath}: content-type ${res.headers.get('content-type')} but body is not JSON: ${text}`);
    }
  }
  return { status: res.status, headers: res.headers, body: parsed, text };
}

/** Asserts an HTTP answer has `status`; the message shows the body. */
export function assertStatus(res, status, what = '') {
  assert.equal(res.status, status, `${what} expected HTTP ${status}, got ${res.status}: ${res.text}`);
  return res;
}

/** Asserts an error answer: `status` and an `ApiError` body. */
export function assertApiError(res, status, what = '') {
  assertStatus(res, status, what);
  assertSchema('ApiError', res.body);
  return res.body;
}

/** Admin create: `POST /api/sites` → 201 Site (validated). */
export async function createSite(gw, token, site) {
  const res = await api(gw, 'POST', '/api/sites', { token, body: site });
  assertStatus(res, 201, `POST /api/sites ${JSON.stringify(site)}:`);
  assertSchema('Site', res.body);
  return res.body;
}

/** Admin create: `POST /api/units` → 201 Unit (validated). */
export async function createUnit(gw, token, unit) {
  const res = await api(gw, 'POST', '/api/units', { token, body: unit });
  assertStatus(res, 201, `POST /api/units ${JSON.stringify(unit)}:`);
  assertSchema('Unit', res.body);
  return res.body;
}

/**
 * The standard fixture: org `acme` with sites s-1, s-2 and units u-1 (s-1), u-2 (s-2);
 * org `other` with site s-9 and units u-9 and u-1 (same id as acme's, to prove ids are per org).
 */
export async function seedStandardFixture(gw) {
  const acmeAdmin = gw.token({ sub: 'admin-acme', org: 'acme', role: 'admin' });
  const otherAdmin = gw.token({ sub: 'admin-other', org: 'other', role: 'admin' });
  await createSite(gw, acmeAdmin, { id: 's-1', name: 'Cold room 1' });
  await createSite(gw, acmeAdmin, { id: 's-2', name: 'Cold room 2' });
  await createUnit(gw, acmeAdmin, { id: 'u-1', siteId: 's-1', name: 'Fridge 1', tempMin: 2, tempMax: 8, offlineAfterSeconds: 600 });
  await createUnit(gw, acmeAdmin, { id: 'u-2', siteId: 's-2', name: 'Freezer 2' });
  await createSite(gw, otherAdmin, { id: 's-9', name: 'Other warehouse' });
  await createUnit(gw, otherAdmin, { id: 'u-9', siteId: 's-9', name: 'Other fridge' });
  await createUnit(gw, otherAdmin, { id: 'u-1', siteId: 's-9', name: 'Other fridge with a clashing id' });
  return { acmeAdmin, otherAdmin };
}

// ---------------------------------------------------------------------------------------------
// Socket.io

function socketOptions(gw, { token, auth, ...opts } = {}) {
  return {
    reconnection: false,
    forceNew: true,
    timeout: 5000,
    ...(token !== undefined ? { auth: { token } } : auth !== undefined ? { auth } : {}),
    ...opts,
  };
}

/**
 * Opens a socket and resolves once it is connected; rejects with the `connect_error` (or a
 * timeout). Options: `token` (sent as `auth.token`), `auth`, and any socket.io-client option.
 */
export function connect(gw, opts = {}) {
  const socket = io(gw.url, socketOptions(gw, opts));
  gw.sockets.add(socket);
  return withTimeout(new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (err) => reject(err));
  }), 8000, 'socket did not connect').catch((err) => {
    socket.disconnect();
    throw err;
  });
}

/** Opens a socket that is expected to be refused; resolves with the `connect_error` Error. */
export function connectError(gw, opts = {}) {
  const socket = io(gw.url, socketOptions(gw, opts));
  gw.sockets.add(socket);
  return withTimeout(new Promise((resolve, reject) => {
    socket.once('connect', () => reject(new Error('socket connected but the handshake should have been refused')));
    socket.once('connect_error', (err) => resolve(err));
  }), 8000, 'neither connect nor connect_error').finally(() => socket.disconnect());
}

/** Emits with an ack callback (3 s timeout) and resolves with the ack's first argument. */
export function emitAck(socket, event, ...args) {
  return socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, ...args);
}

/** Resolves with the first argument of the next `event` on `socket`, or rejects after `ms`. */
export function nextEvent(socket, event, ms = 5000) {
  let handler;
  return withTimeout(new Promise((resolve) => {
    handler = (arg) => resolve(arg);
    socket.once(event, handler);
  }), ms, `no '${event}' event`).finally(() => socket.off(event, handler));
}

/** Resolves with the `disconnect` reason, or rejects after `ms`. */
export function nextDisconnect(socket, ms = 5000) {
  if (!socket.connected) return Promise.reject(new Error('socket is already disconnected'));
  return nextEvent(socket, 'disconnect', ms);
}

/** `subscribe:*` / `unsubscribe:*` with an ack; the ack is validated against `SubscribeAck`. */
export async function roomAck(socket, event, id) {
  const ack = await emitAck(socket, event, id);
  assertSchema('SubscribeAck', ack);
  return ack;
}
