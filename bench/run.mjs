#!/usr/bin/env node
// sensorwire benchmark: starts the gateway itself and prints one JSON line per scenario on stdout
// (progress goes to stderr). See README.md for what every figure means.
//
//   node run.mjs            full run (≈ 4–6 minutes on a 2-core machine)
//   node run.mjs --scenarios cluster   only the two-node Redis scenario (≈ 1.5 minutes)
//   node run.mjs --quick    smoke run (≈ 30 s)
//   node run.mjs --help     every flag

import { Worker } from 'node:worker_threads';
import { parseArgs } from 'node:util';

import { io } from 'socket.io-client';
import { fileURLToPath } from 'node:url';

import {
  DEFAULT_BIN,
  cpuSeconds,
  createPostgresDatabase,
  dropPostgresDatabase,
  histPercentile,
  isoMs,
  log,
  machineBusySeconds,
  makeAgent,
  mintToken,
  mustRequest,
  newSecret,
  percentiles,
  postgresCount,
  request,
  round,
  sleep,
  sqliteAvailable,
  sqliteCount,
  startGateway,
  startRedis,
  statusMiB,
  summariseLog,
} from './lib.mjs';

const ORG = 'bench';
const SERVER_DEFAULT_FLUSH_MS = 1000; // the contract's default for FLUSH_INTERVAL_MS

// ---------------------------------------------------------------------------------------------
// Options

const FLAGS = {
  quick: { type: 'boolean', default: false, help: 'smoke run (~30 s): fewer posters, clients and seconds' },
  scenarios: { type: 'string', help: 'comma list of ingest,e2e,cluster (default all three, in that order)' },
  scenario: { type: 'string', help: 'same as --scenarios' },
  bin: { type: 'string', help: 'gateway binary (default $SENSORWIRE_BIN or ../target/release/sensorwire)' },
  'pg-url': { type: 'string', help: 'maintenance database for CREATE/DROP DATABASE (default $BENCH_POSTGRES_URL or postgres://root@127.0.0.1:5432/test)' },
  engines: { type: 'string', help: 'ingest: comma list of sqlite,postgres (default both)' },
  posters: { type: 'string', help: 'ingest: comma list of concurrent posters (default 1,10,100)' },
  duration: { type: 'string', help: 'ingest: seconds per run (default 10)' },
  'readings-per-request': { type: 'string', help: 'ingest: readings per request (default 100, max 1000)' },
  units: { type: 'string', help: 'ingest: units the readings are spread over (default 100)' },
  clients: { type: 'string', help: 'e2e: connected Socket.io clients (default 1000)' },
  rate: { type: 'string', help: 'e2e: readings per second posted (default 200)' },
  'e2e-units': { type: 'string', help: 'e2e: units the readings are spread over (default 50)' },
  'request-size': { type: 'string', help: 'e2e: readings per ingest request (default 10)' },
  'e2e-duration': { type: 'string', help: 'e2e: seconds of posting (default 20)' },
  workers: { type: 'string', help: 'e2e, cluster: worker threads holding the clients (default 2)' },
  'connect-rate': { type: 'string', help: 'e2e, cluster: new connections per second while connecting (default 200)' },
  'flush-interval-ms': { type: 'string', help: 'e2e, cluster: FLUSH_INTERVAL_MS given to the gateway(s) (default: unset = server default 1000)' },
  'cluster-nodes': { type: 'string', help: 'cluster: comma list of node counts to run, in order (default 2,1: two nodes on Redis, then one node without)' },
  'cluster-clients': { type: 'string', help: 'cluster: Socket.io clients, split evenly over the nodes (default 2000)' },
  'cluster-rate': { type: 'string', help: 'cluster: readings per second posted, alternating between the nodes (default 200)' },
  'cluster-units': { type: 'string', help: 'cluster: units the readings are spread over (default 50)' },
  'cluster-request-size': { type: 'string', help: 'cluster: readings per ingest request (default 10)' },
  'cluster-duration': { type: 'string', help: 'cluster: seconds of posting (default 20)' },
  'redis-server': { type: 'string', help: 'cluster: redis-server binary (default $REDIS_SERVER or redis-server on PATH)' },
  help: { type: 'boolean', default: false, help: 'this text' },
};

