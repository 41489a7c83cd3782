-- Issue 12: enrollment secrets that run out and expire; per-installation stored scan bytes for the quota.

-- uses counts enrollments made with the token (incremented in the enrollment's transaction, under
-- the token's row lock, so concurrent enrollments cannot exceed max_uses). Both limits are optional.
ALTER TABLE tokens
    ADD COLUMN max_uses   integer CHECK (max_uses > 0),
    ADD COLUMN uses       integer NOT NULL DEFAULT 0,
    ADD COLUMN expires_at timestamptz,
    ADD CONSTRAINT tokens_uses_within_max CHECK (max_uses IS NULL OR uses <= max_uses);

-- The revocation follower reads the newest token's creation time every poll (an index-only scan)
-- to drop its cache of unknown tokens when new ones appear.
CREATE INDEX tokens_created ON tokens (created_at);

-- Stored scan bytes (sealed) per installation and UTC day of expiry, added by the scan writer. The
-- quota sums the days not yet past, so no decrement is needed when the sweeper deletes expired scans
-- (a day counts until its end; a shortened retention keeps counting until the original day).
-- Removed with the installation (erasure, inactivity).
CREATE TABLE scan_usage (
    install_id  uuid NOT NULL REFERENCES installations (install_id) ON DELETE CASCADE,
    expires_on  date NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (install_id, expires_on)
);

-- Scans stored before this migration count too.
INSERT INTO scan_usage (install_id, expires_on, bytes)
SELECT s.install_id, (s.expires_at AT TIME ZONE 'UTC')::date, sum(octet_length(s.ciphertext))
FROM scans s JOIN installations i ON i.install_id = s.install_id
WHERE s.expires_at > now()
GROUP BY 1, 2;
