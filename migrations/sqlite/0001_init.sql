-- sensorwire schema (SQLite, the embedded single-node default).
-- Times are INTEGER milliseconds since the Unix epoch (UTC).

CREATE TABLE organisations (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

CREATE TABLE sites (
    org_id      TEXT NOT NULL REFERENCES organisations (id),
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, id)
);

CREATE TABLE units (
    org_id                 TEXT NOT NULL,
    id                     TEXT NOT NULL,
    site_id                TEXT NOT NULL,
    name                   TEXT NOT NULL,
    temp_min               REAL,
    temp_max               REAL,
    offline_after_seconds  INTEGER NOT NULL DEFAULT 300 CHECK (offline_after_seconds >= 1),
    status                 TEXT NOT NULL DEFAULT 'unknown',
    status_since           INTEGER,
    last_reading_at        INTEGER,
    last_temperature       REAL,
    -- Server time of the last reading received: what the offline sweeper measures silence by.
    last_seen_at           INTEGER,
    created_at             INTEGER NOT NULL,
    PRIMARY KEY (org_id, id),
    FOREIGN KEY (org_id, site_id) REFERENCES sites (org_id, id)
);
CREATE INDEX units_by_site ON units (org_id, site_id);

-- device_id is '' rather than NULL so the idempotency key below treats "no device" as one value
-- (NULLs are all distinct in a unique index).
CREATE TABLE readings (
    id               INTEGER PRIMARY KEY,
    org_id           TEXT NOT NULL,
    unit_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL DEFAULT '',
    temperature      REAL NOT NULL,
    humidity         REAL,
    battery          REAL,
    signal_strength  REAL,
    recorded_at      INTEGER NOT NULL,
    source           TEXT NOT NULL,
    received_at      INTEGER NOT NULL
);
-- The idempotency key; it also serves "latest reading of a unit" and "readings of a unit by time".
CREATE UNIQUE INDEX readings_dedup ON readings (org_id, unit_id, recorded_at, device_id, source);

CREATE TABLE alerts (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL,
    unit_id       TEXT NOT NULL,
    site_id       TEXT NOT NULL,
    alert_type    TEXT NOT NULL,
    severity      TEXT NOT NULL,
    message       TEXT NOT NULL,
    status        TEXT NOT NULL,
    triggered_at  INTEGER NOT NULL,
    resolved_at   INTEGER,
    value         REAL,
    threshold     REAL
);
-- At most one open alert per unit and type: the arbiter when several requests or nodes race.
CREATE UNIQUE INDEX alerts_one_active ON alerts (org_id, unit_id, alert_type) WHERE status = 'active';
CREATE INDEX alerts_by_org ON alerts (org_id, status, triggered_at);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES organisations (id),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
