-- A batch of scans is written by one call of write_scan_batch, one statement and one round trip,
-- as heartbeats are (0014): before, storage.scans.write_scans sent seven statements inside
-- BEGIN and COMMIT, nine round trips, each a wake-up of the worker's event loop, which shares
-- its core with the threads that prepare scans. Measured with the writer alone (9 KB sealed
-- scans, one connection): about 650 us of the worker's CPU per batch besides 55 us per scan,
-- and the service's batches under load hold about four scans.
--
-- The same steps, statements, snapshots and outcomes as before, in the same order:
--   1. the batch's installations locked FOR SHARE in install_id order, their state read by the
--      locking statement itself (batches of scans do not wait for each other; a restriction,
--      erasure or retention change, which update the row, is ordered before or after the batch);
--   2. in a fresh snapshot, each scan judged: gone (no installation, or being erased),
--      restricted, revoked (its token revoked or gone), or a candidate;
--   3. the candidates' advisory locks (storage.scans.lock_key, computed by the caller), sorted,
--      so two batches never wait for each other in a cycle, held until commit;
--   4. in a fresh snapshot, each candidate's oldest unexpired stored scan of the same scan_id;
--   5. with a quota, the candidates' installations' usage: past days deleted, the rest summed;
--   6. each candidate in order (per installation, as the quota and scan_id are): exists (stored
--      before, or earlier in this batch), over quota, or stored, expiring at received_at plus the
--      installation's retention but never after its key's epoch ends (key_expires_at);
--   7. the stored scans inserted, their sealed bytes added to scan_usage per day of expiry in
--      (install_id, day) order (concurrent upserts cannot deadlock).
-- Called alone it is its own transaction; inside the caller's, part of it.
CREATE TYPE scan_row AS (
    install_id      uuid,
    agent_id        uuid,
    scan_id         uuid,
    received_at     timestamptz,
    key_id          integer,
    key_expires_at  timestamptz,
    content_mac     bytea,
    size_wire       integer,
    size_decoded    integer,
    size_plain      integer,
    ciphertext      bytea,
    token_id        text,
    lock_key        bigint
);

CREATE TYPE scan_outcome AS (
    status      text,
    expires_at  timestamptz,
    key_id      integer,
    content_mac bytea
);

