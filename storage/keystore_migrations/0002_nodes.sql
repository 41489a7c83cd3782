-- Which key-encryption keys each running worker holds, and when it last said so (storage.keystore,
-- ingest.worker.nodes). `keys rotate` reads it: it re-wraps data keys under a new primary only once every
-- live worker holds that key, so no running node is left unable to unwrap what the store holds.
-- Key ids only (crypto.keyring.kek_id, a digest), never key material.
CREATE TABLE nodes (
    node_id     text PRIMARY KEY,           -- host:pid of the worker process
    kek_ids     text[] NOT NULL,            -- every key id it holds, its primary first
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX nodes_seen ON nodes (seen_at);
