-- Issue 13: records of the categories a policy file declares, received at POST /v1/records/{category}.
--
-- One shared table for every category the file declares beyond the built-in ones (which keep their
-- own tables): the declared plaintext, anonymised and keyed-hash values in `fields` (jsonb, by the
-- declared names, nothing else), the encrypted part in `sealed` (bytea; the whole filtered record
-- when the category is sealed, else the encrypted fields as one sealed object) under data key
-- `key_id` of the installation. No category name is written here: the file says what goes in.
CREATE TABLE records (
    category     text NOT NULL,
    install_id   uuid NOT NULL REFERENCES installations (install_id) ON DELETE CASCADE,
    record_id    text NOT NULL,               -- the idempotency key's value, else a generated UUID
    received_at  timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    fields       jsonb NOT NULL DEFAULT '{}'::jsonb,
    sealed       bytea,
    key_id       integer,
    content_mac  bytea,                       -- keyed hash of the stored content: a resent key with other content is 409
    PRIMARY KEY (category, install_id, record_id),
    CHECK ((sealed IS NULL) = (key_id IS NULL))
);
-- The sweeper deletes what has expired, oldest first, in batches.
CREATE INDEX records_expires ON records (expires_at);
-- Export and erasure read and delete an installation's records.
CREATE INDEX records_install ON records (install_id, category);

-- An installation's shortened retention per category (the file's `installations_may_shorten`),
-- set with PUT /v1/installation/settings; absent means the category's retention.
CREATE TABLE record_settings (
    install_id       uuid NOT NULL REFERENCES installations (install_id) ON DELETE CASCADE,
    category         text NOT NULL,
    retention_hours  integer NOT NULL CHECK (retention_hours > 0),
    PRIMARY KEY (install_id, category)
);

-- The policy whose categories and fields the database holds: what `policy apply --confirm` last
-- applied (or the first start under a file). serve compares the file in force with it: a category
-- or field the file no longer declares keeps serve from starting until `policy apply --confirm`.
CREATE TABLE policy_applied (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    declared    jsonb NOT NULL,               -- {category: [field path, ...]} of every category
    source      text NOT NULL,                -- the file's path, or "built-in"
    applied_at  timestamptz NOT NULL DEFAULT now()
);
