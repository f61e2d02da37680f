// Helpers for alert-truth.test.js (issue 13, "Alerts and unit status: one truth, on every node,
// through every failure"; CONTRACT.md "Alerts and unit status", "Many nodes", "HTTP API"):
//
//   - nowIso()/at(): `recordedAt` values close to the real time (the offline timer counts from
//     them), strictly increasing across the whole file;
//   - expectStory(): what the contract says a unit's readings must produce — one alert per
//     excursion (`temp_high`/`temp_low`, a high→low jump resolving one and opening the other),
//     `unit:status` on change only — so tests compare dashboards and storage against it;
//   - dashboard(): a stock socket.io-client of an organisation collecting `alert:triggered`,
//     `alert:resolved` and `unit:status` (payloads validated against proto/schema.json);
//   - assertStoryOnDashboard()/assertStoryInStorage(): every excursion exactly once, matched by
//     alertId, on a dashboard and in `GET /api/alerts` / `GET /api/units/{id}`;
//   - timed(): an HTTP request whose latency is measured and whose network failure (connection
//     refused, reset) is a result instead of an exception;
//   - startPrivatePostgres(): a PostgreSQL server of the test's own (initdb in a temporary
//     directory, `pg_ctl` on a free port) that can be stopped hard and restarted on the same port
//     and data directory.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chownSync, closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import pg from 'pg';

import { api, assertSchema, assertStatus, connect, withTimeout } from './harness.js';
import { IN_CI, collect, freePort } from './cluster-helpers.js';

// ---------------------------------------------------------------------------------------------
// Time

let lastMs = 0;

/** The current time as an ISO string (ms precision), strictly later than every earlier call. */
export function nowIso() {
  lastMs = Math.max(lastMs + 1, Date.now());
  return new Date(lastMs).toISOString();
}

/** An ingest reading for `unitId` at `temperature`, recorded now. */
export function at(unitId, temperature, extra = {}) {
  return { unitId, temperature, recordedAt: nowIso(), ...extra };
}

export const sameInstant = (a, b) => typeof a === 'string' && typeof b === 'string' && Date.parse(a) === Date.parse(b);

// ---------------------------------------------------------------------------------------------
// What the contract says a unit's readings produce

/**
 * `readings` (`{ temperature, recordedAt, node? }`, in recordedAt order) of a unit with
 * `tempMin`/`tempMax`, starting from status `unknown`. Resolves
 *   { excursions: [{ alertType, value, threshold, triggeredAt, resolvedAt, openIndex,
 *                    resolveIndex, openNode, resolveNode }],
 *     statuses: [{ status, since }], finalStatus, last }
 * "Above" and "below" are strict; a jump from above tempMax to below tempMin resolves the
 * temp_high alert and opens a temp_low one, with no `unit:status` (it stays `excursion`).
 */
export function expectStory(readings, { tempMin, tempMax }) {
  const excursions = [];
  const statuses = [];
  let open = null;
  let category = 'unknown';
  readings.forEach((r, i) => {
    const t = r.temperature;
    const state = tempMax != null && t > tempMax ? 'temp_high' : tempMin != null && t < tempMin ? 'temp_low' : 'ok';
    if (open && open.alertType !== state) {
      open.resolvedAt = r.recordedAt;
      open.resolveIndex = i;
      open.resolveNode = r.node;
      open = null;
    }
    if (state !== 'ok' && !open) {
      open = {
        alertType: state,
        value: t,
        threshold: state === 'temp_high' ? tempMax : tempMin,
        triggeredAt: r.recordedAt,
        resolvedAt: null,
        openIndex: i,
        resolveIndex: null,
        openNode: r.node,
        resolveNode: null,
      };
      excursions.push(open);
    }
    const next = state === 'ok' ? 'ok' : 'excursion';
    if (next !== category) {
      statuses.push({ status: next, since: r.recordedAt });
      category = next;
    }
  });
  return { excursions, statuses, finalStatus: category, last: readings.at(-1) };
}

/** How many `alert:triggered` / `alert:resolved` / `unit:status` a dashboard must receive. */
export function storyCounts(story) {
  return {
    triggered: story.excursions.length,
    resolved: story.excursions.filter((e) => e.resolvedAt).length,
    status: story.statuses.length,
  };
}

const describeExcursion = (e) =>
  `${e.alertType} opened at ${e.triggeredAt} (reading #${e.openIndex}${e.openNode ? ` on ${e.openNode}` : ''})` +
  (e.resolvedAt ? `, resolved at ${e.resolvedAt} (reading #${e.resolveIndex}${e.resolveNode ? ` on ${e.resolveNode}` : ''})` : ', still open');

