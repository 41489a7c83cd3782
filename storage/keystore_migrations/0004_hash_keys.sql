-- Keys of the keyed hashes (issue 13): a field a policy file stores as `keyed-hash` is kept as
-- HMAC-SHA256 of its value under its category's key, so records with the same value can be
-- counted and joined while the value itself is not kept. One key per category (joins across
-- installations are the point), made on first use, wrapped by a key-encryption key of
-- TELEMETRY_MASTER_KEY like the data keys (kek_id, wrapped), re-wrapped by `keys rotate`.
-- Not an installation's key: erasure deletes the installation's hashed values with its rows.
CREATE TABLE hash_keys (
    category    text PRIMARY KEY,
    kek_id      text NOT NULL,
    wrapped     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hash_keys_kek ON hash_keys (kek_id);
