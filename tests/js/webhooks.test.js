// Organisation webhooks (CONTRACT.md "Alert lifecycle", Webhooks): the admin API, signed
// deliveries a local HTTP receiver verifies, retries with the same delivery id, a gateway
// restart between attempts, exactly once with two nodes on PostgreSQL, and refused private
// addresses. No sockets: alerts are raised through the ingest API.

import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
  api, assertApiError, assertSchema, assertStatus, createSite, createUnit, forEachEngine, mintToken,
  sleep, useGateway,
} from './harness.js';
import {
  clusterSkipReason, createDatabase, newSecret, pollUntil, reading, startNode, startRedis,
} from './cluster-helpers.js';

/** A local HTTP receiver: records every request with its raw body; `answers` scripts statuses. */
async function receiver(answers = []) {
  const got = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      got.push({ headers: req.headers, raw, body: JSON.parse(raw.toString('utf8')) });
      const status = answers.length ? answers.shift() : 200;
      if (status === 'hang') return; // never answers
      res.writeHead(status, { 'content-type': 'text/plain' }).end('ok');
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}/hook`,
    got,
    close: () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(resolve); }),
  };
}

const verify = (secret, raw, header) =>
  header === `sha256=${createHmac('sha256', secret).update(raw).digest('hex')}`;

/** Site, unit (0–5 °C) and an ingest key for `org`; returns `{ admin, key }`. */
async function seed(gw, org) {
  const admin = mintToken({ secret: gw.secret, sub: `admin-${org}`, org, role: 'admin' });
  await createSite(gw, admin, { id: 's-1', name: 'Store' });
  await createUnit(gw, admin, { id: 'u-1', siteId: 's-1', name: 'Fridge', tempMin: 0, tempMax: 5 });
  const k = assertStatus(await api(gw, 'POST', '/api/keys', { token: admin, body: { name: 'dev' } }), 201);
  return { admin, key: k.body.key };
}

async function ingest(gw, key, temperature) {
  const res = await api(gw, 'POST', '/api/readings/ingest', {
    headers: { 'x-api-key': key },
    body: { readings: [reading('u-1', temperature)] },
  });
  assertStatus(res, 200, `ingest (gateway log: ${gw.stderr?.().slice(-3000)})`);
}

async function createHook(gw, admin, body) {
  const res = await api(gw, 'POST', '/api/webhooks', { token: admin, body });
  assertStatus(res, 201, 'POST /api/webhooks');
  assertSchema('WebhookCreated', res.body);
  return res.body;
}

async function deliveries(gw, admin, id) {
  const res = assertStatus(await api(gw, 'GET', `/api/webhooks/${id}/deliveries`, { token: admin }), 200);
  for (const d of res.body) assertSchema('WebhookDelivery', d);
  return res.body;
}

forEachEngine('webhooks', (engine) => {
  const gw = useGateway(engine, { env: { WEBHOOK_ALLOW_PRIVATE: 'true' } });

  it('admin-only CRUD: defaults, validation, no secrets in the list, 404 across orgs', async () => {
    const { admin } = await seed(gw, 'crud');
    const operator = gw.token({ sub: 'op', org: 'crud', role: 'operator' });
    const other = gw.token({ sub: 'x', org: 'other-crud', role: 'admin' });
    assertApiError(await api(gw, 'POST', '/api/webhooks', { token: operator, body: { url: 'http://127.0.0.1:9/' } }), 403);
    assertApiError(await api(gw, 'GET', '/api/webhooks', { token: operator }), 403);
    const k = await api(gw, 'POST', '/api/keys', { token: admin, body: { name: 'p', scopes: ['publish'] } });
    assertApiError(await api(gw, 'GET', '/api/webhooks', { headers: { 'x-api-key': k.body.key } }), 403);

    const made = await createHook(gw, admin, { url: 'http://127.0.0.1:9/a' });
    assert.deepEqual(made.events, ['alert:triggered', 'alert:resolved', 'alert:acknowledged']);
    assert.match(made.secret, /^[0-9a-f]{64}$/);
    const given = await createHook(gw, admin, { url: 'http://127.0.0.1:9/b', events: ['alert:resolved'], secret: 's3cret' });
    assert.equal(given.secret, 's3cret');
    assert.deepEqual(given.events, ['alert:resolved']);

    for (const body of [
      { url: 'http://127.0.0.1:9/', events: ['unit:status'] },
      { url: 'http://127.0.0.1:9/', events: [] },
      { url: 'ftp://example.com/' },
      { url: 'not a url' },
      { url: 'http://127.0.0.1:9/', secret: '' },
    ]) {
      assertApiError(await api(gw, 'POST', '/api/webhooks', { token: admin, body }), 422, JSON.stringify(body));
    }

    const list = assertStatus(await api(gw, 'GET', '/api/webhooks', { token: admin }), 200).body;
    assert.deepEqual(list.map((w) => w.id).sort(), [made.id, given.id].sort());
    for (const w of list) {
      assertSchema('Webhook', w);
      assert.equal(w.secret, undefined);
    }
    assertApiError(await api(gw, 'DELETE', `/api/webhooks/${made.id}`, { token: other }), 404);
    assertApiError(await api(gw, 'GET', `/api/webhooks/${made.id}/deliveries`, { token: other }), 404);
    assertStatus(await api(gw, 'DELETE', `/api/webhooks/${made.id}`, { token: admin }), 204);
    assertApiError(await api(gw, 'DELETE', `/api/webhooks/${made.id}`, { token: admin }), 404);
    assertStatus(await api(gw, 'DELETE', `/api/webhooks/${given.id}`, { token: admin }), 204);
  });

  it('delivers signed alert events the receiver verifies; only the events asked for', async () => {
    const { admin, key } = await seed(gw, 'signed');
    const rx = await receiver();
    try {
      const all = await createHook(gw, admin, { url: rx.url, secret: 'topsecret' });
      const resolvedOnly = await createHook(gw, admin, { url: rx.url, events: ['alert:resolved'] });
      await ingest(gw, key, 9.5);
      await ingest(gw, key, 3);
      await pollUntil(() => rx.got.length >= 3, { ms: 15_000, what: 'three deliveries' });
      await sleep(800);
      assert.equal(rx.got.length, 3, 'no more than three deliveries');
      const toAll = rx.got.filter((r) => verify('topsecret', r.raw, r.headers['x-sensorwire-signature']));
      assert.deepEqual(toAll.map((r) => r.body.event).sort(), ['alert:resolved', 'alert:triggered']);
      for (const r of toAll) {
        assert.equal(r.headers['content-type'], 'application/json');
        assert.equal(r.headers['x-sensorwire-event'], r.body.event);
        assert.equal(r.headers['x-sensorwire-delivery'], r.body.deliveryId);
        assert.equal(r.body.orgId, 'signed');
        assert.equal(r.body.data.unitId, 'u-1');
        assert.ok(!Number.isNaN(Date.parse(r.body.sentAt)));
        assertSchema('WebhookPayload', r.body);
      }
      const triggered = toAll.find((r) => r.body.event === 'alert:triggered');
      assert.equal(triggered.body.data.value, 9.5);
      const other = rx.got.find((r) => !toAll.includes(r));
      assert.equal(other.body.event, 'alert:resolved');
      assert.ok(!verify('topsecret', other.raw, other.headers['x-sensorwire-signature']));

      const ds = await deliveries(gw, admin, all.id);
      assert.equal(ds.length, 2);
      assert.equal(ds[0].event, 'alert:resolved', 'newest first');
      for (const d of ds) {
        assert.equal(d.attempts, 1);
        assert.equal(d.lastStatus, 200);
        assert.equal(d.lastError, null);
        assert.equal(d.nextAttemptAt, null);
        assert.ok(d.deliveredAt);
      }
      assert.equal((await deliveries(gw, admin, resolvedOnly.id)).length, 1);
    } finally {
      await rx.close();
    }
  });

  it('an acknowledgement is delivered as alert:acknowledged, with who and the note', async () => {
    const { admin, key } = await seed(gw, 'acked');
    const rx = await receiver();
    try {
      await createHook(gw, admin, { url: rx.url, events: ['alert:acknowledged'], secret: 's3' });
      await ingest(gw, key, 9.5);
      const active = assertStatus(await api(gw, 'GET', '/api/alerts?status=active', { token: admin }), 200).body;
      assert.equal(active.length, 1);
      const ack = await api(gw, 'POST', `/api/alerts/${active[0].alertId}/acknowledge`, {
        token: admin,
        body: { note: 'door was open' },
      });
      assertStatus(ack, 200, 'acknowledge');
      await pollUntil(() => rx.got.length >= 1, { ms: 15_000, what: 'the acknowledgement delivered' });
      await sleep(800);
      assert.equal(rx.got.length, 1, 'only the event asked for, once');
      const [r] = rx.got;
      assert.ok(verify('s3', r.raw, r.headers['x-sensorwire-signature']));
      assert.equal(r.body.event, 'alert:acknowledged');
      assert.equal(r.body.data.alertId, active[0].alertId);
      assert.equal(r.body.data.acknowledgedBy, 'admin-acked');
      assert.equal(r.body.data.note, 'door was open');
      assertSchema('WebhookPayload', r.body);
    } finally {
      await rx.close();
    }
  });

  it('a receiver answering 500 then 200 gets the retry with the same delivery id', async () => {
    const { admin, key } = await seed(gw, 'retry');
    const rx = await receiver([500]);
    try {
      const hook = await createHook(gw, admin, { url: rx.url, events: ['alert:triggered'] });
      await ingest(gw, key, 12);
      await pollUntil(() => rx.got.length >= 2, { ms: 15_000, what: 'two attempts' });
      assert.equal(rx.got[0].body.deliveryId, rx.got[1].body.deliveryId);
      assert.equal(rx.got[0].headers['x-sensorwire-delivery'], rx.got[1].headers['x-sensorwire-delivery']);
      await pollUntil(async () => (await deliveries(gw, admin, hook.id))[0]?.deliveredAt, { ms: 5000, what: 'recorded' });
      const [d] = await deliveries(gw, admin, hook.id);
      assert.equal(d.attempts, 2);
      assert.equal(d.lastStatus, 200);
      assert.equal(d.deliveryId, rx.got[0].body.deliveryId);
    } finally {
      await rx.close();
    }
  });

  it('a failing receiver: lastError, lastStatus and nextAttemptAt are recorded', async () => {
    const { admin, key } = await seed(gw, 'failing');
    const rx = await receiver([503, 503, 503, 503, 503]);
    try {
      const hook = await createHook(gw, admin, { url: rx.url, events: ['alert:triggered'] });
      await ingest(gw, key, 12);
      await pollUntil(() => rx.got.length >= 1, { ms: 10_000, what: 'an attempt' });
      await pollUntil(async () => (await deliveries(gw, admin, hook.id))[0]?.attempts >= 1, { ms: 5000, what: 'recorded' });
      const [d] = await deliveries(gw, admin, hook.id);
      assert.equal(d.lastStatus, 503);
      assert.match(d.lastError, /503/);
      assert.equal(d.deliveredAt, null);
      assert.ok(Date.parse(d.nextAttemptAt) > Date.now() - 2000);
    } finally {
      await rx.close();
    }
  });
});

describe('webhook addresses without WEBHOOK_ALLOW_PRIVATE', () => {
  const gw = useGateway('sqlite');

  it('refuses loopback, private, link-local and unique-local URLs with 422', async () => {
    const admin = gw.token({ sub: 'a', org: 'acme', role: 'admin' });
    for (const url of [
      'http://127.0.0.1:8080/hook', 'http://localhost/hook', 'http://10.0.0.5/', 'http://192.168.1.10/',
      'http://169.254.169.254/latest', 'http://[::1]/', 'http://[fd00::1]/', 'http://[fe80::1]/', 'http://0.0.0.0/',
    ]) {
      const err = assertApiError(await api(gw, 'POST', '/api/webhooks', { token: admin, body: { url } }), 422, url);
      assert.match(err.message, /WEBHOOK_ALLOW_PRIVATE/, url);
    }
  });
});

describe('webhook delivery across a gateway restart', () => {
  let dir;
  let node;
  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'sensorwire-hooks-'));
  });
  after(async () => {
    await node?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('an attempt failed before the restart is retried by the restarted gateway', async () => {
    const secret = newSecret();
    const databaseUrl = `sqlite://${path.join(dir, 'db.sqlite')}`;
    const env = { WEBHOOK_ALLOW_PRIVATE: 'true', REDIS_URL: undefined };
    node = await startNode({ name: 'A', databaseUrl, secret, env });
    const { admin, key } = await seed(node, 'restart');
    const rx = await receiver([500]);
    try {
      const hook = await createHook(node, admin, { url: rx.url, events: ['alert:triggered'] });
      await ingest(node, key, 20);
      await pollUntil(() => rx.got.length >= 1, { ms: 10_000, what: 'the first attempt' });
      await node.stop();
      const first = rx.got.length;
      await sleep(1500);
      assert.equal(rx.got.length, first, 'nothing while the gateway is down');
      node = await startNode({ name: 'A2', databaseUrl, secret, env });
      await pollUntil(() => rx.got.length >= first + 1, { ms: 15_000, what: 'the retry after the restart' });
      assert.equal(rx.got.at(-1).body.deliveryId, rx.got[0].body.deliveryId);
      await pollUntil(async () => (await deliveries(node, admin, hook.id))[0]?.deliveredAt, { ms: 5000, what: 'recorded' });
      const [d] = await deliveries(node, admin, hook.id);
      assert.equal(d.attempts, rx.got.length);
      assert.equal(d.lastStatus, 200);
    } finally {
      await rx.close();
    }
  });
});

