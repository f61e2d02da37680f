// Room subscriptions, get:latest, and the per-organisation id space.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import {
  assertSchema,
  emitAck,
  forEachEngine,
  nextEvent,
  roomAck,
  seedStandardFixture,
  useGateway,
} from './harness.js';

const FORBIDDEN = { ok: false, error: 'forbidden' };
const NOT_FOUND = { ok: false, error: 'not_found' };
const OK = { ok: true };

const MALFORMED_IDS = [
  ['an empty string', ''],
  ['a 100-character string', 'x'.repeat(100)],
  ['a number', 42],
  ['an object', { id: 's-1' }],
  ['a string with characters outside [A-Za-z0-9_.:-]', 's 1!'],
];

forEachEngine('socket.io subscriptions', (engine) => {
  const gw = useGateway(engine);
  let acmeViewer;
  let otherViewer;

  before(async () => {
    await seedStandardFixture(gw);
    acmeViewer = gw.token({ sub: 'viewer-acme', org: 'acme', role: 'viewer' });
    otherViewer = gw.token({ sub: 'viewer-other', org: 'other', role: 'viewer' });
  });

  for (const kind of ['site', 'unit']) {
    const own = kind === 'site' ? 's-1' : 'u-1';
    const foreign = kind === 'site' ? 's-9' : 'u-9';
    const missing = kind === 'site' ? 's-404' : 'u-404';

    describe(`subscribe:${kind}`, () => {
      it(`acks { ok: true } for a ${kind} of the caller's organisation`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        assert.deepEqual(await roomAck(socket, `subscribe:${kind}`, own), OK);
      });

      it(`acks forbidden for another organisation's ${kind}`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        assert.deepEqual(await roomAck(socket, `subscribe:${kind}`, foreign), FORBIDDEN);
      });

      it(`acks forbidden for a ${kind} that does not exist (indistinguishable from another org's)`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        assert.deepEqual(await roomAck(socket, `subscribe:${kind}`, missing), FORBIDDEN);
      });

      for (const [label, id] of MALFORMED_IDS) {
        it(`acks not_found for a malformed id: ${label}`, async () => {
          const socket = await gw.connect({ token: acmeViewer });
          assert.deepEqual(await roomAck(socket, `subscribe:${kind}`, id), NOT_FOUND);
          assert.ok(socket.connected, 'a malformed id does not cost the socket its connection');
        });
      }

      it(`unsubscribe:${kind} after subscribing acks { ok: true }`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        assert.deepEqual(await roomAck(socket, `subscribe:${kind}`, own), OK);
        assert.deepEqual(await roomAck(socket, `unsubscribe:${kind}`, own), OK);
      });

      it(`unsubscribe:${kind} of a room never joined acks { ok: true }`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        assert.deepEqual(await roomAck(socket, `unsubscribe:${kind}`, own === 's-1' ? 's-2' : 'u-2'), OK);
      });

      it(`a forbidden subscribe:${kind} without an ack callback gets an 'error' event { code: 'forbidden' }`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        const errorEvent = nextEvent(socket, 'error', 3000);
        socket.emit(`subscribe:${kind}`, foreign);
        const payload = await errorEvent;
        assertSchema('ErrorEvent', payload);
        assert.equal(payload.code, 'forbidden');
        assert.equal(typeof payload.message, 'string');
        assert.ok(socket.connected, 'the socket stays connected');
      });

      it(`a successful subscribe:${kind} without an ack callback sends no 'error' event`, async () => {
        const socket = await gw.connect({ token: acmeViewer });
        const errors = [];
        socket.on('error', (e) => errors.push(e));
        socket.emit(`subscribe:${kind}`, own);
        // An acked round trip afterwards proves the server has processed the first event.
        assert.deepEqual(await roomAck(socket, `unsubscribe:${kind}`, 'whatever'), OK);
        assert.deepEqual(errors, []);
      });
    });
  }

  describe('token restricted by site_ids', () => {
    let restricted;
    before(() => {
      restricted = gw.token({ sub: 'viewer-s1', org: 'acme', role: 'viewer', siteIds: ['s-1'] });
    });

    it('may subscribe to a listed site and to its units', async () => {
      const socket = await gw.connect({ token: restricted });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-1'), OK);
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-1'), OK);
    });

    it('is forbidden from an unlisted site of its own org and from that site\'s units', async () => {
      const socket = await gw.connect({ token: restricted });
      assert.deepEqual(await roomAck(socket, 'subscribe:site', 's-2'), FORBIDDEN);
      assert.deepEqual(await roomAck(socket, 'subscribe:unit', 'u-2'), FORBIDDEN);
    });
  });

  describe('ids are per organisation', () => {
    it("both organisations may subscribe to their own unit 'u-1'", async () => {
      const acme = await gw.connect({ token: acmeViewer });
      const other = await gw.connect({ token: otherViewer });
      assert.deepEqual(await roomAck(acme, 'subscribe:unit', 'u-1'), OK);
      assert.deepEqual(await roomAck(other, 'subscribe:unit', 'u-1'), OK);
    });

    it("org 'other' is forbidden from acme's site s-1 and unit u-2", async () => {
      const other = await gw.connect({ token: otherViewer });
      assert.deepEqual(await roomAck(other, 'subscribe:site', 's-1'), FORBIDDEN);
      assert.deepEqual(await roomAck(other, 'subscribe:unit', 'u-2'), FORBIDDEN);
    });
  });

  describe('get:latest', () => {
    it('acks null for a unit without readings', async () => {
      const socket = await gw.connect({ token: acmeViewer });
      assert.equal(await emitAck(socket, 'get:latest', 'u-1'), null);
    });

    it("acks null for another organisation's unit", async () => {
      const socket = await gw.connect({ token: acmeViewer });
      assert.equal(await emitAck(socket, 'get:latest', 'u-9'), null);
    });

    it('acks null for a unit that does not exist', async () => {
      const socket = await gw.connect({ token: acmeViewer });
      assert.equal(await emitAck(socket, 'get:latest', 'u-404'), null);
    });

    it('acks null for a unit outside the token\'s site_ids', async () => {
      const socket = await gw.connect({ token: gw.token({ sub: 'viewer-s1', org: 'acme', siteIds: ['s-1'] }) });
      assert.equal(await emitAck(socket, 'get:latest', 'u-2'), null);
    });
  });
});
