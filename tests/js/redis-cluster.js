// A real Redis Cluster for redis-cluster.test.js (issue 16): `masters` masters with `replicas`
// replicas each (3 × 1 by default), every node a private `redis-server` child on loopback ports
// of its own, joined with `redis-cli --cluster create`, no persistence, all under one temporary
// directory that stop() removes.
//
//   - startRedisCluster(): starts the nodes, creates the cluster, waits until every node says
//     `cluster_state:ok` with all 16384 slots covered, agrees on the roles, and every replica's
//     link to its master is up. Resolves a handle (see startRedisCluster's comment);
//   - hashSlot(): a key's slot computed locally (CRC16/XMODEM of the hash tag, mod 16384), the
//     same as `CLUSTER KEYSLOT`;
//   - orgsOnDistinctMasters(): organisation ids whose event streams (`sensorwire:{<org>}:events`)
//     live on different masters;
//   - redisCommand(): one command over a fresh connection (a tiny RESP2 client), bounded in time.
//
// Failover is quick: `cluster-node-timeout` 1000 ms (a master silent that long is suspected, and
// failed once a majority of masters agree) and `cluster-replica-validity-factor 0` (a replica
// always stands for election, however long it has been cut off from its master). After a SIGKILL
// the replica is promoted within a few seconds. While a master is down and its slots are not yet
// taken over, the whole cluster answers CLUSTERDOWN (`cluster-require-full-coverage yes`, the
// default — what production runs with), unless `requireFullCoverage: false` is given.
//
// Each node gets two ports: its client port and its cluster bus port (`cluster-port`; the default
// bus port, client port + 10000, can be above 65535 for an ephemeral client port).
//
// Needs `redis-server` and `redis-cli` (Debian: redis-server, redis-tools) 7.0 or later
// (`cluster-port`, `CLUSTER SHARDS`); REDIS_SERVER_BIN and REDIS_CLI_BIN override the commands.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { REDIS_SERVER, freePort, pollUntil } from './cluster-helpers.js';
import { withTimeout } from './harness.js';

export const REDIS_CLI = process.env.REDIS_CLI_BIN || 'redis-cli';
export const SLOTS = 16384;

/** The key of an organisation's event stream: the hash tag is exactly `{<org>}`. */
export const orgStreamKey = (org) => `sensorwire:{${org}}:events`;

// Children and directories still around when this test process exits (a crash, a cancelled run)
// are killed and removed — the same guard as cluster-helpers.js `track`.
const liveChildren = new Set();
const liveDirs = new Set();
process.once('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL');
  for (const dir of liveDirs) rmSync(dir, { recursive: true, force: true });
});

