#!/usr/bin/env node
// sensorwire benchmark: starts the gateway itself and prints one JSON line per scenario on stdout
// (progress goes to stderr). See README.md for what every figure means.
//
//   node run.mjs            full run (≈ 4–6 minutes on a 2-core machine)
//   node run.mjs --scenarios cluster   only the two-node Redis scenario (≈ 1.5 minutes)
//   node run.mjs --quick    smoke run (≈ 30 s)
//   node run.mjs --scenarios capacity [--redis-cluster]   issue 16's figures: Redis and node CPU
//                           per organisation event, memory per connection (≈ 2½ minutes; not in the default run)
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
  redisCommandStats,
  redisNetBytes,
  startRedis,
  startRedisCluster,
  statusMiB,
  summariseLog,
} from './lib.mjs';

const ORG = 'bench';
const SERVER_DEFAULT_FLUSH_MS = 1000; // the contract's default for FLUSH_INTERVAL_MS

// ---------------------------------------------------------------------------------------------
// Options

const FLAGS = {
  quick: { type: 'boolean', default: false, help: 'smoke run (~30 s): fewer posters, clients and seconds' },
  scenarios: { type: 'string', help: 'comma list of ingest,e2e,cluster,capacity (default ingest,e2e,cluster, in that order; capacity only when named)' },
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
  'redis-server': { type: 'string', help: 'cluster, capacity: redis-server binary (default $REDIS_SERVER or redis-server on PATH)' },
  'capacity-clients': { type: 'string', help: 'capacity: org X clients (node 1 in run A, split in run B; default 1000)' },
  'capacity-other-clients': { type: 'string', help: 'capacity: org Y clients on node 2, never posted to (default 500)' },
  'capacity-rate': { type: 'string', help: 'capacity: readings per second posted to node 1 (default 200)' },
  'capacity-units': { type: 'string', help: 'capacity: units of org X the readings are spread over (default 50)' },
  'capacity-request-size': { type: 'string', help: 'capacity: readings per ingest request (default 10)' },
  'capacity-duration': { type: 'string', help: 'capacity: seconds of posting (default 20)' },
  'capacity-idle': { type: 'string', help: 'capacity: seconds of the idle window measured before the load (default: --capacity-duration)' },
  'capacity-runs': { type: 'string', help: 'capacity: comma list of A (org X on node 1 only), B (org X split over both nodes); default A,B' },
  'redis-cluster': { type: 'boolean', default: false, help: 'capacity: a Redis Cluster (REDIS_URL=redis-cluster://h:p,...) instead of one redis-server' },
  'redis-masters': { type: 'string', help: 'capacity with --redis-cluster: masters (default 3, no replicas)' },
  'redis-cli': { type: 'string', help: 'capacity with --redis-cluster: redis-cli binary for --cluster create (default $REDIS_CLI or redis-cli)' },
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
    capacityClients: num('capacity-clients', 1000, 200),
    capacityOtherClients: values['capacity-other-clients'] === '0' ? 0 : num('capacity-other-clients', 500, 100),
    capacityRate: num('capacity-rate', 200, 100),
    capacityUnits: num('capacity-units', 50, 50),
    capacityRequestSize: num('capacity-request-size', 10, 10),
    capacityDuration: num('capacity-duration', 20, 5),
    capacityIdle: null,
    capacityRuns: list('capacity-runs', 'A,B', 'A,B').map((s) => s.toUpperCase()),
    redisCluster: values['redis-cluster'],
    redisMasters: num('redis-masters', 3, 3),
    redisCli: values['redis-cli'] ?? process.env.REDIS_CLI ?? 'redis-cli',
  };
  o.capacityIdle = values['capacity-idle'] !== undefined ? num('capacity-idle', 0, 0) : o.capacityDuration;
  for (const r of o.capacityRuns) if (!['A', 'B'].includes(r)) throw new Error(`--capacity-runs: A or B, not ${r}`);
  if (o.capacityRequestSize > 1000) throw new Error('--capacity-request-size is at most 1000 (the gateway cap)');
  for (const s of o.scenarios) if (!['ingest', 'e2e', 'cluster', 'capacity'].includes(s)) throw new Error(`unknown scenario ${s}`);
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
    const stats = await drainDeliveries(workers, expected, flushMs);
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

