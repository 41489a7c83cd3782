-- Core schema: installations, their data keys, tokens, agents, heartbeat history, audit log.
-- Every per-installation table carries install_id in its key (Citus colocation).

CREATE TABLE installations (
    install_id           uuid PRIMARY KEY,
    enrolled_at          timestamptz NOT NULL DEFAULT now(),
    last_seen_at         timestamptz,
    license_type         text,
    version              text,
    asset_count          integer,
    db_server_type       text,
    web_server_type      text,
    email_ct             bytea,            -- sealed (crypto.envelope format)
    ip_prefix            cidr,             -- anonymised: IPv4 /24, IPv6 /48
    scan_retention_hours integer NOT NULL DEFAULT 720 CHECK (scan_retention_hours BETWEEN 1 AND 720),
    restricted           boolean NOT NULL DEFAULT false,
    erasing              boolean NOT NULL DEFAULT false
);
CREATE INDEX installations_last_seen ON installations (last_seen_at);

-- Data keys of an installation, wrapped by a key-encryption key (kek_id).
CREATE TABLE data_keys (
    install_id  uuid NOT NULL,
    key_id      integer NOT NULL,
    kek_id      text NOT NULL,
    wrapped     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (install_id, key_id)
);
CREATE INDEX data_keys_kek ON data_keys (kek_id);

CREATE TABLE agents (
    install_id  uuid NOT NULL,
    agent_id    uuid NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (install_id, agent_id)
);

-- Only the SHA-256 of a token is stored. token_id is the public handle (safe to log, print, revoke by).
CREATE TABLE tokens (
    token_id    text PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    role        text NOT NULL CHECK (role IN ('enroll', 'installation', 'agent', 'admin')),
    install_id  uuid,
    agent_id    uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    revoke_seq  bigint
);
CREATE SEQUENCE token_revocations;
CREATE INDEX tokens_revoke_seq ON tokens (revoke_seq) WHERE revoke_seq IS NOT NULL;
CREATE INDEX tokens_install ON tokens (install_id) WHERE install_id IS NOT NULL;

-- Heartbeat history: one row per heartbeat, partitioned by day of receipt.
CREATE TABLE heartbeats (
    install_id      uuid NOT NULL,
    received_at     timestamptz NOT NULL,
    license_type    text NOT NULL,
    version         text NOT NULL,
    asset_count     integer NOT NULL,
    db_server_type  text,
    web_server_type text,
    ip_prefix       cidr
) PARTITION BY RANGE (received_at);
CREATE INDEX heartbeats_install ON heartbeats (install_id, received_at);

-- Append-only record of every administrative action.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,         -- admin token id or 'cli' / 'sweeper'; never a token
    action      text NOT NULL,
    install_id  uuid,
    detail      jsonb NOT NULL DEFAULT '{}'
);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
