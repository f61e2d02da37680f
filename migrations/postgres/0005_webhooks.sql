-- Organisation webhooks and their deliveries.
--
-- A delivery row is made by a trigger on `event_outbox`, inside the transaction that writes the
-- alert event (the ingest commit, the offline sweep, an acknowledgement): every path that stores
-- an alert event gets its webhook deliveries without code of its own, and a delivery exists if
-- and only if its event was committed; the trigger runs once per event row, and the unique
-- (webhook_id, outbox_id) makes that one per event per webhook. Any node's delivery worker
-- claims due rows with a lease (`lease_until`) and records each attempt; `next_attempt_at` is
-- NULL once delivered or given up.
CREATE TABLE webhooks (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL,  -- JSON array of event names
    secret      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX webhooks_by_org ON webhooks (org_id);

CREATE TABLE webhook_deliveries (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    webhook_id        TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    org_id            TEXT NOT NULL,
    outbox_id         BIGINT NOT NULL,
    event             TEXT NOT NULL,
    payload           TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    first_attempt_at  BIGINT,
    next_attempt_at   BIGINT,
    lease_until       BIGINT NOT NULL DEFAULT 0,
    last_status       INTEGER,
    last_error        TEXT,
    delivered_at      BIGINT,
    UNIQUE (webhook_id, outbox_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (webhook_id, seq);

CREATE FUNCTION webhook_deliveries_for_event() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, webhook_id, org_id, outbox_id, event, payload, created_at,
                                    next_attempt_at)
    SELECT replace(gen_random_uuid()::text, '-', ''), w.id, NEW.org_id, NEW.id, NEW.event,
           NEW.payload, NEW.created_at, NEW.created_at
    FROM webhooks AS w
    WHERE w.org_id = NEW.org_id AND w.events::jsonb ? NEW.event;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER event_outbox_webhooks AFTER INSERT ON event_outbox FOR EACH ROW
    WHEN (NEW.event IN ('alert:triggered', 'alert:resolved', 'alert:acknowledged'))
    EXECUTE FUNCTION webhook_deliveries_for_event();