/**
 * One poster on a fixed schedule (cluster, capacity): from `started`, one request of
 * `requestSize` readings every requestSize / rate seconds for `duration` s, spread over `units`;
 * request k goes to node `target(k)` (an index into `urls`) with `deviceOf(node)` as deviceId.
 * `recordedAt` never repeats a millisecond (see e2e). Waits for every answer and for the end of
 * the schedule. Non-200 answers are counted as `node<i>:<status>`.
 */
async function postOnSchedule({ started, rate, requestSize, duration, units, token, agent, urls, target, deviceOf }) {
  const interval = (1000 * requestSize) / rate;
  const totalRequests = Math.round((duration * 1000) / interval);
  const errors = {};
  const latencies = [];
  const postedPerNode = urls.map(() => 0);
  let duplicates = 0;
  let lateSends = 0;
  const inflight = new Set();
  let lastTs = 0;
  for (let k = 0; k < totalRequests; k++) {
    const due = started + k * interval;
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait);
    else if (-wait > interval) lateSends++;
    const n = target(k);
    const now = Math.max(Date.now(), lastTs + 1); // never reuse a millisecond (see e2e)
    lastTs = now;
    const readings = [];
    for (let j = 0; j < requestSize; j++) {
      readings.push({
        unitId: units[(k * requestSize + j) % units.length],
        temperature: temperature(),
        recordedAt: isoMs(now),
        deviceId: deviceOf(n),
      });
    }
    const p = request(urls[n], 'POST', '/api/readings/ingest', { token, agent, body: { readings } })
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
  const scheduleEnd = started + duration * 1000;
  if (performance.now() < scheduleEnd) await sleep(scheduleEnd - performance.now());
  const postSeconds = (performance.now() - started) / 1000;
  return { postedPerNode, duplicates, errors, latencies, lateSends, postSeconds };
}

/**
 * Waits for the last flush windows, as in e2e: until the workers' clients have `expected`
 * reading-deliveries, or nothing has arrived for 3 flush intervals + 2 s (at most 30 s).
 * Resolves the last collectStats().
 */
async function drainDeliveries(workers, expected, flushMs) {
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
  return stats;
}

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
    const cpu0 = nodeCpu();
    const redis0 = redisCpu();
    const clientCpu0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const started = performance.now();
    const { postedPerNode, duplicates, errors, latencies, lateSends, postSeconds } = await postOnSchedule({
      started,
      rate: o.clusterRate,
      requestSize: o.clusterRequestSize,
      duration: o.clusterDuration,
      units,
      token: admin,
      agent,
      urls: gws.map((g) => g.url),
      target: (k) => k % nodes,
      deviceOf,
    });
    const posted = postedPerNode.reduce((a, b) => a + b, 0);

    // Drain, as in e2e.
    const expected = posted * o.clusterClients;
    const stats = await drainDeliveries(workers, expected, flushMs);
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
// Scenario 4: capacity — what Redis and a second node pay per organisation event (issue 16)

const ORG_OTHER = 'bench-other';
const CAPACITY_DEVICE = (n) => `capacity-n${n}`;

/** Sum of a Prometheus counter's samples whose labels contain `label` (0 when absent), or null without text. */
function metricValue(text, name, label = '') {
  if (typeof text !== 'string') return null;
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== '{' && rest[0] !== ' ') continue;
    if (label && !rest.includes(label)) continue;
    const v = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(v)) sum += v;
  }
  return sum;
}

/** Every node's /metrics text (null for a node that did not answer). */
const nodeMetrics = (gws) =>
  Promise.all(
    gws.map((g) =>
      request(g.url, 'GET', '/metrics', { timeoutMs: 5_000 })
        .then((r) => (r.status === 200 && typeof r.body === 'string' ? r.body : null))
        .catch(() => null),
    ),
  );

/** Commandstats after − before: the commands Redis ran in between, most expensive first. */
function commandDelta(after, before, perEvent, top = 12) {
  if (!after || !before) return null;
  const rows = [];
  for (const [cmd, a] of Object.entries(after)) {
    const b = before[cmd] ?? { calls: 0, usec: 0 };
    const calls = a.calls - b.calls;
    const usec = a.usec - b.usec;
    if (calls <= 0) continue;
    rows.push([cmd, { calls, usec, ...(perEvent ? { calls_per_batch_event: round(calls / perEvent, 2) } : {}) }]);
  }
  rows.sort((x, y) => y[1].usec - x[1].usec);
  return Object.fromEntries(rows.slice(0, top));
}

