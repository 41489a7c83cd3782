-- The sweeper lease (storage.sweeper): one row, held by whichever process is sweeping until
-- expires_at, renewed while it works. It replaces a session advisory lock, which a pooler in
-- transaction mode cannot keep (the lock stays on whichever server connection took it, and the
-- pool's reset, pg_advisory_unlock_all(), can drop a lock another sweeper really holds).
CREATE TABLE sweeper_lease (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
