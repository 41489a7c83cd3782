-- Retention (issue 4): what the sweeper and data-key replacement read.

-- Records sealed under each data key, as counted by the workers and added up every sweep
-- interval (a lower bound: a worker killed between flushes loses at most one interval's count,
-- far inside the margin between data_key_max_uses and AES-GCM's 2**32).
ALTER TABLE data_keys ADD COLUMN uses bigint NOT NULL DEFAULT 0;

-- Heartbeat history past its retention inside a partition that is not wholly expired is deleted
-- in batches by received_at, and the oldest row's age is a metric: both read this index.
CREATE INDEX heartbeats_received ON heartbeats (received_at);

-- Inactive installations: last_seen_at has its index; these never sent a heartbeat at all.
CREATE INDEX installations_never_seen ON installations (enrolled_at) WHERE last_seen_at IS NULL;

-- The age of the oldest stored scan is a metric every worker reads each sweep interval: min() on
-- this index (per partition) instead of reading every scan. Expired scans are found by
-- scans_expires (0002).
CREATE INDEX scans_received ON scans (received_at);