// ---------------------------------------------------------------------------------------------
// Dashboards

/**
 * A connected socket on `node` with `token` (websocket transport) collecting the alert and
 * status events. `{ node, socket, triggered, resolved, status, stop() }`.
 */
export async function dashboard(node, token) {
  const socket = await connect(node, { token, transports: ['websocket'] });
  return watchAlerts(socket, node);
}

/** Collectors of `alert:triggered`, `alert:resolved`, `unit:status` on an open socket. */
export function watchAlerts(socket, node) {
  const d = {
    node,
    socket,
    triggered: collect(socket, 'alert:triggered', 'AlertTriggered'),
    resolved: collect(socket, 'alert:resolved', 'AlertResolved'),
    status: collect(socket, 'unit:status', 'UnitStatusChanged'),
    stop() {
      d.triggered.stop();
      d.resolved.stop();
      d.status.stop();
    },
  };
  return d;
}

/**
 * Waits until dashboard `d` has received, for every `[unitId, story]` of `stories`, at least the
 * number of events the story needs (then the caller waits a little more and checks exact counts).
 */
export async function waitForStories(d, stories, ms, what) {
  const enough = (key) => (list) =>
    stories.every(([unitId, story]) => list.filter((p) => p && p.unitId === unitId).length >= storyCounts(story)[key]);
  await Promise.all([
    d.triggered.waitFor(enough('triggered'), ms, `${what}: alert:triggered for every excursion`),
    d.resolved.waitFor(enough('resolved'), ms, `${what}: alert:resolved for every closed excursion`),
    d.status.waitFor(enough('status'), ms, `${what}: unit:status for every change`),
  ]);
}

/**
 * Asserts what dashboard `d` received for `unitId` against `story`: exactly one
 * `alert:triggered` per excursion (type, severity, value, threshold, triggeredAt), no other;
 * exactly one `alert:resolved` per closed excursion carrying its alertId and resolvedAt, none for
 * an open one; `unit:status` exactly the changes of the story (by `since`), and the last one
 * received is the unit's final status. Returns the alertIds in excursion order.
 */
