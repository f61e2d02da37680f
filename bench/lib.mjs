// Shared pieces of the sensorwire benchmark: the gateway process, /proc sampling, HTTP, JWTs,
// PostgreSQL databases, percentiles. Used by run.mjs (main thread) and clients.mjs (workers).

import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import jwt from 'jsonwebtoken';
import pg from 'pg';

export const DEFAULT_BIN = fileURLToPath(new URL('../target/release/sensorwire', import.meta.url));
export const CLK_TCK = 100;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
export const randomId = (bytes = 4) => randomBytes(bytes).toString('hex');
export const log = (...args) => console.error(`[bench ${new Date().toISOString().slice(11, 23)}]`, ...args);
export const round = (x, digits = 1) => (x == null || !Number.isFinite(x) ? x : Number(x.toFixed(digits)));

/** RFC 3339 UTC with millisecond precision, as the contract writes times. */
export const isoMs = (ms) => new Date(ms).toISOString();

// ---------------------------------------------------------------------------------------------
// /proc

/** utime + stime of a process, in seconds (CLK_TCK = 100). */
export function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

/** Busy CPU seconds of the whole machine so far (all cores; /proc/stat, CLK_TCK = 100). */
export function machineBusySeconds() {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0];
    const [user, nice, system, idle, iowait, irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number);
    return (user + nice + system + irq + softirq + (steal || 0)) / CLK_TCK;
  } catch {
    return null;
  }
}

/** A field of /proc/<pid>/status in MiB (VmRSS, VmHWM), or null. */
export function statusMiB(pid, field) {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
    return m ? Number(m[1]) / 1024 : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Statistics

/** Percentile (nearest rank) of an array of numbers; sorts a copy. */
export function percentiles(values, ps) {
  const out = {};
  if (values.length === 0) {
    for (const p of ps) out[p] = null;
    return out;
  }
  const sorted = Float64Array.from(values).sort();
  for (const p of ps) {
    const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
    out[p] = sorted[rank];
  }
  return out;
}

/** Percentile of a histogram with 1 ms buckets (index = ms). */
export function histPercentile(hist, total, p) {
  if (total === 0) return null;
  const target = Math.max(1, Math.ceil((p / 100) * total));
  let seen = 0;
  for (let i = 0; i < hist.length; i++) {
    seen += hist[i];
    if (seen >= target) return i;
  }
  return hist.length - 1;
}

// ---------------------------------------------------------------------------------------------
// HTTP (node:http with keep-alive; lighter on the client than fetch)

export function makeAgent(maxSockets) {
  return new http.Agent({ keepAlive: true, maxSockets, maxFreeSockets: maxSockets });
}

/** Resolves { status, body (parsed JSON or text), ms, retryAfter }; rejects only on network errors. */
export function request(baseUrl, method, urlPath, { token, body, agent, timeoutMs = 30_000 } = {}) {
  const url = new URL(urlPath, baseUrl);
  const payload = body === undefined ? undefined : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const req = http.request(
      {
        hostname: url.hostname,
        port: url.port,
        path: url.pathname + url.search,
        method,
        agent,
        headers: {
          ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
        timeout: timeoutMs,
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const ms = performance.now() - started;
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed = text;
          try {
            parsed = text ? JSON.parse(text) : null;
          } catch {
            /* keep text */
          }
          resolve({ status: res.statusCode, body: parsed, ms, retryAfter: res.headers['retry-after'] });
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)));
    req.on('error', reject);
    if (payload) req.write(payload);
    req.end();
  });
}

export async function mustRequest(baseUrl, method, urlPath, opts) {
  const res = await request(baseUrl, method, urlPath, opts);
  if (res.status < 200 || res.status >= 300) {
    throw new Error(`${method} ${urlPath} answered ${res.status}: ${JSON.stringify(res.body)}`);
  }
  return res.body;
}

// ---------------------------------------------------------------------------------------------
// JWT

