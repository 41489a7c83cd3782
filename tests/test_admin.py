"""Admin endpoints and commands: export, erasure, restriction, statistics, and the audit log, over real HTTP."""

import asyncio
import datetime as dt
import gc
import uuid
from dataclasses import dataclass

import aiohttp
import asyncpg
import orjson
import psutil
import pytest

from crypto.datakeys import epoch_end, wrap_context
from crypto.envelope import DataKey, open_
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing
from ingest.keys import AUTH, DATA_KEYS
from ingest.pipeline.sealed import email_context
from storage import admin
from crypto.documents import canonical, content_digest, content_mac, seal_document
from crypto.keyring import generate_key
from ingest.admin import rights
from ingest.pipeline.sealed import scan_context
from storage.scans import ScanRow, write_scans
from tests.support import heartbeat_body, start_service


def is_problem(body, headers, status):
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["title"] and body["detail"]
    return True


async def tables_mentioning(db, value: str) -> dict[str, int]:
    """Every table (partitioned parents included, partitions folded in) with a row whose text holds value."""
    names = [r[0] for r in await db.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition")]
    found = {}
    for name in names:
        n = await db.fetchval(f'SELECT count(*) FROM "{name}" t WHERE t::text LIKE $1', f"%{value}%")
        if n:
            found[name] = n
    return found


def scan_body(i: int = 0, **extra) -> dict:
    body = {
        "scan_id": str(uuid.uuid4()),
        "scanned_at": "2025-01-15T10:30:00Z",
        "agent_version": "1.0.3",
        "asset": {"name": f"pc-{i}", "serial_number": f"SN-{i}", "last_user": f"user{i}"},
        "software": [{"name": "Office", "version": "16.0", "publisher": "Contoso"}],
    }
    body.update(extra)
    return body


@dataclass
class Subject:
    """An enrolled installation with history: its tokens and the scans it uploaded (as filtered)."""

    install_id: uuid.UUID
    token: str
    agent_token: str
    agent_id: uuid.UUID
    scans: list[dict]


async def populated(service, *, email="subject@example.org", heartbeats=3, scans=2) -> Subject:
    """An installation with heartbeats (with e-mail), an agent, and scans."""
    install_id, token = await service.enroll()
    for i in range(heartbeats):
        status, body, _ = await service.request("POST", "/v1/heartbeats", token=token,
                                                json=heartbeat_body(install_id, asset_count=100 + i, email=email))
        assert status == 200, body
    status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": "scanner-1"})
    assert status == 201, body
    agent_token, agent_id = body["token"], uuid.UUID(body["agent_id"])
    uploaded = []
    for i in range(scans):
        doc = scan_body(i)
        status, body, _ = await service.request("POST", "/v1/scans", token=agent_token, json={**doc, "license_key": "XXXX"})
        assert status == 201 and body["dropped_fields"] == ["license_key"], body
        uploaded.append(doc)
    return Subject(install_id, token, agent_token, agent_id, uploaded)


@pytest.fixture
def admin_token(service):
    return service.create_secret("admin-token")


# ------------------------------------------------------------------ access control


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/admin/installations/{id}/export"),
    ("DELETE", "/v1/admin/installations/{id}"),
    ("PUT", "/v1/admin/installations/{id}/restriction"),
    ("GET", "/v1/admin/stats"),
])
async def test_admin_routes_need_an_admin_token(service, db, method, path):
    install_id, token = await service.enroll()
    path = path.format(id=install_id)
    body = {"restricted": True} if method == "PUT" else None
    status, resp, headers = await service.request(method, path, json=body)
    assert status == 401 and is_problem(resp, headers, 401)
    status, resp, headers = await service.request(method, path, token=token, json=body)
    assert status == 403 and is_problem(resp, headers, 403)
    status, _, _ = await service.request(method, path, token="tiadm_" + "A" * 43, json=body)
    assert status == 401
    # nothing happened to the installation
    row = await db.fetchrow("SELECT restricted, erasing FROM installations WHERE install_id = $1", install_id)
    assert tuple(row) == (False, False)
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE install_id = $1", install_id) == 0


@pytest.mark.parametrize("method, suffix", [("GET", "/export"), ("DELETE", ""), ("PUT", "/restriction")])
# A fixed unknown id (not uuid4() here: xdist's workers must collect the same test ids).
@pytest.mark.parametrize("ident", ["5f55db40-079c-4a19-bd2b-e6372a088aba", "not-a-uuid", "1234"])
async def test_unknown_or_malformed_installation_is_404(service, admin_token, method, suffix, ident):
    body = {"restricted": True} if method == "PUT" else None
    status, resp, headers = await service.request(method, f"/v1/admin/installations/{ident}{suffix}", token=admin_token, json=body)
    assert status == 404 and is_problem(resp, headers, 404)


