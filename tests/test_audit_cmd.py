"""`telemetry-ingest audit`: passes on a healthy database, fails naming each kind of planted violation."""

import datetime as dt
import uuid

import orjson
import pytest

from crypto.tokens import new_token
from ingest.admin.compliance import audit_database, report
from ingest.admin import rights
from storage.partitions import ensure_partitions
from storage.tokens import insert_token
from tests.support import heartbeat_body


async def enroll(service, db):
    """Enroll through the API with a secret made directly in the database (no CLI round trip)."""
    token_id, secret, digest = new_token("enroll")
    await insert_token(db, token_id, digest, "enroll")
    return await service.enroll(secret=secret)


async def healthy(service, db) -> dict:
    """A database in use: installations with heartbeats, e-mail, agents, scans, and admin actions done to them."""
    admin_token = service.create_secret("admin-token")
    install_id, token = await enroll(service, db)
    for i in range(2):
        status, _, _ = await service.request("POST", "/v1/heartbeats", token=token,
                                             json=heartbeat_body(install_id, asset_count=i, email="admin@example.org"))
        assert status == 200
    status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": "scanner-1"})
    assert status == 201
    agent_token = body["token"]
    scan = {"scan_id": str(uuid.uuid4()), "scanned_at": "2025-01-15T10:30:00Z",
            "asset": {"name": "pc-1", "last_user": "someone"}, "software": [{"name": "Office"}]}
    assert (await service.request("POST", "/v1/scans", token=agent_token, json=scan))[0] == 201
    base = f"/v1/admin/installations/{install_id}"
    assert (await service.request("PUT", base + "/restriction", token=admin_token, json={"restricted": True}))[0] == 200
    assert (await service.request("PUT", base + "/restriction", token=admin_token, json={"restricted": False}))[0] == 200
    assert (await service.request("GET", base + "/export", token=admin_token))[0] == 200
    # another installation, erased
    gone, _ = await enroll(service, db)
    assert (await service.request("DELETE", f"/v1/admin/installations/{gone}", token=admin_token))[0] == 204
    return {"install_id": install_id, "scan_id": uuid.UUID(scan["scan_id"])}


async def test_audit_passes_on_a_healthy_database(service, db):
    await healthy(service, db)
    proc = service.cli("audit", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "audit passed"


async def _plant_old_heartbeat(db, ks, ids):
    day = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=40)
    await ensure_partitions(db, day, days_back=0, days_ahead=0)
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "VALUES ($1, $2, 'enterprise', '1.0', 1)",
        ids["install_id"], dt.datetime.combine(day, dt.time(12), dt.timezone.utc),
    )


async def _plant_unhashed_token(db, ks, ids):
    await db.execute("ALTER TABLE tokens DROP CONSTRAINT tokens_token_hash_check")
    token_id, token, _ = new_token("enroll")
    await db.execute("INSERT INTO tokens (token_id, token_hash, role) VALUES ($1, $2, 'enroll')", token_id, token.encode())


async def _plant_unfinished_erasure(db, ks, ids):
    await rights.begin_erasure(db, ks, ids["install_id"], "test")


def sql(statement: str, where: str = "db"):
    """A violation planted by one SQL statement in the data database (or, where="ks", the key store)."""
    async def plant(db, ks, ids):
        conn = ks if where == "ks" else db
        await conn.execute(statement.format(install_id=ids["install_id"], scan_id=ids["scan_id"]))

    return plant


