"""POST /v1/records/{category}: every category a policy file declares, received and stored as the file says.

Each file of examples/policies/ is served; a valid record with undeclared fields goes to each of its
categories; the database must hold exactly the declared fields in the declared form; `policy show`
discloses them, the export returns them, erasure removes them and `audit` passes. Then the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import uuid
from pathlib import Path

import orjson

from crypto.datakeys import hash_key_context
from crypto.documents import open_document_json
from crypto.envelope import key_id_of, open_
from crypto.keyring import KeyRing
from ingest.pipeline.records import record_context
from storage import keystore
from storage.sweeper import Rules, sweep
from tests.support import ROOT, heartbeat_body, start_service

EXAMPLES = ROOT / "examples" / "policies"


@contextlib.asynccontextmanager
async def serve(db_dsn, master_key, tmp_path, policy: Path, **settings):
    async with start_service(db_dsn, master_key, tmp_path / "data", policy=policy, **settings) as svc:
        svc.env["TELEMETRY_POLICY"] = str(policy)
        yield svc


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


async def hash_key(ks, master_key: str, category: str) -> bytes:
    kek_id, wrapped = await keystore.stored_hash_key(ks, category)
    return KeyRing.from_setting(master_key).unwrap(kek_id, wrapped, hash_key_context(category))


def hashed(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


async def data_key(ks, master_key: str, install_id: uuid.UUID, key_id: int):
    from crypto.datakeys import wrap_context
    from crypto.envelope import DataKey

    r = next(r for r in await keystore.keys_of(ks, install_id) if r["key_id"] == key_id)
    raw = KeyRing.from_setting(master_key).unwrap(r["kek_id"], bytes(r["wrapped"]), wrap_context(install_id, key_id))
    return DataKey.from_bytes(key_id, raw)


async def stored(db, category: str, install_id: uuid.UUID):
    rows = await db.fetch("SELECT record_id, received_at, expires_at, fields::text AS fields, sealed, key_id FROM records "
                          "WHERE category = $1 AND install_id = $2 ORDER BY received_at", category, install_id)
    return [dict(r, fields=json.loads(r["fields"])) for r in rows]


async def export(svc, admin: str, install_id: uuid.UUID) -> dict:
    status, body, _ = await svc.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin)
    assert status == 200, body
    return body


async def erase_and_audit(svc, db, admin: str, install_id: uuid.UUID) -> None:
    audit = svc.cli("audit", check=False)
    assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout + audit.stderr
    status, _, _ = await svc.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin)
    assert status == 204
    assert await db.fetchval("SELECT count(*) FROM records WHERE install_id = $1", install_id) == 0
    assert await db.fetchval("SELECT count(*) FROM record_settings WHERE install_id = $1", install_id) == 0
    audit = svc.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout


def disclosed(svc, path: Path) -> dict[tuple[str, str], dict]:
    rows = orjson.loads(svc.cli("policy", "show", str(path), "--format", "json").stdout)
    return {(r["category"], r["field"]): r for r in rows}


NOW = "2026-12-01T10:00:00Z"


# ------------------------------------------------------------------ the examples, end to end


async def test_download_log_example_stores_keyed_hash_and_anonymised_prefix(db_dsn, master_key, tmp_path, db, ks):
    path = EXAMPLES / "download-log.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        admin = svc.create_secret("admin-token")
        download_id = str(uuid.uuid4())
        body = {"download_id": download_id.upper(), "downloaded_at": NOW, "licence_number": "ABCD-1234-XY",
                "program": "inventory", "version": "4.2.1", "address": "203.0.113.77",
                "user_name": "jane", "extra": {"deep": [1, 2, 3]}}
        status, answer, _ = await svc.request("POST", "/v1/records/download", token=token, json=body)
        assert status == 201, answer
        assert answer["record_id"] == download_id and answer["dropped_fields"] == ["user_name", "extra"]
        (row,) = await stored(db, "download", install_id)
        assert await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", install_id) is not None
        key = await hash_key(ks, master_key, "download")
        assert row["fields"] == {"download_id": download_id, "downloaded_at": NOW, "program": "inventory", "version": "4.2.1",
                                 "licence_number": hashed(key, "ABCD-1234-XY"), "address": "203.0.113.0/24"}
        assert row["sealed"] is None and row["key_id"] is None
        assert row["expires_at"] - row["received_at"] == dt.timedelta(days=30)
        # the same record again: stored once, 200; the same key with other content: 409
        status, again, _ = await svc.request("POST", "/v1/records/download", token=token, json=body)
        assert status == 200 and again["record_id"] == download_id
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, json={**body, "program": "other"})
        assert status == 409
        assert len(await stored(db, "download", install_id)) == 1
        # the built-in paths this file leaves out answer 404, and so does a category it does not declare
        for method, route in (("POST", "/v1/heartbeats"), ("POST", "/v1/scans"), ("POST", "/v1/agents"),
                              ("POST", "/v1/records/diagnostic"), ("POST", "/v1/records/installation")):
            status, problem, _ = await svc.request(method, route, token=token, json={})
            assert status == 404, (route, problem)
        # disclosure, export, audit, erasure
        shown = disclosed(svc, path)
        assert shown["download", "licence_number"]["stored_as"] == "keyed-hash"
        assert shown["download", "address"]["stored_as"] == "anonymised"
        assert shown["download", "program"]["stored_as"] == "plaintext"
        (exported,) = (await export(svc, admin, install_id))["records"]
        assert exported["category"] == "download" and exported["record"] == row["fields"]
        doc = (await svc.request("GET", "/openapi.json"))[1]
        assert "/v1/records/download" in doc["paths"] and "/v1/heartbeats" not in doc["paths"]
        schema = doc["paths"]["/v1/records/download"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["required"]) == {"download_id", "downloaded_at", "licence_number", "program", "version", "address"}
        await erase_and_audit(svc, db, admin, install_id)


async def test_cloud_scan_example_is_sealed_whole_under_the_epoch_key_and_shortened_by_the_installation(
        db_dsn, master_key, tmp_path, db, ks):
    path = EXAMPLES / "cloud-scan.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        admin = svc.create_secret("admin-token")
        scan_id = str(uuid.uuid4())
        body = {"scan_id": scan_id, "scanned_at": NOW, "provider": "aws", "account": "prod-7", "secret": "x",
                "resources": [{"resource_id": "i-1", "kind": "vm", "vcpus": 4, "tags": ["web"], "owner": "jane"},
                              {"resource_id": "b-2", "kind": "bucket", "region": "eu-west-1"}]}
        status, answer, _ = await svc.request("POST", "/v1/records/cloud_scan", token=token, json=body)
        assert status == 201, answer
        assert answer["dropped_fields"] == ["secret", "resources[].owner"]
        (row,) = await stored(db, "cloud_scan", install_id)
        assert row["fields"] == {"scan_id": scan_id}  # only the key in the clear
        assert row["expires_at"] - row["received_at"] == dt.timedelta(hours=48)
        assert key_id_of(bytes(row["sealed"])) == row["key_id"] >= keystore.EPOCH_KEY_BASE  # an epoch key
        key = await data_key(ks, master_key, install_id, row["key_id"])
        opened = orjson.loads(open_document_json(key, bytes(row["sealed"]),
                                                 record_context(install_id, "cloud_scan", scan_id, whole=True)))
        expected = {k: v for k, v in body.items() if k != "secret"}
        expected["resources"] = [{k: v for k, v in r.items() if k != "owner"} for r in body["resources"]]
        assert opened == expected
        assert b"prod-7" not in bytes(row["sealed"])
        # the installation shortens its retention: the stored record's expiry moves, new ones follow it
        status, settings, _ = await svc.request("PUT", "/v1/installation/settings", token=token,
                                                json={"cloud_scan_retention_hours": 24})
        assert status == 200 and settings == {"cloud_scan_retention_hours": 24}
        status, _, _ = await svc.request("PUT", "/v1/installation/settings", token=token,
                                         json={"cloud_scan_retention_hours": 12})
        assert status == 422  # below the file's shortest_retention
        (row,) = await stored(db, "cloud_scan", install_id)
        assert row["expires_at"] - row["received_at"] == dt.timedelta(hours=24)
        second = {**body, "scan_id": str(uuid.uuid4())}
        status, answer, _ = await svc.request("POST", "/v1/records/cloud_scan", token=token, json=second)
        assert status == 201
        row2 = (await stored(db, "cloud_scan", install_id))[1]
        assert row2["expires_at"] - row2["received_at"] == dt.timedelta(hours=24)
        shown = disclosed(svc, path)
        assert shown["cloud_scan", "account"]["stored_as"] == "encrypted"
        assert "24 to 48 hours" in shown["cloud_scan", "account"]["retention"]
        exported = (await export(svc, admin, install_id))["records"]
        assert [r["record"] for r in exported][0] == expected
        await erase_and_audit(svc, db, admin, install_id)


async def test_diagnostics_example_hashes_the_machine_and_never_keeps_the_description(db_dsn, master_key, tmp_path, db, ks):
    path = EXAMPLES / "diagnostics.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        admin = svc.create_secret("admin-token")
        report_id = str(uuid.uuid4())
        body = {"report_id": report_id, "occurred_at": NOW, "version": "2.0.1", "os": "linux", "fault": "crash",
                "machine": "host-4711", "uptime_s": 3600.0, "description": "it broke when I clicked save",
                "stack": {"module": "core", "frames": ["a", "b"], "locals": {"x": 1}}, "user": "jane"}
        status, answer, _ = await svc.request("POST", "/v1/records/diagnostic", token=token, json=body)
        assert status == 201, answer
        assert answer["dropped_fields"] == ["stack.locals", "user"]
        (row,) = await stored(db, "diagnostic", install_id)
        key = await hash_key(ks, master_key, "diagnostic")
        assert row["fields"] == {"report_id": report_id, "occurred_at": NOW, "version": "2.0.1", "os": "linux",
                                 "fault": "crash", "machine": hashed(key, "host-4711"), "uptime_s": 3600,
                                 "stack": {"module": "core", "frames": ["a", "b"]}}
        assert row["sealed"] is None
        assert "clicked" not in json.dumps(row["fields"])
        # not stored is still checked: too long a description is refused, and nothing is stored
        status, _, _ = await svc.request("POST", "/v1/records/diagnostic", token=token,
                                         json={**body, "report_id": str(uuid.uuid4()), "description": "x" * 2001})
        assert status == 422
        # plaintext is for categories, not people
        status, problem, _ = await svc.request("POST", "/v1/records/diagnostic", token=token,
                                               json={**body, "report_id": str(uuid.uuid4()), "fault": "jane@example.com"})
        assert status == 422 and "fault" in problem["detail"]
        status, _, _ = await svc.request("POST", "/v1/records/diagnostic", token=token,
                                         json={**body, "report_id": str(uuid.uuid4()), "stack": {"module": "10.1.2.3"}})
        assert status == 422
        assert len(await stored(db, "diagnostic", install_id)) == 1
        shown = disclosed(svc, path)
        assert shown["diagnostic", "machine"]["stored_as"] == "keyed-hash"
        assert shown["diagnostic", "description"]["stored_as"] == "not-stored"
        assert shown["diagnostic", "description"]["retention"].startswith("not kept")
        (exported,) = (await export(svc, admin, install_id))["records"]
        assert exported["record"] == row["fields"]
        await erase_and_audit(svc, db, admin, install_id)


async def test_it_inventory_example_serves_the_built_in_paths_and_no_records(db_dsn, master_key, tmp_path, db):
    path = EXAMPLES / "it-inventory.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        status, answer, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, x=1))
        assert status == 200 and answer["dropped_fields"] == ["x"]
        status, _, _ = await svc.request("POST", "/v1/records/installation", token=token, json=heartbeat_body(install_id))
        assert status == 404  # a built-in category keeps its own path
        assert await db.fetchval("SELECT count(*) FROM records") == 0
        shown = disclosed(svc, path)
        assert shown["installation", "email"]["stored_as"] == "encrypted"
        audit = svc.cli("audit", check=False)
        assert audit.returncode == 0, audit.stdout


# ------------------------------------------------------------------ encrypted fields, current state

CONTACT = """
format = 1