# ------------------------------------------------------------------ export


async def export(service, admin_token, install_id) -> tuple[int, dict | None, bytes]:
    async with service.http.get(f"{service.url}/v1/admin/installations/{install_id}/export",
                                headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        raw = await resp.read()
        if resp.status == 200:
            assert resp.headers["Content-Type"].startswith("application/json")
            assert resp.headers.get("Transfer-Encoding") == "chunked"
        return resp.status, orjson.loads(raw) if raw else None, raw


async def test_export_is_one_document_with_everything_decrypted(service, db, admin_token):
    email = f"dpo-{uuid.uuid4().hex[:6]}@example.org"
    subject = await populated(service, email=email, scans=3)
    install_id = subject.install_id
    # one scan has expired (not yet swept): it is not exported
    expired = subject.scans.pop(0)
    await db.execute("UPDATE scans SET received_at = now() - interval '2 hours', expires_at = now() - interval '1 hour' "
                     "WHERE scan_id = $1", uuid.UUID(expired["scan_id"]))
    other = await populated(service, email="other@example.org", heartbeats=1, scans=1)

    status, doc, raw = await export(service, admin_token, install_id)
    assert status == 200
    assert doc["format"] == "telemetry-ingest export 1" and doc["install_id"] == str(install_id)
    inst = doc["installation"]
    assert inst["email"] == email and "email_ct" not in inst
    assert (inst["license_type"], inst["version"], inst["asset_count"]) == ("enterprise", "4.2.1", 102)
    assert inst["ip_prefix"] == "127.0.0.0/24" and inst["restricted"] is False and inst["scan_retention_hours"] == 720
    assert [h["asset_count"] for h in doc["heartbeats"]] == [100, 101, 102]
    # the record came from the latest heartbeat, and says when it was received (data migration 0019)
    assert inst["heartbeat_at"] == doc["heartbeats"][-1]["received_at"] and inst["last_seen_at"] >= inst["heartbeat_at"]
    assert set(doc["heartbeats"][0]) == {"received_at", "license_type", "version", "asset_count", "db_server_type",
                                         "web_server_type", "ip_prefix"}
    assert doc["agents"] == [{"agent_id": str(subject.agent_id), "name": "scanner-1",
                              "created_at": doc["agents"][0]["created_at"], "revoked_at": None}]
    assert sorted(t["role"] for t in doc["tokens"]) == ["agent", "installation"]
    # every unexpired scan, decrypted: the document as filtered (the undeclared license_key was dropped)
    assert [s["scan"] for s in doc["scans"]] == subject.scans
    assert {s["agent_id"] for s in doc["scans"]} == {str(subject.agent_id)}
    assert all(s["expires_at"] > s["received_at"] for s in doc["scans"])
    assert [a["action"] for a in doc["audit"]] == ["installation.export"]
    # no token material, nothing expired, nothing of the other installation
    text = raw.decode()
    for forbidden in ("token_hash", "wrapped", "ciphertext", "content_mac", "license_key", subject.token, subject.agent_token,
                      expired["scan_id"], str(other.install_id), "other@example.org", other.scans[0]["scan_id"], admin_token):
        assert forbidden not in text
    # audited under the admin token's id, never the token
    row = await db.fetchrow("SELECT actor, action FROM audit_log WHERE install_id = $1", install_id)
    admin_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'admin'")
    assert tuple(row) == (admin_id, "installation.export")
    assert admin_token not in str([dict(r) for r in await db.fetch("SELECT * FROM audit_log")])


async def test_export_of_installation_without_history(service, admin_token):
    install_id, _ = await service.enroll()
    status, doc, _ = await export(service, admin_token, install_id)
    assert status == 200
    assert doc["installation"]["email"] is None and doc["installation"]["last_seen_at"] is None
    assert doc["installation"]["heartbeat_at"] is None
    assert doc["heartbeats"] == [] and doc["agents"] == [] and doc["scans"] == []


async def test_unreadable_records_are_marked_not_fatal(service, db, admin_token):
    subject = await populated(service, heartbeats=1, scans=2)
    other = await populated(service, email="x@example.org", heartbeats=1, scans=1)
    # ciphertexts moved here from another installation do not open under this one's keys and contexts
    await db.execute("UPDATE installations SET email_ct = (SELECT email_ct FROM installations WHERE install_id = $2) "
                     "WHERE install_id = $1", subject.install_id, other.install_id)
    await db.execute("UPDATE scans SET ciphertext = (SELECT ciphertext FROM scans WHERE install_id = $2) WHERE scan_id = $1",
                     uuid.UUID(subject.scans[0]["scan_id"]), other.install_id)
    status, doc, _ = await export(service, admin_token, subject.install_id)
    assert status == 200
    assert doc["installation"]["email"] is None and doc["installation"]["email_unreadable"] is True
    first, second = doc["scans"]
    assert first["scan"] is None and first["unreadable"] is True
    assert second["scan"] == subject.scans[1] and "unreadable" not in second


async def test_export_with_a_missing_key_ring_key_is_503_before_anything_is_sent(db_dsn, master_key, tmp_path):
    async with start_service(db_dsn, master_key, tmp_path) as svc:
        install_id, _ = await svc.enroll()
        admin_token = svc.create_secret("admin-token")
    async with start_service(db_dsn, generate_key(), tmp_path) as svc:  # the key that wrapped its data key is gone
        status, body, headers = await svc.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
        assert status == 503 and is_problem(body, headers, 503) and headers.get("Retry-After")


async def _bulk_scans(service, db, install_id: uuid.UUID, agent_id: uuid.UUID, count: int, size: int) -> int:
    """Store `count` distinct scans of about `size` bytes of JSON each through the real batch writer; returns their bytes."""
    now = dt.datetime.now(dt.timezone.utc)
    key = await service.app[DATA_KEYS].for_expiry(install_id, now + dt.timedelta(hours=720))
    total = 0
    for start in range(0, count, 100):
        rows = []
        for i in range(start, min(count, start + 100)):
            scan_id = uuid.uuid4()
            software = [{"name": f"package-{i}-{j}-{uuid.uuid4().hex}", "version": f"{j}.{i}", "publisher": "Contoso"}
                        for j in range(size // 90)]
            plain = canonical({"scan_id": str(scan_id), "scanned_at": "2025-01-15T10:30:00Z", "software": software})
            context = scan_context(install_id, scan_id)
            sealed = seal_document(key, plain, context)
            rows.append(ScanRow(install_id, agent_id, scan_id, now, key.key_id, epoch_end(key.key_id), content_mac(key, context, content_digest(plain)),
                                len(plain), len(plain), len(plain), sealed))
            total += len(plain)
        outcomes = await write_scans(db, rows)
        assert {o.status for o in outcomes} == {"stored"}
    return total


@pytest.mark.slow
async def stream_export(service, admin_token: str, install_id: uuid.UUID) -> tuple[int, int, int, bytes]:
    """Read an export as it streams: (bytes, scans counted, peak RSS growth of this process, last 4 KiB)."""
    proc = psutil.Process()
    gc.collect()
    baseline = peak = proc.memory_info().rss
    size = scans = 0
    tail = b""
    async with service.http.get(f"{service.url}/v1/admin/installations/{install_id}/export",
                                headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            scans += (tail[-16:] + chunk).count(b'"scanned_at":')
            tail = (tail + chunk)[-4096:]
            peak = max(peak, proc.memory_info().rss)
    return size, scans, peak - baseline, tail


async def test_export_of_thousands_of_scans_streams_in_flat_memory(service, db, admin_token):
    subject = await populated(service, heartbeats=1, scans=0)
    plain_bytes = await _bulk_scans(service, db, subject.install_id, subject.agent_id, count=3000, size=16 * 1024)
    # and a long heartbeat history, made inside the server (spread over the last ~2 minutes, so every
    # row lands in a partition that exists: today's or yesterday's)
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count, db_server_type, web_server_type, ip_prefix) "
        "SELECT $1, now() - i * interval '1 ms', 'enterprise', '4.' || (i % 13) || '.' || i, i, 'postgresql', 'nginx', '192.0.2.0/24' "
        "FROM generate_series(1, $2) i",
        subject.install_id, 100_000,
    )
    size, scans, growth, tail = await stream_export(service, admin_token, subject.install_id)
    assert size > plain_bytes > 40 * 1024 * 1024, (size, plain_bytes)
    assert scans == 3000
    # client and server share this process: together they held a small fraction of the document
    assert growth < size / 8, (growth, size)
    assert tail.endswith(b'"action":"installation.export"}]}')


async def test_export_of_a_long_audit_history_and_many_agents_streams_in_flat_memory(service, db, admin_token):
    """Agents, tokens and the audit list (which grows with every export) are streamed like the rest."""
    subject = await populated(service, heartbeats=0, scans=0)
    await db.execute(
        "INSERT INTO audit_log (actor, action, install_id, detail) SELECT 'cli', 'installation.export', $1, '{}' "
        "FROM generate_series(1, $2)", subject.install_id, 400_000)
    await db.execute(
        "INSERT INTO agents (install_id, agent_id, name, revoked_at) SELECT $1, gen_random_uuid(), 'agent-' || i, now() "
        "FROM generate_series(1, $2) i", subject.install_id, 50_000)
    size, _, growth, tail = await stream_export(service, admin_token, subject.install_id)
    assert size > 400_000 * 40, size
    # loaded whole, 450,000 rows would take far more than the document itself; streamed, a fraction of it
    assert growth < size / 4, (growth, size)
    assert tail.endswith(b'"action":"installation.export"}]}')


async def test_export_of_a_scan_of_megabytes(service, db, admin_token):
    """A scan whose ciphertext is over a mebibyte is opened off the event loop, and exported whole."""
    subject = await populated(service, heartbeats=0, scans=0)
    doc = scan_body(software=[{"name": uuid.uuid4().hex * 2, "version": str(i), "publisher": uuid.uuid4().hex} for i in range(30_000)])
    status, body, _ = await service.request("POST", "/v1/scans", token=subject.agent_token, json=doc)
    assert status == 201, body
    assert await db.fetchval("SELECT length(ciphertext) FROM scans WHERE install_id = $1", subject.install_id) > rights.OFFLOAD_BYTES
    status, exported, _ = await export(service, admin_token, subject.install_id)
    assert status == 200 and [s["scan"] for s in exported["scans"]] == [doc]


@pytest.mark.fault
async def test_export_cut_off_midway_is_not_a_whole_document(service, db, admin_token):
    """The database connection dies after the document has begun: the client sees a broken transfer."""
    install_id, _ = await service.enroll()
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "SELECT $1, now() - i * interval '1 ms', 'enterprise', '1.0', i FROM generate_series(1, 100000) i", install_id)
    async with service.http.get(f"{service.url}/v1/admin/installations/{install_id}/export",
                                headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        assert resp.status == 200
        first = await resp.content.readexactly(1000)
        assert first.startswith(b'{"format":"telemetry-ingest export 1"')
        # the export's backend: the one in a read-only snapshot transaction over this installation's history
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%FROM heartbeats WHERE install_id%'")
        assert killed == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # the service carries on
    status, doc, _ = await export(service, admin_token, (await service.enroll())[0])
    assert status == 200 and doc["heartbeats"] == []


async def test_head_of_export_is_not_allowed(service, admin_token):
    install_id, _ = await service.enroll()
    status, _, _ = await service.request("HEAD", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 405


async def test_cli_export_writes_the_document_to_stdout(service, db, admin_token):
    email = "cli-subject@example.org"
    subject = await populated(service, email=email)
    proc = service.cli("export", str(subject.install_id))
    doc = orjson.loads(proc.stdout)
    assert doc["installation"]["email"] == email and len(doc["heartbeats"]) == 3
    assert [s["scan"] for s in doc["scans"]] == subject.scans
    # the same document as over HTTP (but for when it was made and the audit trail of the exports)
    status, over_http, _ = await export(service, admin_token, subject.install_id)
    for d in (doc, over_http):
        d.pop("exported_at"), d.pop("audit")
    assert doc == over_http
    assert [r[0] for r in await db.fetch("SELECT actor FROM audit_log WHERE action = 'installation.export' ORDER BY id")][0] == "cli"
    missing = service.cli("export", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and missing.stdout == "" and "no installation" in missing.stderr
    assert service.cli("export", "nope", check=False).returncode == 1


# ------------------------------------------------------------------ erasure


async def test_erasure_leaves_nothing_and_the_id_can_enroll_afresh(service, db, admin_token):
    subject = await populated(service)
    install_id = subject.install_id
    secret = service.create_secret()
    status, _, _ = await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token)
    assert status == 204
    # only the audit log still names it
    assert await tables_mentioning(db, str(install_id)) == {"audit_log": 2}
    for scan in subject.scans:
        assert await tables_mentioning(db, scan["scan_id"]) == {}
    assert await tables_mentioning(db, str(subject.agent_id)) == {}
    actions = [r[0] for r in await db.fetch("SELECT action FROM audit_log WHERE install_id = $1 ORDER BY id", install_id)]
    assert actions == ["installation.erase", "installation.erased"]
    admin_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'admin'")
    assert {r[0] for r in await db.fetch("SELECT actor FROM audit_log WHERE install_id = $1", install_id)} == {admin_id}
    # its old tokens are refused, and the id is unknown to the admin routes
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=subject.token, json=heartbeat_body(install_id))
    assert status == 401
    status, _, _ = await service.request("POST", "/v1/scans", token=subject.agent_token, json=scan_body())
    assert status == 401
    assert (await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token))[0] == 404
    assert (await export(service, admin_token, install_id))[0] == 404
    # a new enrollment of the same id starts from nothing
    status, body, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
    assert status == 201
    new_token = body["token"]
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=new_token, json=heartbeat_body(install_id, email="new@example.org"))
    assert status == 200
    status, doc, _ = await export(service, admin_token, install_id)
    assert status == 200
    assert len(doc["heartbeats"]) == 1 and doc["agents"] == [] and doc["scans"] == []
    assert doc["installation"]["email"] == "new@example.org"
    assert [t["role"] for t in doc["tokens"]] == ["installation"]


