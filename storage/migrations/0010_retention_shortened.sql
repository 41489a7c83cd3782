-- When an installation last shortened its scan retention (storage.scans.set_retention). The
-- sweeper then destroys, ahead of their epoch's end, the epoch keys that the shortening left
-- without any unexpired scan (storage.sweeper, step 7), and clears the mark when none is left.
ALTER TABLE installations ADD COLUMN retention_shortened_at timestamptz;
CREATE INDEX installations_retention_shortened ON installations (install_id) WHERE retention_shortened_at IS NOT NULL;
