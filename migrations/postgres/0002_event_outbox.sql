-- Alert and status events are written in the transaction that makes the change (a transactional
-- outbox) and deleted once announced. A row whose lease has run out was not announced by the
-- node that wrote it (it died, or lost its way out): any live node announces it.
CREATE TABLE event_outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id       TEXT NOT NULL,
    event        TEXT NOT NULL,
    rooms        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    lease_until  BIGINT NOT NULL
);
CREATE INDEX event_outbox_by_lease ON event_outbox (lease_until);