async def test_erasure_interrupted_after_key_destruction_then_resumed(service, db, admin_token, master_key, ks):
    subject = await populated(service)
    install_id = subject.install_id
    email_ct = await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id)
    key_row = await ks.fetchrow("SELECT key_id, kek_id, wrapped FROM data_keys WHERE install_id = $1", install_id)
    # Phase one only, as if the process died right after its commit.
    assert await rights.begin_erasure(db, ks, install_id, "test") == "started"
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 0
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE install_id = $1 AND revoked_at IS NULL", install_id) == 0
    # the ciphertexts are still there, but nothing the database holds opens them any more
    assert await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id) == email_ct
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1", install_id) == 2
    service.app[DATA_KEYS].evict(install_id)
    with pytest.raises(DecryptionError):
        await service.app[DATA_KEYS].get(install_id, key_row["key_id"])
    # (the destroyed key did open them: shredding is what made the difference)
    key = DataKey.from_bytes(key_row["key_id"], KeyRing.from_setting(master_key).unwrap(
        key_row["kek_id"], key_row["wrapped"], wrap_context(install_id, key_row["key_id"])))
    assert open_(key, email_ct, email_context(install_id)) == b"subject@example.org"
    # meanwhile the installation behaves as gone
    await service.app[AUTH].poll_revocations()
    assert (await service.request("POST", "/v1/heartbeats", token=subject.token, json=heartbeat_body(install_id)))[0] == 401
    assert (await service.request("POST", "/v1/scans", token=subject.agent_token, json=scan_body()))[0] == 401
    assert (await export(service, admin_token, install_id))[0] == 404
    assert (await service.request("PUT", f"/v1/admin/installations/{install_id}/restriction", token=admin_token,
                                  json={"restricted": True}))[0] == 404
    secret = service.create_secret()
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
    assert status == 409  # not before the erasure is complete
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 3
    # calling erase again finishes the job
    status, _, _ = await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token)
    assert status == 204
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    detail = await db.fetchval("SELECT detail FROM audit_log WHERE install_id = $1 AND action = 'installation.erase' "
                               "ORDER BY id DESC LIMIT 1", install_id)
    assert detail["resumed"] is True
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
    assert status == 201