describe('webhook delivery cut off by a shutdown', () => {
  let dir;
  let node;
  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'sensorwire-hooks-'));
  });
  after(async () => {
    await node?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('an attempt still waiting for its answer at shutdown is released and sent again at once after the restart', async () => {
    const secret = newSecret();
    const databaseUrl = `sqlite://${path.join(dir, 'db.sqlite')}`;
    const env = { WEBHOOK_ALLOW_PRIVATE: 'true', REDIS_URL: undefined };
    node = await startNode({ name: 'A', databaseUrl, secret, env });
    const { admin, key } = await seed(node, 'cutoff');
    const rx = await receiver(['hang']);
    try {
      const hook = await createHook(node, admin, { url: rx.url, events: ['alert:triggered'] });
      await ingest(node, key, 20);
      await pollUntil(() => rx.got.length >= 1, { ms: 10_000, what: 'the first attempt' });
      const stopping = Date.now();
      await node.stop();
      assert.ok(node.child.signalCode !== 'SIGKILL', 'the gateway exited on SIGTERM');
      assert.ok(Date.now() - stopping < 5000, 'within the shutdown grace');
      node = await startNode({ name: 'A2', databaseUrl, secret, env });
      // Well before the 60 s lease would have run out.
      await pollUntil(() => rx.got.length >= 2, { ms: 10_000, what: 'the attempt after the restart' });
      assert.equal(rx.got[1].body.deliveryId, rx.got[0].body.deliveryId);
      await pollUntil(async () => (await deliveries(node, admin, hook.id))[0]?.deliveredAt, { ms: 5000, what: 'recorded' });
    } finally {
      await rx.close();
    }
  });
});

