"""Admin endpoints and commands: export, erasure, restriction, statistics, and the audit log, over real HTTP."""

import asyncio
import gc
import uuid

import asyncpg
import orjson
import psutil
import pytest

from crypto.datakeys import wrap_context
from crypto.envelope import DataKey, open_
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing
from ingest.keys import AUTH, DATA_KEYS
from ingest.routes_core import email_context
from storage import admin
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


async def populated(service, db, *, email="subject@example.org", heartbeats=3):
    """An installation with heartbeats (with e-mail), an agent and its token row; returns (install_id, token)."""
    install_id, token = await service.enroll()
    for i in range(heartbeats):
        status, body, _ = await service.request("POST", "/v1/heartbeats", token=token,
                                                json=heartbeat_body(install_id, asset_count=100 + i, email=email))
        assert status == 200, body
    agent_id = uuid.uuid4()
    await db.execute("INSERT INTO agents (install_id, agent_id, name) VALUES ($1, $2, 'scanner-1')", install_id, agent_id)
    await db.execute(
        "INSERT INTO tokens (token_id, token_hash, role, install_id, agent_id) VALUES ($1, $2, 'agent', $3, $4)",
        "tid_" + uuid.uuid4().hex[:16], uuid.uuid4().bytes * 2, install_id, agent_id,
    )
    return install_id, token


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
@pytest.mark.parametrize("ident", [str(uuid.uuid4()), "not-a-uuid", "1234"])
async def test_unknown_or_malformed_installation_is_404(service, admin_token, method, suffix, ident):
    body = {"restricted": True} if method == "PUT" else None
    status, resp, headers = await service.request(method, f"/v1/admin/installations/{ident}{suffix}", token=admin_token, json=body)
    assert status == 404 and is_problem(resp, headers, 404)


# ------------------------------------------------------------------ export


