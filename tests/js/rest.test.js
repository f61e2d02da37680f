// HTTP API: admin creates and the dashboard reads (sites, units, latest, alerts).
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  assertApiError,
  assertSchema,
  assertStatus,
  createSite,
  createUnit,
  forEachEngine,
  mintToken,
  nowSeconds,
  seedStandardFixture,
  useGateway,
} from './harness.js';

const ID_GRAMMAR = /^[A-Za-z0-9_.:-]{1,64}$/;
const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

forEachEngine('HTTP API', (engine) => {
  const gw = useGateway(engine);
  let acmeViewer;
  let otherViewer;

  before(async () => {
    await seedStandardFixture(gw);
    acmeViewer = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    otherViewer = gw.token({ sub: 'viewer-other', org: 'other', role: 'viewer' });
  });

  async function getOk(path, token) {
    const res = await gw.api('GET', path, { token });
    assertStatus(res, 200, `GET ${path}:`);
    assert.match(res.headers.get('content-type') || '', /application\/json/, `GET ${path} content-type`);
    return res.body;
  }

  async function getList(path, token, schemaName) {
    const body = await getOk(path, token);
    assert.ok(Array.isArray(body), `GET ${path} answers a bare JSON array, got ${JSON.stringify(body)}`);
    for (const item of body) assertSchema(schemaName, item);
    return body;
  }

  describe('reads (viewer)', () => {
    it("GET /api/sites lists exactly the caller's organisation's sites", async () => {
      const sites = await getList('/api/sites', acmeViewer, 'Site');
      assert.deepEqual([...sites].sort(byId), [
        { id: 's-1', name: 'Cold room 1' },
        { id: 's-2', name: 'Cold room 2' },
      ]);
    });

    it("GET /api/units lists exactly the caller's organisation's units", async () => {
      const units = await getList('/api/units', acmeViewer, 'Unit');
      assert.deepEqual(units.map((u) => [u.id, u.siteId]).sort(), [['u-1', 's-1'], ['u-2', 's-2']]);
    });

    it('GET /api/units/u-1 returns the unit as created, with status unknown before any reading', async () => {
      const unit = assertSchema('Unit', await getOk('/api/units/u-1', acmeViewer));
      assert.equal(unit.id, 'u-1');
      assert.equal(unit.siteId, 's-1');
      assert.equal(unit.name, 'Fridge 1');
      assert.equal(unit.tempMin, 2);
      assert.equal(unit.tempMax, 8);
      assert.equal(unit.offlineAfterSeconds, 600);
      assert.equal(unit.status, 'unknown');
      assert.equal(unit.lastReadingAt ?? null, null);
      assert.equal(unit.lastTemperature ?? null, null);
    });

    it('a unit created without thresholds has no tempMin/tempMax and offlineAfterSeconds 300', async () => {
      const unit = assertSchema('Unit', await getOk('/api/units/u-2', acmeViewer));
      assert.equal(unit.tempMin ?? null, null);
      assert.equal(unit.tempMax ?? null, null);
      assert.equal(unit.offlineAfterSeconds, 300);
    });

    it("the same unit id in another organisation is that organisation's own unit", async () => {
      const unit = assertSchema('Unit', await getOk('/api/units/u-1', otherViewer));
      assert.equal(unit.siteId, 's-9');
      assert.equal(unit.name, 'Other fridge with a clashing id');
    });

    it('GET /api/units/u-1/latest of a unit without readings is 200 null', async () => {
      assert.equal(await getOk('/api/units/u-1/latest', acmeViewer), null);
    });

    it("GET /api/units/u-9 (another organisation's unit) is 404 with an ApiError body", async () => {
      assertApiError(await gw.api('GET', '/api/units/u-9', { token: acmeViewer }), 404);
    });

    it("GET /api/units/u-9/latest (another organisation's unit) is 404", async () => {
      assertApiError(await gw.api('GET', '/api/units/u-9/latest', { token: acmeViewer }), 404);
    });

    it('GET /api/units/{id} of a unit that does not exist is 404', async () => {
      assertApiError(await gw.api('GET', '/api/units/u-404', { token: acmeViewer }), 404);
    });

    it('GET /api/alerts is [] when nothing ever happened (also with ?status=active|resolved)', async () => {
      assert.deepEqual(await getList('/api/alerts', acmeViewer, 'Alert'), []);
      assert.deepEqual(await getList('/api/alerts?status=active', acmeViewer, 'Alert'), []);
      assert.deepEqual(await getList('/api/alerts?status=resolved', acmeViewer, 'Alert'), []);
    });
  });

  describe('reads with a site_ids-restricted token', () => {
    let restricted;
    before(() => {
      restricted = gw.token({ sub: 'viewer-s1', org: 'acme', role: 'viewer', siteIds: ['s-1'] });
    });

    it('GET /api/sites shows only the listed sites', async () => {
      const sites = await getList('/api/sites', restricted, 'Site');
      assert.deepEqual(sites.map((s) => s.id), ['s-1']);
    });

    it('GET /api/units shows only the units of the listed sites', async () => {
      const units = await getList('/api/units', restricted, 'Unit');
      assert.deepEqual(units.map((u) => u.id), ['u-1']);
    });

    it('a unit of an unlisted site is 404 (GET /api/units/u-2 and /latest)', async () => {
      assertApiError(await gw.api('GET', '/api/units/u-2', { token: restricted }), 404);
      assertApiError(await gw.api('GET', '/api/units/u-2/latest', { token: restricted }), 404);
    });

    it('a unit of a listed site is readable', async () => {
      assert.equal(assertSchema('Unit', await getOk('/api/units/u-1', restricted)).id, 'u-1');
    });
  });

  describe('every error is { error, message } JSON', () => {
    for (const path of ['/api/units/u-1/readings?limit=abc', '/api/alerts?status=x', '/api/units/u-1/readings?since=yesterday']) {
      it(`GET ${path} → 422 validation_failed`, async () => {
        const res = await gw.api('GET', path, { token: acmeViewer });
        assertApiError(res, 422, `GET ${path}:`);
        assert.equal(res.body.error, 'validation_failed');
        assert.ok(res.body.message.length > 0, 'says why');
      });
    }

    it('a known path with another method → 405 method_not_allowed, with Allow', async () => {
      const res = await gw.api('PUT', '/api/sites', { token: acmeViewer, body: {} });
      assertApiError(res, 405, 'PUT /api/sites:');
      assert.equal(res.body.error, 'method_not_allowed');
      assert.match(res.headers.get('allow') || '', /GET/, 'Allow lists GET');
      assert.match(res.headers.get('allow') || '', /POST/, 'Allow lists POST');
    });

    it('the plain WebSocket route without a WebSocket handshake → 400 bad_request; POST → 405', async () => {
      const get = await gw.api('GET', '/api/v2/ws', { token: acmeViewer });
      assertApiError(get, 400, 'GET /api/v2/ws without Upgrade:');
      assert.equal(get.body.error, 'bad_request');
      assert.ok(get.body.message.length > 0, 'says why');
      const post = await gw.api('POST', '/api/v2/ws', { token: acmeViewer, body: {} });
      assertApiError(post, 405, 'POST /api/v2/ws:');
      assert.equal(post.body.error, 'method_not_allowed');
    });
  });

  describe('authentication', () => {
    for (const path of ['/api/sites', '/api/units', '/api/units/u-1', '/api/alerts']) {
      it(`GET ${path} without a token is 401 with an ApiError body`, async () => {
        assertApiError(await gw.api('GET', path), 401);
      });
    }

    it('a token with a bad signature is 401', async () => {
      const forged = mintToken({ sub: 'x', org: 'acme', secret: 'wrong-secret-0123456789abcdef0123456789' });
      assertApiError(await gw.api('GET', '/api/sites', { token: forged }), 401);
    });

    it('a token expired beyond the 30 s leeway is 401', async () => {
      const expired = gw.token({ sub: 'x', org: 'acme', exp: nowSeconds() - 120 });
      assertApiError(await gw.api('GET', '/api/sites', { token: expired }), 401);
    });

    it('a token expired 10 s ago is accepted (inside the leeway)', async () => {
      const token = gw.token({ sub: 'x', org: 'acme', exp: nowSeconds() - 10 });
      await getList('/api/sites', token, 'Site');
    });

    it('POST /api/sites without a token is 401', async () => {
      assertApiError(await gw.api('POST', '/api/sites', { body: { id: 'nope', name: 'Nope' } }), 401);
    });
  });

  describe('admin creates', () => {
    it('POST /api/sites by an admin answers 201 with the site', async () => {
      const admin = gw.token({ sub: 'a', org: 'create', role: 'admin' });
      const res = await gw.api('POST', '/api/sites', { token: admin, body: { id: 'site:north_1.a', name: 'North' } });
      assertStatus(res, 201);
      assert.deepEqual(assertSchema('Site', res.body), { id: 'site:north_1.a', name: 'North' });
      const sites = await getList('/api/sites', admin, 'Site');
      assert.deepEqual(sites, [{ id: 'site:north_1.a', name: 'North' }]);
    });

    it('POST /api/units by an admin answers 201 with the full unit', async () => {
      const admin = gw.token({ sub: 'a', org: 'create-u', role: 'admin' });
      await createSite(gw, admin, { id: 's-a', name: 'A' });
      const res = await gw.api('POST', '/api/units', {
        token: admin,
        body: { id: 'u-a', siteId: 's-a', name: 'Fridge A', tempMin: -20.5, tempMax: -15, offlineAfterSeconds: 60 },
      });
      assertStatus(res, 201);
      const unit = assertSchema('Unit', res.body);
      assert.deepEqual(
        { id: unit.id, siteId: unit.siteId, name: unit.name, tempMin: unit.tempMin, tempMax: unit.tempMax,
          offlineAfterSeconds: unit.offlineAfterSeconds, status: unit.status },
        { id: 'u-a', siteId: 's-a', name: 'Fridge A', tempMin: -20.5, tempMax: -15, offlineAfterSeconds: 60, status: 'unknown' },
      );
      assert.deepEqual(assertSchema('Unit', await getOk('/api/units/u-a', admin)), unit);
    });

    it('a site and a unit created without an id get a server-assigned id that can be read back', async () => {
      const admin = gw.token({ sub: 'a', org: 'generated', role: 'admin' });
      const site = await createSite(gw, admin, { name: 'Generated site' });
      assert.match(site.id, ID_GRAMMAR);
      assert.equal(site.name, 'Generated site');
      const unit = await createUnit(gw, admin, { siteId: site.id, name: 'Generated unit' });
      assert.match(unit.id, ID_GRAMMAR);
      assert.equal(unit.siteId, site.id);
      const read = assertSchema('Unit', await getOk(`/api/units/${encodeURIComponent(unit.id)}`, admin));
      assert.equal(read.name, 'Generated unit');
    });

    it('a duplicate site id in the same organisation is 409 and leaves the original unchanged', async () => {
      const admin = gw.token({ sub: 'a', org: 'dup', role: 'admin' });
      await createSite(gw, admin, { id: 'dup-site', name: 'Original' });
      assertApiError(await gw.api('POST', '/api/sites', { token: admin, body: { id: 'dup-site', name: 'Second' } }), 409);
      assert.deepEqual(await getList('/api/sites', admin, 'Site'), [{ id: 'dup-site', name: 'Original' }]);
    });

    it('a duplicate unit id in the same organisation is 409, even under another site', async () => {
      const admin = gw.token({ sub: 'a', org: 'dup-u', role: 'admin' });
      await createSite(gw, admin, { id: 'sa', name: 'A' });
      await createSite(gw, admin, { id: 'sb', name: 'B' });
      await createUnit(gw, admin, { id: 'dup-unit', siteId: 'sa', name: 'Original' });
      assertApiError(await gw.api('POST', '/api/units', { token: admin, body: { id: 'dup-unit', siteId: 'sb', name: 'Second' } }), 409);
      const read = assertSchema('Unit', await getOk('/api/units/dup-unit', admin));
      assert.equal(read.name, 'Original');
      assert.equal(read.siteId, 'sa');
    });

    it('the same site id in two organisations is allowed', async () => {
      const adminX = gw.token({ sub: 'a', org: 'same-x', role: 'admin' });
      const adminY = gw.token({ sub: 'a', org: 'same-y', role: 'admin' });
      await createSite(gw, adminX, { id: 'shared', name: 'X' });
      await createSite(gw, adminY, { id: 'shared', name: 'Y' });
      assert.deepEqual(await getList('/api/sites', adminX, 'Site'), [{ id: 'shared', name: 'X' }]);
      assert.deepEqual(await getList('/api/sites', adminY, 'Site'), [{ id: 'shared', name: 'Y' }]);
    });

    it('a malformed caller-supplied id is refused (400/422) and nothing is created', async () => {
      const admin = gw.token({ sub: 'a', org: 'bad-id', role: 'admin' });
      for (const id of ['', 'has space', 'x'.repeat(65), 'slash/id']) {
        const res = await gw.api('POST', '/api/sites', { token: admin, body: { id, name: 'Bad' } });
        assert.ok([400, 422].includes(res.status), `id ${JSON.stringify(id)}: expected 400 or 422, got ${res.status}: ${res.text}`);
        assertSchema('ApiError', res.body);
      }
      assert.deepEqual(await getList('/api/sites', admin, 'Site'), []);
    });

    it("a unit under another organisation's site is refused and not created", async () => {
      const admin = gw.token({ sub: 'a', org: 'acme', role: 'admin' });
      const res = await gw.api('POST', '/api/units', { token: admin, body: { id: 'u-sneaky', siteId: 's-9', name: 'Sneaky' } });
      assert.ok([400, 403, 404, 422].includes(res.status), `expected a 4xx refusal, got ${res.status}: ${res.text}`);
      assertSchema('ApiError', res.body);
      assertApiError(await gw.api('GET', '/api/units/u-sneaky', { token: admin }), 404);
    });

    for (const role of ['viewer', 'operator']) {
      it(`POST /api/sites and /api/units by a ${role} are 403`, async () => {
        const token = gw.token({ sub: 'u', org: 'acme', role });
        assertApiError(await gw.api('POST', '/api/sites', { token, body: { id: `by-${role}`, name: 'No' } }), 403);
        assertApiError(await gw.api('POST', '/api/units', { token, body: { id: `by-${role}`, siteId: 's-1', name: 'No' } }), 403);
      });
    }

    it('a token without a role claim is a viewer: POST /api/sites is 403', async () => {
      const token = gw.token({ sub: 'u', org: 'acme' });
      assertApiError(await gw.api('POST', '/api/sites', { token, body: { id: 'by-default', name: 'No' } }), 403);
    });
  });
});
