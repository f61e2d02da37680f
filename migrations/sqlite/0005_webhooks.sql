-- Organisation webhooks and their deliveries.
--
-- A delivery row is made by a trigger on `event_outbox`, inside the transaction that writes the
-- alert event (the ingest commit, the offline sweep, an acknowledgement): every path that stores
-- an alert event gets its webhook deliveries without code of its own, and a delivery exists if
-- and only if its event was committed; the trigger runs once per event row, so one per event per
-- webhook. (`outbox_id` is not unique over time here: SQLite reuses the ids of deleted outbox
-- rows, so it is kept for diagnosis only; `seq` orders the deliveries.) The delivery worker
-- claims due rows with a lease (`lease_until`) and records each attempt; `next_attempt_at` is
-- NULL once delivered or given up.
CREATE TABLE webhooks (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL,  -- JSON array of event names
    secret      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX webhooks_by_org ON webhooks (org_id);

CREATE TABLE webhook_deliveries (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    webhook_id        TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    org_id            TEXT NOT NULL,
    outbox_id         INTEGER NOT NULL,
    event             TEXT NOT NULL,
    payload           TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    first_attempt_at  INTEGER,
    next_attempt_at   INTEGER,
    lease_until       INTEGER NOT NULL DEFAULT 0,
    last_status       INTEGER,
    last_error        TEXT,
    delivered_at      INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (webhook_id, seq);

CREATE TRIGGER event_outbox_webhooks AFTER INSERT ON event_outbox
WHEN NEW.event IN ('alert:triggered', 'alert:resolved', 'alert:acknowledged')
BEGIN
    INSERT INTO webhook_deliveries (id, webhook_id, org_id, outbox_id, event, payload, created_at,
                                    next_attempt_at)
    SELECT lower(hex(randomblob(16))), w.id, NEW.org_id, NEW.id, NEW.event, NEW.payload,
           NEW.created_at, NEW.created_at
    FROM webhooks AS w
    WHERE w.org_id = NEW.org_id
      AND EXISTS (SELECT 1 FROM json_each(w.events) AS e WHERE e.value = NEW.event);
END;
