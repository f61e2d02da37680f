// A reference socket.io v4 server for sensorwire-loadgen: the same HTTP routes, handshake and
// `sensor:readings:batch` wire format as sensorwire, with no storage, thresholds or replay log.
// It answers "what does Node's socket.io cost for this traffic?", so it does only what the load
// generator looks at, and shapes every payload byte for byte like sensorwire's.

import { createHmac, randomBytes, randomUUID, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { Server } from "socket.io";

const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT || 0);
const SECRET = process.env.JWT_SECRET;
const FLUSH_MS = Number(process.env.FLUSH_INTERVAL_MS || 1000);
const MAX_BODY = 1024 * 1024; // sensorwire's MAX_BODY_BYTES default
const BATCH_MAX = 500; // sensorwire's BATCH_MAX_READINGS default: larger windows are split
if (!SECRET) {
  console.error("ref-node: JWT_SECRET is required");
  process.exit(2);
}

// ---- HS256 JWT (node:crypto only; claims sub, org_id, role, exp) ----------------------------
function verifyJwt(token) {
  try {
    return checkJwt(token);
  } catch (e) {
    throw new Error(e instanceof SyntaxError ? "malformed token" : e.message); // bad base64/JSON
  }
}
function checkJwt(token) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) throw new Error("malformed token");
  const [h, p, s] = parts;
  if (JSON.parse(Buffer.from(h, "base64url")).alg !== "HS256") throw new Error("bad alg");
  const want = createHmac("sha256", SECRET).update(`${h}.${p}`).digest();
  const got = Buffer.from(s, "base64url");
  if (got.length !== want.length || !timingSafeEqual(got, want)) throw new Error("bad signature");
  const claims = JSON.parse(Buffer.from(p, "base64url"));
  if (typeof claims.exp !== "number" || claims.exp * 1000 <= Date.now()) throw new Error("token expired");
  if (!claims.sub || !claims.org_id) throw new Error("missing claims");
  return claims;
}

// ---- In-memory state: all the "storage" there is --------------------------------------------
const units = new Map(); // `${org}\n${unitId}` -> siteId (unit ids are per organisation)
const keys = new Map(); // API key -> org
let buffers = new Map(); // `${org}\n${unitId}` -> { org, unitId, readings: [] } until the next flush
let nextId = 0; // sensorwire's ids are integer row ids as strings: a counter keeps sizes comparable
let emitted = 0; // batch broadcasts, exposed like sensorwire's counter for the loadgen's `broadcasts`
let last = { ms: 0, seq: 0 }; // offsets "<ms>-<seq>", increasing, as sensorwire's offset clock

function nextOffset() {
  const now = Date.now();
  last = now <= last.ms ? { ms: last.ms, seq: last.seq + 1 } : { ms: now, seq: 0 };
  return `${last.ms}-${last.seq}`;
}

// ---- HTTP -------------------------------------------------------------------------------------
function send(res, status, body, type = "application/json") {
  const text = type === "application/json" ? JSON.stringify(body) : body;
  res.writeHead(status, { "content-type": type, "content-length": Buffer.byteLength(text) });
  res.end(text);
}
const fail = (res, status, error, message) => send(res, status, { error, message });
// Thrown by handlers; anything else thrown (a bad token) is a 401.
const httpError = (status, error, message) => Object.assign(new Error(message), { status, error });

async function readJson(req) {
  let size = 0;
  const chunks = [];
  for await (const c of req) {
    size += c.length;
    if (size > MAX_BODY) throw httpError(413, "payload_too_large", "body too large");
    chunks.push(c);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString("utf8"));
  } catch {
    throw httpError(400, "bad_request", "body is not JSON");
  }
}

function admin(req) {
  const m = /^Bearer (.+)$/.exec(req.headers.authorization || "");
  const claims = verifyJwt(m?.[1]); // throws -> 401
  if (claims.role !== "admin") throw httpError(403, "forbidden", "admin role required");
  return claims.org_id;
}