function track(child) {
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

// ---------------------------------------------------------------------------------------------
// Prerequisites

/** `null` when `redis-cli` can be run, otherwise why not. */
export function probeRedisCli() {
  const r = spawnSync(REDIS_CLI, ['--version'], { encoding: 'utf8', timeout: 5000 });
  if (r.error) return `${REDIS_CLI}: ${r.error.code || r.error.message}`;
  if (r.status !== 0) return `${REDIS_CLI} --version exited with ${r.status}: ${r.stderr}`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Hash slots

const CRC16_TABLE = (() => {
  const table = new Uint16Array(256);
  for (let i = 0; i < 256; i += 1) {
    let crc = i << 8;
    for (let j = 0; j < 8; j += 1) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    table[i] = crc;
  }
  return table;
})();

function crc16(bytes) {
  let crc = 0;
  for (const b of bytes) crc = ((crc << 8) & 0xffff) ^ CRC16_TABLE[((crc >> 8) ^ b) & 0xff];
  return crc;
}

/**
 * The slot of `key`, as Redis Cluster computes it: only the part between the first `{` and the
 * next `}` counts when that part is not empty (the hash tag).
 */
export function hashSlot(key) {
  let bytes = Buffer.from(key, 'utf8');
  const open = bytes.indexOf(0x7b); // {
  if (open !== -1) {
    const close = bytes.indexOf(0x7d, open + 1); // }
    if (close > open + 1) bytes = bytes.subarray(open + 1, close);
  }
  return crc16(bytes) % SLOTS;
}

// ---------------------------------------------------------------------------------------------
// A tiny RESP2 client

function encodeCommand(args) {
  const parts = [`*${args.length}\r\n`];
  for (const a of args) {
    const s = String(a);
    parts.push(`$${Buffer.byteLength(s)}\r\n${s}\r\n`);
  }
  return parts.join('');
}

// Parses one RESP2 value of `buf` at `pos`: `[value, next]`, or undefined when incomplete.
// An error reply parses to an Error object (not thrown: it may sit inside an array).
function parseReply(buf, pos) {
  const eol = buf.indexOf('\r\n', pos);
  if (eol === -1) return undefined;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString('utf8', pos + 1, eol);
  const next = eol + 2;
  switch (type) {
    case '+':
      return [line, next];
    case '-':
      return [new Error(line), next];
    case ':':
      return [Number(line), next];
    case '$': {
      const len = Number(line);
      if (len < 0) return [null, next];
      if (buf.length < next + len + 2) return undefined;
      return [buf.toString('utf8', next, next + len), next + len + 2];
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return [null, next];
      const items = [];
      let p = next;
      for (let i = 0; i < n; i += 1) {
        const r = parseReply(buf, p);
        if (!r) return undefined;
        items.push(r[0]);
        p = r[1];
      }
      return [items, p];
    }
    default:
      throw new Error(`unexpected RESP reply type ${JSON.stringify(type)}: ${JSON.stringify(buf.toString('utf8', pos, pos + 80))}`);
  }
}

/**
 * Sends one command (`args`: strings/numbers) to 127.0.0.1:`port` on a fresh connection and
 * resolves with the reply (simple and bulk strings as strings, integers as numbers, arrays as
 * arrays); rejects on an error reply, a connection error or after `ms`.
 */
export function redisCommand(port, args, { ms = 2000 } = {}) {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ port, host: '127.0.0.1' });
    let buf = Buffer.alloc(0);
    let settled = false;
    const done = (err, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value);
    };
    const timer = setTimeout(() => done(new Error(`redis 127.0.0.1:${port} ${args[0]}: no reply within ${ms} ms`)), ms);
    sock.on('connect', () => sock.write(encodeCommand(args)));
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      let r;
      try {
        r = parseReply(buf, 0);
      } catch (err) {
        done(err);
        return;
      }
      if (!r) return;
      if (r[0] instanceof Error) done(new Error(`redis 127.0.0.1:${port} ${args.join(' ')}: ${r[0].message}`));
      else done(null, r[0]);
    });
    sock.on('error', (err) => done(new Error(`redis 127.0.0.1:${port} ${args[0]}: ${err.message}`)));
    sock.on('close', () => done(new Error(`redis 127.0.0.1:${port} ${args[0]}: connection closed before a reply`)));
  });
}

