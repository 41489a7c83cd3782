-- The audit log's trigger function resolves what it calls (now(), current_setting, the operators)
-- through pg_catalog only: a role that can create functions in a schema of its search_path (the
-- service role can, in public: it makes the daily partitions there) cannot shadow now() and so
-- pass a recent row off as one past the 30 days. Who may do what to the log: storage/roles.py.
ALTER FUNCTION audit_log_append_only() SET search_path = pg_catalog, pg_temp;