describe('webhooks with two nodes on PostgreSQL', async () => {
  const skip = await clusterSkipReason();
  let db;
  let redis;
  const nodes = [];
  before(async () => {
    if (skip) return;
    db = await createDatabase();
    redis = await startRedis();
  });
  after(async () => {
    for (const n of nodes) await n.stop();
    await redis?.stop?.();
    await db?.drop();
  });

  it('each event is delivered exactly once per webhook', { skip }, async () => {
    const secret = newSecret();
    const env = { WEBHOOK_ALLOW_PRIVATE: 'true' };
    const redisUrl = redis.url;
    nodes.push(await startNode({ name: 'A', databaseUrl: db.url, redisUrl, secret, env }));
    nodes.push(await startNode({ name: 'B', databaseUrl: db.url, redisUrl, secret, env }));
    const [A, B] = nodes;
    const { admin, key } = await seed(A, 'pair');
    const rx = await receiver();
    try {
      const h1 = await createHook(A, admin, { url: rx.url });
      const h2 = await createHook(B, admin, { url: rx.url });
      // Ten excursions and recoveries, half through each node: 20 events × 2 webhooks.
      for (let i = 0; i < 10; i++) {
        const n = i % 2 ? A : B;
        await ingest(n, key, 9 + i);
        await ingest(n, key, 2);
      }
      await pollUntil(() => rx.got.length >= 40, { ms: 30_000, what: '40 deliveries' });
      await sleep(2000);
      assert.equal(rx.got.length, 40);
      const ids = new Set(rx.got.map((r) => r.body.deliveryId));
      assert.equal(ids.size, 40, 'no delivery twice');
      for (const h of [h1, h2]) {
        const ds = await deliveries(A, admin, h.id);
        assert.equal(ds.length, 20);
        assert.ok(ds.every((d) => d.attempts === 1 && d.deliveredAt));
      }
    } finally {
      await rx.close();
    }
  });
});