[[category]]
name = "contact"
purpose = "who to call about the installation"
retention = "10d"
state = "current"
installation_key = "install_id"

[[category.field]]
name = "install_id"
type = "uuid"
required = true

[[category.field]]
name = "team"
type = "string"
max_length = 32
required = true

[[category.field]]
name = "email"
type = "email"
storage = "encrypted"

[[category.field]]
name = "people"
type = "list"
max_items = 10

[[category.field.field]]
name = "role"
type = "string"
max_length = 16

[[category.field.field]]
name = "name"
type = "string"
max_length = 64
storage = "encrypted"

[[category]]
name = "ping"
purpose = "reachability"
retention = "1h"

[[category.field]]
name = "rtt_ms"
type = "integer"
min = 0
required = true
"""


async def test_encrypted_fields_are_one_sealed_object_and_a_current_record_is_replaced(db_dsn, master_key, tmp_path, db, ks):
    path = write_policy(tmp_path, CONTACT)
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        admin = svc.create_secret("admin-token")
        body = {"install_id": str(install_id), "team": "ops", "email": "ops@example.com",
                "people": [{"role": "lead", "name": "Jane Roe"}, {"role": "deputy"}]}
        status, answer, _ = await svc.request("POST", "/v1/records/contact", token=token, json=body)
        assert status == 201, answer
        (row,) = await stored(db, "contact", install_id)
        assert row["record_id"] == "current"
        assert row["fields"] == {"install_id": str(install_id), "team": "ops", "people": [{"role": "lead"}, {"role": "deputy"}]}
        assert b"example.com" not in bytes(row["sealed"]) and b"Jane" not in bytes(row["sealed"])
        key = await data_key(ks, master_key, install_id, row["key_id"])
        assert row["key_id"] < keystore.EPOCH_KEY_BASE  # the installation's record key, as the e-mail's
        opened = orjson.loads(open_(key, bytes(row["sealed"]), record_context(install_id, "contact", "current", whole=False)))
        assert opened == {"email": "ops@example.com", "people": [{"name": "Jane Roe"}, {}]}
        shown = disclosed(svc, path)
        assert shown["contact", "email"]["stored_as"] == "encrypted"
        assert shown["contact", "team"]["retention"] == "the latest record only, 10 days after receipt"
        (exported,) = (await export(svc, admin, install_id))["records"]
        assert exported["record"] == {"install_id": str(install_id), "team": "ops", "email": "ops@example.com",
                                      "people": [{"role": "lead", "name": "Jane Roe"}, {"role": "deputy"}]}
        # a newer record replaces it; another installation's id in the installation key is 403
        status, _, _ = await svc.request("POST", "/v1/records/contact", token=token, json={**body, "team": "sre", "email": None})
        assert status == 201
        (row,) = await stored(db, "contact", install_id)
        assert row["fields"]["team"] == "sre" and row["sealed"] is not None  # the names stay encrypted
        status, _, _ = await svc.request("POST", "/v1/records/contact", token=token,
                                         json={**body, "install_id": str(uuid.uuid4())})
        assert status == 403
        # events without an idempotency key: each one a record
        for rtt in (5, 7):
            assert (await svc.request("POST", "/v1/records/ping", token=token, json={"rtt_ms": rtt}))[0] == 201
        assert sorted(r["fields"]["rtt_ms"] for r in await stored(db, "ping", install_id)) == [5, 7]
        # an agent token may not send records
        status, agent, _ = await svc.request("POST", "/v1/agents", token=token, json={"name": "a"})
        assert status == 404  # this file has no [agents]
        await erase_and_audit(svc, db, admin, install_id)


# ------------------------------------------------------------------ the rules


async def test_reject_mode_limits_and_bad_bodies_store_nothing(db_dsn, master_key, tmp_path, db):
    path = EXAMPLES / "download-log.toml"
    async with serve(db_dsn, master_key, tmp_path, path, unknown_fields="reject", heartbeat_max_bytes=4096,
                     json_max_values=50) as svc:
        install_id, token = await svc.enroll()
        good = {"download_id": str(uuid.uuid4()), "downloaded_at": NOW, "licence_number": "ABCD-1234",
                "program": "inventory", "version": "4.2.1", "address": "2001:db8:1234:5678::1"}
        status, problem, _ = await svc.request("POST", "/v1/records/download", token=token, json={**good, "user": "x"})
        assert status == 422 and "user" in problem["detail"]
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, json={**good, "address": "not-an-ip"})
        assert status == 422
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, json={**good, "version": "1.0\n"})
        assert status == 422
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token,
                                         json={**good, "program": "p" * 5000})
        assert status == 413
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token,
                                         json={k: v for k, v in good.items() if k != "program"})
        assert status == 422
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, data=b'{"a": [' + b"1," * 60 + b"1]}",
                                         headers={"Content-Type": "application/json"})
        assert status == 413  # the value budget
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, data=b"[1]",
                                         headers={"Content-Type": "application/json"})
        assert status == 400
        status, _, _ = await svc.request("POST", "/v1/records/download", token=token, data=b"{}",
                                         headers={"Content-Type": "text/plain"})
        assert status == 415
        assert (await svc.request("POST", "/v1/records/download", json=good))[0] == 401
        assert await db.fetchval("SELECT count(*) FROM records") == 0
        status, answer, _ = await svc.request("POST", "/v1/records/download", token=token, json=good)
        assert status == 201
        (row,) = await stored(db, "download", install_id)
        assert row["fields"]["address"] == "2001:db8:1234::/48"


async def test_restricted_installation_is_refused_and_erasure_wins(db_dsn, master_key, tmp_path, db):
    path = EXAMPLES / "diagnostics.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        admin = svc.create_secret("admin-token")
        body = {"report_id": str(uuid.uuid4()), "occurred_at": NOW, "version": "1", "os": "linux", "fault": "hang"}
        status, _, _ = await svc.request("PUT", f"/v1/admin/installations/{install_id}/restriction", token=admin,
                                         json={"restricted": True})
        assert status == 200
        status, problem, _ = await svc.request("POST", "/v1/records/diagnostic", token=token, json=body)
        assert status == 403 and "restricted" in problem["type"]
        assert await db.fetchval("SELECT count(*) FROM records") == 0
        await svc.request("PUT", f"/v1/admin/installations/{install_id}/restriction", token=admin, json={"restricted": False})
        assert (await svc.request("POST", "/v1/records/diagnostic", token=token, json=body))[0] == 201
        assert (await svc.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin))[0] == 204
        status, _, _ = await svc.request("POST", "/v1/records/diagnostic", token=token, json={**body, "report_id": str(uuid.uuid4())})
        assert status == 401
        assert await db.fetchval("SELECT count(*) FROM records") == 0


async def test_records_are_group_committed_and_answer_503_when_the_database_does_not_commit(db_dsn, master_key, tmp_path, db):
    path = EXAMPLES / "diagnostics.toml"
    async with serve(db_dsn, master_key, tmp_path, path, db_timeout=1.5) as svc:
        install_id, token = await svc.enroll()

        def body():
            return {"report_id": str(uuid.uuid4()), "occurred_at": NOW, "version": "1", "os": "linux", "fault": "hang"}

        results = await asyncio.gather(*(svc.request("POST", "/v1/records/diagnostic", token=token, json=body())
                                         for _ in range(40)))
        assert all(r[0] == 201 for r in results)
        transactions = await db.fetchval("SELECT count(DISTINCT xmin::text) FROM records")
        assert transactions < 40
        # the installation's row held: the writer cannot commit, the request gets 503 + Retry-After (the batch it
        # was in may still commit after the answer, unacknowledged, like a commit whose answer a cut connection lost)
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        status, _, headers = await svc.request("POST", "/v1/records/diagnostic", token=token, json=body())
        await tx.rollback()
        assert status == 503 and headers.get("Retry-After")
        assert await db.fetchval("SELECT count(*) FROM records") in (40, 41)


async def test_the_sweeper_deletes_expired_records_and_keeps_their_epoch_keys_until_then(db_dsn, master_key, tmp_path, db, ks):
    path = EXAMPLES / "cloud-scan.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        body = {"scan_id": str(uuid.uuid4()), "scanned_at": NOW, "provider": "gcp", "account": "a"}
        assert (await svc.request("POST", "/v1/records/cloud_scan", token=token, json=body))[0] == 201
        (row,) = await stored(db, "cloud_scan", install_id)
        now = dt.datetime.now(dt.timezone.utc)
        # before expiry: nothing goes, and the epoch key is kept
        result = await sweep(db, ks, now + dt.timedelta(hours=47), Rules(batch_rows=1))
        assert result.rows_deleted["records"] == 0
        assert row["key_id"] in {r["key_id"] for r in await keystore.keys_of(ks, install_id)}
        # past expiry: the record goes (in batches of one, each its own statement), and a second sweep finds nothing
        result = await sweep(db, ks, row["expires_at"] + dt.timedelta(seconds=1), Rules(batch_rows=1))
        assert result.rows_deleted["records"] == 1
        assert await db.fetchval("SELECT count(*) FROM records") == 0
        result = await sweep(db, ks, row["expires_at"] + dt.timedelta(seconds=2), Rules(batch_rows=1))
        assert result.rows_deleted["records"] == 0


# ------------------------------------------------------------------ serve and the built-in categories


def test_serve_refuses_a_built_in_category_declared_otherwise(tmp_path):
    from tests.support import run_cli

    changed = tmp_path / "changed.toml"
    text = (ROOT / "policy" / "builtin.toml").read_text(encoding="utf-8")
    changed.write_text(text.replace('retention = "720h"', 'retention = "700h"'))
    data = tmp_path / "data"
    proc = run_cli("serve", env={"TELEMETRY_POLICY": str(changed), "TELEMETRY_DATA_DIR": str(data)}, check=False, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "category[scan]: differs from the built-in one" in proc.stderr
    assert not data.exists()


def test_openapi_documents_each_file_category():
    from ingest.http.openapi import build
    from policy import load

    doc = build(load(EXAMPLES / "cloud-scan.toml"))
    paths = doc["paths"]
    assert "/v1/records/cloud_scan" in paths and "/v1/scans" not in paths and "/v1/agents" not in paths
    settings = paths["/v1/installation/settings"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert settings["properties"] == {"cloud_scan_retention_hours": {"type": "integer", "minimum": 24, "maximum": 48}}
    assert settings["required"] == ["cloud_scan_retention_hours"]
    assert "409" in paths["/v1/records/cloud_scan"]["post"]["responses"]


async def test_a_restored_backup_loses_an_erased_installations_records_and_audit_finds_overdue_ones(
        db_dsn, master_key, tmp_path, db, ks):
    from storage.databases import replay_erasures

    path = EXAMPLES / "download-log.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        kept_id, kept_token = await svc.enroll()
        for tok in (token, kept_token):
            body = {"download_id": str(uuid.uuid4()), "downloaded_at": NOW, "licence_number": "ABCD-1234",
                    "program": "inventory", "version": "4.2.1", "address": "203.0.113.7"}
            assert (await svc.request("POST", "/v1/records/download", token=tok, json=body))[0] == 201
        # the key store erased the installation (as an erasure does first), the data database still holds it,
        # as a restored backup would: the replay erases it again, its records included
        await keystore.destroy_installation(ks, install_id)
        assert await replay_erasures(db, ks, grace=0) == 1
        assert await db.fetchval("SELECT count(*) FROM records WHERE install_id = $1", install_id) == 0
        assert await db.fetchval("SELECT count(*) FROM records WHERE install_id = $1", kept_id) == 1
        # a record past its expiry that no sweep removed is a finding of audit
        await db.execute("UPDATE records SET received_at = now() - interval '40 days', expires_at = now() - interval '10 days'")
        audit = svc.cli("audit", check=False)
        assert audit.returncode == 1 and "1 row(s) in records past their expires_at" in audit.stdout


async def test_settings_take_each_shortenable_category_beside_the_built_in_scans(db_dsn, master_key, tmp_path, db):
    text = (ROOT / "policy" / "builtin.toml").read_text(encoding="utf-8")
    cloud = (EXAMPLES / "cloud-scan.toml").read_text(encoding="utf-8").replace("format = 1", "")
    path = write_policy(tmp_path, text + "\n" + cloud)
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        status, answer, _ = await svc.request("PUT", "/v1/installation/settings", token=token,
                                              json={"cloud_scan_retention_hours": 24})
        assert status == 200 and answer == {"cloud_scan_retention_hours": 24, "scan_retention_hours": 720}
        status, answer, _ = await svc.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 48})
        assert status == 200 and answer == {"scan_retention_hours": 48, "cloud_scan_retention_hours": 24}
        assert (await svc.request("PUT", "/v1/installation/settings", token=token, json={}))[0] == 422
        assert await db.fetchval("SELECT retention_hours FROM record_settings WHERE install_id = $1", install_id) == 24
        # the built-in paths are served beside the file's own
        status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
        assert status == 200


async def test_hash_keys_are_made_once_per_category_and_re_wrapped_by_rotation(ks, master_key):
    import base64
    import os

    from crypto.datakeys import new_wrapped_hash_key, rewrap_hash_key

    old = KeyRing.from_setting(master_key)
    kek_id, wrapped = await keystore.hash_key(ks, "download", *new_wrapped_hash_key(old, "download"))
    # a second worker's key loses: the first one made stays the category's
    again = await keystore.hash_key(ks, "download", *new_wrapped_hash_key(old, "download"))
    assert again == (kek_id, wrapped)
    key = old.unwrap(kek_id, wrapped, hash_key_context("download"))
    new = KeyRing.from_setting(base64.b64encode(os.urandom(32)).decode() + "," + master_key)
    assert await keystore.count_not_wrapped_by(ks, new.primary_id) == 1
    assert await keystore.rewrap_hash_keys(ks, new.primary_id, lambda *row: rewrap_hash_key(new, *row)) == 1
    assert await keystore.count_not_wrapped_by(ks, new.primary_id) == 0
    kek_id, wrapped = await keystore.stored_hash_key(ks, "download")
    assert kek_id == new.primary_id and new.unwrap(kek_id, wrapped, hash_key_context("download")) == key
    assert (await keystore.kek_ids(ks)) == {new.primary_id: 1}


async def test_a_large_sealed_record_is_prepared_off_the_event_loop_and_gzip_is_read(db_dsn, master_key, tmp_path, db, ks):
    import gzip

    path = EXAMPLES / "cloud-scan.toml"
    async with serve(db_dsn, master_key, tmp_path, path) as svc:
        install_id, token = await svc.enroll()
        scan_id = str(uuid.uuid4())
        body = {"scan_id": scan_id, "scanned_at": NOW, "provider": "azure", "account": "big",
                "resources": [{"resource_id": f"r-{i}", "kind": "vm", "tags": ["t" * 40]} for i in range(3000)]}
        raw = orjson.dumps(body)
        assert len(raw) > 64 * 1024  # past INLINE_BYTES: on the prepare threads
        status, answer, _ = await svc.request("POST", "/v1/records/cloud_scan", token=token, data=gzip.compress(raw),
                                              headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert status == 201, answer
        (row,) = await stored(db, "cloud_scan", install_id)
        key = await data_key(ks, master_key, install_id, row["key_id"])
        opened = orjson.loads(open_document_json(key, bytes(row["sealed"]),
                                                 record_context(install_id, "cloud_scan", scan_id, whole=True)))
        assert opened == body
