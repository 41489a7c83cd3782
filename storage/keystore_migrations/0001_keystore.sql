-- The key store (CONTRACT.md section 5): data keys live here, apart from the data they open, so a
-- copy of the data database alone opens nothing, and destroying a key here makes its ciphertexts
-- unreadable in every copy of the data database (backups, WAL archives, replicas) at once.

-- Data keys, each wrapped (AES-256-GCM) by a key-encryption key of TELEMETRY_MASTER_KEY (kek_id).
-- key_id < 2^30: an installation's record keys (serials 1, 2, ...: the current record's e-mail).
-- key_id >= 2^30: retention-epoch keys of scans (crypto.datakeys.epoch_key_id); expires_at is the
-- end of the epoch, after which no scan sealed under the key can still be unexpired: the sweeper
-- destroys it then.
--
-- An epoch key whose scans have all expired (a hint, `last_expiry`, says when the workers last saw
-- one sealed under it expire; the data database decides), or that a shortened retention left
-- without scans, is destroyed before its epoch ends in two steps (storage.keystore, storage.sweeper): `retiring_at` (no worker seals with it any
-- more), then, once every worker's cache has let go of it, its material is deleted (wrapped and
-- kek_id NULL) while the row stays until expires_at, so its id is never made again.
CREATE TABLE data_keys (
    install_id  uuid NOT NULL,
    key_id      integer NOT NULL,
    kek_id      text,
    wrapped     bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    uses        bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz,
    retiring_at timestamptz,
    last_expiry timestamptz,  -- the latest expires_at of the scans it sealed, as the workers reported it (a hint)
    PRIMARY KEY (install_id, key_id),
    CHECK ((key_id >= 1073741824) = (expires_at IS NOT NULL)),
    CHECK ((wrapped IS NULL) = (kek_id IS NULL)),
    CHECK (wrapped IS NOT NULL OR retiring_at IS NOT NULL)
);
CREATE INDEX data_keys_kek ON data_keys (kek_id);
CREATE INDEX data_keys_expires ON data_keys (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX data_keys_retiring ON data_keys (retiring_at) WHERE retiring_at IS NOT NULL AND wrapped IS NOT NULL;
CREATE INDEX data_keys_last_expiry ON data_keys (last_expiry) WHERE retiring_at IS NULL AND wrapped IS NOT NULL;

-- Tombstones of erased installations: the install_id and the time, nothing else. At every start
-- and every sweep, an installation of the data database enrolled before its tombstone is erased
-- again (a restored backup of the data database does not bring it back).
CREATE TABLE erasures (
    install_id  uuid PRIMARY KEY,
    erased_at   timestamptz NOT NULL
);
