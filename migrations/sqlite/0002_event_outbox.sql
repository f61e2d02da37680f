-- Alert and status events are written in the transaction that makes the change (a transactional
-- outbox) and deleted once announced. A row whose lease has run out was not announced by the
-- process that wrote it (it died before): the restarted process announces it.
CREATE TABLE event_outbox (
    id           INTEGER PRIMARY KEY,
    org_id       TEXT NOT NULL,
    event        TEXT NOT NULL,
    rooms        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    lease_until  INTEGER NOT NULL
);
CREATE INDEX event_outbox_by_lease ON event_outbox (lease_until);