function options() {
  const { values } = parseArgs({
    options: Object.fromEntries(Object.entries(FLAGS).map(([k, v]) => [k, { type: v.type, ...(v.default !== undefined ? { default: v.default } : {}) }])),
    strict: true,
  });
  if (values.help) {
    console.log('usage: node run.mjs [flags]\n');
    for (const [k, v] of Object.entries(FLAGS)) console.log(`  --${k.padEnd(22)} ${v.help}`);
    process.exit(0);
  }
  const q = values.quick;
  const num = (name, full, quick) => {
    const v = values[name] !== undefined ? Number(values[name]) : q ? quick : full;
    if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} must be a positive number`);
    return v;
  };
  const list = (name, full, quick) => (values[name] ?? (q ? quick : full)).split(',').map((s) => s.trim()).filter(Boolean);
  const o = {
    quick: q,
    scenarios: (values.scenarios ?? values.scenario ?? 'ingest,e2e,cluster').split(',').map((s) => s.trim()).filter(Boolean),
    bin: values.bin ?? process.env.SENSORWIRE_BIN ?? DEFAULT_BIN,
    pgUrl: values['pg-url'] ?? process.env.BENCH_POSTGRES_URL ?? 'postgres://root@127.0.0.1:5432/test',
    engines: list('engines', 'sqlite,postgres', 'sqlite,postgres'),
    posters: list('posters', '1,10,100', '1,10').map(Number),
    duration: num('duration', 10, 2),
    readingsPerRequest: num('readings-per-request', 100, 100),
    units: num('units', 100, 100),
    clients: num('clients', 1000, 100),
    rate: num('rate', 200, 100),
    e2eUnits: num('e2e-units', 50, 50),
    requestSize: num('request-size', 10, 10),
    e2eDuration: num('e2e-duration', 20, 5),
    workers: num('workers', 2, 1),
    connectRate: num('connect-rate', 200, 200),
    flushIntervalMs: values['flush-interval-ms'] !== undefined ? Number(values['flush-interval-ms']) : null,
    clusterNodes: list('cluster-nodes', '2,1', '2,1').map(Number),
    clusterClients: num('cluster-clients', 2000, 200),
    clusterRate: num('cluster-rate', 200, 100),
    clusterUnits: num('cluster-units', 50, 50),
    clusterRequestSize: num('cluster-request-size', 10, 10),
    clusterDuration: num('cluster-duration', 20, 5),
    redisServer: values['redis-server'] ?? process.env.REDIS_SERVER ?? 'redis-server',
  };
  for (const s of o.scenarios) if (!['ingest', 'e2e', 'cluster'].includes(s)) throw new Error(`unknown scenario ${s}`);
  for (const n of o.clusterNodes) if (!Number.isInteger(n) || n < 1) throw new Error('--cluster-nodes: positive integers');
  if (o.clusterRequestSize > 1000 || o.requestSize > 1000) throw new Error('--request-size / --cluster-request-size is at most 1000 (the gateway cap)');
  for (const e of o.engines) if (!['sqlite', 'postgres'].includes(e)) throw new Error(`unknown engine ${e}`);
  if (o.readingsPerRequest > 1000) throw new Error('--readings-per-request is at most 1000 (the gateway cap)');
  return o;
}

function emit(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

const unitIds = (n, prefix) => Array.from({ length: n }, (_, i) => `${prefix}-${String(i).padStart(4, '0')}`);

async function createFixtures(gw, token, units) {
  await mustRequest(gw.url, 'POST', '/api/sites', { token, body: { id: 's-bench', name: 'Bench site' } });
  const agent = makeAgent(8);
  // A handful at a time: creation is not what is measured.
  for (let i = 0; i < units.length; i += 8) {
    await Promise.all(
      units.slice(i, i + 8).map((id) =>
        mustRequest(gw.url, 'POST', '/api/units', {
          token,
          agent,
          body: { id, siteId: 's-bench', name: `Unit ${id}`, tempMin: -40, tempMax: 60 },
        }),
      ),
    );
  }
  agent.destroy();
}

const temperature = () => Math.round((18 + Math.random() * 8) * 100) / 100; // always in range: no alerts

/**
 * Machine-wide CPU over a measured window, and what is left after the gateway and the harness:
 * other processes (PostgreSQL, or anything else running on the box) competing for the cores.
 */
function otherLoad(machineBusy, serverCpu, benchCpu, seconds) {
  if (machineBusy === null || !Number.isFinite(machineBusy)) return {};
  const bench = (benchCpu.user + benchCpu.system) / 1e6;
  return {
    machine_cpu_busy_cores: round(machineBusy / seconds, 2),
    other_processes_cpu_cores: round(Math.max(0, machineBusy - serverCpu - bench) / seconds, 2),
  };
}

function serverLog(gw) {
  const s = summariseLog(gw.stderrLines());
  return s.lines === 0 ? { lines: 0 } : s;
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: ingest throughput

async function ingestRun(o, engine, posters) {
  const gw = await startGateway({ bin: o.bin, engine, pgUrl: o.pgUrl });
  try {
    const token = mintToken(gw.secret, { sub: 'bench-admin', org: ORG, role: 'admin' });
    const units = unitIds(o.units, 'u');
    await createFixtures(gw, token, units);

    const agent = makeAgent(posters);
    const perRequest = o.readingsPerRequest;
    // Readings of one request for one unit get distinct milliseconds when a request holds more
    // readings than there are units; each poster has its own deviceId, so (unitId, recordedAt,
    // deviceId, source) never repeats and nothing is a duplicate.
    const msPerRequest = Math.ceil(perRequest / units.length);
    const latencies = [];
    const errors = {};
    let requests = 0;
    let okRequests = 0;
    let accepted = 0;
    let duplicates = 0;
    let rejectedReadings = 0;
    let retryWaitMs = 0;

    const cpu0 = cpuSeconds(gw.pid);
    const clientCpu0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const started = performance.now();
    const deadline = started + o.duration * 1000;

    const poster = async (p) => {
      const deviceId = `bench-p${p}`;
      let lastTs = 0;
      while (performance.now() < deadline) {
        const ts = Math.max(Date.now(), lastTs + msPerRequest);
        lastTs = ts;
        const readings = new Array(perRequest);
        for (let j = 0; j < perRequest; j++) {
          readings[j] = {
            unitId: units[(j + p) % units.length],
            temperature: temperature(),
            recordedAt: isoMs(ts + Math.floor(j / units.length)),
            deviceId,
          };
        }
        requests++;
        let res;
        try {
          res = await request(gw.url, 'POST', '/api/readings/ingest', { token, agent, body: { readings } });
        } catch (e) {
          const key = `network:${e.code ?? e.message}`;
          errors[key] = (errors[key] || 0) + 1;
          rejectedReadings += perRequest;
          await sleep(100);
          continue;
        }
        if (res.status === 200) {
          okRequests++;
          latencies.push(res.ms);
          accepted += res.body.accepted;
          duplicates += res.body.duplicates;
        } else {
          errors[res.status] = (errors[res.status] || 0) + 1;
          rejectedReadings += perRequest;
          if (res.status === 503 || res.status === 429) {
            // Do what a well-behaved device does: wait Retry-After (capped at 1 s here).
            const wait = Math.min(1000, 1000 * (Number(res.retryAfter) || 1));
            retryWaitMs += wait;
            await sleep(wait);
          }
        }
      }
    };
    await Promise.all(Array.from({ length: posters }, (_, p) => poster(p)));
    const elapsed = (performance.now() - started) / 1000;
    const cpu1 = cpuSeconds(gw.pid);
    const clientCpu = process.cpuUsage(clientCpu0);
    const machine1 = machineBusySeconds();
    const rss = statusMiB(gw.pid, 'VmRSS');
    const hwm = statusMiB(gw.pid, 'VmHWM');
    agent.destroy();

    // Verify against the database itself.
    let stored = null;
    let verifyNote;
    if (engine === 'postgres') {
      stored = await postgresCount(gw.databaseUrl, 'SELECT count(*) AS count FROM readings');
      await gw.stop();
    } else {
      await gw.stop();
      if (sqliteAvailable()) stored = sqliteCount(gw.sqliteFile, 'SELECT count(*) FROM readings');
      else verifyNote = 'sqlite3 CLI not found: stored count not checked';
    }
    const lat = percentiles(latencies, [50, 99]);
    const result = {
      scenario: 'ingest',
      engine,
      posters,
      readings_per_request: perRequest,
      units: units.length,
      duration_s: round(elapsed, 2),
      requests,
      ok_requests: okRequests,
      accepted,
      duplicates,
      accepted_per_s: Math.round(accepted / elapsed),
      requests_per_s: round(okRequests / elapsed, 1),
      latency_ms: { p50: round(lat[50], 1), p99: round(lat[99], 1), max: round(latencies.length ? latencies.reduce((a, b) => Math.max(a, b), 0) : null, 1) },
      errors,
      rejected_readings: rejectedReadings,
      retry_wait_s: round(retryWaitMs / 1000, 1),
      stored,
      stored_matches_accepted: stored === null ? null : stored === accepted,
      server_cpu_s: round(cpu1 - cpu0, 2),
      server_cpu_cores: round((cpu1 - cpu0) / elapsed, 2),
      server_rss_mb: round(rss, 1),
      server_rss_peak_mb: round(hwm, 1),
      bench_client_cpu_s: round((clientCpu.user + clientCpu.system) / 1e6, 2),
      ...otherLoad(machine1 - machine0, cpu1 - cpu0, clientCpu, elapsed),
      server_log: serverLog(gw),
    };
    if (verifyNote) result.note = verifyNote;
    return result;
  } finally {
    await gw.cleanup();
  }
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: end-to-end latency of sensor:readings:batch

/**
 * `url`: one gateway URL, or an array of node URLs: then the client with overall index i connects
 * to url[i % url.length] (see clients.mjs), and `deviceNode` lets the workers split latency into
 * local and cross-node deliveries.
 */
function startWorkers(n, url, tokens, connectRate, { deviceNode = null } = {}) {
  const workers = [];
  const per = Math.ceil(tokens.length / n);
  for (let w = 0; w < n; w++) {
    const share = tokens.slice(w * per, (w + 1) * per);
    if (share.length === 0) continue;
    const where = Array.isArray(url) ? { urls: url, firstIndex: w * per, deviceNode } : { url };
    const worker = new Worker(fileURLToPath(new URL('./clients.mjs', import.meta.url)), {
      workerData: { ...where, tokens: share, connectPerSecond: connectRate / n, connectTimeoutMs: 20_000, workerIndex: w },
    });
    const waiters = [];
    worker.on('message', (msg) => {
      const i = waiters.findIndex((x) => x.type === msg.type);
      if (i >= 0) waiters.splice(i, 1)[0].resolve(msg);
    });
    worker.on('error', (e) => {
      log(`client worker ${w} failed: ${e.stack ?? e}`);
      for (const x of waiters.splice(0)) x.reject(e);
    });
    const call = (type, reply = type) =>
      new Promise((resolve, reject) => {
        waiters.push({ type: reply, resolve, reject });
        worker.postMessage({ type });
      });
    workers.push({ worker, call });
  }
  return workers;
}

async function collectStats(workers) {
  const all = await Promise.all(workers.map((w) => w.call('stats')));
  const merged = {
    deliveries: 0,
    batchEvents: 0,
    duplicates: 0,
    outOfOrder: 0,
    countMismatch: 0,
    badEvents: 0,
    maxLatency: 0,
    minLatency: null,
    perClient: [],
    perClientLocal: [],
    perClientDisconnected: [],
    connectedNow: 0,
    disconnectedClients: 0,
    disconnects: {},
    loopDelayP99Ms: 0,
    loopDelayMaxMs: 0,
    hist: null,
    histLocal: null,
    histRemote: null,
    maxLocal: 0,
    maxRemote: 0,
  };
  const add = (into, h) => {
    if (!h) return into;
    if (!into) return h;
    for (let i = 0; i < h.length; i++) into[i] += h[i];
    return into;
  };
  for (const s of all) {
    for (const k of ['deliveries', 'batchEvents', 'duplicates', 'outOfOrder', 'countMismatch', 'badEvents', 'connectedNow', 'disconnectedClients']) merged[k] += s[k];
    merged.maxLatency = Math.max(merged.maxLatency, s.maxLatency);
    if (s.minLatency !== null) merged.minLatency = merged.minLatency === null ? s.minLatency : Math.min(merged.minLatency, s.minLatency);
    merged.perClient.push(...s.perClient);
    if (s.perClientLocal) merged.perClientLocal.push(...s.perClientLocal);
    if (s.perClientDisconnected) merged.perClientDisconnected.push(...s.perClientDisconnected);
    for (const [k, v] of Object.entries(s.disconnects)) merged.disconnects[k] = (merged.disconnects[k] || 0) + v;
    merged.loopDelayP99Ms = Math.max(merged.loopDelayP99Ms, s.loopDelayP99Ms);
    merged.loopDelayMaxMs = Math.max(merged.loopDelayMaxMs, s.loopDelayMaxMs);
    merged.hist = add(merged.hist, s.hist);
    merged.histLocal = add(merged.histLocal, s.histLocal);
    merged.histRemote = add(merged.histRemote, s.histRemote);
    merged.maxLocal = Math.max(merged.maxLocal, s.maxLocal ?? 0);
    merged.maxRemote = Math.max(merged.maxRemote, s.maxRemote ?? 0);
  }
  return merged;
}

async function e2eRun(o) {
  const env = o.flushIntervalMs !== null ? { FLUSH_INTERVAL_MS: String(o.flushIntervalMs) } : {};
  const flushMs = o.flushIntervalMs ?? SERVER_DEFAULT_FLUSH_MS;
  const gw = await startGateway({ bin: o.bin, engine: 'sqlite', pgUrl: o.pgUrl, env });
  let workers = [];
  try {
    const admin = mintToken(gw.secret, { sub: 'bench-poster', org: ORG, role: 'admin' });
    const units = unitIds(o.e2eUnits, 'e');
    await createFixtures(gw, admin, units);
    const rssIdle = statusMiB(gw.pid, 'VmRSS');

    // Connect the clients.
    const tokens = Array.from({ length: o.clients }, (_, i) => mintToken(gw.secret, { sub: `dash-${i}`, org: ORG, role: 'admin' }));
    const workerCount = Math.min(o.workers, o.clients);
    log(`e2e: connecting ${o.clients} clients from ${workerCount} worker thread(s) at ~${o.connectRate}/s`);
    const cpuConnect0 = cpuSeconds(gw.pid);
    workers = startWorkers(workerCount, gw.url, tokens, o.connectRate);
    const connects = await Promise.all(workers.map((w) => w.call('connect', 'connected')));
    const connected = connects.reduce((a, c) => a + c.connected, 0);
    const connectErrors = {};
    for (const c of connects) for (const [k, v] of Object.entries(c.errors)) connectErrors[k] = (connectErrors[k] || 0) + v;
    const connectMs = Math.max(...connects.map((c) => c.ms));
    const cpuConnect1 = cpuSeconds(gw.pid);
    // One more client on the main thread, which only posts: its latency is less affected by the
    // load of the worker threads that hold the measured clients (not counted in the figures above).
    const probeLatencies = [];
    const probe = io(gw.url, {
      auth: { token: mintToken(gw.secret, { sub: 'probe', org: ORG, role: 'admin' }) },
      transports: ['websocket'],
      forceNew: true,
      reconnection: false,
    });
    probe.on('sensor:readings:batch', (batch) => {
      const now = Date.now();
      for (const r of batch.readings) probeLatencies.push(now - Date.parse(r.recordedAt));
    });
    await new Promise((resolve, reject) => {
      probe.once('connect', resolve);
      probe.once('connect_error', reject);
    });
    await sleep(1000); // let the server settle before sampling memory
    const rssConnected = statusMiB(gw.pid, 'VmRSS');
    log(`e2e: ${connected}/${o.clients} connected in ${connectMs} ms; server RSS ${round(rssConnected, 1)} MiB; posting ${o.rate} readings/s for ${o.e2eDuration} s`);

    // Post at a fixed rate: one request of `requestSize` readings every `interval` ms.
    const agent = makeAgent(64);
    const interval = (1000 * o.requestSize) / o.rate;
    const totalRequests = Math.round((o.e2eDuration * 1000) / interval);
    const errors = {};
    const latencies = [];
    let posted = 0; // readings the gateway accepted (200)
    let duplicates = 0;
    let lateSends = 0; // requests sent more than one interval behind schedule
    const inflight = new Set();
    let lastTs = 0;
    const cpu0 = cpuSeconds(gw.pid);
    const clientCpu0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const started = performance.now();
    for (let k = 0; k < totalRequests; k++) {
      const due = started + k * interval;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      else if (-wait > interval) lateSends++;
      // A unit comes round again every units/requestSize requests; when the poster catches up
      // after a stall, several requests go out in the same millisecond, so never reuse one:
      // (unitId, recordedAt, deviceId) must not repeat, or the gateway rightly calls it a duplicate.
      const now = Math.max(Date.now(), lastTs + 1);
      lastTs = now;
      const readings = [];
      for (let j = 0; j < o.requestSize; j++) {
        readings.push({
          unitId: units[(k * o.requestSize + j) % units.length],
          temperature: temperature(),
          recordedAt: isoMs(now),
          deviceId: 'e2e-poster',
        });
      }
      const p = request(gw.url, 'POST', '/api/readings/ingest', { token: admin, agent, body: { readings } })
        .then((res) => {
          if (res.status === 200) {
            posted += res.body.accepted;
            duplicates += res.body.duplicates;
            latencies.push(res.ms);
          } else {
            errors[res.status] = (errors[res.status] || 0) + 1;
          }
        })
        .catch((e) => {
          const key = `network:${e.code ?? e.message}`;
          errors[key] = (errors[key] || 0) + 1;
        })
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await Promise.all([...inflight]);
    const scheduleEnd = started + o.e2eDuration * 1000;
    if (performance.now() < scheduleEnd) await sleep(scheduleEnd - performance.now());
    const postSeconds = (performance.now() - started) / 1000;

    // Drain: wait for the last flush windows, until every client has everything or nothing moves.
    const expected = posted * o.clients;
    let stats = await collectStats(workers);
    let lastChange = performance.now();
    let last = stats.deliveries;
    const drainStart = performance.now();
    while (stats.deliveries < expected) {
      await sleep(250);
      stats = await collectStats(workers);
      if (stats.deliveries !== last) {
        last = stats.deliveries;
        lastChange = performance.now();
      }
      const sinceChange = performance.now() - lastChange;
      const sinceDrain = performance.now() - drainStart;
      if ((sinceChange > 3 * flushMs + 2000 && sinceDrain > 2 * flushMs) || sinceDrain > 30_000) break;
    }
    const windowSeconds = (performance.now() - started) / 1000;
    const cpu1 = cpuSeconds(gw.pid);
    const clientCpu = process.cpuUsage(clientCpu0);
    const machine1 = machineBusySeconds();
    const rssEnd = statusMiB(gw.pid, 'VmRSS');
    const hwm = statusMiB(gw.pid, 'VmHWM');
    agent.destroy();

    probe.close();
    const probeLat = percentiles(probeLatencies, [50, 99]);
    const total = stats.hist.reduce((a, b) => a + b, 0);
    const perClientSorted = [...stats.perClient].sort((a, b) => a - b);
    const incomplete = stats.perClient.filter((n) => n !== posted).length;
    const postLat = percentiles(latencies, [50, 99]);
    const result = {
      scenario: 'e2e',
      engine: 'sqlite',
      flush_interval_ms: flushMs,
      clients: o.clients,
      clients_connected: connected,
      connect_errors: connectErrors,
      connect_ms: connectMs,
      client_worker_threads: workerCount,
      units: units.length,
      target_readings_per_s: o.rate,
      readings_per_request: o.requestSize,
      post_duration_s: round(postSeconds, 2),
      posted_readings: posted,
      post_duplicates: duplicates,
      post_errors: errors,
      post_late_sends: lateSends,
      post_latency_ms: { p50: round(postLat[50], 1), p99: round(postLat[99], 1) },
      expected_deliveries: expected,
      received_deliveries: stats.deliveries,
      completeness: expected === 0 ? null : round(stats.deliveries / expected, 6),
      clients_incomplete: incomplete,
      per_client_received: { min: perClientSorted[0], max: perClientSorted[perClientSorted.length - 1] },
      duplicate_deliveries: stats.duplicates,
      out_of_order_in_event: stats.outOfOrder,
      count_mismatch_events: stats.countMismatch,
      batch_events: stats.batchEvents,
      latency_ms: {
        p50: histPercentile(stats.hist, total, 50),
        p99: histPercentile(stats.hist, total, 99),
        max: stats.maxLatency,
        min: stats.minLatency,
      },
      probe_latency_ms: {
        p50: probeLat[50],
        p99: probeLat[99],
        max: probeLatencies.reduce((a, b) => Math.max(a, b), 0),
        readings: probeLatencies.length,
      },
      deliveries_per_s: Math.round(stats.deliveries / postSeconds),
      batch_events_per_s: Math.round(stats.batchEvents / postSeconds),
      disconnected_clients: stats.disconnectedClients,
      disconnect_reasons: stats.disconnects,
      client_loop_delay_ms: { p99: round(stats.loopDelayP99Ms, 1), max: round(stats.loopDelayMaxMs, 1) },
      server_rss_idle_mb: round(rssIdle, 1),
      server_rss_connected_mb: round(rssConnected, 1),
      server_rss_end_mb: round(rssEnd, 1),
      server_rss_peak_mb: round(hwm, 1),
      server_cpu_connect_s: round(cpuConnect1 - cpuConnect0, 2),
      server_cpu_s: round(cpu1 - cpu0, 2),
      server_cpu_cores: round((cpu1 - cpu0) / windowSeconds, 2),
      measured_window_s: round(windowSeconds, 2),
      bench_process_cpu_s: round((clientCpu.user + clientCpu.system) / 1e6, 2),
      ...otherLoad(machine1 - machine0, cpu1 - cpu0, clientCpu, windowSeconds),
      server_log: null,
    };
    await Promise.all(workers.map((w) => w.call('close', 'closed').catch(() => null)));
    await Promise.all(workers.map((w) => w.worker.terminate()));
    workers = [];
    await gw.stop();
    result.server_log = serverLog(gw);
    return result;
  } finally {
    await Promise.all(workers.map((w) => w.worker.terminate()));
    await gw.cleanup();
  }
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: several nodes on one PostgreSQL database and one Redis (the Socket.io Redis adapter)

/** p50 / p99 / max of a 1 ms histogram. */
function histSummary(hist, max) {
  if (!hist) return null;
  const total = hist.reduce((a, b) => a + b, 0);
  return { p50: histPercentile(hist, total, 50), p99: histPercentile(hist, total, 99), max: total ? max : null, readings: total };
}

const perMillion = (cpu, deliveries) => (deliveries > 0 && cpu !== null ? round(cpu / (deliveries / 1e6), 2) : null);

async function clusterRun(o, nodes) {
  const flushEnv = o.flushIntervalMs !== null ? { FLUSH_INTERVAL_MS: String(o.flushIntervalMs) } : {};
  const flushMs = o.flushIntervalMs ?? SERVER_DEFAULT_FLUSH_MS;
  const secret = newSecret();
  let db = null;
  let redis = null;
  const gws = [];
  let workers = [];
  const probes = [];
  const agent = makeAgent(64);
  try {
    db = await createPostgresDatabase(o.pgUrl);
    if (nodes > 1) {
      redis = await startRedis({ bin: o.redisServer });
      log(`cluster: redis-server pid ${redis.pid} on ${redis.url}`);
    }
    const env = { ...flushEnv, ...(redis ? { REDIS_URL: redis.url } : {}) };
    // One after the other: the first node applies the migrations before the next one starts.
    for (let i = 0; i < nodes; i++) {
      gws.push(await startGateway({ bin: o.bin, engine: 'postgres', pgUrl: o.pgUrl, env, databaseUrl: db.url, secret }));
    }
    log(`cluster: ${nodes} node(s) on ${db.name}: ${gws.map((g) => `${g.url} (pid ${g.pid})`).join(', ')}`);
    const admin = mintToken(secret, { sub: 'bench-poster', org: ORG, role: 'admin' });
    const units = unitIds(o.clusterUnits, 'c');
    await createFixtures(gws[0], admin, units);
    const nodeCpu = () => gws.map((g) => cpuSeconds(g.pid));
    const nodeRss = (field = 'VmRSS') => gws.map((g) => statusMiB(g.pid, field));
    const sum = (xs) => (xs.some((x) => x === null || x === undefined) ? null : xs.reduce((a, b) => a + b, 0));
    const diff = (b, a) => b.map((x, i) => (x === null || a[i] === null ? null : x - a[i]));
    const redisCpu = () => (redis ? cpuSeconds(redis.pid) : null);
    const rssIdle = nodeRss();

    // Clients: overall index i on node i % nodes, each with its own `sub` (the gateway allows
    // MAX_CONNECTIONS_PER_USER = 20 connections per user and node).
    const deviceOf = (n) => `cluster-n${n}`;
    const deviceNode = nodes > 1 ? Object.fromEntries(gws.map((_, n) => [deviceOf(n), n])) : null;
    const tokens = Array.from({ length: o.clusterClients }, (_, i) => mintToken(secret, { sub: `dash-${i}`, org: ORG, role: 'admin' }));
    const clientsPerNode = gws.map((_, n) => tokens.filter((_, i) => i % nodes === n).length);
    const workerCount = Math.min(o.workers, o.clusterClients);
    log(`cluster: connecting ${o.clusterClients} clients (${clientsPerNode.join(' + ')}) from ${workerCount} worker thread(s) at ~${o.connectRate}/s`);
    const cpuConnect0 = nodeCpu();
    const redisConnect0 = redisCpu();
    workers = startWorkers(workerCount, gws.map((g) => g.url), tokens, o.connectRate, { deviceNode });
    const connects = await Promise.all(workers.map((w) => w.call('connect', 'connected')));
    const connected = connects.reduce((a, c) => a + c.connected, 0);
    const connectErrors = {};
    for (const c of connects) for (const [k, v] of Object.entries(c.errors)) connectErrors[k] = (connectErrors[k] || 0) + v;
    const connectMs = Math.max(...connects.map((c) => c.ms));
    const cpuConnect1 = nodeCpu();
    const redisConnect1 = redisCpu();

    // One probe client per node on the main thread (which only posts): not counted above.
    const probeLatencies = [];
    for (let n = 0; n < nodes; n++) {
      const probe = io(gws[n].url, {
        auth: { token: mintToken(secret, { sub: `probe-${n}`, org: ORG, role: 'admin' }) },
        transports: ['websocket'],
        forceNew: true,
        reconnection: false,
      });
      probe.on('sensor:readings:batch', (batch) => {
        const now = Date.now();
        for (const r of batch.readings) probeLatencies.push(now - Date.parse(r.recordedAt));
      });
      probes.push(probe);
      await new Promise((resolve, reject) => {
        probe.once('connect', resolve);
        probe.once('connect_error', reject);
      });
    }
    await sleep(1000); // let the servers settle before sampling memory
    const rssConnected = nodeRss();
    log(`cluster: ${connected}/${o.clusterClients} connected in ${connectMs} ms; RSS ${rssConnected.map((r) => round(r, 1)).join(' + ')} MiB; posting ${o.clusterRate} readings/s for ${o.clusterDuration} s, alternating over ${nodes} node(s)`);

    // One poster, fixed schedule; request k goes to node k % nodes, with that node's deviceId.
    const interval = (1000 * o.clusterRequestSize) / o.clusterRate;
    const totalRequests = Math.round((o.clusterDuration * 1000) / interval);
    const errors = {};
    const latencies = [];
    const postedPerNode = gws.map(() => 0);
    let duplicates = 0;
    let lateSends = 0;
    const inflight = new Set();
    let lastTs = 0;
    const cpu0 = nodeCpu();
    const redis0 = redisCpu();
    const clientCpu0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const started = performance.now();
    for (let k = 0; k < totalRequests; k++) {
      const due = started + k * interval;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      else if (-wait > interval) lateSends++;
      const n = k % nodes;
      const now = Math.max(Date.now(), lastTs + 1); // never reuse a millisecond (see e2e)
      lastTs = now;
      const readings = [];
      for (let j = 0; j < o.clusterRequestSize; j++) {
        readings.push({
          unitId: units[(k * o.clusterRequestSize + j) % units.length],
          temperature: temperature(),
          recordedAt: isoMs(now),
          deviceId: deviceOf(n),
        });
      }
      const p = request(gws[n].url, 'POST', '/api/readings/ingest', { token: admin, agent, body: { readings } })
        .then((res) => {
          if (res.status === 200) {
            postedPerNode[n] += res.body.accepted;
            duplicates += res.body.duplicates;
            latencies.push(res.ms);
          } else {
            const key = `node${n}:${res.status}`;
            errors[key] = (errors[key] || 0) + 1;
          }
        })
        .catch((e) => {
          const key = `node${n}:network:${e.code ?? e.message}`;
          errors[key] = (errors[key] || 0) + 1;
        })
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await Promise.all([...inflight]);
    const scheduleEnd = started + o.clusterDuration * 1000;
    if (performance.now() < scheduleEnd) await sleep(scheduleEnd - performance.now());
    const postSeconds = (performance.now() - started) / 1000;
    const posted = postedPerNode.reduce((a, b) => a + b, 0);

    // Drain, as in e2e.
    const expected = posted * o.clusterClients;
    let stats = await collectStats(workers);
    let lastChange = performance.now();
    let last = stats.deliveries;
    const drainStart = performance.now();
    while (stats.deliveries < expected) {
      await sleep(250);
      stats = await collectStats(workers);
      if (stats.deliveries !== last) {
        last = stats.deliveries;
        lastChange = performance.now();
      }
      const sinceChange = performance.now() - lastChange;
      const sinceDrain = performance.now() - drainStart;
      if ((sinceChange > 3 * flushMs + 2000 && sinceDrain > 2 * flushMs) || sinceDrain > 30_000) break;
    }
    const windowSeconds = (performance.now() - started) / 1000;
    const cpu1 = nodeCpu();
    const redis1 = redisCpu();
    const clientCpu = process.cpuUsage(clientCpu0);
    const machine1 = machineBusySeconds();
    const rssEnd = nodeRss();
    const hwm = nodeRss('VmHWM');
    const redisRss = redis ? statusMiB(redis.pid, 'VmRSS') : null;
    const alive = gws.map((g) => g.alive());

    const stored = await postgresCount(db.url, 'SELECT count(*) AS count FROM readings').catch((e) => {
      log(`cluster: could not count stored readings: ${e.message}`);
      return null;
    });

    for (const p of probes) p.close();
    const probeLat = percentiles(probeLatencies, [50, 99]);
    const total = stats.hist.reduce((a, b) => a + b, 0);
    const perClientSorted = [...stats.perClient].sort((a, b) => a - b);
    const incomplete = stats.perClient.filter((x) => x !== posted).length;
    // perClient is in overall client order (workers hold consecutive slices): node = i % nodes.
    const incompletePerNode = gws.map(() => 0);
    const receivedPerNode = gws.map(() => 0);
    // Clients that stayed connected throughout: what they miss was lost by the gateways, not
    // by a disconnect (slow consumer, ping timeout).
    const steady = { clients: 0, incomplete: 0, missing_deliveries: 0 };
    if (nodes > 1) Object.assign(steady, { missing_local: 0, missing_cross_node: 0 });
    stats.perClient.forEach((x, i) => {
      const n = i % nodes;
      receivedPerNode[n] += x;
      if (x !== posted) incompletePerNode[n]++;
      if (stats.perClientDisconnected[i]) return;
      steady.clients++;
      if (x !== posted) steady.incomplete++;
      steady.missing_deliveries += posted - x;
      if (nodes > 1) {
        const local = stats.perClientLocal[i];
        steady.missing_local += postedPerNode[n] - local;
        steady.missing_cross_node += posted - postedPerNode[n] - (x - local);
      }
    });
    const postLat = percentiles(latencies, [50, 99]);
    const serverCpuPerNode = diff(cpu1, cpu0);
    const serverCpu = sum(serverCpuPerNode);
    const redisCpuS = redis ? redis1 - redis0 : null;
    const bench = (clientCpu.user + clientCpu.system) / 1e6;
    const machineBusy = machine1 - machine0;
    const completeness = expected === 0 ? null : round(stats.deliveries / expected, 6);
    const result = {
      scenario: 'cluster',
      nodes,
      engine: 'postgres',
      adapter: redis ? 'redis' : 'in-memory',
      flush_interval_ms: flushMs,
      clients: o.clusterClients,
      clients_per_node: clientsPerNode,
      clients_connected: connected,
      connect_errors: connectErrors,
      connect_ms: connectMs,
      client_worker_threads: workerCount,
      units: units.length,
      target_readings_per_s: o.clusterRate,
      readings_per_request: o.clusterRequestSize,
      post_duration_s: round(postSeconds, 2),
      posted_readings: posted,
      posted_per_node: postedPerNode,
      stored_readings: stored,
      post_duplicates: duplicates,
      post_errors: errors,
      post_late_sends: lateSends,
      post_latency_ms: { p50: round(postLat[50], 1), p99: round(postLat[99], 1) },
      expected_deliveries: expected,
      received_deliveries: stats.deliveries,
      received_per_node: receivedPerNode,
      completeness,
      exactly_once: completeness === 1 && stats.duplicates === 0 && incomplete === 0,
      clients_incomplete: incomplete,
      clients_incomplete_per_node: incompletePerNode,
      per_client_received: { min: perClientSorted[0], max: perClientSorted[perClientSorted.length - 1] },
      duplicate_deliveries: stats.duplicates,
      out_of_order_in_event: stats.outOfOrder,
      count_mismatch_events: stats.countMismatch,
      bad_events: stats.badEvents,
      batch_events: stats.batchEvents,
      batch_events_per_client_per_s: round(stats.batchEvents / o.clusterClients / postSeconds, 1),
      deliveries_per_s: Math.round(stats.deliveries / postSeconds),
      batch_events_per_s: Math.round(stats.batchEvents / postSeconds),
      latency_ms: {
        p50: histPercentile(stats.hist, total, 50),
        p99: histPercentile(stats.hist, total, 99),
        max: stats.maxLatency,
        min: stats.minLatency,
      },
      ...(nodes > 1
        ? {
            latency_local_ms: histSummary(stats.histLocal, stats.maxLocal),
            latency_cross_node_ms: histSummary(stats.histRemote, stats.maxRemote),
          }
        : {}),
      probe_latency_ms: {
        p50: probeLat[50],
        p99: probeLat[99],
        max: probeLatencies.reduce((a, b) => Math.max(a, b), 0),
        readings: probeLatencies.length,
      },
      disconnected_clients: stats.disconnectedClients,
      disconnect_reasons: stats.disconnects,
      never_disconnected: steady,
      client_loop_delay_ms: { p99: round(stats.loopDelayP99Ms, 1), max: round(stats.loopDelayMaxMs, 1) },
      server_cpu_s: round(serverCpu, 2),
      server_cpu_s_per_node: serverCpuPerNode.map((x) => round(x, 2)),
      server_cpu_cores: round(serverCpu / windowSeconds, 2),
      server_cpu_s_per_million_deliveries: perMillion(serverCpu, stats.deliveries),
      redis_cpu_s: round(redisCpuS, 2),
      redis_cpu_s_per_million_deliveries: redis ? perMillion(redisCpuS, stats.deliveries) : null,
      redis_cpu_connect_s: redis ? round(redisConnect1 - redisConnect0, 2) : null,
      redis_rss_mb: round(redisRss, 1),
      server_and_redis_cpu_s_per_million_deliveries: perMillion(serverCpu + (redisCpuS ?? 0), stats.deliveries),
      server_cpu_connect_s_per_node: diff(cpuConnect1, cpuConnect0).map((x) => round(x, 2)),
      server_rss_idle_mb: rssIdle.map((x) => round(x, 1)),
      server_rss_connected_mb: rssConnected.map((x) => round(x, 1)),
      server_rss_connected_total_mb: round(sum(rssConnected), 1),
      server_rss_end_mb: rssEnd.map((x) => round(x, 1)),
      server_rss_peak_mb: hwm.map((x) => round(x, 1)),
      nodes_alive_at_end: alive,
      measured_window_s: round(windowSeconds, 2),
      bench_process_cpu_s: round(bench, 2),
      ...(machineBusy !== null && Number.isFinite(machineBusy)
        ? {
            machine_cpu_busy_cores: round(machineBusy / windowSeconds, 2),
            // What is left after the gateways, Redis and the harness: PostgreSQL, anything else.
            other_processes_cpu_cores: round(Math.max(0, machineBusy - serverCpu - (redisCpuS ?? 0) - bench) / windowSeconds, 2),
          }
        : {}),
      server_log: null,
    };
    agent.destroy();
    await Promise.all(workers.map((w) => w.call('close', 'closed').catch(() => null)));
    await Promise.all(workers.map((w) => w.worker.terminate()));
    workers = [];
    await Promise.all(gws.map((g) => g.stop()));
    result.server_log = gws.map((g) => serverLog(g));
    return result;
  } finally {
    agent.destroy();
    for (const p of probes) p.close();
    await Promise.all(workers.map((w) => w.worker.terminate()));
    await Promise.all(gws.map((g) => g.cleanup()));
    if (redis) await redis.stop();
    if (db) await dropPostgresDatabase(o.pgUrl, db.name).catch((e) => log(`could not drop ${db.name}: ${e.message}`));
  }
}

/** What the Redis adapter costs: the multi-node line against the one-node line of the same run. */
function adapterCost(multi, single) {
  if (!single || single.error || multi.error) return null;
  const m = multi.server_cpu_s_per_million_deliveries;
  const s = single.server_cpu_s_per_million_deliveries;
  const r = multi.redis_cpu_s_per_million_deliveries ?? 0;
  if (m === null || s === null || !s) return null;
  return {
    compared_with: `nodes ${single.nodes}, same load, in-memory adapter`,
    server_cpu_s_per_million_deliveries: { [`nodes_${multi.nodes}`]: m, [`nodes_${single.nodes}`]: s, ratio: round(m / s, 2) },
    redis_cpu_s_per_million_deliveries: r,
    extra_cpu_s_per_million_deliveries_incl_redis: round(m + r - s, 2),
    cpu_ratio_incl_redis: round((m + r) / s, 2),
    batch_events_per_client_per_s: { [`nodes_${multi.nodes}`]: multi.batch_events_per_client_per_s, [`nodes_${single.nodes}`]: single.batch_events_per_client_per_s },
    latency_p50_ms: { [`nodes_${multi.nodes}`]: multi.latency_ms?.p50, [`nodes_${single.nodes}`]: single.latency_ms?.p50 },
    latency_p99_ms: { [`nodes_${multi.nodes}`]: multi.latency_ms?.p99, [`nodes_${single.nodes}`]: single.latency_ms?.p99 },
  };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const o = options();
  log(`gateway binary: ${o.bin}${o.quick ? ' (quick run)' : ''}`);
  let failed = false;
  if (o.scenarios.includes('ingest')) {
    for (const engine of o.engines) {
      for (const posters of o.posters) {
        log(`ingest: ${engine}, ${posters} poster(s), ${o.duration} s`);
        try {
          emit(await ingestRun(o, engine, posters));
        } catch (e) {
          failed = true;
          log(e.stack ?? e);
          emit({ scenario: 'ingest', engine, posters, error: String(e.message ?? e).slice(0, 2000) });
        }
      }
    }
  }
  if (o.scenarios.includes('e2e')) {
    log(`e2e: sqlite, ${o.clients} clients, ${o.rate} readings/s, ${o.e2eDuration} s`);
    try {
      emit(await e2eRun(o));
    } catch (e) {
      failed = true;
      log(e.stack ?? e);
      emit({ scenario: 'e2e', error: String(e.message ?? e).slice(0, 2000) });
    }
  }
  if (o.scenarios.includes('cluster')) {
    // Every run first, then the lines: the multi-node line carries the comparison with the
    // one-node line (`redis_adapter_cost`).
    const results = [];
    for (const nodes of o.clusterNodes) {
      log(`cluster: ${nodes} node(s)${nodes > 1 ? ' + Redis' : ''}, postgres, ${o.clusterClients} clients, ${o.clusterRate} readings/s, ${o.clusterDuration} s`);
      try {
        results.push(await clusterRun(o, nodes));
      } catch (e) {
        failed = true;
        log(e.stack ?? e);
        results.push({ scenario: 'cluster', nodes, error: String(e.message ?? e).slice(0, 2000) });
      }
    }
    const single = results.find((r) => r.nodes === 1 && !r.error);
    for (const r of results) {
      if (r.nodes > 1 && !r.error) r.redis_adapter_cost = adapterCost(r, single);
      emit(r);
    }
  }
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  log(e.stack ?? e);
  process.exit(2);
});