export function mintToken(secret, { sub, org, role = 'admin', ttlSeconds = 3600 }) {
  const exp = Math.floor(Date.now() / 1000) + ttlSeconds;
  return jwt.sign({ sub, org_id: org, role, exp }, secret, { algorithm: 'HS256', noTimestamp: true });
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

export async function createPostgresDatabase(maintenanceUrl) {
  const name = `swbench_${randomId(5)}`;
  const client = new pg.Client({ connectionString: maintenanceUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  const url = new URL(maintenanceUrl);
  url.pathname = `/${name}`;
  return { name, url: url.toString() };
}

export async function dropPostgresDatabase(maintenanceUrl, name) {
  const client = new pg.Client({ connectionString: maintenanceUrl });
  await client.connect();
  try {
    await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  } finally {
    await client.end();
  }
}

export async function postgresCount(url, sql) {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const { rows } = await client.query(sql);
    return Number(rows[0].count);
  } finally {
    await client.end();
  }
}

export function sqliteAvailable() {
  try {
    execFileSync('sqlite3', ['-version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export function sqliteCount(file, sql) {
  const out = execFileSync('sqlite3', [file, sql], { encoding: 'utf8' });
  return Number(out.trim());
}

// ---------------------------------------------------------------------------------------------
// The gateway process

/** A random 32-character JWT_SECRET. */
export const newSecret = () => randomBytes(24).toString('base64url').slice(0, 32);

const SCRUBBED_ENV = [
  'REDIS_URL', 'JWT_PUBLIC_KEY_FILE', 'JWKS_FILE', 'JWT_ISSUER', 'JWT_AUDIENCE', 'CORS_ORIGINS',
  'LOG_FORMAT', 'FLUSH_INTERVAL_MS', 'DATABASE_URL', 'JWT_SECRET', 'HOST', 'PORT', 'RUST_LOG',
];

/**
 * Starts `sensorwire serve` with a fresh database of `engine` ('sqlite' | 'postgres').
 * Resolves { url, pid, secret, engine, databaseUrl, sqliteFile, stderrLines(), stop(), cleanup() }.
 *
 * For several nodes on one database, pass `databaseUrl` (an existing PostgreSQL database the
 * caller created and drops: the gateway neither creates nor drops it) and the same `secret`.
 */
export async function startGateway({
  bin,
  engine,
  pgUrl,
  env: extraEnv = {},
  startupTimeoutMs = 30_000,
  databaseUrl: sharedDatabaseUrl = null,
  secret: sharedSecret = null,
}) {
  if (!existsSync(bin)) {
    throw new Error(`gateway binary not found at ${bin} (run \`cargo build --release\` or set SENSORWIRE_BIN)`);
  }
  const workDir = mkdtempSync(path.join(tmpdir(), 'swbench-'));
  let pgDb = null;
  let databaseUrl;
  let sqliteFile = null;
  if (sharedDatabaseUrl) {
    if (engine !== 'postgres') throw new Error('a shared database must be PostgreSQL');
    databaseUrl = sharedDatabaseUrl;
  } else if (engine === 'sqlite') {
    sqliteFile = path.join(workDir, 'bench.db');
    databaseUrl = `sqlite://${sqliteFile}`;
  } else if (engine === 'postgres') {
    pgDb = await createPostgresDatabase(pgUrl);
    databaseUrl = pgDb.url;
  } else {
    throw new Error(`unknown engine ${engine}`);
  }

  const secret = sharedSecret ?? newSecret();
  const env = { ...process.env };
  for (const key of SCRUBBED_ENV) delete env[key];
  Object.assign(env, {
    HOST: '127.0.0.1',
    PORT: '0',
    JWT_SECRET: secret,
    DATABASE_URL: databaseUrl,
    RUST_LOG: 'warn',
    ...extraEnv,
  });

  const child = spawn(bin, ['serve'], { cwd: workDir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderrBuf = '';
  const stderrLines = [];
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderrBuf += chunk;
    let nl;
    while ((nl = stderrBuf.indexOf('\n')) >= 0) {
      const line = stderrBuf.slice(0, nl);
      stderrBuf = stderrBuf.slice(nl + 1);
      if (line.trim() && stderrLines.length < 100_000) stderrLines.push(line);
    }
  });
  child.stdout.setEncoding('utf8');
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const done = await Promise.race([exited, sleep(15_000).then(() => null)]);
      if (!done) {
        log('gateway did not exit within 15 s of SIGTERM; sending SIGKILL');
        child.kill('SIGKILL');
        await exited;
      }
    }
  };
  const cleanup = async () => {
    await stop();
    if (pgDb) await dropPostgresDatabase(pgUrl, pgDb.name).catch((e) => log(`could not drop ${pgDb.name}: ${e.message}`));
    rmSync(workDir, { recursive: true, force: true });
  };

  try {
    const url = await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`gateway did not print its listening line within ${startupTimeoutMs} ms\n${stdout}\n${stderrLines.join('\n')}`)),
        startupTimeoutMs,
      );
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
        reject(new Error(`could not start ${bin}: ${err.message}`));
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`gateway exited early (code ${code}, signal ${signal})\n${stderrLines.join('\n')}`));
      });
    });
    return {
      url,
      pid: child.pid,
      secret,
      engine,
      databaseUrl,
      sqliteFile,
      exited,
      stderrLines: () => stderrLines,
      alive: () => child.exitCode === null && child.signalCode === null,
      stop,
      cleanup,
    };
  } catch (e) {
    await cleanup();
    throw e;
  }
}