async def test_erasure_interrupted_during_row_deletion_resumed_by_cli(service, db, ks):
    subject = await populated(service, heartbeats=5)
    install_id = subject.install_id
    await rights.begin_erasure(db, ks, install_id, "test")
    # a crash after some batches: part of the rows are gone, the rest is still there
    await db.execute("DELETE FROM heartbeats WHERE install_id = $1 AND asset_count < 102", install_id)
    await db.execute("DELETE FROM scans WHERE install_id = $1", install_id)
    assert "heartbeats" in await tables_mentioning(db, str(install_id))
    proc = service.cli("erase", str(install_id))
    assert f"erased {install_id}" in proc.stdout and "interrupted" in proc.stdout
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    assert service.cli("erase", str(install_id), check=False).returncode == 1


async def test_erasure_deletes_in_batches_and_touches_no_one_else(service, db, ks):
    subject = await populated(service, heartbeats=1, scans=3)
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "SELECT $1, now() - i * interval '1 ms', 'x', '1', i FROM generate_series(1, 25) i", subject.install_id)
    other = await populated(service, heartbeats=2, scans=2)
    await rights.begin_erasure(db, ks, subject.install_id, "test")
    assert await admin.delete_rows(db, subject.install_id, batch=4) == 26 + 3 + 1  # heartbeats, scans, agent
    for table, n in (("heartbeats", 2), ("scans", 2), ("agents", 1), ("tokens", 2)):
        assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE install_id = $1", other.install_id) == n, table
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", other.install_id) >= 1
    # a live installation is not touched by the later phases either
    assert await rights.finish_erasure(db, other.install_id, "test") is False
    assert await admin.unlink(db, other.install_id, "test", 0) is False
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", other.install_id) == 2


