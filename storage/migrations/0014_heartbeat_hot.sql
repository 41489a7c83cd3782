-- Heartbeats update each installation's current record in place (HOT, heap-only tuples): a
-- PostgreSQL update is HOT only when no indexed column changes and the page has room, and every
-- heartbeat changes last_seen_at. So last_seen_at is no longer indexed, neither as a key
-- (installations_last_seen, 0001) nor in a partial index's predicate (installations_never_seen,
-- 0004); the sweeper's inactive-installation step (storage.sweeper.erase_inactive) reads the
-- table sequentially once per sweep instead, and statistics (storage.admin) did already.
-- Free space is kept on each page for the new row versions (fillfactor, for pages written from now on).
DROP INDEX IF EXISTS installations_last_seen;
DROP INDEX IF EXISTS installations_never_seen;
ALTER TABLE installations SET (fillfactor = 75);
