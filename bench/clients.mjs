// Worker thread for the e2e and cluster scenarios: holds a share of the Socket.io clients and
// records, for every reading of every `sensor:readings:batch` it receives, now − recordedAt.
//
// workerData: { url } (every client on one gateway) or { urls, firstIndex } (several nodes: the
// client with overall index i connects to urls[i % urls.length]); with `deviceNode`
// ({ deviceId: node index }) the latency of each reading is also recorded as local (posted to the
// client's own node) or cross-node (posted to another node, relayed over Redis).
//
// Messages from the main thread:
//   { type: 'connect' }  → connects its clients (paced), answers { type: 'connected', ... }
//   { type: 'stats' }    → answers { type: 'stats', ... } (cumulative since the last 'reset')
//   { type: 'reset' }    → forgets what was received so far (after the connect phase)
//   { type: 'close' }    → disconnects everything, answers { type: 'closed' }

import { parentPort, workerData } from 'node:worker_threads';
import { monitorEventLoopDelay } from 'node:perf_hooks';

import { io } from 'socket.io-client';

const { tokens, connectPerSecond, connectTimeoutMs, workerIndex } = workerData;
const urls = workerData.urls ?? [workerData.url];
const firstIndex = workerData.firstIndex ?? 0;
const deviceNode = workerData.deviceNode ?? null;

const HIST_MAX_MS = 120_000;
let hist = new Uint32Array(HIST_MAX_MS + 1);
// Only with deviceNode: the same latencies split by where the reading was posted.
let histLocal = deviceNode ? new Uint32Array(HIST_MAX_MS + 1) : null;
let histRemote = deviceNode ? new Uint32Array(HIST_MAX_MS + 1) : null;
let maxLocal = 0;
let maxRemote = 0;
let deliveries = 0; // reading-deliveries (one reading to one client)
let batchEvents = 0;
let duplicates = 0; // a reading id a client had already received
let outOfOrder = 0; // a reading earlier than the one before it within one event
let countMismatch = 0; // an event whose `count` differs from readings.length
let badEvents = 0; // payload not shaped as expected
let maxLatency = 0;
let minLatency = Infinity;

const loopDelay = monitorEventLoopDelay({ resolution: 10 });
loopDelay.enable();

class Client {
  constructor(index, token) {
    this.index = index;
    this.token = token;
    this.node = (firstIndex + index) % urls.length;
    this.url = urls[this.node];
    this.socket = null;
    this.connected = false;
    this.everConnected = false;
    this.received = 0;
    this.receivedLocal = 0; // only with deviceNode: readings posted to this client's node
    this.seen = new Uint8Array(1024); // by numeric reading id
    this.seenOther = null; // Set fallback for non-numeric ids
    this.disconnects = [];
    this.connectErrors = [];
  }

  markSeen(id) {
    const n = Number(id);
    if (Number.isSafeInteger(n) && n >= 0 && n < 1e8) {
      if (n >= this.seen.length) {
        let len = this.seen.length;
        while (len <= n) len *= 2;
        const grown = new Uint8Array(len);
        grown.set(this.seen);
        this.seen = grown;
      }
      if (this.seen[n]) return false;
      this.seen[n] = 1;
      return true;
    }
    this.seenOther ??= new Set();
    if (this.seenOther.has(id)) return false;
    this.seenOther.add(id);
    return true;
  }

  connect() {
    return new Promise((resolve) => {
      const socket = io(this.url, {
        auth: { token: this.token },
        transports: ['websocket'],
        forceNew: true,
        reconnection: false,
        timeout: connectTimeoutMs,
      });
      this.socket = socket;
      let settled = false;
      const settle = (ok) => {
        if (!settled) {
          settled = true;
          resolve(ok);
        }
      };
      socket.on('connect', () => {
        this.connected = true;
        this.everConnected = true;
        settle(true);
      });
      socket.on('connect_error', (err) => {
        this.connectErrors.push(err.message);
        settle(false);
      });
      socket.on('disconnect', (reason) => {
        this.connected = false;
        if (reason !== 'io client disconnect') this.disconnects.push({ reason, at: Date.now() });
      });
      socket.on('sensor:readings:batch', (batch) => this.onBatch(batch));
    });
  }