/** Summary of the gateway's stderr (RUST_LOG=warn): counts by level and a few distinct messages. */
export function summariseLog(lines) {
  const levels = {};
  const samples = new Map();
  for (const raw of lines) {
    // Strip ANSI colours and the timestamp prefix.
    const line = raw.replace(/\x1b\[[0-9;]*m/g, '');
    const m = /\b(ERROR|WARN|INFO|DEBUG|TRACE)\b\s*(.*)$/.exec(line);
    const level = m ? m[1] : 'OTHER';
    levels[level] = (levels[level] || 0) + 1;
    const key = (m ? m[2] : line).replace(/\d+/g, 'N').slice(0, 160);
    if (!samples.has(key)) samples.set(key, { count: 0, example: line.slice(0, 300) });
    samples.get(key).count++;
  }
  const top = [...samples.values()].sort((a, b) => b.count - a.count).slice(0, 5);
  return { lines: lines.length, levels, top };
}

// ---------------------------------------------------------------------------------------------
// Redis (the cluster scenario starts its own, private one)

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

/** One `PING` over a fresh connection: resolves true on `+PONG`, false otherwise. */
function redisPing(port, timeoutMs = 500) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('error', () => done(false));
    sock.once('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
  });
}

/**
 * Starts `redis-server` on a free port of 127.0.0.1 (or `port`), no persistence, as a child
 * process; `extraArgs` are appended to its command line (e.g. the cluster options), `cwd` is
 * where it runs (a cluster node writes its nodes.conf there).
 * Resolves { url, port, pid, stop() }; stop() sends SIGTERM (SIGKILL after 5 s).
 */
export async function startRedis({ bin = 'redis-server', startupTimeoutMs = 10_000, port: fixedPort = null, extraArgs = [], cwd = undefined } = {}) {
  const port = fixedPort ?? (await freePort());
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...extraArgs], {
    cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const keep = (chunk) => {
    if (output.length < 64 * 1024) output += chunk;
  };
  child.stdout.setEncoding('utf8').on('data', keep);
  child.stderr.setEncoding('utf8').on('data', keep);
  let spawnError = null;
  child.once('error', (e) => {
    spawnError = e;
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    if (child.exitCode === null && child.signalCode === null && !spawnError) {
      child.kill('SIGTERM');
      const done = await Promise.race([exited, sleep(5_000).then(() => null)]);
      if (!done) {
        child.kill('SIGKILL');
        await exited;
      }
    }
  };
  const deadline = Date.now() + startupTimeoutMs;
  for (;;) {
    if (spawnError) throw new Error(`could not start ${bin}: ${spawnError.message}`);
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`redis-server exited early (code ${child.exitCode}, signal ${child.signalCode})\n${output}`);
    }
    if (await redisPing(port)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`redis-server did not answer PING on port ${port} within ${startupTimeoutMs} ms\n${output}`);
    }
    await sleep(50);
  }
  return { url: `redis://127.0.0.1:${port}`, port, pid: child.pid, stop, output: () => output };
}

/** Whether `port` can be bound on 127.0.0.1 right now. */
function portFree(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/**
 * One command to the Redis at 127.0.0.1:`port` over a fresh connection (RESP). Resolves the
 * reply: a string (simple or bulk), a number, null, or an array of those; rejects on an error
 * reply or after `timeoutMs`. Enough for INFO and CLUSTER INFO, not a client library.
 */
export function redisCommand(port, args, timeoutMs = 2_000) {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    const finish = (err, value) => {
      sock.destroy();
      if (err) reject(err);
      else resolve(value);
    };
    sock.setTimeout(timeoutMs, () => finish(new Error(`redis ${port}: no answer to ${args[0]} within ${timeoutMs} ms`)));
    sock.once('error', (e) => finish(e));
    sock.once('connect', () => {
      sock.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`).join('')}`);
    });
    // Parses one value at `at`; returns [value, next] or null when more bytes are needed.
    const parse = (at) => {
      const eol = buf.indexOf('\r\n', at);
      if (eol < 0) return null;
      const type = String.fromCharCode(buf[at]);
      const head = buf.toString('latin1', at + 1, eol);
      if (type === '+') return [head, eol + 2];
      if (type === '-') return [new Error(head), eol + 2];
      if (type === ':') return [Number(head), eol + 2];
      if (type === '$') {
        const len = Number(head);
        if (len < 0) return [null, eol + 2];
        if (buf.length < eol + 2 + len + 2) return null;
        return [buf.toString('utf8', eol + 2, eol + 2 + len), eol + 2 + len + 2];
      }
      if (type === '*') {
        const n = Number(head);
        if (n < 0) return [null, eol + 2];
        const out = [];
        let next = eol + 2;
        for (let i = 0; i < n; i++) {
          const r = parse(next);
          if (!r) return null;
          out.push(r[0]);
          next = r[1];
        }
        return [out, next];
      }
      return [new Error(`unexpected RESP type ${type}`), eol + 2];
    };
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      const r = parse(0);
      if (!r) return;
      if (r[0] instanceof Error) finish(r[0]);
      else finish(null, r[0]);
    });
  });
}