export function assertStoryOnDashboard(d, unitId, story, what) {
  const triggered = d.triggered.forUnit(unitId);
  const resolved = d.resolved.forUnit(unitId);
  const statuses = d.status.forUnit(unitId);
  const problems = [];
  const ids = [];
  const matched = new Set();
  for (const e of story.excursions) {
    const hits = triggered.filter((a) => sameInstant(a.triggeredAt, e.triggeredAt));
    hits.forEach((h) => matched.add(h));
    if (hits.length !== 1) {
      problems.push(`excursion ${describeExcursion(e)}: ${hits.length}× alert:triggered (expected 1)`);
      ids.push(hits[0]?.alertId);
      continue;
    }
    const a = hits[0];
    ids.push(a.alertId);
    const got = { alertType: a.alertType, severity: a.severity, value: a.value, threshold: a.threshold };
    const want = { alertType: e.alertType, severity: 'critical', value: e.value, threshold: e.threshold };
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      problems.push(`excursion ${describeExcursion(e)}: alert:triggered says ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    }
    const res = resolved.filter((r) => r.alertId === a.alertId);
    if (e.resolvedAt) {
      if (res.length !== 1) problems.push(`excursion ${describeExcursion(e)}: ${res.length}× alert:resolved for ${a.alertId} (expected 1)`);
      else if (!sameInstant(res[0].resolvedAt, e.resolvedAt)) {
        problems.push(`excursion ${describeExcursion(e)}: alert:resolved has resolvedAt ${res[0].resolvedAt}`);
      }
    } else if (res.length) {
      problems.push(`excursion ${describeExcursion(e)} is still open but got ${res.length}× alert:resolved`);
    }
  }
  for (const a of triggered) {
    if (!matched.has(a)) problems.push(`an alert:triggered that matches no excursion: ${JSON.stringify(a)}`);
  }
  const dupIds = triggered.map((a) => a.alertId).filter((id, i, all) => all.indexOf(id) !== i);
  if (dupIds.length) problems.push(`alertIds triggered more than once: ${JSON.stringify(dupIds)}`);
  const known = new Set(triggered.map((a) => a.alertId));
  for (const r of resolved) {
    if (!known.has(r.alertId)) problems.push(`an alert:resolved for an alert never triggered here: ${JSON.stringify(r)}`);
  }
  const norm = (s) => `${s.status}@${Number.isNaN(Date.parse(s.since)) ? s.since : new Date(Date.parse(s.since)).toISOString()}`;
  const gotStatuses = [...statuses].sort((x, y) => Date.parse(x.since) - Date.parse(y.since)).map(norm);
  const wanted = story.statuses.map(norm);
  if (JSON.stringify(gotStatuses) !== JSON.stringify(wanted)) {
    problems.push(`unit:status (by since) ${JSON.stringify(gotStatuses)}, expected ${JSON.stringify(wanted)}`);
  }
  const shown = statuses.at(-1)?.status;
  if (shown !== story.finalStatus) {
    problems.push(`the last unit:status received says ${JSON.stringify(shown)}, but the unit ended ${story.finalStatus}`);
  }
  assert.deepEqual(problems, [], `${what}: the dashboard's alerts for ${unitId} do not tell the story of its readings\n` +
    `received alert:triggered ${JSON.stringify(triggered)}\nreceived alert:resolved ${JSON.stringify(resolved)}\n` +
    `received unit:status ${JSON.stringify(statuses)}`);
  return ids;
}

/** `GET /api/alerts` (validated; `limit=1000`, optional `status`), only those of `unitId`. */
export async function storedAlerts(node, token, unitId, status) {
  const q = new URLSearchParams({ limit: '1000', unitId });
  if (status) q.set('status', status);
  const res = await api(node, 'GET', `/api/alerts?${q}`, { token });
  assertStatus(res, 200, `GET /api/alerts?${q} on ${node.name ?? node.url}:`);
  assert.ok(Array.isArray(res.body), 'alerts list is a bare JSON array');
  for (const a of res.body) assertSchema('Alert', a);
  return res.body.filter((a) => a.unitId === unitId);
}

/** `GET /api/units/{id}` (validated Unit). */
export async function storedUnit(node, token, unitId) {
  const res = await api(node, 'GET', `/api/units/${encodeURIComponent(unitId)}`, { token });
  assertStatus(res, 200, `GET /api/units/${unitId} on ${node.name ?? node.url}:`);
  assertSchema('Unit', res.body);
  return res.body;
}

/**
 * Asserts storage (read through `node`) against `story`: one stored alert per excursion (same
 * alertId as the dashboards saw, when `ids` is given), with its status and resolvedAt; the
 * active list holds exactly the open excursions; the unit's status, lastReadingAt and
 * lastTemperature are those of its last reading.
 */
export async function assertStoryInStorage(node, token, unitId, story, ids, what) {
  const all = await storedAlerts(node, token, unitId);
  const active = await storedAlerts(node, token, unitId, 'active');
  const unit = await storedUnit(node, token, unitId);
  const problems = [];
  if (all.length !== story.excursions.length) {
    problems.push(`GET /api/alerts lists ${all.length} alerts for the unit, expected ${story.excursions.length} (one per excursion)`);
  }
  story.excursions.forEach((e, i) => {
    const hits = all.filter((a) => sameInstant(a.triggeredAt, e.triggeredAt));
    if (hits.length !== 1) {
      problems.push(`excursion ${describeExcursion(e)}: ${hits.length} stored alerts`);
      return;
    }
    const a = hits[0];
    if (ids && ids[i] && a.alertId !== ids[i]) problems.push(`excursion ${describeExcursion(e)}: stored as ${a.alertId}, announced as ${ids[i]}`);
    if (a.alertType !== e.alertType || a.value !== e.value || a.threshold !== e.threshold) {
      problems.push(`excursion ${describeExcursion(e)}: stored ${JSON.stringify({ alertType: a.alertType, value: a.value, threshold: a.threshold })}`);
    }
    const wantStatus = e.resolvedAt ? 'resolved' : 'active';
    if (a.status !== wantStatus) problems.push(`excursion ${describeExcursion(e)}: stored status ${a.status}, expected ${wantStatus}`);
    if (e.resolvedAt ? !sameInstant(a.resolvedAt, e.resolvedAt) : a.resolvedAt !== null) {
      problems.push(`excursion ${describeExcursion(e)}: stored resolvedAt ${a.resolvedAt}`);
    }
  });
  const openTimes = story.excursions.filter((e) => !e.resolvedAt).map((e) => Date.parse(e.triggeredAt)).sort();
  const activeTimes = active.map((a) => Date.parse(a.triggeredAt)).sort();
  if (JSON.stringify(openTimes) !== JSON.stringify(activeTimes)) {
    problems.push(`GET /api/alerts?status=active lists ${JSON.stringify(active.map((a) => [a.alertType, a.triggeredAt]))}, ` +
      `expected the open excursions ${JSON.stringify(story.excursions.filter((e) => !e.resolvedAt).map((e) => [e.alertType, e.triggeredAt]))}`);
  }
  if (unit.status !== story.finalStatus) problems.push(`GET /api/units/${unitId}: status ${unit.status}, but the last reading (${story.last.temperature}) makes it ${story.finalStatus}`);
  if (!sameInstant(unit.lastReadingAt, story.last.recordedAt)) problems.push(`GET /api/units/${unitId}: lastReadingAt ${unit.lastReadingAt}, expected ${story.last.recordedAt}`);
  if (unit.lastTemperature !== story.last.temperature) problems.push(`GET /api/units/${unitId}: lastTemperature ${unit.lastTemperature}, expected ${story.last.temperature}`);
  assert.deepEqual(problems, [], `${what} (read through ${node.name ?? node.url}): storage disagrees with the readings\n` +
    `stored alerts ${JSON.stringify(all)}\nunit ${JSON.stringify(unit)}`);
}

// ---------------------------------------------------------------------------------------------
// HTTP with latency and network failures as results

/**
 * One request to `target.url`; never throws. Resolves `{ status, headers, body, text, ms }`, or
 * `{ status: null, error, ms }` when no HTTP answer came (connection refused or reset, timeout).
 * `apiKey` is sent as `X-API-Key`.
 */
export async function timed(target, method, urlPath, { token, apiKey, body, timeoutMs = 3000 } = {}) {
  const headers = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (apiKey) headers['x-api-key'] = apiKey;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const t0 = performance.now();
  try {
    const res = await fetch(new URL(urlPath, target.url), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await res.text();
    const ms = Math.round(performance.now() - t0);
    let parsed = text;
    if ((res.headers.get('content-type') || '').includes('json')) {
      try {
        parsed = JSON.parse(text);
      } catch {
        // left as text
      }
    }
    return { status: res.status, headers: res.headers, body: parsed, text, ms };
  } catch (err) {
    const ms = Math.round(performance.now() - t0);
    const code = err.name === 'TimeoutError' ? `no answer within ${timeoutMs} ms` : (err.cause?.code || err.cause?.message || err.message);
    return { status: null, error: code, ms };
  }
}

export const describeAnswer = (r) => (r.status === null ? `no HTTP answer (${r.error}) after ${r.ms} ms` : `HTTP ${r.status} after ${r.ms} ms: ${r.text}`);

// ---------------------------------------------------------------------------------------------
// A private PostgreSQL server

/** The directory holding `initdb`, `pg_ctl` and `postgres`, or null. `PG_BIN_DIR` overrides. */
export function findPgBinDir() {
  const has = (dir) => ['initdb', 'pg_ctl', 'postgres'].every((b) => existsSync(path.join(dir, b)));
  if (process.env.PG_BIN_DIR) return has(process.env.PG_BIN_DIR) ? process.env.PG_BIN_DIR : null;
  const root = '/usr/lib/postgresql';
  if (existsSync(root)) {
    const versions = readdirSync(root).filter((v) => has(path.join(root, v, 'bin'))).sort((a, b) => Number(b) - Number(a));
    if (versions.length) return path.join(root, versions[0], 'bin');
  }
  const which = spawnSync('sh', ['-c', 'command -v initdb'], { encoding: 'utf8' });
  const found = which.status === 0 ? path.dirname(which.stdout.trim()) : null;
  return found && has(found) ? found : null;
}

const isRoot = () => typeof process.getuid === 'function' && process.getuid() === 0;

/** uid/gid of the `postgres` user (PostgreSQL refuses to run as root), or null. */
function postgresUser() {
  const uid = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' });
  if (uid.status !== 0 || gid.status !== 0) return null;
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

/** Why a private PostgreSQL cannot be started here, or null. */
export function privatePostgresProblem() {
  if (!findPgBinDir()) return 'PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (set PG_BIN_DIR)';
  if (isRoot()) {
    if (!postgresUser()) return 'running as root and there is no `postgres` user to run the server as';
    if (spawnSync('runuser', ['--help'], { encoding: 'utf8' }).error) return 'running as root and `runuser` is missing';
  }
  return null;
}

/** Skip reason (outside CI only), or false: with CI=true a missing server fails the suite. */
export function privatePostgresSkipReason() {
  if (IN_CI) return false;
  const problem = privatePostgresProblem();
  return problem ? `private PostgreSQL not possible: ${problem}` : false;
}

const livePostgres = new Set();
process.once('exit', () => {
  for (const p of livePostgres) p.stopSync();
});

/** Runs a PostgreSQL binary as the `postgres` user when we are root; resolves `{ code, out }`. */
function runPg(bin, args, logFile, ms = 60_000) {
  const [cmd, argv] = isRoot() ? ['runuser', ['-u', 'postgres', '--', bin, ...args]] : [bin, args];
  const fd = openSync(logFile, 'a');
  const child = spawn(cmd, argv, { stdio: ['ignore', fd, fd] });
  closeSync(fd);
  return withTimeout(new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, out: readFileSync(logFile, 'utf8').slice(-4000) }));
  }), ms, `${path.basename(bin)} ${args.join(' ')}`);
}