async def test_export_is_one_document_with_everything_decrypted(service, db, admin_token):
    email = f"dpo-{uuid.uuid4().hex[:6]}@example.org"
    install_id, token = await populated(service, db, email=email)
    other, other_token = await service.enroll()
    await service.request("POST", "/v1/heartbeats", token=other_token, json=heartbeat_body(other, email="other@example.org"))

    async with service.http.get(f"{service.url}/v1/admin/installations/{install_id}/export",
                                headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        raw = await resp.read()
    doc = orjson.loads(raw)
    assert doc["format"] == "telemetry-ingest export 1" and doc["install_id"] == str(install_id)
    inst = doc["installation"]
    assert inst["email"] == email and "email_ct" not in inst
    assert (inst["license_type"], inst["version"], inst["asset_count"]) == ("enterprise", "4.2.1", 102)
    assert inst["ip_prefix"] == "127.0.0.0/24" and inst["restricted"] is False
    assert [h["asset_count"] for h in doc["heartbeats"]] == [100, 101, 102]
    assert set(doc["heartbeats"][0]) == {"received_at", "license_type", "version", "asset_count", "db_server_type",
                                         "web_server_type", "ip_prefix"}
    assert [a["name"] for a in doc["agents"]] == ["scanner-1"]
    assert {t["role"] for t in doc["tokens"]} == {"installation", "agent"}
    assert doc["scans"] == []
    assert [a["action"] for a in doc["audit"]] == ["installation.export"]
    # no token material, nothing of the other installation
    text = raw.decode()
    for forbidden in ("token_hash", "wrapped", token, str(other), "other@example.org", admin_token):
        assert forbidden not in text
    # audited under the admin token's id, never the token
    row = await db.fetchrow("SELECT actor, action FROM audit_log WHERE install_id = $1", install_id)
    admin_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'admin'")
    assert tuple(row) == (admin_id, "installation.export")
    assert admin_token not in str([dict(r) for r in await db.fetch("SELECT * FROM audit_log")])


async def test_export_of_installation_without_heartbeats(service, admin_token):
    install_id, _ = await service.enroll()
    status, doc, _ = await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200
    assert doc["installation"]["email"] is None and doc["installation"]["last_seen_at"] is None
    assert doc["heartbeats"] == [] and doc["agents"] == []


async def test_unreadable_email_is_marked_not_fatal(service, db, admin_token):
    install_id, _ = await populated(service, db, heartbeats=1)
    # a ciphertext moved here from another installation does not open under this one's context
    other, other_token = await service.enroll()
    await service.request("POST", "/v1/heartbeats", token=other_token, json=heartbeat_body(other, email="x@example.org"))
    await db.execute("UPDATE installations SET email_ct = (SELECT email_ct FROM installations WHERE install_id = $2) "
                     "WHERE install_id = $1", install_id, other)
    status, doc, _ = await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200
    assert doc["installation"]["email"] is None and doc["installation"]["email_unreadable"] is True


@pytest.mark.slow
async def test_export_streams_in_flat_memory(service, db, admin_token):
    install_id, _ = await service.enroll()
    rows = 200_000
    # Made inside the server: the test process holds none of it. Spread over the last ~3 minutes,
    # so every row lands in a partition that exists (today's or yesterday's).
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count, db_server_type, web_server_type, ip_prefix) "
        "SELECT $1, now() - i * interval '1 ms', 'enterprise-' || (i % 97), '4.' || (i % 13) || '.' || i, i, "
        "'postgresql-16-with-a-longer-name', 'nginx-1.27-with-a-longer-name', '192.0.2.0/24' "
        "FROM generate_series(1, $2) i",
        install_id, rows,
    )
    proc = psutil.Process()
    gc.collect()
    baseline = peak = proc.memory_info().rss
    size = 0
    tail = b""
    async with service.http.get(f"{service.url}/v1/admin/installations/{install_id}/export",
                                headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            tail = (tail + chunk)[-4096:]
            peak = max(peak, proc.memory_info().rss)
    growth = peak - baseline
    assert size > 40 * 1024 * 1024, size
    # client and server share this process: together they held a small fraction of the document
    assert growth < size / 8, (growth, size)
    assert tail.endswith(b'"action":"installation.export"}]}')


async def test_cli_export_writes_the_document_to_stdout(service, db, tmp_path):
    email = "cli-subject@example.org"
    install_id, _ = await populated(service, db, email=email)
    proc = service.cli("export", str(install_id))
    doc = orjson.loads(proc.stdout)
    assert doc["installation"]["email"] == email and len(doc["heartbeats"]) == 3
    assert await db.fetchval("SELECT actor FROM audit_log WHERE action = 'installation.export'") == "cli"
    missing = service.cli("export", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and missing.stdout == "" and "no installation" in missing.stderr
    assert service.cli("export", "nope", check=False).returncode == 1


# ------------------------------------------------------------------ erasure


async def test_erasure_leaves_nothing_and_the_id_can_enroll_afresh(service, db, admin_token):
    install_id, token = await populated(service, db)
    secret = service.create_secret()
    status, _, _ = await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token)
    assert status == 204
    # only the audit log still names it
    assert await tables_mentioning(db, str(install_id)) == {"audit_log": 2}
    actions = [r[0] for r in await db.fetch("SELECT action FROM audit_log WHERE install_id = $1 ORDER BY id", install_id)]
    assert actions == ["installation.erase", "installation.erased"]
    admin_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'admin'")
    assert {r[0] for r in await db.fetch("SELECT actor FROM audit_log WHERE install_id = $1", install_id)} == {admin_id}
    # its old token is refused, and the id is unknown to the admin routes
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 401
    assert (await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token))[0] == 404
    assert (await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token))[0] == 404
    # a new enrollment of the same id starts from nothing
    status, body, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
    assert status == 201
    new_token = body["token"]
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=new_token, json=heartbeat_body(install_id, email="new@example.org"))
    assert status == 200
    status, doc, _ = await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200
    assert len(doc["heartbeats"]) == 1 and doc["agents"] == [] and doc["installation"]["email"] == "new@example.org"
    assert [t["role"] for t in doc["tokens"]] == ["installation"]


async def test_erasure_interrupted_after_key_destruction_then_resumed(service, db, admin_token, master_key):
    install_id, token = await populated(service, db)
    email_ct = await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id)
    key_row = await db.fetchrow("SELECT key_id, kek_id, wrapped FROM data_keys WHERE install_id = $1", install_id)
    # Phase one only, as if the process died right after its commit.
    assert await admin.begin_erasure(db, install_id, "test") == "started"
    assert await db.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 0
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE install_id = $1 AND revoked_at IS NULL", install_id) == 0
    # the ciphertext is still there, but nothing that the database holds opens it any more
    assert await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id) == email_ct
    service.app[DATA_KEYS].evict(install_id)
    with pytest.raises(DecryptionError):
        await service.app[DATA_KEYS].get(install_id, key_row["key_id"])
    # (the destroyed key itself did open it: shredding is what made the difference)
    key = DataKey.from_bytes(key_row["key_id"], KeyRing.from_setting(master_key).unwrap(
        key_row["kek_id"], key_row["wrapped"], wrap_context(install_id, key_row["key_id"])))
    assert open_(key, email_ct, email_context(install_id)) == b"subject@example.org"
    # meanwhile the installation behaves as gone
    await service.app[AUTH].poll_revocations()
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 401
    assert (await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token))[0] == 404
    assert (await service.request("PUT", f"/v1/admin/installations/{install_id}/restriction", token=admin_token,
                                  json={"restricted": True}))[0] == 404
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 3
    # calling erase again finishes the job
    status, _, _ = await service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token)
    assert status == 204
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    detail = await db.fetchval("SELECT detail FROM audit_log WHERE install_id = $1 AND action = 'installation.erase' "
                               "ORDER BY id DESC LIMIT 1", install_id)
    assert detail["resumed"] is True


