-- Scans (issue 3): one row per uploaded scan, the document sealed whole; partitioned by day of
-- receipt like heartbeats, so retention can drop whole days.
--
-- In the clear only what CONTRACT.md section 4 lists: install_id, agent_id, scan_id, received_at,
-- expires_at, the data key serial (key_id) and sizes; plus content_mac, a keyed hash of the
-- filtered document (crypto.documents.content_mac) that replays are compared by.
CREATE TABLE scans (
    install_id    uuid NOT NULL,
    agent_id      uuid NOT NULL,
    scan_id       uuid NOT NULL,
    received_at   timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    key_id        integer NOT NULL,
    content_mac   bytea NOT NULL CHECK (length(content_mac) = 32),
    size_wire     integer NOT NULL,    -- body bytes as sent
    size_decoded  integer NOT NULL,    -- after decompression
    size_plain    integer NOT NULL,    -- filtered document, canonical JSON, before compression and sealing
    ciphertext    bytea NOT NULL,      -- crypto.documents payload sealed by crypto.envelope
    CHECK (expires_at > received_at)
) PARTITION BY RANGE (received_at);

-- A unique index cannot span partitions without the partition key, so scan_id is kept unique per
-- installation by the writer (advisory lock per (install_id, scan_id), then this lookup).
CREATE INDEX scans_install_scan ON scans (install_id, scan_id);
-- Expired rows are deleted by expires_at, and shortening a retention updates by installation.
CREATE INDEX scans_expires ON scans (expires_at);

-- The ciphertext is incompressible: do not make TOAST try.
ALTER TABLE scans ALTER COLUMN ciphertext SET STORAGE EXTERNAL;
