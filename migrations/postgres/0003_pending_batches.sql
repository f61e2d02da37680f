-- Readings stored but not yet announced in a batch: one row per group commit, written in the
-- commit, deleted once the node's batches holding them are out. A row whose lease has run out
-- belongs to a node that died before its flush: any live node (or the restarted one) reads the
-- readings back by id and announces them.
CREATE TABLE pending_batches (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The commit's new reading ids as JSON ranges: [[first, last], ...]
    ranges       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    lease_until  BIGINT NOT NULL
);
CREATE INDEX pending_batches_by_lease ON pending_batches (lease_until);