  onBatch(batch) {
    const now = Date.now();
    batchEvents++;
    if (!batch || !Array.isArray(batch.readings)) {
      badEvents++;
      return;
    }
    if (batch.count !== batch.readings.length) countMismatch++;
    let prev = -Infinity;
    for (const r of batch.readings) {
      const t = Date.parse(r.recordedAt);
      if (t < prev) outOfOrder++;
      prev = t;
      if (!this.markSeen(r.id)) {
        duplicates++;
        continue;
      }
      this.received++;
      deliveries++;
      const lat = Math.max(0, now - t);
      if (lat > maxLatency) maxLatency = lat;
      if (lat < minLatency) minLatency = lat;
      hist[Math.min(lat, HIST_MAX_MS)]++;
      if (deviceNode) {
        const from = deviceNode[r.deviceId];
        if (from === this.node) {
          this.receivedLocal++;
          histLocal[Math.min(lat, HIST_MAX_MS)]++;
          if (lat > maxLocal) maxLocal = lat;
        } else {
          histRemote[Math.min(lat, HIST_MAX_MS)]++;
          if (lat > maxRemote) maxRemote = lat;
        }
      }
    }
  }
}

const clients = tokens.map((t, i) => new Client(i, t));

async function connectAll() {
  const started = Date.now();
  const perTick = Math.max(1, Math.round(connectPerSecond / 20)); // a wave every 50 ms
  const pending = [];
  for (let i = 0; i < clients.length; i += perTick) {
    for (const c of clients.slice(i, i + perTick)) pending.push(c.connect());
    await new Promise((r) => setTimeout(r, 50));
  }
  let results = await Promise.all(pending);
  // One retry, paced the same way, for clients whose handshake failed.
  const failed = clients.filter((c, i) => !results[i]);
  let retried = 0;
  if (failed.length > 0) {
    retried = failed.length;
    const again = [];
    for (let i = 0; i < failed.length; i += perTick) {
      for (const c of failed.slice(i, i + perTick)) {
        c.socket.close();
        again.push(c.connect());
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    await Promise.all(again);
  }
  const connected = clients.filter((c) => c.connected).length;
  const errors = {};
  for (const c of clients) for (const e of c.connectErrors) errors[e] = (errors[e] || 0) + 1;
  return { connected, total: clients.length, retried, ms: Date.now() - started, errors };
}

function stats() {
  const perClient = clients.map((c) => c.received);
  const perClientLocal = deviceNode ? clients.map((c) => c.receivedLocal) : null;
  const perClientDisconnected = clients.map((c) => c.disconnects.length > 0 || !c.connected);
  const disconnects = {};
  let disconnectedClients = 0;
  for (const c of clients) {
    if (c.disconnects.length) disconnectedClients++;
    for (const d of c.disconnects) disconnects[d.reason] = (disconnects[d.reason] || 0) + 1;
  }
  const out = {
    type: 'stats',
    workerIndex,
    deliveries,
    batchEvents,
    duplicates,
    outOfOrder,
    countMismatch,
    badEvents,
    maxLatency,
    minLatency: Number.isFinite(minLatency) ? minLatency : null,
    perClient,
    perClientLocal,
    perClientDisconnected,
    connectedNow: clients.filter((c) => c.connected).length,
    disconnectedClients,
    disconnects,
    loopDelayP99Ms: loopDelay.percentile(99) / 1e6,
    loopDelayMaxMs: loopDelay.max / 1e6,
    hist: hist.slice(),
    histLocal: histLocal ? histLocal.slice() : null,
    histRemote: histRemote ? histRemote.slice() : null,
    maxLocal,
    maxRemote,
  };
  return out;
}

function reset() {
  hist = new Uint32Array(HIST_MAX_MS + 1);
  if (deviceNode) {
    histLocal = new Uint32Array(HIST_MAX_MS + 1);
    histRemote = new Uint32Array(HIST_MAX_MS + 1);
  }
  maxLocal = 0;
  maxRemote = 0;
  deliveries = 0;
  batchEvents = 0;
  duplicates = 0;
  outOfOrder = 0;
  countMismatch = 0;
  badEvents = 0;
  maxLatency = 0;
  minLatency = Infinity;
  for (const c of clients) {
    c.received = 0;
    c.receivedLocal = 0;
  }
  loopDelay.reset();
}

parentPort.on('message', async (msg) => {
  if (msg.type === 'connect') {
    parentPort.postMessage({ type: 'connected', ...(await connectAll()) });
  } else if (msg.type === 'stats') {
    const s = stats();
    parentPort.postMessage(s, [s.hist, s.histLocal, s.histRemote].filter(Boolean).map((h) => h.buffer));
  } else if (msg.type === 'reset') {
    reset();
    parentPort.postMessage({ type: 'reset' });
  } else if (msg.type === 'close') {
    for (const c of clients) c.socket?.close();
    parentPort.postMessage({ type: 'closed' });
  }
});
