-- Data keys move to the key store (storage/keystore_migrations, CONTRACT.md section 5). Before
-- this file runs, storage.migrate has copied every row of data_keys into the key store and
-- checked that none is missing there (storage.keystore.adopt_legacy_keys); the data database
-- then keeps ciphertexts and key serials only, never a key, wrapped or not.
DROP TABLE data_keys;

-- How far this database has replayed the key store's erasure tombstones. A restored backup
-- brings back its own, older position, so the next start or sweep replays every erasure since.
CREATE TABLE erasure_replay (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    erased_through timestamptz NOT NULL
);
