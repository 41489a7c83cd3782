-- Distribute telemetry-ingest's tables across a Citus cluster, sharded by install_id.
--
-- Run once on the coordinator, after `telemetry-ingest serve` (or any CLI command) has
-- applied the migrations there and before traffic arrives:
--     psql "$TELEMETRY_DSN" -v ON_ERROR_STOP=1 -f deploy/citus/distribute.sql
--
-- Every per-installation table carries install_id and every unique key includes it, so the
-- tables are colocated with `installations`: a heartbeat batch, a scan batch, an export and
-- an erasure each touch one shard group per installation.
--
-- NOT TESTED HERE: no Citus is available on the project's machines. The statements follow
-- the Citus documentation for create_distributed_table / create_reference_table on
-- (partitioned) tables; see the README's scale-out section for what is known to differ.

CREATE EXTENSION IF NOT EXISTS citus;

SELECT create_distributed_table('installations', 'install_id');
SELECT create_distributed_table('agents',        'install_id', colocate_with => 'installations');
-- Partitioned by day on received_at; Citus distributes the parent and every partition.
SELECT create_distributed_table('heartbeats',    'install_id', colocate_with => 'installations');
SELECT create_distributed_table('scans',         'install_id', colocate_with => 'installations');
SELECT create_distributed_table('scan_usage',    'install_id', colocate_with => 'installations');
SELECT create_distributed_table('records',       'install_id', colocate_with => 'installations');
SELECT create_distributed_table('record_settings', 'install_id', colocate_with => 'installations');

-- Tokens are looked up by hash, not by installation, and are few: replicate them to every node.
SELECT create_reference_table('tokens');
-- The audit log is small, append-only and read by operators: keep it whole on every node.
SELECT create_reference_table('audit_log');
-- One-row bookkeeping: the key store's erasure replay position and the sweeper lease (migration
-- 0008). Reference tables, so that every node sees the same row.
SELECT create_reference_table('erasure_replay');
SELECT create_reference_table('sweeper_lease');
SELECT create_reference_table('policy_applied');
-- schema_migrations stays a local table on the coordinator. The data keys are not here: they
-- live in the key store, a database of its own (TELEMETRY_KEYSTORE_DSN), which is not distributed.
