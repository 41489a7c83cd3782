-- The current record is the latest heartbeat by receipt time, judged against a time of its own.
--
-- 0018 judged a heartbeat against last_seen_at, which a stored record moves too (storage.records:
-- greatest(last_seen_at, now()), the database's clock when its transaction started). So a record
-- committed between a heartbeat's receipt and its commit made that heartbeat, changed fields and
-- all, history only: its new version or e-mail stayed out of the current record until the next
-- heartbeat. Found in review of 0018, before any release carried it. Now heartbeat_at holds the
-- receipt time of the heartbeat the current record came from (no index: the update stays HOT); a
-- heartbeat rewrites the record when it is the first one (heartbeat_at NULL, also every
-- installation right after this migration), comes a second or more after heartbeat_at, or differs
-- in a field and was received at or after heartbeat_at. last_seen_at = greatest(last_seen_at,
-- received_at): heartbeats and records both move it forward only. The batch's latest heartbeat of
-- an installation is now the latest by receipt time (then by position), not by position alone.
ALTER TABLE installations ADD COLUMN heartbeat_at timestamptz;

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
            AND (i.heartbeat_at IS NULL OR l.received_at >= i.heartbeat_at + interval '1 second'
                 OR (l.received_at >= i.heartbeat_at
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
