-- The current record never moves back in time.
--
-- Heartbeats of one installation can commit out of order: two workers, two nodes, or a batch that
-- waited for its lock behind a later one. Until now (0016, 0017) a changed heartbeat rewrote the
-- current record whenever its batch committed, so one received at 10:00:00 and committed after
-- another received at 10:00:02 put the older fields back and moved last_seen_at back two seconds.
-- Now a heartbeat received before last_seen_at is history only: the current record is the latest
-- heartbeat by receipt time, whatever the order of commits. Everything else is as in 0017 (a repeat
-- less than a second after last_seen_at leaves the row alone; every stored heartbeat is judged
-- under the row locks and appended to the history). Receipt times come from the workers' clocks: a
-- node whose clock runs ahead holds last_seen_at where it put it until the others' clocks pass it
-- (their heartbeats are history meanwhile), as NTP keeps nodes within milliseconds of each other.
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
        SELECT DISTINCT ON (install_id) * FROM judged WHERE outcome = 'stored' ORDER BY install_id, ord DESC
    ), current_record AS (
        UPDATE installations i SET
            last_seen_at = l.received_at, license_type = l.license_type, version = l.version,
            asset_count = l.asset_count, db_server_type = l.db_server_type,
            web_server_type = l.web_server_type, email_ct = l.email_ct, ip_prefix = l.ip_prefix::cidr
        FROM latest l WHERE i.install_id = l.install_id
            AND (i.last_seen_at IS NULL OR l.received_at >= i.last_seen_at + interval '1 second'
                 OR (l.received_at >= i.last_seen_at
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