async def test_erasure_finished_by_someone_else_still_unlinks_the_tokens(service, db, ks):
    """If another eraser (e.g. the sweeper) deleted the rows first, erasing again still clears the token rows."""
    subject = await populated(service)
    await rights.begin_erasure(db, ks, subject.install_id, "test")
    for table in ("heartbeats", "scans", "agents", "installations"):
        await db.execute(f"DELETE FROM {table} WHERE install_id = $1", subject.install_id)
    assert await rights.finish_erasure(db, subject.install_id, "test") is True
    assert set(await tables_mentioning(db, str(subject.install_id))) == {"audit_log"}


async def test_erase_with_cli(service, db):
    subject = await populated(service)
    install_id = subject.install_id
    proc = service.cli("erase", str(install_id))
    assert proc.stdout.strip() == f"erased {install_id}"
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    assert {r[0] for r in await db.fetch("SELECT actor FROM audit_log WHERE install_id = $1", install_id)} == {"cli"}
    await asyncio.sleep(0.6)  # the service's revocation follower catches up on its own
    assert (await service.request("POST", "/v1/heartbeats", token=subject.token, json=heartbeat_body(install_id)))[0] == 401
    assert (await service.request("POST", "/v1/scans", token=subject.agent_token, json=scan_body()))[0] == 401
    missing = service.cli("erase", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and "no installation" in missing.stderr


async def test_other_workers_drop_their_caches(db_dsn, master_key, tmp_path, db):
    """Two apps on one database stand for two workers: the one not handling the erasure forgets too."""
    async with start_service(db_dsn, master_key, tmp_path) as a, start_service(db_dsn, master_key, tmp_path) as b:
        install_id, token = await a.enroll()
        admin_token = a.create_secret("admin-token")
        # b caches the token and the installation's data key
        status, _, _ = await b.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email="old@example.org"))
        assert status == 200
        assert (await a.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token))[0] == 204
        await asyncio.sleep(0.6)
        assert (await b.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 401
        # re-enrolled through a; b seals with the new data key, not a cached old one
        _, new_token = await a.enroll(install_id)
        status, _, _ = await b.request("POST", "/v1/heartbeats", token=new_token, json=heartbeat_body(install_id, email="new@example.org"))
        assert status == 200
        status, body, _ = await b.request("POST", "/v1/agents", token=new_token, json={"name": "fresh"})
        doc = scan_body()
        assert (await b.request("POST", "/v1/scans", token=body["token"], json=doc))[0] == 201
        status, exported, _ = await export(a, admin_token, install_id)
        assert status == 200 and exported["installation"]["email"] == "new@example.org"
        assert [s["scan"] for s in exported["scans"]] == [doc]


async def test_concurrent_erasures_of_one_installation(service, db, admin_token):
    subject = await populated(service)
    results = await asyncio.gather(*(
        service.request("DELETE", f"/v1/admin/installations/{subject.install_id}", token=admin_token) for _ in range(3)))
    assert 204 in [r[0] for r in results] and all(r[0] in (204, 404) for r in results)
    assert set(await tables_mentioning(db, str(subject.install_id))) == {"audit_log"}


# ------------------------------------------------------------------ restriction


async def test_restriction_stops_processing_but_keeps_and_exports_data(service, db, admin_token):
    subject = await populated(service, heartbeats=2, scans=1)
    install_id = subject.install_id
    url = f"/v1/admin/installations/{install_id}/restriction"
    status, body, _ = await service.request("PUT", url, token=admin_token, json={"restricted": True})
    assert status == 200 and body == {"install_id": str(install_id), "restricted": True}
    before = await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id)
    counts = "SELECT (SELECT count(*) FROM heartbeats WHERE install_id = $1), (SELECT count(*) FROM scans WHERE install_id = $1)"
    assert tuple(await db.fetchrow(counts, install_id)) == (2, 1)
    for _ in range(3):
        status, resp, headers = await service.request("POST", "/v1/heartbeats", token=subject.token,
                                                      json=heartbeat_body(install_id, asset_count=999, email="changed@example.org"))
        assert status == 403 and is_problem(resp, headers, 403)
        status, resp, headers = await service.request("POST", "/v1/scans", token=subject.agent_token, json=scan_body())
        assert status == 403 and is_problem(resp, headers, 403)
    assert tuple(await db.fetchrow(counts, install_id)) == (2, 1)
    assert await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id) == before
    # stored data is kept and can still be exported
    status, doc, _ = await export(service, admin_token, install_id)
    assert status == 200 and doc["installation"]["restricted"] is True and len(doc["heartbeats"]) == 2
    assert doc["installation"]["email"] == "subject@example.org" and [s["scan"] for s in doc["scans"]] == subject.scans
    # lifting it restores normal behaviour
    status, body, _ = await service.request("PUT", url, token=admin_token, json={"restricted": False})
    assert status == 200 and body["restricted"] is False
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=subject.token, json=heartbeat_body(install_id, asset_count=7))
    assert status == 200
    assert (await service.request("POST", "/v1/scans", token=subject.agent_token, json=scan_body()))[0] == 201
    assert tuple(await db.fetchrow(counts, install_id)) == (3, 2)
    rows = await db.fetch("SELECT actor, detail FROM audit_log WHERE install_id = $1 AND action = 'installation.restriction' ORDER BY id", install_id)
    admin_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'admin'")
    assert [(r["actor"], r["detail"]["restricted"]) for r in rows] == [(admin_id, True), (admin_id, False)]


