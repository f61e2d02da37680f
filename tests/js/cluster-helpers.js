// Helpers for cluster.test.js (CONTRACT.md "Many nodes"): several gateway processes sharing one
// PostgreSQL database and one Redis that the test file owns.
//
//   - startRedis(): a private `redis-server` child on a free port (never a shared Redis: nodes
//     sharing a Redis share every Socket.io channel), which can be SIGKILLed and restarted on the
//     same port;
//   - createDatabase(): a fresh PostgreSQL database, dropped WITH (FORCE) afterwards;
//   - startNode(): `sensorwire serve` with REDIS_URL + DATABASE_URL, the same shape as a
//     `useGateway` handle so `api`/`connect` of harness.js work on it;
//   - tcpProxy(): a TCP proxy in front of PostgreSQL that can "break the connection" (stop
//     listening, reset every open connection) and restore it on the same port;
//   - collect(): records an event on a socket, validating each payload against proto/schema.json;
//   - clusterSkipReason(): skip (or, with CI=true, fail) when PostgreSQL or redis-server is missing.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

import pg from 'pg';

import { GATEWAY_BIN, POSTGRES_URL, assertSchema, probePostgres, randomId, sleep, withTimeout } from './harness.js';

export const IN_CI = process.env.CI === 'true';
export const REDIS_SERVER = process.env.REDIS_SERVER_BIN || 'redis-server';

// Children still running when this test process exits (a crash, a cancelled run) are killed.
const liveChildren = new Set();
process.once('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL');
});