const routes = {
  "POST /api/sites": async (req, res) => {
    admin(req);
    const b = await readJson(req);
    send(res, 201, { id: b.id ?? randomUUID(), name: b.name });
  },
  "POST /api/units": async (req, res) => {
    const org = admin(req);
    const b = await readJson(req);
    const id = b.id ?? randomUUID();
    units.set(`${org}\n${id}`, b.siteId);
    send(res, 201, {
      id, siteId: b.siteId, name: b.name, tempMin: b.tempMin ?? null, tempMax: b.tempMax ?? null,
      offlineAfterSeconds: b.offlineAfterSeconds ?? 300, status: "unknown", lastReadingAt: null, lastTemperature: null,
    });
  },
  "POST /api/keys": async (req, res) => {
    const org = admin(req);
    const b = await readJson(req);
    const key = `sw_${randomBytes(24).toString("base64url")}`;
    keys.set(key, org);
    send(res, 201, { id: randomUUID(), key, scopes: b.scopes ?? ["ingest"], name: b.name });
  },
  "POST /api/readings/ingest": async (req, res) => {
    const org = keys.get(req.headers["x-api-key"]);
    if (!org) return fail(res, 401, "unauthorized", "unknown API key");
    const { readings } = await readJson(req);
    if (!Array.isArray(readings) || readings.length === 0) return fail(res, 400, "bad_request", "readings must be a non-empty array");
    // Validate the whole request before buffering any of it, as sensorwire does (all or nothing).
    for (const [index, r] of readings.entries()) {
      const why = !units.has(`${org}\n${r.unitId}`) ? ["unitId", "unknown unit"]
        : typeof r.temperature !== "number" ? ["temperature", "must be a number"]
        : Number.isNaN(Date.parse(r.recordedAt)) ? ["recordedAt", "must be RFC 3339"] : null;
      if (why) return send(res, 422, { error: "validation_failed", message: `readings[${index}].${why[0]}: ${why[1]}`, details: [{ index, field: why[0], message: why[1] }] });
    }
    const ids = [];
    for (const r of readings) {
      const id = String(++nextId);
      ids.push(id);
      // SensorReading, fields in sensorwire's order; recordedAt normalised to millisecond UTC.
      const reading = {
        id, unitId: r.unitId, deviceId: r.deviceId || null, temperature: r.temperature,
        humidity: r.humidity ?? null, battery: r.battery ?? null, signalStrength: r.signalStrength ?? null,
        recordedAt: new Date(r.recordedAt).toISOString(), source: r.source ?? "api",
      };
      const k = `${org}\n${r.unitId}`;
      let buf = buffers.get(k);
      if (!buf) buffers.set(k, (buf = { org, unitId: r.unitId, readings: [] }));
      buf.readings.push(reading);
    }
    send(res, 200, { accepted: ids.length, duplicates: 0, ids });
  },
  "GET /healthz": (req, res) => send(res, 200, { status: "ok" }),
  "GET /metrics": (req, res) => send(res, 200,
    `sensorwire_events_emitted_total{event="sensor:readings:batch"} ${emitted}\n`, "text/plain; version=0.0.4"),
};

// socket.io takes the /socket.io/ requests off this server and hands it every other one.
const http = createServer(async (req, res) => {
  const route = routes[`${req.method} ${req.url.split("?")[0]}`];
  if (!route) return fail(res, 404, "not_found", "no such route");
  try {
    await route(req, res);
  } catch (e) {
    if (!res.headersSent) fail(res, e.status ?? 401, e.error ?? "unauthorized", e.message);
  }
});

// ---- socket.io ------------------------------------------------------------------------------
// sensorwire's ping settings; websocket and polling as socket.io defaults; no permessage-deflate
// (socket.io's default, and sensorwire's).
const io = new Server(http, { pingInterval: 25000, pingTimeout: 20000, serveClient: false });
io.use((socket, next) => {
  try {
    socket.data.org = verifyJwt(socket.handshake.auth?.token).org_id;
    next();
  } catch (e) {
    next(new Error(`unauthorized: ${e.message}`));
  }
});
io.on("connection", (socket) => socket.join(`org:${socket.data.org}`));

// Every flush interval, each unit's window goes out as one batch (split at BATCH_MAX) to its
// organisation's room, readings in recordedAt order, offset first as sensorwire stamps it.
const timer = setInterval(() => {
  const due = buffers;
  buffers = new Map();
  for (const { org, unitId, readings } of due.values()) {
    readings.sort((a, b) => (a.recordedAt < b.recordedAt ? -1 : a.recordedAt > b.recordedAt ? 1 : 0));
    for (let i = 0; i < readings.length; i += BATCH_MAX) {
      const chunk = readings.slice(i, i + BATCH_MAX);
      io.to(`org:${org}`).emit("sensor:readings:batch", { offset: nextOffset(), unitId, readings: chunk, count: chunk.length });
      emitted++;
    }
  }
}, FLUSH_MS);

http.listen(PORT, HOST, () => {
  const { address, port } = http.address();
  console.log(`sensorwire-ref-node listening on http://${address}:${port}`);
});

function shutdown() {
  clearInterval(timer);
  io.close(() => process.exit(0)); // disconnects every socket and closes the HTTP server
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
