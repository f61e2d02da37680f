-- Alert lifecycle (issue 17): acknowledgement, peak of the excursion, history queries.
-- acknowledged_at is set once: the acknowledge statement is a conditional UPDATE
-- (... WHERE acknowledged_at IS NULL), so of two nodes racing exactly one wins.
ALTER TABLE alerts ADD COLUMN acknowledged_at INTEGER;
ALTER TABLE alerts ADD COLUMN acknowledged_by TEXT;
ALTER TABLE alerts ADD COLUMN note TEXT;
-- The most extreme out-of-range reading of the excursion so far (highest for temp_high, lowest
-- for temp_low), kept by the ingest commit under the unit's row lock; NULL for offline.
ALTER TABLE alerts ADD COLUMN peak_value REAL;
UPDATE alerts SET peak_value = value WHERE alert_type <> 'offline';
-- History: newest first within an organisation, the cursor's order.
CREATE INDEX alerts_history ON alerts (org_id, triggered_at DESC, id DESC);