VIOLATIONS = [
    # (id, plant, check named, words in the report)
    ("expired-scan", sql("UPDATE scans SET received_at = now() - interval '3 hours', expires_at = now() - interval '2 hours'"),
     "retention", "in scans past their expires_at"),
    ("old-heartbeat", _plant_old_heartbeat, "retention", "heartbeats of heartbeat history older than 30 days"),
    ("inactive-installation", sql("UPDATE installations SET last_seen_at = now() - interval '401 days'"),
     "retention", "installations without a heartbeat for more than 400 days"),
    ("plaintext-email", sql("UPDATE installations SET email_ct = convert_to('admin@example.org', 'UTF8') WHERE email_ct IS NOT NULL"),
     "ciphertext", "installations.email_ct are not sealed records"),
    ("plaintext-scan", sql("UPDATE scans SET ciphertext = convert_to('{{\"asset\": {{\"name\": \"pc-1\"}}}}', 'UTF8')"),
     "ciphertext", "scans.ciphertext are not sealed records"),
    ("undeclared-column", sql("ALTER TABLE installations ADD COLUMN hostname text"),
     "schema", "column installations.hostname is not declared"),
    ("undeclared-table", sql("CREATE TABLE raw_uploads (install_id uuid, body jsonb)"),
     "schema", "table raw_uploads is not declared"),
    ("undeclared-json-key", sql("INSERT INTO audit_log (actor, action, detail) VALUES ('cli', 'x', '{{\"hostname\": \"pc-1\"}}')"),
     "json", "audit_log.detail holds keys outside the policy: hostname"),
    ("nested-json-key", sql("INSERT INTO audit_log (actor, action, detail) VALUES ('cli', 'x', '{{\"rows\": {{\"serial_number\": 1}}}}')"),
     "json", "outside the policy: serial_number"),
    ("unknown-kek", sql("UPDATE data_keys SET kek_id = '00000000deadbeef'", "ks"),
     "keys", "wrapped by key id 00000000deadbeef, which is not in the configured key ring"),
    ("unwrapped-key", sql("UPDATE data_keys SET wrapped = decode(repeat('ab', 32), 'hex')", "ks"),
     "keys", "not in the wrapped format"),
    ("key-material-in-data-database", sql("CREATE TABLE data_keys (install_id uuid, key_id int, kek_id text, wrapped bytea)"),
     "keys", "the data database holds key material: data_keys"),
    ("expired-epoch-key", sql("INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, expires_at) SELECT install_id, "
                              "1073741824 + 1, kek_id, wrapped, now() - interval '1 day' FROM data_keys LIMIT 1", "ks"),
     "keys", "1 epoch key(s) in the key store outlived their epoch"),
    ("erased-installation-back", sql("INSERT INTO erasures (install_id, erased_at) VALUES ('{install_id}', now())", "ks"),
     "keys", "1 installation(s) the key store lists as erased are in the data database"),
    ("unhashed-token", _plant_unhashed_token, "tokens", "stored without hashing"),
    ("token-in-text", sql("UPDATE agents SET name = 'copied tia_Zx9kQ2mN4pL7vB1cD8fG3hJ6kL0qW5eR2tY7uI4oP1a'"),
     "tokens", "agents.name contain a bearer token"),
    ("token-in-json", sql("INSERT INTO audit_log (actor, action, detail) VALUES ('cli', 'x', "
                          "'{{\"token_id\": \"tiadm_Zx9kQ2mN4pL7vB1cD8fG3hJ6kL0qW5eR2tY7uI4oP1a\"}}')"),
     "tokens", "audit_log.detail contain a bearer token"),
    ("plaintext-email-in-text", sql("UPDATE installations SET license_type = 'admin@example.org'"),
     "personal", "installations.license_type contain an e-mail address in plaintext"),
    ("unfinished-erasure", _plant_unfinished_erasure, "erasure", "began but did not finish: run `telemetry-ingest erase"),
    ("orphan-rows", sql("INSERT INTO agents (install_id, agent_id, name) VALUES (gen_random_uuid(), gen_random_uuid(), 'left')"),
     "erasure", "1 row(s) in agents belong to no installation"),
    ("audit-log-unguarded", sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update"),
     "audit-log", "audit_log is not append-only: trigger(s) audit_log_no_update missing or disabled"),
]


