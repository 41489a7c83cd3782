-- An installation whose record predates heartbeat_at is judged against last_seen_at, as in 0018.
--
-- 0019 let the first heartbeat after it rewrite every existing installation's current record
-- unchecked (heartbeat_at NULL), so a changed heartbeat received before the record's, in a batch
-- committed across the upgrade or from a node whose clock lags, put older fields back once. Now a
-- heartbeat is judged against coalesce(heartbeat_at, last_seen_at): until its first heartbeat
-- after 0019 an installation behaves as under 0018, and one never seen (both NULL) takes its first
-- heartbeat. (One installation whose last_seen_at a stored record moved before its first heartbeat
-- meets 0018's race once: a heartbeat received before that record and committed after it is
-- history only, until the next.) No backfill: an UPDATE of every row would rewrite the table under the migration's lock.
-- Found in review of 0019, before any release carried it.
CREATE OR REPLACE FUNCTION write_heartbeat_batch(p_rows heartbeat_row[])
RETURNS text[] LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    outcomes text[];
BEGIN
    PERFORM 1 FROM installations WHERE install_id = ANY(ARRAY(SELECT r.install_id FROM unnest(p_rows) r))
        ORDER BY install_id FOR UPDATE;
    WITH u AS (
        SELECT * FROM unnest(p_rows) WITH ORDINALITY AS u(install_id, received_at, license_type, version, asset_count,
                                                          db_server_type, web_server_type, email_ct, ip_prefix, token_id, ord)
    ), live AS MATERIALIZED (
        SELECT t.token_id FROM tokens t
        WHERE t.token_id = ANY(ARRAY(SELECT r.token_id FROM unnest(p_rows) r)) AND t.revoked_at IS NULL
    ), judged AS (
        SELECT u.*, CASE
            WHEN i.install_id IS NULL OR i.erasing THEN 'gone'
            WHEN u.token_id IS NOT NULL AND live.token_id IS NULL THEN 'revoked'
            WHEN i.restricted THEN 'restricted'
            ELSE 'stored' END AS outcome
        FROM u LEFT JOIN installations i ON i.install_id = u.install_id
               LEFT JOIN live ON live.token_id = u.token_id
    ), latest AS (
        SELECT DISTINCT ON (install_id) * FROM judged WHERE outcome = 'stored' ORDER BY install_id, received_at DESC, ord DESC
    ), current_record AS (
        UPDATE installations i SET
            last_seen_at = greatest(i.last_seen_at, l.received_at), heartbeat_at = l.received_at,
            license_type = l.license_type, version = l.version,
            asset_count = l.asset_count, db_server_type = l.db_server_type,
            web_server_type = l.web_server_type, email_ct = l.email_ct, ip_prefix = l.ip_prefix::cidr
        FROM latest l WHERE i.install_id = l.install_id
            AND (coalesce(i.heartbeat_at, i.last_seen_at) IS NULL
                 OR l.received_at >= coalesce(i.heartbeat_at, i.last_seen_at) + interval '1 second'
                 OR (l.received_at >= coalesce(i.heartbeat_at, i.last_seen_at)
                     AND (i.license_type, i.version, i.asset_count, i.db_server_type, i.web_server_type, i.email_ct, i.ip_prefix)
                         IS DISTINCT FROM (l.license_type, l.version, l.asset_count, l.db_server_type, l.web_server_type,
                                           l.email_ct, l.ip_prefix::cidr)))
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