CREATE FUNCTION write_scan_batch(p_rows scan_row[], p_max_bytes bigint)
RETURNS SETOF scan_outcome LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    n constant integer := coalesce(cardinality(p_rows), 0);
    st_ids uuid[];
    st_restricted boolean[];
    st_erasing boolean[];
    st_hours integer[];
    v_status text[];     -- per scan; NULL while it is a candidate
    v_hours integer[];
    v_expires timestamptz[];
    v_key integer[];
    v_mac bytea[];
    v_installs uuid[];   -- the candidates' installations, sorted
    u_ids uuid[];
    u_bytes bigint[];
    today date;
    c record;
    cur uuid;
    used bigint;
    kept_scans uuid[];
    kept_ords integer[];
    k integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(s.install_id), array_agg(s.restricted), array_agg(s.erasing), array_agg(s.scan_retention_hours)
      INTO st_ids, st_restricted, st_erasing, st_hours
      FROM (SELECT i.install_id, i.restricted, i.erasing, i.scan_retention_hours
              FROM (SELECT DISTINCT r.install_id FROM unnest(p_rows) r) b JOIN installations i ON i.install_id = b.install_id
             ORDER BY i.install_id FOR SHARE OF i) s;

    SELECT array_agg(CASE WHEN s.install_id IS NULL OR s.erasing THEN 'gone'
                          WHEN s.restricted THEN 'restricted'
                          WHEN u.token_id IS NOT NULL AND t.token_id IS NULL THEN 'revoked' END ORDER BY u.ord),
           array_agg(s.hours ORDER BY u.ord)
      INTO v_status, v_hours
      FROM unnest(p_rows) WITH ORDINALITY AS u(install_id, agent_id, scan_id, received_at, key_id, key_expires_at, content_mac,
                                               size_wire, size_decoded, size_plain, ciphertext, token_id, lock_key, ord)
      LEFT JOIN unnest(st_ids, st_restricted, st_erasing, st_hours) AS s(install_id, restricted, erasing, hours)
             ON s.install_id = u.install_id
      LEFT JOIN tokens t ON t.token_id = u.token_id AND t.revoked_at IS NULL;

    IF array_position(v_status, NULL) IS NULL THEN  -- no candidate: nothing to lock, look up or store
        RETURN QUERY SELECT v_status[o], NULL::timestamptz, NULL::integer, NULL::bytea FROM generate_series(1, n) AS o ORDER BY o;
        RETURN;
    END IF;

    PERFORM pg_advisory_xact_lock(l.k)
       FROM unnest(ARRAY(SELECT DISTINCT r.lock_key FROM unnest(p_rows) WITH ORDINALITY AS r(install_id, agent_id, scan_id,
                         received_at, key_id, key_expires_at, content_mac, size_wire, size_decoded, size_plain, ciphertext,
                         token_id, lock_key, ord)
                         WHERE v_status[r.ord] IS NULL ORDER BY 1)) AS l(k);

    SELECT array_agg(e.expires_at ORDER BY u.ord), array_agg(e.key_id ORDER BY u.ord), array_agg(e.content_mac ORDER BY u.ord)
      INTO v_expires, v_key, v_mac
      FROM unnest(p_rows) WITH ORDINALITY AS u(install_id, agent_id, scan_id, received_at, key_id, key_expires_at, content_mac,
                                               size_wire, size_decoded, size_plain, ciphertext, token_id, lock_key, ord)
      LEFT JOIN LATERAL (SELECT s.expires_at, s.key_id, s.content_mac FROM scans s
                          WHERE v_status[u.ord] IS NULL AND s.install_id = u.install_id AND s.scan_id = u.scan_id
                            AND s.expires_at > now()
                          ORDER BY s.received_at LIMIT 1) e ON true;

    v_installs := ARRAY(SELECT DISTINCT r.install_id FROM unnest(p_rows) WITH ORDINALITY AS r(install_id, agent_id, scan_id,
                        received_at, key_id, key_expires_at, content_mac, size_wire, size_decoded, size_plain, ciphertext,
                        token_id, lock_key, ord)
                        WHERE v_status[r.ord] IS NULL ORDER BY 1);
    IF p_max_bytes IS NOT NULL THEN
        -- Days already past count no more: their rows are deleted here (same snapshot, disjoint rows).
        today := (now() AT TIME ZONE 'UTC')::date;
        WITH past AS (DELETE FROM scan_usage WHERE install_id = ANY(v_installs) AND expires_on < today)
        SELECT array_agg(g.install_id), array_agg(g.total) INTO u_ids, u_bytes
          FROM (SELECT su.install_id, sum(su.bytes)::bigint AS total FROM scan_usage su
                 WHERE su.install_id = ANY(v_installs) AND su.expires_on >= today GROUP BY su.install_id) g;
    END IF;

    FOR c IN SELECT r.ord::integer AS ord, r.install_id, r.scan_id, r.received_at, r.key_id, r.key_expires_at, r.content_mac,
                    octet_length(r.ciphertext)::bigint AS size
               FROM unnest(p_rows) WITH ORDINALITY AS r(install_id, agent_id, scan_id, received_at, key_id, key_expires_at,
                    content_mac, size_wire, size_decoded, size_plain, ciphertext, token_id, lock_key, ord)
              WHERE v_status[r.ord] IS NULL ORDER BY r.install_id, r.ord
    LOOP
        IF cur IS DISTINCT FROM c.install_id THEN
            cur := c.install_id;
            used := coalesce(u_bytes[array_position(u_ids, cur)], 0);
            kept_scans := '{}';
            kept_ords := '{}';
        END IF;
        IF v_key[c.ord] IS NOT NULL THEN  -- stored before this batch
            v_status[c.ord] := 'exists';
            CONTINUE;
        END IF;
        k := array_position(kept_scans, c.scan_id);
        IF k IS NOT NULL THEN  -- stored earlier in this batch: that one is what this repeat finds
            v_status[c.ord] := 'exists';
            v_expires[c.ord] := v_expires[kept_ords[k]];
            v_key[c.ord] := (p_rows[kept_ords[k]]).key_id;
            v_mac[c.ord] := (p_rows[kept_ords[k]]).content_mac;
        ELSIF p_max_bytes IS NOT NULL AND used + c.size > p_max_bytes THEN
            v_status[c.ord] := 'over_quota';
        ELSE
            used := used + c.size;
            v_status[c.ord] := 'stored';
            -- The key was chosen for the retention the worker knew; if it has since grown, the scan
            -- still expires with its key (a shorter one only makes the key outlive it).
            v_expires[c.ord] := least(c.received_at + make_interval(hours => v_hours[c.ord]), c.key_expires_at);
            kept_scans := kept_scans || c.scan_id;
            kept_ords := kept_ords || c.ord;
        END IF;
    END LOOP;

    IF array_position(v_status, 'stored') IS NOT NULL THEN
        INSERT INTO scans (install_id, agent_id, scan_id, received_at, expires_at, key_id, content_mac,
                           size_wire, size_decoded, size_plain, ciphertext)
        SELECT r.install_id, r.agent_id, r.scan_id, r.received_at, v_expires[r.ord], r.key_id, r.content_mac,
               r.size_wire, r.size_decoded, r.size_plain, r.ciphertext
          FROM unnest(p_rows) WITH ORDINALITY AS r(install_id, agent_id, scan_id, received_at, key_id, key_expires_at, content_mac,
                                                   size_wire, size_decoded, size_plain, ciphertext, token_id, lock_key, ord)
         WHERE v_status[r.ord] = 'stored';
        INSERT INTO scan_usage AS su (install_id, expires_on, bytes)
        SELECT r.install_id, (v_expires[r.ord] AT TIME ZONE 'UTC')::date, sum(octet_length(r.ciphertext))
          FROM unnest(p_rows) WITH ORDINALITY AS r(install_id, agent_id, scan_id, received_at, key_id, key_expires_at, content_mac,
                                                   size_wire, size_decoded, size_plain, ciphertext, token_id, lock_key, ord)
         WHERE v_status[r.ord] = 'stored'
         GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (install_id, expires_on) DO UPDATE SET bytes = su.bytes + excluded.bytes;
    END IF;

    RETURN QUERY SELECT v_status[o], v_expires[o], CASE WHEN v_status[o] = 'exists' THEN v_key[o] END,
                        CASE WHEN v_status[o] = 'exists' THEN v_mac[o] END
                   FROM generate_series(1, n) AS o ORDER BY o;
END
$$;