@pytest.mark.parametrize("body, status", [
    ({}, 422), ({"restricted": "yes"}, 422), ({"restricted": 1}, 422), ({"restricted": None}, 422),
    (b"[true]", 400), (b"{nope", 400),
])
async def test_restriction_body_is_validated(service, admin_token, body, status):
    install_id, _ = await service.enroll()
    url = f"/v1/admin/installations/{install_id}/restriction"
    if isinstance(body, bytes):
        got, resp, headers = await service.request("PUT", url, token=admin_token, data=body, headers={"Content-Type": "application/json"})
    else:
        got, resp, headers = await service.request("PUT", url, token=admin_token, json=body)
    assert got == status and is_problem(resp, headers, status)


# ------------------------------------------------------------------ statistics


async def _installation(db, version, license_type="enterprise", db_type="postgresql", web_type="nginx", assets=10,
                        days_ago=1.0, restricted=False):
    install_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO installations (install_id, last_seen_at, license_type, version, asset_count, db_server_type, "
        "web_server_type, email_ct, ip_prefix, restricted) "
        "VALUES ($1, now() - $2 * interval '1 day', $3, $4, $5, $6, $7, '\\x01'::bytea, '198.51.100.0/24', $8)",
        install_id, days_ago, license_type, version, assets, db_type, web_type, restricted,
    )
    return install_id