/** `INFO <section>` as { field: value } (numbers where they parse). */
export async function redisInfo(port, section) {
  const text = await redisCommand(port, ['INFO', section]);
  const out = {};
  for (const line of String(text).split('\r\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.indexOf(':');
    if (i < 0) continue;
    out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/**
 * `INFO commandstats` of every given port, summed: { command: { calls, usec } } (usec is the
 * time Redis spent executing the command, without reading and writing the sockets).
 */
export async function redisCommandStats(ports) {
  const out = {};
  for (const port of ports) {
    const info = await redisInfo(port, 'commandstats');
    for (const [k, v] of Object.entries(info)) {
      if (!k.startsWith('cmdstat_')) continue;
      const cmd = k.slice('cmdstat_'.length);
      const calls = Number(/calls=(\d+)/.exec(v)?.[1] ?? 0);
      const usec = Number(/usec=(\d+)/.exec(v)?.[1] ?? 0);
      out[cmd] ??= { calls: 0, usec: 0 };
      out[cmd].calls += calls;
      out[cmd].usec += usec;
    }
  }
  return out;
}

/** Bytes every given Redis has read from and written to its clients so far (INFO stats), summed. */
export async function redisNetBytes(ports) {
  let input = 0;
  let output = 0;
  for (const port of ports) {
    const info = await redisInfo(port, 'stats');
    input += Number(info.total_net_input_bytes ?? 0);
    output += Number(info.total_net_output_bytes ?? 0);
  }
  return { input, output };
}

/**
 * A Redis Cluster of `masters` redis-server processes on 127.0.0.1 (no replicas, no
 * persistence), each in its own temporary directory, joined with
 * `redis-cli --cluster create … --cluster-replicas 0 --cluster-yes`. Resolves when every node
 * reports cluster_state:ok with all 16384 slots assigned:
 * { url: 'redis-cluster://127.0.0.1:p1,…', ports, pids, instances, stop() }.
 */
export async function startRedisCluster({ bin = 'redis-server', cli = 'redis-cli', masters = 3, startupTimeoutMs = 30_000 } = {}) {
  // A cluster node also listens on port + 10000 (the cluster bus): both must be free.
  const ports = [];
  for (let tries = 0; ports.length < masters; tries++) {
    if (tries > 500) throw new Error('no free port pairs (p, p + 10000) for the Redis cluster');
    const p = 20000 + Math.floor(Math.random() * 35000);
    if (ports.includes(p) || ports.includes(p + 10000) || ports.includes(p - 10000)) continue;
    if ((await portFree(p)) && (await portFree(p + 10000))) ports.push(p);
  }
  const dirs = [];
  const instances = [];
  const stop = async () => {
    await Promise.all(instances.map((r) => r.stop()));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  };
  try {
    for (const port of ports) {
      const dir = mkdtempSync(path.join(tmpdir(), 'swbench-redis-'));
      dirs.push(dir);
      instances.push(
        await startRedis({
          bin,
          port,
          cwd: dir,
          extraArgs: ['--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '5000'],
        }),
      );
    }
    const addrs = ports.map((p) => `127.0.0.1:${p}`);
    try {
      execFileSync(cli, ['--cluster', 'create', ...addrs, '--cluster-replicas', '0', '--cluster-yes'], {
        stdio: ['ignore', 'pipe', 'pipe'],
        timeout: startupTimeoutMs,
      });
    } catch (e) {
      throw new Error(`${cli} --cluster create failed: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`);
    }
    const deadline = Date.now() + startupTimeoutMs;
    for (;;) {
      const states = await Promise.all(
        ports.map((p) =>
          redisCommand(p, ['CLUSTER', 'INFO'])
            .then((t) => String(t))
            .catch(() => ''),
        ),
      );
      const ok = states.every(
        (t) => /cluster_state:ok/.test(t) && /cluster_slots_assigned:16384/.test(t) && new RegExp(`cluster_known_nodes:${masters}\\b`).test(t),
      );
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`the Redis cluster on ${addrs.join(',')} did not become ready:\n${states.join('\n---\n')}`);
      await sleep(100);
    }
    return {
      url: `redis-cluster://${addrs.join(',')}`,
      ports,
      pids: instances.map((r) => r.pid),
      instances,
      stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}
