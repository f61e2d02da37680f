-- sensorwire schema (PostgreSQL, shared by several nodes).
-- Times are BIGINT milliseconds since the Unix epoch (UTC).

CREATE TABLE organisations (
    id          TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL
);

CREATE TABLE sites (
    org_id      TEXT NOT NULL REFERENCES organisations (id),
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (org_id, id)
);

CREATE TABLE units (
    org_id                 TEXT NOT NULL,
    id                     TEXT NOT NULL,
    site_id                TEXT NOT NULL,
    name                   TEXT NOT NULL,
    temp_min               DOUBLE PRECISION,
    temp_max               DOUBLE PRECISION,
    offline_after_seconds  BIGINT NOT NULL DEFAULT 300 CHECK (offline_after_seconds >= 1),
    status                 TEXT NOT NULL DEFAULT 'unknown',
    status_since           BIGINT,
    last_reading_at        BIGINT,
    last_temperature       DOUBLE PRECISION,
    -- Server time of the last reading received: what the offline sweeper measures silence by.
    last_seen_at           BIGINT,
    created_at             BIGINT NOT NULL,
    PRIMARY KEY (org_id, id),
    FOREIGN KEY (org_id, site_id) REFERENCES sites (org_id, id)
);
CREATE INDEX units_by_site ON units (org_id, site_id);

-- device_id is '' rather than NULL so the idempotency key below treats "no device" as one value
-- (NULLs are all distinct in a unique index).
CREATE TABLE readings (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id           TEXT NOT NULL,
    unit_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL DEFAULT '',
    temperature      DOUBLE PRECISION NOT NULL,
    humidity         DOUBLE PRECISION,
    battery          DOUBLE PRECISION,
    signal_strength  DOUBLE PRECISION,
    recorded_at      BIGINT NOT NULL,
    source           TEXT NOT NULL,
    received_at      BIGINT NOT NULL
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
    triggered_at  BIGINT NOT NULL,
    resolved_at   BIGINT,
    value         DOUBLE PRECISION,
    threshold     DOUBLE PRECISION
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
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