async def test_stats_fold_small_groups_and_name_no_one(service, db, admin_token):
    ids = []
    for _ in range(7):
        ids.append(await _installation(db, "4.2.1", assets=100))
    for _ in range(5):
        ids.append(await _installation(db, "4.3.0", license_type="community", web_type="apache", assets=10))
    ids.append(await _installation(db, "5.0.0-beta", db_type="mssql", assets=1))
    ids.append(await _installation(db, "3.9.9", db_type="mssql", assets=2))
    ids.append(await _installation(db, "other", db_type=None, assets=3))
    # not counted: inactive for over 30 days, or restricted
    await _installation(db, "9.9.9", days_ago=31, assets=1000)
    await _installation(db, "9.9.9", restricted=True, assets=1000)
    status, body, _ = await service.request("GET", "/v1/admin/stats", token=admin_token)
    assert status == 200
    assert body["k"] == 5 and body["suppressed"] is False
    assert body["active_installations"] == 15 and body["asset_count_total"] == 7 * 100 + 5 * 10 + 6
    by = {d: {g["value"]: (g["installations"], g["asset_count"]) for g in groups} for d, groups in body["by"].items()}
    # 5.0.0-beta, 3.9.9 and a stored 'other' (3 in all) are below k; so that 'other' is not a group below k
    # as well (readable as total minus the rest), the smallest shown group, 4.3.0, joins it
    assert by["version"] == {"4.2.1": (7, 700), "other": (8, 56)}
    assert by["license_type"] == {"enterprise": (10, 706), "community": (5, 50)}
    # mssql (2) and none (1) are below k, and the one group left must join them for the same reason
    assert by["db_server_type"] == {"other": (15, 756)}
    assert by["web_server_type"] == {"nginx": (10, 706), "apache": (5, 50)}
    for groups in body["by"].values():
        assert all(g["installations"] >= 5 for g in groups)
        assert groups[-1]["value"] == "other" or all(g["value"] != "other" for g in groups)
    text = orjson.dumps(body).decode()
    for i in ids:
        assert str(i) not in text
    assert "198.51.100" not in text and "@" not in text


async def test_stats_never_show_a_group_below_k(db_dsn, master_key, tmp_path, db):
    import random

    rnd = random.Random(5)
    for _ in range(60):
        await _installation(db, rnd.choice(["1.0", "1.1", "1.2", "2.0", "2.1", "3.0"]) + "." + str(rnd.randint(0, 3)),
                            license_type=rnd.choice(["a", "b", "c", "d"]), db_type=rnd.choice(["pg", "my", "ms", None]),
                            web_type=rnd.choice(["nginx", "apache", "iis"]), assets=rnd.randint(0, 1000))
    token = None
    for k in (1, 3, 5, 8, 13, 30, 60):
        async with start_service(db_dsn, master_key, tmp_path, stats_k=k) as svc:
            token = token or svc.create_secret("admin-token")
            status, body, _ = await svc.request("GET", "/v1/admin/stats", token=token)
        assert status == 200 and body["k"] == k
        for dim, groups in body["by"].items():
            assert sum(g["installations"] for g in groups) == 60
            assert all(g["installations"] >= k for g in groups), (k, dim, groups)
            assert len({g["value"] for g in groups}) == len(groups)