@pytest.mark.parametrize("plant, check, words", [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
async def test_audit_fails_naming_each_violation(service, db, ks, plant, check, words):
    ids = await healthy(service, db)
    await plant(db, ks, ids)
    proc = service.cli("audit", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("audit FAILED")
    named = [line for line in lines[1:] if line.strip().startswith(f"[{check}]")]
    assert any(words in line for line in named), proc.stdout
    # and nothing else is reported than what was planted (one violation may show under two checks, e.g. an
    # unfinished erasure whose data keys are gone already)
    assert len(lines) - 1 <= 2, proc.stdout
    if "erase" in words:
        # following the report's advice repairs it
        service.cli("erase", str(ids["install_id"]))
        assert service.cli("audit", check=False).returncode == 0


async def test_audit_respects_configured_retention(service, db, ks):
    ids = await healthy(service, db)
    await _plant_old_heartbeat(db, ks, ids)
    env = {**service.env, "TELEMETRY_HEARTBEAT_RETENTION_DAYS": "60"}
    from tests.support import run_cli

    assert run_cli("audit", env=env, check=False).returncode == 0
    assert run_cli("audit", env={**env, "TELEMETRY_HEARTBEAT_RETENTION_DAYS": "30"}, check=False).returncode == 1


async def test_report_names_every_finding(service, db, master_key, ks):
    """In process: several violations at once are all listed, one line each."""
    from crypto.keyring import KeyRing

    ids = await healthy(service, db)
    for plant in (VIOLATIONS[0][1], VIOLATIONS[5][1], VIOLATIONS[9][1]):
        await plant(db, ks, ids)
    settings = service.settings.replace(service_dsn=service.env["TELEMETRY_SERVICE_DSN"])  # as the command line's
    findings = await audit_database(db, ks, KeyRing.from_setting(master_key), settings)
    assert sorted(f.check for f in findings) == ["keys", "retention", "schema"], findings
    text = report(findings)
    assert text.splitlines()[0] == "audit FAILED: 3 finding(s)" and len(text.splitlines()) == 4


# ------------------------------------------------------------------ policy show


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    assert lines[0] == "| category | field | purpose | stored as | retention |" and lines[1] == "|---|---|---|---|---|"
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 5, line
        rows.append(cells)
    return rows


def test_policy_show_is_the_disclosure_table():
    from policy.categories import SCAN
    from tests.support import run_cli

    env = {"TELEMETRY_HEARTBEAT_RETENTION_DAYS": "14", "TELEMETRY_INACTIVE_DAYS": "200"}
    markdown = _markdown_rows(run_cli("policy", "show", env=env).stdout)
    as_json = orjson.loads(run_cli("policy", "show", "--format", "json", env=env).stdout)
    assert [[r["category"], f"`{r['field']}`", r["purpose"], r["stored_as"], r["retention"]] for r in as_json] == markdown
    by_field = {(r["category"], r["field"]): r for r in as_json}
    assert by_field["installation", "email"]["stored_as"] == "encrypted"
    assert by_field["installation", "ip_address"]["stored_as"] == "anonymised"
    assert by_field["installation", "license_type"]["stored_as"] == "plaintext"
    assert by_field["installation", "install_id"]["stored_as"] == "plaintext (lookup key)"
    # the configured retention, not the defaults
    assert by_field["installation", "version"]["retention"] == "current record until 200 days without a heartbeat; heartbeat history 14 days"
    assert "720 hours" in by_field["scan", "asset.serial_number"]["retention"]
    assert by_field["agent", "name"]["stored_as"] == "plaintext"
    # every declared scan field, to the leaves, each encrypted but the key
    for path in ("asset.last_user", "network[].mac_address", "software[].publisher", "hotfixes[].id", "hardware.memory_mb"):
        assert by_field["scan", path]["stored_as"] == "encrypted"
    assert by_field["scan", "scan_id"]["stored_as"] == "plaintext (lookup key)"
    assert all(r["purpose"] and r["retention"] for r in as_json)
    assert {r["category"] for r in as_json} == {"installation", "scan", "agent", "audit log"}
    assert len([r for r in as_json if r["category"] == "scan"]) > len(SCAN.fields)
