-- The key store (CONTRACT.md section 5): data keys live here, apart from the data they open, so a
-- copy of the data database alone opens nothing, and destroying a key here makes its ciphertexts
-- unreadable in every copy of the data database (backups, WAL archives, replicas) at once.

-- Data keys, each wrapped (AES-256-GCM) by a key-encryption key of TELEMETRY_MASTER_KEY (kek_id).
-- key_id < 2^30: an installation's record keys (serials 1, 2, ...: the current record's e-mail).
-- key_id >= 2^30: retention-epoch keys of scans (crypto.datakeys.epoch_key_id); expires_at is the
-- end of the epoch, after which no scan sealed under the key can still be unexpired: the sweeper
-- destroys it then.
CREATE TABLE data_keys (
    install_id  uuid NOT NULL,
    key_id      integer NOT NULL,
    kek_id      text NOT NULL,
    wrapped     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    uses        bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz,
    PRIMARY KEY (install_id, key_id),
    CHECK ((key_id >= 1073741824) = (expires_at IS NOT NULL))
);
CREATE INDEX data_keys_kek ON data_keys (kek_id);
CREATE INDEX data_keys_expires ON data_keys (expires_at) WHERE expires_at IS NOT NULL;

-- Tombstones of erased installations: the install_id and the time, nothing else. At every start
-- and every sweep, an installation of the data database enrolled before its tombstone is erased
-- again (a restored backup of the data database does not bring it back).
CREATE TABLE erasures (
    install_id  uuid PRIMARY KEY,
    erased_at   timestamptz NOT NULL
);
