-- The batch function finds every row it reads by index, one lookup per heartbeat, whatever the
-- planner would guess of a batch's size against a table's.
--
-- Its plans are generic (0015: made once per connection), and a generic plan takes a batch for
-- ten rows. Against an installations or tokens table of a few hundred rows (a new fleet, or a
-- day's new installations in a small one) the planner then preferred reading the whole table
-- into a hash join, and against a larger one a bitmap scan over `= ANY(array)`; reading a
-- tokens table row by row to compare each token id with every one of the batch's cost as much
-- as a quarter of the statement. Now:
--   * the batch's tokens are joined like its installations (a LEFT JOIN on the primary key,
--     live ones only), not collected first into a CTE by `= ANY(array)`;
--   * the row locks are taken by joining the batch's distinct install_ids to installations
--     (still ORDER BY install_id, above the join: the same fixed order, concurrent batches cannot
--     deadlock);
--   * the function runs with hash and merge joins off (SET clauses, like plan_cache_mode), so
--     each join is a nested loop with an index lookup on the inner side: no whole-table read, work
--     in proportion to the batch (a lookup grows only with its index's depth).
-- The same statements in the same order, the same snapshots, the same outcomes, records and
-- history. Backend CPU per batch of 24 heartbeats, one connection, rounds interleaved (medians):
-- 256 installations 725 -> 570 us (eight rounds of 1,000 batches), 20,000 installations
-- 870 -> 780 us (six rounds).
CREATE OR REPLACE FUNCTION write_heartbeat_batch(p_rows heartbeat_row[])
RETURNS text[] LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    outcomes text[];
BEGIN
    PERFORM 1 FROM (SELECT DISTINCT r.install_id FROM unnest(p_rows) r) b JOIN installations i ON i.install_id = b.install_id
        ORDER BY i.install_id FOR UPDATE OF i;
    WITH u AS (
        SELECT * FROM unnest(p_rows) WITH ORDINALITY AS u(install_id, received_at, license_type, version, asset_count,
                                                          db_server_type, web_server_type, email_ct, ip_prefix, token_id, ord)
    ), judged AS (
        SELECT u.*, CASE
            WHEN i.install_id IS NULL OR i.erasing THEN 'gone'
            WHEN u.token_id IS NOT NULL AND t.token_id IS NULL THEN 'revoked'
            WHEN i.restricted THEN 'restricted'
            ELSE 'stored' END AS outcome,
            coalesce(i.heartbeat_at, i.last_seen_at) AS judged_at,
            (i.license_type, i.version, i.asset_count, i.db_server_type, i.web_server_type, i.email_ct, i.ip_prefix)
                IS DISTINCT FROM (u.license_type, u.version, u.asset_count, u.db_server_type, u.web_server_type,
                                  u.email_ct, u.ip_prefix::cidr) AS changed
        FROM u LEFT JOIN installations i ON i.install_id = u.install_id
               LEFT JOIN tokens t ON t.token_id = u.token_id AND t.revoked_at IS NULL
    ), latest AS (
        SELECT DISTINCT ON (install_id) * FROM judged WHERE outcome = 'stored' ORDER BY install_id, received_at DESC, ord DESC
    ), current_record AS (
        UPDATE installations i SET
            last_seen_at = greatest(i.last_seen_at, l.received_at), heartbeat_at = l.received_at,
            license_type = l.license_type, version = l.version,
            asset_count = l.asset_count, db_server_type = l.db_server_type,
            web_server_type = l.web_server_type, email_ct = l.email_ct, ip_prefix = l.ip_prefix::cidr
        FROM latest l WHERE i.install_id = l.install_id
            AND (l.judged_at IS NULL OR l.received_at >= l.judged_at + interval '1 second'
                 OR (l.received_at >= l.judged_at AND l.changed))
    ), history AS (
        INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count, db_server_type,
                                web_server_type, ip_prefix)
        SELECT install_id, received_at, license_type, version, asset_count, db_server_type, web_server_type,
               ip_prefix::cidr
        FROM judged WHERE outcome = 'stored'
    )
    SELECT array_agg(outcome ORDER BY ord) INTO outcomes FROM judged;
    RETURN outcomes;
END $$;
