-- Data keys move to the key store (storage/keystore_migrations, CONTRACT.md section 5). Before
-- this file runs, in the same transaction, storage.databases.migrate_both has copied every row
-- of data_keys into the key store, checked that each arrived unchanged, and emptied data_keys
-- (storage.keystore.adopt_legacy_keys); a migration run without the key store finds keys left
-- and stops here. The data database then keeps ciphertexts and key serials only, never a key.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM data_keys) THEN
        RAISE EXCEPTION 'data_keys still holds keys: migrate together with the key store (storage.databases.migrate_both)';
    END IF;
END
$$;
DROP TABLE data_keys;

-- How far this database has replayed the key store's erasure tombstones. A restored backup
-- brings back its own, older position, so the next start or sweep replays every erasure since.
CREATE TABLE erasure_replay (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    erased_through timestamptz NOT NULL
);