/**
 * One capacity run on two nodes: org X (`--capacity-clients`) on node 1 only (run A) or split
 * over both nodes (run B); org Y (`--capacity-other-clients`) on node 2, never posted to. Every
 * reading is posted to node 1. Measures, per node and for Redis, CPU over an idle window (every
 * client connected, nothing posted) and over the load window (first post to end of drain).
 */
async function capacityRun(o, run) {
  const split = run === 'B';
  const flushEnv = o.flushIntervalMs !== null ? { FLUSH_INTERVAL_MS: String(o.flushIntervalMs) } : {};
  const flushMs = o.flushIntervalMs ?? SERVER_DEFAULT_FLUSH_MS;
  const secret = newSecret();
  let db = null;
  let redis = null;
  const gws = [];
  let workersX = [];
  let workersY = [];
  let probe = null;
  const agent = makeAgent(64);
  try {
    db = await createPostgresDatabase(o.pgUrl);
    if (o.redisCluster) {
      const c = await startRedisCluster({ bin: o.redisServer, cli: o.redisCli, masters: o.redisMasters });
      redis = { kind: 'cluster', url: c.url, pids: c.pids, ports: c.ports, stop: c.stop };
    } else {
      const r = await startRedis({ bin: o.redisServer });
      redis = { kind: 'single', url: r.url, pids: [r.pid], ports: [r.port], stop: r.stop };
    }
    log(`capacity ${run}: ${redis.kind === 'cluster' ? `Redis cluster of ${redis.pids.length} masters` : 'redis-server'} pid(s) ${redis.pids.join(', ')}; REDIS_URL=${redis.url}`);
    const env = { ...flushEnv, REDIS_URL: redis.url };
    for (let i = 0; i < 2; i++) {
      gws.push(await startGateway({ bin: o.bin, engine: 'postgres', pgUrl: o.pgUrl, env, databaseUrl: db.url, secret }));
    }
    log(`capacity ${run}: nodes on ${db.name}: ${gws.map((g) => `${g.url} (pid ${g.pid})`).join(', ')}`);
    const admin = mintToken(secret, { sub: 'bench-poster', org: ORG, role: 'admin' });
    const units = unitIds(o.capacityUnits, 'k');
    await createFixtures(gws[0], admin, units);
    // Warm-up, before anything is measured or connected: one reading per unit, so the units'
    // first-reading status events (and the pipeline's first allocations) are behind us and the
    // load window holds only the readings' own events.
    const warmup = await mustRequest(gws[0].url, 'POST', '/api/readings/ingest', {
      token: admin,
      agent,
      body: { readings: units.map((unitId) => ({ unitId, temperature: temperature(), recordedAt: isoMs(Date.now() - 1000), deviceId: 'capacity-warmup' })) },
    });
    await sleep(2 * flushMs + 500);

    const sum = (xs) => (xs.some((x) => x === null || x === undefined) ? null : xs.reduce((a, b) => a + b, 0));
    const diff = (b, a) => b.map((x, i) => (x === null || a[i] === null ? null : x - a[i]));
    const nodeCpu = () => gws.map((g) => cpuSeconds(g.pid));
    const nodeRss = (field = 'VmRSS') => gws.map((g) => statusMiB(g.pid, field));
    const redisCpu = () => sum(redis.pids.map((pid) => cpuSeconds(pid)));
    const commandStats = () =>
      redisCommandStats(redis.ports).catch((e) => {
        log(`capacity ${run}: INFO commandstats failed: ${e.message}`);
        return null;
      });
    const netBytes = () =>
      redisNetBytes(redis.ports).catch((e) => {
        log(`capacity ${run}: INFO stats failed: ${e.message}`);
        return null;
      });

    // Clients. Org X: client i on xUrls[i % xUrls.length]; org Y: all on node 2.
    const xUrls = split ? [gws[0].url, gws[1].url] : [gws[0].url];
    const xTokens = Array.from({ length: o.capacityClients }, (_, i) => mintToken(secret, { sub: `dash-${i}`, org: ORG, role: 'admin' }));
    const yTokens = Array.from({ length: o.capacityOtherClients }, (_, i) => mintToken(secret, { sub: `other-${i}`, org: ORG_OTHER, role: 'admin' }));
    const xPerNode = [0, 1].map((n) => xTokens.filter((_, i) => i % xUrls.length === n).length);
    const yPerNode = [0, yTokens.length];
    const rssBefore = nodeRss();
    const cpuConnect0 = nodeCpu();

    // The probe: one more org X client, on node 1, on the main thread. The batch events it gets
    // are the org's distinct batch events (each appended once, whatever the number of clients).
    const probeCount = { events: 0, readings: 0 };
    probe = io(gws[0].url, {
      auth: { token: mintToken(secret, { sub: 'probe', org: ORG, role: 'admin' }) },
      transports: ['websocket'],
      forceNew: true,
      reconnection: false,
    });
    probe.on('sensor:readings:batch', (batch) => {
      probeCount.events++;
      probeCount.readings += Array.isArray(batch?.readings) ? batch.readings.length : 0;
    });
    await new Promise((resolve, reject) => {
      probe.once('connect', resolve);
      probe.once('connect_error', reject);
    });
    const clientsPerNode = [xPerNode[0] + yPerNode[0] + 1, xPerNode[1] + yPerNode[1]];

    log(`capacity ${run}: connecting org X ${xPerNode.join(' + ')} and org Y ${yPerNode.join(' + ')} clients (node 1 + node 2) at ~${o.connectRate}/s`);
    const deviceNode = split ? { [CAPACITY_DEVICE(0)]: 0 } : null;
    workersX = startWorkers(Math.min(o.workers, xTokens.length), xUrls, xTokens, o.connectRate, { deviceNode });
    const connectsX = await Promise.all(workersX.map((w) => w.call('connect', 'connected')));
    workersY = yTokens.length ? startWorkers(1, [gws[1].url], yTokens, o.connectRate) : [];
    const connectsY = await Promise.all(workersY.map((w) => w.call('connect', 'connected')));
    const connects = [...connectsX, ...connectsY];
    const connectedX = connectsX.reduce((a, c) => a + c.connected, 0);
    const connectedY = connectsY.reduce((a, c) => a + c.connected, 0);
    const connectErrors = {};
    for (const c of connects) for (const [k, v] of Object.entries(c.errors)) connectErrors[k] = (connectErrors[k] || 0) + v;
    const maxMs = (cs) => cs.reduce((a, c) => Math.max(a, c.ms), 0);
    const connectMs = maxMs(connectsX) + maxMs(connectsY); // one group after the other
    const cpuConnect1 = nodeCpu();
    await sleep(1000); // let the servers settle before sampling memory
    const rssConnected = nodeRss();

    // Idle window: everything connected, nothing posted. Two halves, to see how steady it is.
    log(`capacity ${run}: ${connectedX} + ${connectedY} connected; RSS ${rssConnected.map((r) => round(r, 1)).join(' + ')} MiB; idle for ${o.capacityIdle} s`);
    const cmdIdle0 = await commandStats();
    const idleCpu0 = nodeCpu();
    const idleRedis0 = redisCpu();
    const idleStart = performance.now();
    await sleep((o.capacityIdle * 1000) / 2);
    const idleCpuMid = nodeCpu();
    const idleRedisMid = redisCpu();
    await sleep((o.capacityIdle * 1000) / 2);
    const idleCpu1 = nodeCpu();
    const idleRedis1 = redisCpu();
    const idleSeconds = (performance.now() - idleStart) / 1000;
    const cmdIdle1 = await commandStats();
    const metrics0 = await nodeMetrics(gws);
    await Promise.all([...workersX, ...workersY].map((w) => w.call('reset')));
    const probe0 = { ...probeCount };

    // Load window: every request to node 1.
    log(`capacity ${run}: posting ${o.capacityRate} readings/s over ${units.length} units to node 1 for ${o.capacityDuration} s`);
    const cmd0 = await commandStats();
    const net0 = await netBytes();
    const cpu0 = nodeCpu();
    const redis0 = redisCpu();
    const clientCpu0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const started = performance.now();
    const posting = await postOnSchedule({
      started,
      rate: o.capacityRate,
      requestSize: o.capacityRequestSize,
      duration: o.capacityDuration,
      units,
      token: admin,
      agent,
      urls: gws.map((g) => g.url),
      target: () => 0,
      deviceOf: CAPACITY_DEVICE,
    });
    const posted = sum(posting.postedPerNode);
    const expected = posted * o.capacityClients;
    const stats = await drainDeliveries(workersX, expected, flushMs);
    // The probe is on this thread: give it a moment if it is behind.
    for (let i = 0; i < 20 && probeCount.readings - probe0.readings < posted; i++) await sleep(100);
    const windowSeconds = (performance.now() - started) / 1000;
    const cpu1 = nodeCpu();
    const redis1 = redisCpu();
    const clientCpu = process.cpuUsage(clientCpu0);
    const machine1 = machineBusySeconds();
    const cmd1 = await commandStats();
    const net1 = await netBytes();
    const metrics1 = await nodeMetrics(gws);
    const statsY = workersY.length ? await collectStats(workersY) : null;
    const rssEnd = nodeRss();
    const hwm = nodeRss('VmHWM');
    const redisRss = sum(redis.pids.map((pid) => statusMiB(pid, 'VmRSS')));
    const alive = gws.map((g) => g.alive());
    // Without the warm-up's readings.
    const stored = await postgresCount(db.url, 'SELECT count(*) AS count FROM readings')
      .then((n) => n - (warmup?.accepted ?? 0))
      .catch((e) => {
        log(`capacity ${run}: could not count stored readings: ${e.message}`);
        return null;
      });

    // The org's distinct batch events: what the probe got (one client that got everything).
    const probeEvents = probeCount.events - probe0.events;
    const probeReadings = probeCount.readings - probe0.readings;
    const events = probeEvents > 0 ? probeEvents : null;
    const perEvent = (s) => (events && s !== null && s !== undefined ? round((s / events) * 1e6, 1) : null);

    // CPU: during the load, and the same beyond what the idle window's rate would have cost.
    const nodeLoad = diff(cpu1, cpu0);
    const nodeIdle = diff(idleCpu1, idleCpu0);
    const nodeIdleHalves = [diff(idleCpuMid, idleCpu0), diff(idleCpu1, idleCpuMid)];
    const nodeExtra = nodeLoad.map((c, n) => (c === null || nodeIdle[n] === null ? null : c - (nodeIdle[n] / idleSeconds) * windowSeconds));
    const redisLoad = redis1 !== null && redis0 !== null ? redis1 - redis0 : null;
    const redisIdle = idleRedis1 !== null && idleRedis0 !== null ? idleRedis1 - idleRedis0 : null;
    const redisExtra = redisLoad !== null && redisIdle !== null ? redisLoad - (redisIdle / idleSeconds) * windowSeconds : null;

    // Deliveries by node (X client i is on node i % xUrls.length).
    const receivedPerNode = [0, 0];
    const incompletePerNode = [0, 0];
    const steady = { clients: 0, incomplete: 0, missing_deliveries: 0 };
    stats.perClient.forEach((x, i) => {
      const n = i % xUrls.length;
      receivedPerNode[n] += x;
      if (x !== posted) incompletePerNode[n]++;
      if (stats.perClientDisconnected[i]) return;
      steady.clients++;
      if (x !== posted) steady.incomplete++;
      steady.missing_deliveries += posted - x;
    });
    const incomplete = incompletePerNode[0] + incompletePerNode[1];
    const completeness = expected === 0 ? null : round(stats.deliveries / expected, 6);
    const total = stats.hist.reduce((a, b) => a + b, 0);
    const perDelivery = (c, d) => (c === null || !d ? null : round((c / d) * 1e6, 3));
    const batchMetric = (texts) => texts.map((t) => metricValue(t, 'sensorwire_events_emitted_total', 'event="sensor:readings:batch"'));
    const liveMetric = (texts) => texts.map((t) => metricValue(t, 'sensorwire_events_emitted_total', 'event="sensor:reading"'));
    const bench = (clientCpu.user + clientCpu.system) / 1e6;
    const machineBusy = machine1 !== null && machine0 !== null ? machine1 - machine0 : null;
    const postLat = percentiles(posting.latencies, [50, 99]);

    const result = {
      scenario: 'capacity',
      run,
      layout: split ? 'org X split over node 1 and node 2; org Y on node 2' : 'org X on node 1 only; org Y (no readings) on node 2',
      redis: redis.kind,
      redis_instances: redis.pids.length,
      nodes: 2,
      engine: 'postgres',
      flush_interval_ms: flushMs,
      org_x_clients_per_node: xPerNode,
      org_y_clients_per_node: yPerNode,
      probe_clients_per_node: [1, 0],
      clients_connected: { org_x: connectedX, org_y: connectedY },
      connect_errors: connectErrors,
      connect_ms: connectMs,
      units: units.length,
      target_readings_per_s: o.capacityRate,
      readings_per_request: o.capacityRequestSize,
      posted_to: 'node 1',
      post_duration_s: round(posting.postSeconds, 2),
      posted_readings: posted,
      stored_readings: stored,
      warmup_readings: warmup?.accepted ?? null,
      post_duplicates: posting.duplicates,
      post_errors: posting.errors,
      post_late_sends: posting.lateSends,
      post_latency_ms: { p50: round(postLat[50], 1), p99: round(postLat[99], 1) },
      // The org's distinct sensor:readings:batch events, and how they reached the clients.
      batch_events: events,
      probe_readings: probeReadings,
      batch_events_per_org_x_client: connectedX ? round(stats.batchEvents / connectedX, 2) : null,
      batch_events_emitted_per_node: diff(batchMetric(metrics1), batchMetric(metrics0)),
      live_events_emitted_per_node: diff(liveMetric(metrics1), liveMetric(metrics0)),
      expected_deliveries: expected,
      received_deliveries: stats.deliveries,
      received_per_node: receivedPerNode,
      completeness,
      exactly_once: completeness === 1 && stats.duplicates === 0 && incomplete === 0,
      clients_incomplete_per_node: incompletePerNode,
      duplicate_deliveries: stats.duplicates,
      never_disconnected: steady,
      disconnected_clients: stats.disconnectedClients + (statsY?.disconnectedClients ?? 0),
      disconnect_reasons: stats.disconnects,
      org_y_deliveries: statsY ? statsY.deliveries : null,
      org_y_batch_events: statsY ? statsY.batchEvents : null,
      latency_ms: { p50: histPercentile(stats.hist, total, 50), p99: histPercentile(stats.hist, total, 99), max: stats.maxLatency },
      ...(split ? { latency_local_ms: histSummary(stats.histLocal, stats.maxLocal), latency_cross_node_ms: histSummary(stats.histRemote, stats.maxRemote) } : {}),
      client_loop_delay_ms: { p99: round(stats.loopDelayP99Ms, 1), max: round(stats.loopDelayMaxMs, 1) },

      // The figures of issue 16 (µs of CPU per distinct batch event of org X).
      redis_cpu_us_per_batch_event: perEvent(redisLoad),
      redis_cpu_us_per_batch_event_net_of_idle: perEvent(redisExtra),
      redis_cpu_s_per_million_deliveries: perMillion(redisLoad, stats.deliveries),
      node2_cpu_us_per_batch_event: perEvent(nodeExtra[1]),
      node_cpu_us_per_batch_event: nodeExtra.map(perEvent),
      node_cpu_us_per_delivery: nodeExtra.map((c, n) => perDelivery(c, receivedPerNode[n])),
      node_cpu_us_per_delivery_gross: nodeLoad.map((c, n) => perDelivery(c, receivedPerNode[n])),
      node_cpu_s_per_million_deliveries: perMillion(sum(nodeLoad), stats.deliveries),
      rss_per_connection_kib: [0, 1].map((n) =>
        rssBefore[n] === null || rssConnected[n] === null || !clientsPerNode[n] ? null : round(((rssConnected[n] - rssBefore[n]) * 1024) / clientsPerNode[n], 2),
      ),
      node_cpu_ms_per_connect: [0, 1].map((n) =>
        cpuConnect1[n] === null || cpuConnect0[n] === null || !clientsPerNode[n] ? null : round(((cpuConnect1[n] - cpuConnect0[n]) * 1000) / clientsPerNode[n], 3),
      ),

      cpu: {
        window_s: round(windowSeconds, 2),
        idle_window_s: round(idleSeconds, 2),
        node_cpu_s: nodeLoad.map((x) => round(x, 2)),
        node_idle_cpu_s: nodeIdle.map((x) => round(x, 2)),
        node_idle_cpu_s_halves: nodeIdleHalves.map((h) => h.map((x) => round(x, 2))),
        node_extra_cpu_s: nodeExtra.map((x) => round(x, 3)),
        redis_cpu_s: round(redisLoad, 3),
        redis_idle_cpu_s: round(redisIdle, 3),
        redis_idle_cpu_s_halves: [round(idleRedisMid - idleRedis0, 3), round(idleRedis1 - idleRedisMid, 3)],
        redis_extra_cpu_s: round(redisExtra, 3),
        bench_process_cpu_s: round(bench, 2),
        ...(machineBusy !== null && Number.isFinite(machineBusy)
          ? {
              machine_busy_cores: round(machineBusy / windowSeconds, 2),
              other_processes_cpu_cores: round(Math.max(0, machineBusy - (sum(nodeLoad) ?? 0) - (redisLoad ?? 0) - bench) / windowSeconds, 2),
            }
          : {}),
      },
      redis_commands: commandDelta(cmd1, cmd0, events),
      // What Redis read from and wrote to its clients (the nodes) per batch event: a node that
      // reads every organisation's events shows up in `out`.
      redis_net_bytes_per_batch_event:
        net0 && net1 && events ? { in: Math.round((net1.input - net0.input) / events), out: Math.round((net1.output - net0.output) / events) } : null,
      redis_commands_idle: commandDelta(cmdIdle1, cmdIdle0, null, 6),
      server_rss_before_mb: rssBefore.map((x) => round(x, 1)),
      server_rss_connected_mb: rssConnected.map((x) => round(x, 1)),
      server_rss_end_mb: rssEnd.map((x) => round(x, 1)),
      server_rss_peak_mb: hwm.map((x) => round(x, 1)),
      redis_rss_mb: round(redisRss, 1),
      nodes_alive_at_end: alive,
      server_log: null,
    };
    probe.close();
    probe = null;
    const all = [...workersX, ...workersY];
    await Promise.all(all.map((w) => w.call('close', 'closed').catch(() => null)));
    await Promise.all(all.map((w) => w.worker.terminate()));
    workersX = [];
    workersY = [];
    await Promise.all(gws.map((g) => g.stop()));
    result.server_log = gws.map((g) => serverLog(g));
    return result;
  } finally {
    agent.destroy();
    probe?.close();
    await Promise.all([...workersX, ...workersY].map((w) => w.worker.terminate()));
    await Promise.all(gws.map((g) => g.cleanup()));
    if (redis) await redis.stop();
    if (db) await dropPostgresDatabase(o.pgUrl, db.name).catch((e) => log(`could not drop ${db.name}: ${e.message}`));
  }
}