/** `CLUSTER INFO` / `INFO <section>` text → `{ field: value }`. */
function parseInfo(text) {
  const out = {};
  for (const line of text.split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0 && !line.startsWith('#')) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/**
 * `CLUSTER NODES` text → `[{ id, port, flags: Set, masterId, linkState, slots: [[from, to]...],
 * self, master, replica, failed }]` (importing/migrating entries are ignored).
 */
export function parseClusterNodes(text) {
  return text.trim().split('\n').filter(Boolean).map((line) => {
    const [id, addr, flags, masterId, , , , linkState, ...slotParts] = line.trim().split(' ');
    const port = Number(/:(\d+)@/.exec(addr)?.[1] ?? /:(\d+)/.exec(addr)?.[1]);
    const f = new Set(flags.split(','));
    const slots = slotParts.filter((s) => !s.startsWith('[')).map((s) => {
      const [from, to] = s.split('-').map(Number);
      return [from, to ?? from];
    });
    return {
      id,
      port,
      flags: f,
      masterId: masterId === '-' ? null : masterId,
      linkState,
      slots,
      self: f.has('myself'),
      master: f.has('master'),
      replica: f.has('slave'),
      failed: f.has('fail') || f.has('fail?'),
    };
  });
}

const slotCount = (entry) => entry.slots.reduce((n, [from, to]) => n + to - from + 1, 0);
const ownsSlot = (entry, slot) => entry.slots.some(([from, to]) => slot >= from && slot <= to);

// ---------------------------------------------------------------------------------------------
// The cluster

/**
 * Starts `masters × (1 + replicas)` redis-server children and makes them one cluster. Resolves:
 *
 *   url           `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` — the masters at creation
 *   fredUrl       `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`
 *   dir           the temporary directory (config files, logs)
 *   nodes         `[{ port, busPort, pid, id, role: 'master' | 'replica', masterPort, alive }]`,
 *                 roles as last seen (refreshed by waitReady/waitForFailover/refresh)
 *   masterPorts   ports of the live masters, as last seen
 *   command(port, ...args)   one command to one node (redisCommand)
 *   keyslot(key)  the slot by `CLUSTER KEYSLOT` on a live node
 *   masterFor(key)  port of the live master that currently owns the key's slot (from `CLUSTER
 *                 NODES` of a live node whose cluster state is ok)
 *   killMaster(port)  SIGKILLs that master; resolves once the process has exited
 *   waitForFailover(port, { ms })  resolves with the port of the replica promoted in place of the
 *                 killed master, once every live node agrees it owns those slots and says
 *                 `cluster_state:ok` with every slot covered
 *   refresh()     re-reads the roles; waitReady({ ms }) waits for a healthy cluster again
 *   log(port)     the last 32 KB a node wrote (stdout/stderr)
 *   stop()        SIGKILLs every node and removes the directory
 */
export async function startRedisCluster({ masters = 3, replicas = 1, nodeTimeoutMs = 1000, requireFullCoverage = true } = {}) {
  assert.ok(masters >= 3, 'a Redis Cluster needs at least 3 masters');
  const dir = mkdtempSync(path.join(tmpdir(), 'sensorwire-redis-cluster-'));
  liveDirs.add(dir);
  const nodes = [];
  const handle = { dir, nodes };
  try {
    // Ports: a client port and a bus port per node, all distinct.
    const taken = new Set();
    const pick = async () => {
      for (;;) {
        const p = await freePort();
        if (!taken.has(p)) {
          taken.add(p);
          return p;
        }
      }
    };
    const total = masters * (1 + replicas);
    for (let i = 0; i < total; i += 1) nodes.push({ port: await pick(), busPort: await pick() });

    await Promise.all(nodes.map((n) => launch(n, { dir, nodeTimeoutMs, requireFullCoverage })));

    const create = await run(REDIS_CLI, [
      '--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`),
      '--cluster-replicas', String(replicas), '--cluster-yes',
    ], 60_000);
    if (create.code !== 0) {
      throw new Error(`redis-cli --cluster create exited with ${create.code}:\n${create.out}`);
    }

    Object.assign(handle, clusterMethods(handle, { masters, replicas, nodeTimeoutMs, requireFullCoverage }));
    await handle.waitReady({ ms: 30_000 });
    const initial = nodes.filter((n) => n.role === 'master').sort((a, b) => a.firstSlot - b.firstSlot);
    assert.equal(initial.length, masters, `expected ${masters} masters, got ${JSON.stringify(nodes.map(({ port, role }) => ({ port, role })))}`);
    const [first, ...rest] = initial;
    handle.url = `redis-cluster://${initial.map((n) => `127.0.0.1:${n.port}`).join(',')}`;
    handle.fredUrl = `redis-cluster://127.0.0.1:${first.port}?${rest.map((n) => `node=127.0.0.1:${n.port}`).join('&')}`;
    return handle;
  } catch (err) {
    const logs = nodes.filter((n) => n.log).map((n) => `--- redis ${n.port}:\n${n.log().slice(-2000)}`).join('\n');
    await stopAll(nodes, dir);
    throw new Error(`${err.message}\n${logs}`);
  }
}

/** Runs a command to completion; `{ code, out }` (stdout + stderr). */
function run(cmd, args, ms) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    track(child);
    let out = '';
    for (const s of [child.stdout, child.stderr]) {
      s.setEncoding('utf8');
      s.on('data', (c) => {
        out += c;
      });
    }
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${cmd} ${args.join(' ')} did not finish within ${ms} ms:\n${out}`));
    }, ms);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`${cmd}: ${err.message}`));
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** Starts (or restarts) one node's redis-server; resolves once it answers PING. */
async function launch(node, { dir, nodeTimeoutMs, requireFullCoverage }) {
  const child = spawn(REDIS_SERVER, [
    '--port', String(node.port),
    '--cluster-port', String(node.busPort),
    '--bind', '127.0.0.1',
    '--protected-mode', 'no',
    '--daemonize', 'no',
    '--cluster-enabled', 'yes',
    '--cluster-config-file', path.join(dir, `nodes-${node.port}.conf`),
    '--cluster-node-timeout', String(nodeTimeoutMs),
    '--cluster-replica-validity-factor', '0',
    '--cluster-require-full-coverage', requireFullCoverage ? 'yes' : 'no',
    '--save', '',
    '--appendonly', 'no',
    '--dir', dir,
    '--dbfilename', `dump-${node.port}.rdb`, // replicas' full syncs must not share one file
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  let log = '';
  for (const s of [child.stdout, child.stderr]) {
    s.setEncoding('utf8');
    s.on('data', (c) => {
      log = (log + c).slice(-32 * 1024);
    });
  }
  node.child = child;
  node.pid = child.pid;
  node.alive = true;
  node.log = () => log;
  node.exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    node.alive = false;
    resolve({ code, signal });
  }));
  let failed;
  node.exited.then(({ code, signal }) => {
    failed = `redis-server on port ${node.port} exited (code ${code}, signal ${signal})\n${log}`;
  });
  await pollUntil(async () => {
    if (failed) throw new Error(failed);
    return (await redisCommand(node.port, ['PING'], { ms: 500 })) === 'PONG';
  }, { ms: 10_000, interval: 50, what: `redis-server did not answer PING on port ${node.port}` }).catch((err) => {
    throw new Error(failed || err.message);
  });
}

async function stopAll(nodes, dir) {
  await Promise.all(nodes.map(async (n) => {
    if (n.child && n.child.exitCode === null && n.child.signalCode === null) n.child.kill('SIGKILL');
    if (n.exited) await withTimeout(n.exited, 5000, `redis-server ${n.port} did not exit`).catch(() => {});
  }));
  rmSync(dir, { recursive: true, force: true });
  liveDirs.delete(dir);
}

function clusterMethods(handle, { masters, replicas }) {
  const { nodes, dir } = handle;
  const live = () => nodes.filter((n) => n.alive);
  const byPort = (port) => {
    const n = nodes.find((x) => x.port === port);
    assert.ok(n, `no cluster node on port ${port}`);
    return n;
  };
  const command = (port, ...args) => redisCommand(port, args);
  const viewOf = async (port) => parseClusterNodes(await command(port, 'CLUSTER', 'NODES'));
  const infoOf = async (port) => parseInfo(await command(port, 'CLUSTER', 'INFO'));

  /** Why the cluster is not healthy from `port`'s point of view, or null. */
  async function unhealthy(port, expectMasters) {
    const info = await infoOf(port);
    if (info.cluster_state !== 'ok') return `${port}: cluster_state:${info.cluster_state}`;
    if (Number(info.cluster_slots_assigned) !== SLOTS || Number(info.cluster_slots_ok) !== SLOTS) {
      return `${port}: slots assigned ${info.cluster_slots_assigned}, ok ${info.cluster_slots_ok}`;
    }
    const view = await viewOf(port);
    const liveMasters = view.filter((e) => e.master && !e.failed && slotCount(e) > 0);
    if (liveMasters.length !== expectMasters) return `${port}: sees ${liveMasters.length} masters with slots`;
    const covered = liveMasters.reduce((s, e) => s + slotCount(e), 0);
    if (covered !== SLOTS) return `${port}: live masters cover ${covered} slots`;
    const odd = view.filter((e) => e.flags.has('handshake') || e.flags.has('noaddr'));
    if (odd.length) return `${port}: nodes in handshake/noaddr`;
    // Every live node of ours is known and not suspected.
    for (const n of live()) {
      const e = view.find((x) => x.port === n.port);
      if (!e) return `${port}: does not know ${n.port}`;
      if (e.failed) return `${port}: flags ${n.port} as ${[...e.flags].join(',')}`;
    }
    return null;
  }

  /** Re-reads the roles from a live node's view (and every replica's link state). */
  async function refresh() {
    const from = live()[0];
    assert.ok(from, 'no live cluster node');
    const view = await viewOf(from.port);
    for (const n of nodes) {
      const e = view.find((x) => x.port === n.port);
      if (!e) continue;
      n.id = e.id;
      n.role = e.master ? 'master' : e.replica ? 'replica' : 'unknown';
      n.masterPort = e.masterId ? view.find((x) => x.id === e.masterId)?.port ?? null : null;
      n.firstSlot = e.slots.length ? Math.min(...e.slots.map(([s]) => s)) : null;
      n.slots = e.slots;
    }
    handle.masterPorts = nodes.filter((n) => n.alive && n.role === 'master' && n.slots?.length).map((n) => n.port);
    return nodes;
  }

  /** Waits until every live node reports a healthy cluster and every live replica's link is up. */
  async function waitReady({ ms = 30_000, expectMasters = masters } = {}) {
    let why;
    await pollUntil(async () => {
      for (const n of live()) {
        why = await unhealthy(n.port, expectMasters);
        if (why) return false;
      }
      await refresh();
      for (const n of live().filter((x) => x.role === 'replica')) {
        if (!nodes.find((m) => m.port === n.masterPort)?.alive) continue; // a replica of a dead master
        const repl = parseInfo(await command(n.port, 'INFO', 'replication'));
        why = `replica ${n.port}: master_link_status:${repl.master_link_status}`;
        if (repl.master_link_status !== 'up') return false;
      }
      return true;
    }, { ms, interval: 100, what: `Redis Cluster healthy (cluster_state:ok, ${SLOTS} slots, ${expectMasters} masters, replicas linked) on every live node` })
      .catch((err) => {
        throw new Error(`${err.message}; last problem: ${why}`);
      });
    return refresh();
  }

  async function keyslot(key) {
    for (const n of live()) {
      try {
        return await command(n.port, 'CLUSTER', 'KEYSLOT', key);
      } catch {
        // the next node
      }
    }
    throw new Error('no live cluster node answered CLUSTER KEYSLOT');
  }

  async function masterFor(key) {
    const slot = await keyslot(key);
    let last;
    for (const n of live()) {
      try {
        if ((await infoOf(n.port)).cluster_state !== 'ok') continue;
        const owner = (await viewOf(n.port)).find((e) => e.master && !e.failed && ownsSlot(e, slot));
        if (owner) return owner.port;
      } catch (err) {
        last = err;
      }
    }
    throw new Error(`no live master owns slot ${slot} of ${key}${last ? ` (${last.message})` : ''}`);
  }

  async function killMaster(port) {
    const n = byPort(port);
    await refresh();
    assert.equal(n.role, 'master', `node ${port} is not a master: ${JSON.stringify(n.role)}`);
    assert.ok(n.alive, `node ${port} is not running`);
    n.killedAs = { id: n.id, slots: n.slots };
    n.child.kill('SIGKILL');
    await withTimeout(n.exited, 5000, `redis-server ${port} did not exit on SIGKILL`);
  }

  async function waitForFailover(port, { ms = 30_000 } = {}) {
    const n = byPort(port);
    assert.ok(n.killedAs, `node ${port} was not killed with killMaster()`);
    const { id, slots } = n.killedAs;
    const slot = slots[0][0];
    let promoted;
    let why;
    await pollUntil(async () => {
      promoted = undefined;
      for (const x of live()) {
        const view = await viewOf(x.port);
        const owner = view.find((e) => e.master && !e.failed && ownsSlot(e, slot));
        why = `${x.port}: slot ${slot} owned by ${owner ? `${owner.port} (${owner.id === id ? 'the killed master' : 'another node'})` : 'no live master'}`;
        if (!owner || owner.id === id) return false;
        const old = view.find((e) => e.id === id);
        why = `${x.port}: the killed master is flagged ${old ? [...old.flags].join(',') : '(unknown)'}`;
        if (old && !old.flags.has('fail')) return false; // not yet agreed as failed
        why = `${x.port}: sees ${owner.port} as the new owner, another node saw ${promoted}`;
        if (promoted !== undefined && promoted !== owner.port) return false; // views disagree (yet)
        promoted = owner.port;
        const info = await infoOf(x.port);
        why = `${x.port}: cluster_state:${info.cluster_state}, slots ok ${info.cluster_slots_ok}`;
        if (info.cluster_state !== 'ok' || Number(info.cluster_slots_ok) !== SLOTS) return false;
      }
      return promoted !== undefined;
    }, { ms, interval: 100, what: `a replica of ${port} promoted and cluster_state:ok on every live node` })
      .catch((err) => {
        throw new Error(`${err.message}; last problem: ${why}`);
      });
    await refresh();
    assert.equal(byPort(promoted).role, 'master');
    return promoted;
  }

  return {
    command,
    keyslot,
    masterFor,
    killMaster,
    waitForFailover,
    refresh,
    waitReady,
    log: (port) => byPort(port).log(),
    info: infoOf,
    view: viewOf,
    stop: () => stopAll(nodes, dir),
    replicas,
  };
}

// ---------------------------------------------------------------------------------------------
// Organisations spread over the masters

/**
 * `n` random organisation ids (`org-<hex>`) whose streams `sensorwire:{<org>}:events` are owned
 * by `n` different masters of `cluster` right now.
 */
export async function orgsOnDistinctMasters(cluster, n) {
  const byMaster = new Map();
  for (let i = 0; i < 1000 && byMaster.size < n; i += 1) {
    const org = `org-${randomBytes(4).toString('hex')}`;
    const master = await cluster.masterFor(orgStreamKey(org));
    if (!byMaster.has(master)) byMaster.set(master, org);
  }
  assert.equal(byMaster.size, n, `could not find ${n} organisations on distinct masters (the cluster has ${byMaster.size} reachable)`);
  return [...byMaster.values()];
}