async def test_erasure_interrupted_during_row_deletion_resumed_by_cli(service, db):
    install_id, _ = await populated(service, db, heartbeats=5)
    await admin.begin_erasure(db, install_id, "test")
    # a crash after some batches: part of the history is gone, the rest is still there
    await db.execute("DELETE FROM heartbeats WHERE install_id = $1 AND asset_count < 102", install_id)
    assert "heartbeats" in await tables_mentioning(db, str(install_id))
    proc = service.cli("erase", str(install_id))
    assert f"erased {install_id}" in proc.stdout and "interrupted" in proc.stdout
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    assert service.cli("erase", str(install_id), check=False).returncode == 1


async def test_erasure_deletes_in_batches(service, db):
    install_id, _ = await populated(service, db, heartbeats=1)
    await db.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
        "SELECT $1, now() - i * interval '1 ms', 'x', '1', i FROM generate_series(1, 25) i", install_id)
    other, _ = await populated(service, db, heartbeats=2)
    await admin.begin_erasure(db, install_id, "test")
    assert await admin.delete_rows(db, install_id, batch=4) == 26 + 1  # 26 heartbeats, 1 agent
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", other) == 2
    assert await db.fetchval("SELECT count(*) FROM agents WHERE install_id = $1", other) == 1


async def test_erase_with_cli(service, db):
    install_id, token = await populated(service, db)
    proc = service.cli("erase", str(install_id))
    assert proc.stdout.strip() == f"erased {install_id}"
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}
    assert {r[0] for r in await db.fetch("SELECT actor FROM audit_log WHERE install_id = $1", install_id)} == {"cli"}
    await asyncio.sleep(0.6)  # the service's revocation follower catches up on its own
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 401
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
        # re-enrolled through a; b seals the new e-mail with the new key, not a cached old one
        _, new_token = await a.enroll(install_id)
        status, _, _ = await b.request("POST", "/v1/heartbeats", token=new_token, json=heartbeat_body(install_id, email="new@example.org"))
        assert status == 200
        status, doc, _ = await a.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
        assert status == 200 and doc["installation"]["email"] == "new@example.org"


async def test_concurrent_erasures_of_one_installation(service, db, admin_token):
    install_id, _ = await populated(service, db)
    results = await asyncio.gather(*(
        service.request("DELETE", f"/v1/admin/installations/{install_id}", token=admin_token) for _ in range(3)))
    assert sorted(r[0] for r in results)[0] == 204 and all(r[0] in (204, 404) for r in results)
    assert set(await tables_mentioning(db, str(install_id))) == {"audit_log"}


# ------------------------------------------------------------------ restriction


async def test_restriction_stops_processing_but_keeps_and_exports_data(service, db, admin_token):
    install_id, token = await populated(service, db, heartbeats=2)
    url = f"/v1/admin/installations/{install_id}/restriction"
    status, body, _ = await service.request("PUT", url, token=admin_token, json={"restricted": True})
    assert status == 200 and body == {"install_id": str(install_id), "restricted": True}
    before = await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id)
    for _ in range(3):
        status, resp, headers = await service.request("POST", "/v1/heartbeats", token=token,
                                                      json=heartbeat_body(install_id, asset_count=999, email="changed@example.org"))
        assert status == 403 and is_problem(resp, headers, 403)
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 2
    assert await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id) == before
    # stored data is kept and can still be exported
    status, doc, _ = await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200 and doc["installation"]["restricted"] is True and len(doc["heartbeats"]) == 2
    assert doc["installation"]["email"] == "subject@example.org"
    # lifting it restores normal behaviour
    status, body, _ = await service.request("PUT", url, token=admin_token, json={"restricted": False})
    assert status == 200 and body["restricted"] is False
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, asset_count=7))
    assert status == 200
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 3
    rows = await db.fetch("SELECT action, detail FROM audit_log WHERE install_id = $1 AND action = 'installation.restriction' ORDER BY id", install_id)
    assert [r["detail"]["restricted"] for r in rows] == [True, False]


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