/**
 * initdb in a fresh temporary directory and `pg_ctl start` on a free 127.0.0.1 port (trust
 * authentication, user `postgres`), then `CREATE DATABASE <database>`. Resolves
 * `{ port, url, stopHard(), start(), running(), destroy() }`: `stopHard()` is
 * `pg_ctl stop -m immediate` (no shutdown checkpoint, every connection dropped), `start()` starts
 * the server again on the same port and data directory, `destroy()` stops it and removes the
 * directory (also done when the test process exits).
 */
export async function startPrivatePostgres({ database = 'sensorwire' } = {}) {
  const problem = privatePostgresProblem();
  if (problem) throw new Error(`cannot start a private PostgreSQL: ${problem}`);
  const bin = findPgBinDir();
  const dir = mkdtempSync(path.join(tmpdir(), 'sw-private-pg-'));
  if (isRoot()) {
    const { uid, gid } = postgresUser();
    chownSync(dir, uid, gid);
  }
  const data = path.join(dir, 'data');
  const log = path.join(dir, 'server.log');
  const toolLog = path.join(dir, 'tools.log');
  const port = await freePort();
  let up = false;
  const ctl = (args, ms) => runPg(path.join(bin, 'pg_ctl'), args, toolLog, ms);
  const handle = {
    port,
    dir,
    url: `postgres://postgres@127.0.0.1:${port}/${database}`,
    running: () => up,
    log: () => (existsSync(log) ? readFileSync(log, 'utf8').slice(-4000) : ''),
    async start() {
      if (up) return;
      const r = await ctl(['-D', data, '-l', log, '-w', '-t', '30', '-o',
        `-p ${port} -c listen_addresses=127.0.0.1 -k ${dir} -c fsync=off`, 'start'], 40_000);
      if (r.code !== 0) throw new Error(`pg_ctl start exited ${r.code}\n${r.out}\n${handle.log()}`);
      up = true;
    },
    async stopHard() {
      if (!up) return;
      const r = await ctl(['-D', data, '-m', 'immediate', '-w', '-t', '30', 'stop'], 40_000);
      if (r.code !== 0) throw new Error(`pg_ctl stop -m immediate exited ${r.code}\n${r.out}`);
      up = false;
    },
    stopSync() {
      if (up) {
        const args = ['-D', data, '-m', 'immediate', '-w', 'stop'];
        const [cmd, argv] = isRoot() ? ['runuser', ['-u', 'postgres', '--', path.join(bin, 'pg_ctl'), ...args]] : [path.join(bin, 'pg_ctl'), args];
        spawnSync(cmd, argv, { stdio: 'ignore', timeout: 20_000 });
        up = false;
      }
      rmSync(dir, { recursive: true, force: true });
      livePostgres.delete(handle);
    },
    async destroy() {
      await handle.stopHard().catch(() => {});
      handle.stopSync();
    },
  };
  livePostgres.add(handle);
  try {
    const init = await runPg(path.join(bin, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--no-sync'], toolLog);
    if (init.code !== 0) throw new Error(`initdb exited ${init.code}\n${init.out}`);
    await handle.start();
    const client = new pg.Client({ connectionString: `postgres://postgres@127.0.0.1:${port}/postgres`, connectionTimeoutMillis: 5000 });
    await client.connect();
    try {
      await client.query(`CREATE DATABASE ${database}`);
    } finally {
      await client.end().catch(() => {});
    }
  } catch (err) {
    await handle.destroy();
    throw err;
  }
  return handle;
}
