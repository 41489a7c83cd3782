-- Admin actions (export, erasure, restriction): the export lists what was done to an
-- installation, so the audit log is looked up by install_id.
CREATE INDEX audit_log_install ON audit_log (install_id) WHERE install_id IS NOT NULL;

-- audit_log stays append-only through the triggers of 0001, which bind every role,
-- the table's owner included (only dropping or disabling them, which `telemetry-ingest
-- audit` reports, gets round them). Where the service runs as a role that does not
-- own the schema, privileges say the same:
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