function track(child) {
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

// ---------------------------------------------------------------------------------------------
// Prerequisites

/** `null` when `redis-server` can be run, otherwise why not. */
export function probeRedisServer() {
  const r = spawnSync(REDIS_SERVER, ['--version'], { encoding: 'utf8', timeout: 5000 });
  if (r.error) return `${REDIS_SERVER}: ${r.error.code || r.error.message}`;
  if (r.status !== 0) return `${REDIS_SERVER} --version exited with ${r.status}: ${r.stderr}`;
  return null;
}

/**
 * Skip reason for the cluster suites, or `false`. With CI=true nothing is skipped: the suites'
 * `before` hooks then fail on the missing dependency.
 */
export async function clusterSkipReason() {
  if (IN_CI) return false;
  const reasons = [];
  const redis = probeRedisServer();
  if (redis) reasons.push(`redis-server not available: ${redis}`);
  const postgres = await probePostgres();
  if (postgres) reasons.push(`postgres not reachable: ${postgres}`);
  return reasons.length ? reasons.join('; ') : false;
}

/** Throws (fails the hook) when a prerequisite is missing; used in `before` so CI fails loudly. */
export async function requirePrerequisites() {
  const redis = probeRedisServer();
  if (redis) throw new Error(`redis-server is required for the cluster tests: ${redis}`);
  const postgres = await probePostgres();
  if (postgres) throw new Error(`PostgreSQL is required for the cluster tests: ${postgres}`);
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary not found at ${GATEWAY_BIN} (run \`cargo build\` or set SENSORWIRE_BIN)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Ports and polling

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Calls `probe()` every `interval` ms until it returns a truthy value (resolved with it) or `ms`
 * pass (rejects with `what` and the last value/error seen). Errors thrown by `probe` count as
 * "not yet".
 */
export async function pollUntil(probe, { ms, interval = 200, what }) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v;
      last = v;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      const shown = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`${what} (not within ${ms} ms; last: ${shown})`);
    }
    await sleep(interval);
  }
}

// ---------------------------------------------------------------------------------------------
// Redis

/** Sends PING on a fresh connection; resolves true on +PONG, false otherwise (bounded). */
export function redisPing(port, ms = 1000) {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host: '127.0.0.1' });
    let buf = '';
    const done = (ok) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), ms);
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
    sock.on('error', () => done(false));
  });
}

/**
 * Starts a private `redis-server` on `port` (a free one by default), no persistence. Resolves
 * `{ port, url, child, kill(signal), restart(), stop(), log() }`. `kill` resolves once the
 * process has exited; `restart` starts a new one on the same port.
 */
export async function startRedis(port) {
  port ??= await freePort();
  usedPorts.add(port);
  let child;
  let exited;
  let log = '';
  const launch = async () => {
    child = spawn(REDIS_SERVER, [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--daemonize', 'no', '--protected-mode', 'no',
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    track(child);
    const self = child;
    exited = new Promise((resolve) => self.once('exit', (code, signal) => resolve({ code, signal })));
    for (const stream of [child.stdout, child.stderr]) {
      stream.setEncoding('utf8');
      stream.on('data', (c) => {
        log = (log + c).slice(-32 * 1024);
      });
    }
    let failed;
    exited.then(({ code, signal }) => {
      failed = `redis-server exited (code ${code}, signal ${signal})\n${log}`;
    });
    await pollUntil(async () => {
      if (failed) throw Object.assign(new Error(failed), { fatal: true });
      return redisPing(port, 500);
    }, { ms: 10_000, interval: 50, what: `redis-server did not answer PING on port ${port}` }).catch((err) => {
      throw new Error(failed || err.message);
    });
  };
  await launch();
  const handle = {
    port,
    url: `redis://127.0.0.1:${port}`,
    get child() {
      return child;
    },
    log: () => log,
    async kill(signal = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return withTimeout(exited, 5000, 'redis-server did not exit');
    },
    async restart() {
      await handle.kill('SIGKILL');
      await launch();
    },
    async stop() {
      await handle.kill('SIGKILL').catch(() => {});
    },
  };
  return handle;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/** Runs `fn(client)` on the maintenance database (TEST_POSTGRES_URL), or on `url`. */
export async function withPg(fn, url = POSTGRES_URL) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

/** A fresh database: `{ name, url, host, port, urlVia(port), drop() }`. */
export async function createDatabase() {
  const name = `sw_test_cluster_${randomId(6)}`;
  await withPg((c) => c.query(`CREATE DATABASE ${name}`));
  const url = new URL(POSTGRES_URL);
  url.pathname = `/${name}`;
  return {
    name,
    url: url.toString(),
    host: url.hostname,
    port: Number(url.port || 5432),
    /** The same database reached through 127.0.0.1:`port` (e.g. a proxy). */
    urlVia(port) {
      const u = new URL(url);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    query: (sql, params) => withPg((c) => c.query(sql, params), url.toString()),
    drop: () => withPg((c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)),
  };
}

// ---------------------------------------------------------------------------------------------
// TCP proxy (to make PostgreSQL unreachable and reachable again)

/**
 * A TCP proxy on 127.0.0.1:`port` (free by default) to `targetHost:targetPort`.
 * `break()` stops listening and resets every open connection (new connections are refused);
 * `restore()` listens again on the same port; `close()` for good.
 */
export async function tcpProxy(targetHost, targetPort, port) {
  port ??= await freePort();
  usedPorts.add(port);
  const conns = new Set();
  let server;
  const listen = () => new Promise((resolve, reject) => {
    server = net.createServer((client) => {
      const upstream = net.connect({ host: targetHost, port: targetPort });
      const pair = { client, upstream };
      conns.add(pair);
      const end = () => {
        client.destroy();
        upstream.destroy();
        conns.delete(pair);
      };
      client.on('error', end);
      upstream.on('error', end);
      client.on('close', end);
      upstream.on('close', end);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  await listen();
  let broken = false;
  const proxy = {
    port,
    get connections() {
      return conns.size;
    },
    async break() {
      if (broken) return;
      broken = true;
      const closed = new Promise((resolve) => server.close(() => resolve()));
      for (const { client, upstream } of conns) {
        client.destroy();
        upstream.destroy();
      }
      conns.clear();
      await closed;
    },
    async restore() {
      if (!broken) return;
      await listen();
      broken = false;
    },
    async close() {
      await proxy.break();
    },
  };
  return proxy;
}

// ---------------------------------------------------------------------------------------------
// Gateway nodes

const SCRUBBED_ENV = [
  'REDIS_URL', 'JWT_PUBLIC_KEY_FILE', 'JWKS_FILE', 'JWT_ISSUER', 'JWT_AUDIENCE', 'CORS_ORIGINS',
  'LOG_FORMAT', 'FLUSH_INTERVAL_MS', 'SOCKET_EVENTS_PER_SECOND', 'SOCKET_EVENTS_BURST',
  'SOCKET_ABUSE_LIMIT', 'MAX_ROOMS_PER_SOCKET', 'DATABASE_URL', 'JWT_SECRET', 'HOST', 'PORT',
  'MAX_BODY_BYTES', 'MAX_READINGS_PER_REQUEST', 'BATCH_MAX_READINGS', 'OFFLINE_SWEEP_MS',
  'MAX_BUFFERED_READINGS', 'INGEST_QUEUE', 'SOCKET_BUFFER_SIZE', 'SOCKET_MAX_PAYLOAD',
  'HANDSHAKE_TIMEOUT_SECS', 'ALLOW_TOKEN_IN_QUERY', 'WEB_DIR',
];

// Ports given to nodes so far. A node never gets a port an earlier node of this process had:
// `fetch` keeps connections alive per origin, and a request to a new node on a reused port would
// go down a dead kept-alive connection (ECONNRESET).
const usedPorts = new Set();

async function unusedPort() {
  for (;;) {
    const port = await freePort();
    if (!usedPorts.has(port)) {
      usedPorts.add(port);
      return port;
    }
  }
}

/**
 * Nodes A, B and C on one database and one Redis: A first (it runs the migrations), then B and C
 * together. Each node goes into `started` as soon as it is up, so the suite's `after` stops it
 * even when a later one fails to start.
 */
export async function startThreeNodes({ databaseUrl, redisUrl, secret, started }) {
  const start = async (name) => {
    const node = await startNode({ name, databaseUrl, redisUrl, secret });
    started.push(node);
    return node;
  };
  const A = await start('A');
  const [B, C] = await Promise.all([start('B'), start('C')]);
  return [A, B, C];
}

/**
 * Starts one node: `sensorwire serve` on 127.0.0.1 with a port no earlier node of this process
 * used (retried once if the port was taken meanwhile). Resolves a handle `{ name, url, secret,
 * child, exited, sockets, alive(), stop(), stderr() }` usable with harness.js `api`/`connect`.
 */
export async function startNode(opts) {
  try {
    return await startNodeOnce(opts);
  } catch (err) {
    if (!/address already in use|AddrInUse|EADDRINUSE/i.test(err.message)) throw err;
    return startNodeOnce(opts);
  }
}

async function startNodeOnce({ name, databaseUrl, redisUrl, secret, env = {} }) {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary not found at ${GATEWAY_BIN} (run \`cargo build\` or set SENSORWIRE_BIN)`);
  }
  const workDir = mkdtempSync(path.join(tmpdir(), 'sensorwire-cluster-'));
  const childEnv = { ...process.env };
  for (const key of SCRUBBED_ENV) delete childEnv[key];
  Object.assign(childEnv, {
    HOST: '127.0.0.1',
    PORT: String(await unusedPort()),
    JWT_SECRET: secret,
    DATABASE_URL: databaseUrl,
    REDIS_URL: redisUrl,
    FLUSH_INTERVAL_MS: '300',
    RUST_LOG: 'warn',
    ...env,
  });
  const child = spawn(GATEWAY_BIN, ['serve'], { cwd: workDir, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (c) => {
    stdout = (stdout + c).slice(-64 * 1024);
  });
  child.stderr.on('data', (c) => {
    stderr = (stderr + c).slice(-64 * 1024);
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const node = {
    name,
    url: undefined,
    secret,
    child,
    exited,
    sockets: new Set(),
    stderr: () => stderr,
    stdout: () => stdout,
    alive: () => child.exitCode === null && child.signalCode === null,
    describeExit: () => `node ${name} exited (code ${child.exitCode}, signal ${child.signalCode})\nstderr:\n${stderr}`,
    disconnectSockets() {
      for (const s of node.sockets) s.disconnect();
      node.sockets.clear();
    },
    async stop() {
      node.disconnectSockets();
      if (node.alive()) {
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
    node.url = await new Promise((resolve, reject) => {
      let seen = '';
      const timer = setTimeout(() => reject(new Error(`node ${name} did not print its listening line in time\nstdout:\n${stdout}\nstderr:\n${stderr}`)), 20_000);
      child.stdout.on('data', (chunk) => {
        seen += chunk;
        const m = /^sensorwire listening on (http:\/\/127\.0\.0\.1:(\d+))\r?$/m.exec(seen);
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
        reject(new Error(`node ${name} exited early (code ${code}, signal ${signal})\nstderr:\n${stderr}`));
      });
    });
  } catch (err) {
    await node.stop().catch(() => {});
    throw err;
  }
  return node;
}

export const newSecret = () => randomBytes(32).toString('hex');

// ---------------------------------------------------------------------------------------------
// Readings

// Distinct, increasing `recordedAt` values close to "now" (never in the future).
let clock = Date.now() - 30_000;

/** A fresh, unique `recordedAt` (ISO, ms precision), later than every previous one. */
export function nextTime() {
  clock = Math.max(clock + 1, Date.now() - 5_000);
  return new Date(clock).toISOString();
}

export function reading(unitId, temperature, extra = {}) {
  return { unitId, temperature, recordedAt: nextTime(), ...extra };
}

// ---------------------------------------------------------------------------------------------
// Event collection

/**
 * Records every `event` a socket receives from now on, validating each payload against
 * `$defs/<schema>`; a schema failure is re-thrown by the accessors (it fails the test that reads
 * the events instead of crashing the process).
 */
export function collect(socket, event, schema) {
  const items = [];
  const waiters = new Set();
  let schemaError;
  const handler = (payload) => {
    if (schema) {
      try {
        assertSchema(schema, payload);
      } catch (err) {
        schemaError ??= new Error(`'${event}' payload: ${err.message}`);
      }
    }
    items.push({ payload, at: Date.now() });
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
    forUnit(unitId) {
      return checked().filter((p) => p && p.unitId === unitId);
    },
    /** Resolves with the list once `predicate(list)` holds; rejects after `ms`. */
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

/** How many times reading `id` appears among the readings of `batches`. */
export const countInBatches = (batches, id) => batches.flatMap((b) => b.readings).filter((r) => r.id === id).length;

/** Asserts the contract's invariants for one `sensor:readings:batch`. */
export function assertBatch(batch) {
  assertSchema('ReadingsBatch', batch);
  assert.equal(batch.count, batch.readings.length, 'batch.count equals readings.length');
  for (const r of batch.readings) assert.equal(r.unitId, batch.unitId, 'every reading of a batch belongs to its unit');
}
