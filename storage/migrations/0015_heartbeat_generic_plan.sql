-- The heartbeat batch function plans its two statements once per connection, not once per call.
--
-- PL/pgSQL caches a statement's plan, but for statements with parameters it keeps planning a
-- custom plan for each call while the generic one does not look cheaper; for the batch
-- function's locking statement and its five-part write, that planning cost more than the writing
-- of a batch of twenty (measured on PostgreSQL 18: about 0.6 ms of backend CPU per call for a
-- batch of one, 0.25 ms with the generic plan). The generic plan of both statements uses the
-- installations' and tokens' primary keys whatever the batch holds (checked with 100,000
-- installations: per-row cost falls as batches grow, as index lookups do).
ALTER FUNCTION write_heartbeat_batch(uuid[], timestamptz[], text[], text[], int[], text[], text[], bytea[], text[], text[])
    SET plan_cache_mode = force_generic_plan;
