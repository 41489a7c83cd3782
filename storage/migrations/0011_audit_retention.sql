-- The audit log has a retention too (TELEMETRY_AUDIT_RETENTION_DAYS, disclosed by `policy show`):
-- the sweeper deletes rows past it. Everything else stays refused for every role, the owner
-- included: UPDATE, TRUNCATE, and a DELETE outside the sweeper's marked transaction or of a row
-- younger than 30 days, whatever the setting (a compromised service cannot wipe recent history).
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('telemetry.audit_sweep', true) = 'on'
       AND OLD.at < now() - interval '30 days' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;

-- Rows past retention are found by time.
CREATE INDEX audit_log_at ON audit_log (at);
-- The sweeper (the owner or a role granted DELETE) is the one that deletes.