async def test_stats_suppressed_below_k(service, db, admin_token):
    for _ in range(4):
        await _installation(db, "1.0", assets=50)
    status, body, _ = await service.request("GET", "/v1/admin/stats", token=admin_token)
    assert status == 200 and body["suppressed"] is True
    assert body["active_installations"] is None and body["asset_count_total"] is None
    assert all(groups == [] for groups in body["by"].values())


# ------------------------------------------------------------------ audit log


async def test_audit_log_is_append_only(service, db):
    service.create_secret("admin-token")
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 1
    for sql in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute(sql)
    assert await db.fetchval("SELECT actor FROM audit_log") == "cli"
    # appending still works
    await db.execute("INSERT INTO audit_log (actor, action) VALUES ('cli', 'test')")
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 2


async def test_the_audit_log_keeps_its_rows_for_its_retention_and_no_longer(service, db, ks):
    """TELEMETRY_AUDIT_RETENTION_DAYS: the sweeper deletes older rows; nothing younger than 30 days
    goes, whatever the retention, and outside the sweeper's marked transaction nothing goes at all."""
    from storage.sweeper import Rules, sweep

    await db.execute("INSERT INTO audit_log (at, actor, action) SELECT now() - d * interval '1 day', 'cli', 'old' "
                     "FROM unnest(ARRAY[800, 731, 729, 40, 10]) d")
    now = dt.datetime.now(dt.timezone.utc)
    result = await sweep(db, ks, now, Rules(audit_retention=dt.timedelta(days=730), erase_grace=0))
    assert result.audit_rows_deleted == 2
    ages = sorted(r[0] for r in await db.fetch("SELECT extract(day FROM now() - at)::int FROM audit_log WHERE action = 'old'"))
    assert ages == [10, 40, 729]
    # a retention below the 30-day floor deletes only what is older than 30 days
    result = await sweep(db, ks, now, Rules(audit_retention=dt.timedelta(days=1), erase_grace=0))
    assert result.audit_rows_deleted == 2
    assert [r[0] for r in await db.fetch("SELECT extract(day FROM now() - at)::int FROM audit_log WHERE action = 'old'")] == [10]
    # the trigger itself: even marked, a young row cannot be deleted
    async with db.transaction():
        await db.execute("SET LOCAL telemetry.audit_sweep = 'on'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("DELETE FROM audit_log WHERE action = 'old'")
    # disclosed by policy show, with the configured retention
    out = service.cli("policy", "show", "--format", "json").stdout
    rows = [r for r in orjson.loads(out) if r["category"] == "audit log"]
    assert {r["field"].split()[0] for r in rows} == {"install_id", "action", "at", "actor"}
    assert all(r["retention"].startswith("730 days") for r in rows)
    # and audit reports a row kept past it
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
    await db.execute("UPDATE audit_log SET at = now() - interval '900 days' WHERE action = 'old'")
    await db.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update")
    proc = service.cli("audit", check=False)
    assert proc.returncode == 1 and "1 row(s) in audit_log older than 730 days" in proc.stdout, proc.stdout


async def test_audit_log_privileges_for_an_application_role(db, db_dsn):
    """A role that is granted what the service needs still cannot rewrite the log (trigger, and no privileges)."""
    role = f"ti_app_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        await db.execute(f"GRANT SELECT, INSERT ON audit_log TO {role}; GRANT USAGE ON SEQUENCE audit_log_id_seq TO {role}")
        conn = await asyncpg.connect(db_dsn, user=role, password="pw")
        try:
            assert await conn.fetchval("SELECT current_user") == role
            await conn.execute("INSERT INTO audit_log (actor, action) VALUES ('cli', 'x')")
            for sql in ("UPDATE audit_log SET actor = 'y'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
        finally:
            await conn.close()
    finally:
        await db.execute(f"REVOKE ALL ON audit_log FROM {role}; REVOKE ALL ON SEQUENCE audit_log_id_seq FROM {role}; DROP ROLE {role}")


async def test_heartbeat_history_past_retention_is_never_exported(service, db, admin_token):
    subject = await populated(service, heartbeats=3, scans=0)
    days = service.settings.heartbeat_retention_days
    from storage.partitions import ensure_partitions

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date(), days_back=days + 1)
    # the oldest row is one minute past retention and not yet swept: it must not be served
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "VALUES ($1, now() - make_interval(days => $2, mins => 1), 'old', '0.1', 1)", subject.install_id, days)
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "VALUES ($1, now() - make_interval(days => $2) + interval '1 hour', 'kept', '0.2', 2)", subject.install_id, days)
    status, doc, _ = await export(service, admin_token, subject.install_id)
    assert status == 200
    kinds = [h["license_type"] for h in doc["heartbeats"]]
    assert "old" not in kinds and kinds[0] == "kept" and len(kinds) == 4
