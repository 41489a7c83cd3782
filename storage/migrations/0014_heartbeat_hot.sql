-- Heartbeats in one round trip per batch, and their current records updated in place.
--
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

-- A batch of heartbeats in one call, in its caller's transaction (alone: one implicit transaction,
-- one round trip instead of BEGIN, two statements and COMMIT). Two statements inside, as before
-- (storage.installations): lock the installations in a fixed order, then judge each heartbeat
-- against the installation and its token, update each current record to its latest heartbeat,
-- append the history. The function is VOLATILE, so its second statement takes a fresh snapshot
-- after the locks are held: an erasure, restriction or revocation that committed first is seen.
-- Returns each heartbeat's outcome in order: stored, restricted, gone or revoked.
CREATE FUNCTION write_heartbeat_batch(p_install_id uuid[], p_received_at timestamptz[], p_license_type text[],
                                      p_version text[], p_asset_count int[], p_db_server_type text[],
                                      p_web_server_type text[], p_email_ct bytea[], p_ip_prefix text[],
                                      p_token_id text[])
RETURNS text[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    outcomes text[];
BEGIN
    PERFORM 1 FROM installations WHERE install_id = ANY(p_install_id) ORDER BY install_id FOR UPDATE;
    WITH u AS (
        SELECT * FROM unnest(p_install_id, p_received_at, p_license_type, p_version, p_asset_count, p_db_server_type,
                             p_web_server_type, p_email_ct, p_ip_prefix, p_token_id)
            WITH ORDINALITY AS u(install_id, received_at, license_type, version, asset_count, db_server_type,
                                 web_server_type, email_ct, ip_prefix, token_id, ord)
    ), judged AS (
        SELECT u.*, CASE
            WHEN i.install_id IS NULL OR i.erasing THEN 'gone'
            WHEN u.token_id IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM tokens t WHERE t.token_id = u.token_id AND t.revoked_at IS NULL) THEN 'revoked'
            WHEN i.restricted THEN 'restricted'
            ELSE 'stored' END AS outcome
        FROM u LEFT JOIN installations i ON i.install_id = u.install_id
    ), latest AS (
        SELECT DISTINCT ON (install_id) * FROM judged WHERE outcome = 'stored' ORDER BY install_id, ord DESC
    ), current_record AS (
        UPDATE installations i SET
            last_seen_at = l.received_at, license_type = l.license_type, version = l.version,
            asset_count = l.asset_count, db_server_type = l.db_server_type,
            web_server_type = l.web_server_type, email_ct = l.email_ct, ip_prefix = l.ip_prefix::cidr
        FROM latest l WHERE i.install_id = l.install_id
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