/** The summary line: the issue's figures from runs A and B of the same invocation. */
function capacitySummary(o, results) {
  const ok = (run) => results.find((r) => r.run === run && !r.error) ?? null;
  const A = ok('A');
  const B = ok('B');
  const both = (f) => ({ A: A ? f(A) : null, B: B ? f(B) : null });
  const sub = (x, y) => (x === null || x === undefined || y === null || y === undefined ? null : round(x - y, 1));
  const redisA = A?.redis_cpu_us_per_batch_event ?? null;
  const node1A = A?.node_cpu_us_per_batch_event?.[0] ?? null;
  const node2A = A?.node2_cpu_us_per_batch_event ?? null;
  const notes = [];
  const emitted2 = A?.batch_events_emitted_per_node?.[1];
  if (A && emitted2 > 0) {
    notes.push(`run A: node 2 emitted ${emitted2} sensor:readings:batch events (org X: ${A.batch_events}) though none of its sockets is in org X — it reads every organisation's events`);
  }
  for (const r of [A, B]) {
    const pub = r?.redis_commands ? (r.redis_commands.publish?.calls ?? 0) + (r.redis_commands.spublish?.calls ?? 0) : 0;
    if (pub > 0) {
      notes.push(`run ${r.run}: Redis relayed ${pub} PUBLISH/SPUBLISH for ${r.posted_readings} readings (organisation event announcements, plus live readings published per site per emitter run — through the Socket.io adapter before issue 16) though no client subscribed to a unit or site`);
    }
  }
  const live2 = A?.live_events_emitted_per_node?.[1];
  if (A && live2 > 0) notes.push(`run A: node 2 emitted ${live2} live sensor:reading events of org X`);
  for (const r of [A, B]) {
    if (r && r.exactly_once === false) notes.push(`run ${r.run}: not exactly once (completeness ${r.completeness}, ${r.clients_incomplete_per_node.join(' + ')} incomplete clients)`);
    if (r && r.org_y_deliveries) notes.push(`run ${r.run}: org Y clients received ${r.org_y_deliveries} readings of org X`);
    if (r && r.batch_events !== null && r.batch_events_per_org_x_client !== null && Math.abs(r.batch_events_per_org_x_client - r.batch_events) > 0.01 * r.batch_events) {
      notes.push(`run ${r.run}: the org X clients got ${r.batch_events_per_org_x_client} batch events each, the probe ${r.batch_events}`);
    }
  }
  for (const r of results) if (r.error) notes.push(`run ${r.run}: ${r.error.split('\n')[0]}`);
  return {
    binary: o.bin,
    redis: o.redisCluster ? `cluster, ${o.redisMasters} masters` : 'single',
    load: `${o.capacityRate} readings/s over ${o.capacityUnits} units for ${o.capacityDuration} s, posted to node 1; org X ${o.capacityClients} clients, org Y ${o.capacityOtherClients} clients on node 2`,
    batch_events: both((r) => r.batch_events),
    // (1) Redis CPU per batch event, all Redis CPU of the load window / distinct batch events.
    redis_cpu_us_per_batch_event: { ...both((r) => r.redis_cpu_us_per_batch_event), goal_le: 30, goal_met: redisA === null ? null : redisA <= 30 },
    redis_cpu_us_per_batch_event_net_of_idle: both((r) => r.redis_cpu_us_per_batch_event_net_of_idle),
    // What a second node following the org adds in Redis (B − A, net of idle).
    redis_cpu_us_per_batch_event_per_extra_following_node: sub(B?.redis_cpu_us_per_batch_event_net_of_idle, A?.redis_cpu_us_per_batch_event_net_of_idle),
    redis_cpu_s_per_million_deliveries: both((r) => r.redis_cpu_s_per_million_deliveries),
    redis_net_bytes_per_batch_event: both((r) => r.redis_net_bytes_per_batch_event),
    // (2) The extra CPU per event of a second node serving other organisations (run A, node 2).
    node2_cpu_us_per_batch_event_other_orgs: node2A,
    node1_cpu_us_per_batch_event_same_run: node1A,
    node2_share_of_node1: node2A !== null && node1A ? round(node2A / node1A, 3) : null,
    node2_cpu_us_per_batch_event_serving_org: B ? B.node2_cpu_us_per_batch_event : null,
    node_cpu_us_per_delivery: both((r) => r.node_cpu_us_per_delivery),
    rss_per_connection_kib: both((r) => r.rss_per_connection_kib),
    exactly_once: both((r) => r.exactly_once),
    batch_events_emitted_per_node: both((r) => r.batch_events_emitted_per_node),
    notes,
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
  if (o.scenarios.includes('capacity')) {
    // Runs A and B first, then their lines and the summary.
    const results = [];
    for (const run of o.capacityRuns) {
      log(`capacity ${run}: 2 nodes + ${o.redisCluster ? `a Redis cluster (${o.redisMasters} masters)` : 'Redis'}, postgres, org X ${o.capacityClients} clients ${run === 'B' ? 'split over both nodes' : 'on node 1'}, org Y ${o.capacityOtherClients} on node 2, ${o.capacityRate} readings/s, ${o.capacityDuration} s`);
      try {
        results.push(await capacityRun(o, run));
      } catch (e) {
        failed = true;
        log(e.stack ?? e);
        results.push({ scenario: 'capacity', run, redis: o.redisCluster ? 'cluster' : 'single', error: String(e.message ?? e).slice(0, 2000) });
      }
    }
    for (const r of results) emit(r);
    emit({ scenario: 'capacity', summary: capacitySummary(o, results) });
  }
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  log(e.stack ?? e);
  process.exit(2);
});
