"""Enrollment and heartbeats over real HTTP against a real PostgreSQL."""

import asyncio
import gzip
import ipaddress
import uuid

import asyncpg
import orjson
import pytest
import zstandard

from crypto.datakeys import wrap_context
from crypto.envelope import DataKey, open_
from crypto.keyring import KeyRing
from ingest.http.app import HEARTBEAT_FLUSHERS
from ingest.keys import METRICS, POOL
from ingest.pipeline.sealed import email_context
from tests.support import heartbeat_body, start_service

JSON = {"Content-Type": "application/json"}


def is_problem(body, headers, status):
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["type"] and body["title"] and body["detail"]
    return True


# ------------------------------------------------------------------ enrollment


async def test_enroll_creates_installation_and_token(service, db, ks):
    install_id, token = await service.enroll()
    assert token.startswith("tii_")
    row = await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id)
    assert row is not None and row["scan_retention_hours"] == 720
    tokens = await db.fetch("SELECT * FROM tokens WHERE install_id = $1", install_id)
    assert len(tokens) == 1 and tokens[0]["role"] == "installation"
    # only the hash is stored: the token appears nowhere in the table
    dump = str([dict(r) for r in await db.fetch("SELECT * FROM tokens")])
    assert token not in dump and token[4:] not in dump
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 1


async def test_enroll_twice_is_409(service):
    secret = service.create_secret()
    install_id, _ = await service.enroll(secret=secret)
    status, body, headers = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
    assert status == 409 and is_problem(body, headers, 409)


@pytest.mark.parametrize("auth", [None, "Bearer tie_wrong", "Basic abc", "Bearer ", "Bearer " + "tie_" + "x" * 500])
async def test_enroll_with_bad_secret_is_401(service, auth):
    headers = {**JSON, **({"Authorization": auth} if auth else {})}
    status, body, h = await service.request("POST", "/v1/enroll", data=orjson.dumps({"install_id": str(uuid.uuid4())}), headers=headers)
    assert status == 401 and is_problem(body, h, 401)
    assert "WWW-Authenticate" in h


async def test_enroll_with_installation_token_is_403(service):
    _, token = await service.enroll()
    status, body, h = await service.request("POST", "/v1/enroll", token=token, json={"install_id": str(uuid.uuid4())})
    assert status == 403 and is_problem(body, h, 403)


async def test_enroll_bad_bodies(service):
    secret = service.create_secret()
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": "not-a-uuid"})
    assert status == 422
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, json={})
    assert status == 422
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, data=b"{nope", headers=JSON)
    assert status == 400
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, data=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415


# ------------------------------------------------------------------ heartbeats


async def test_heartbeat_is_stored_when_acknowledged(service, db):
    install_id, token = await service.enroll()
    status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 200 and body == {"stored": True, "dropped_fields": []}
    cur = await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id)
    assert (cur["license_type"], cur["version"], cur["asset_count"], cur["db_server_type"], cur["web_server_type"]) == (
        "enterprise", "4.2.1", 120, "postgresql", "nginx")
    assert cur["last_seen_at"] is not None
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 1
    # a second heartbeat updates the current record and appends history
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, version="4.3.0", asset_count=7))
    assert status == 200
    cur = await db.fetchrow("SELECT version, asset_count FROM installations WHERE install_id = $1", install_id)
    assert tuple(cur) == ("4.3.0", 7)
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 2


async def test_unknown_fields_dropped_and_reported(service, db):
    install_id, token = await service.enroll()
    body = heartbeat_body(install_id, hostname="secret-host", extra={"nested": {"deep": "secret-nested"}}, ip="10.1.2.3")
    status, resp, _ = await service.request("POST", "/v1/heartbeats", token=token, json=body)
    assert status == 200
    assert sorted(resp["dropped_fields"]) == ["extra", "hostname", "ip"]
    dump = str([dict(r) for t in ("installations", "heartbeats") for r in await db.fetch(f"SELECT * FROM {t}")])
    assert "secret-host" not in dump and "secret-nested" not in dump and "10.1.2.3" not in dump
    metrics = (await service.request("GET", "/metrics"))[1]
    assert 'telemetry_fields_dropped_total{category="installation"} 3.0' in metrics


async def test_unknown_fields_rejected_in_reject_mode(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, unknown_fields="reject") as svc:
        install_id, token = await svc.enroll()
        status, body, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, hostname="x"))
        assert status == 422 and "hostname" in body["detail"]
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0
        status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
        assert status == 200


@pytest.mark.parametrize(
    "change",
    [
        {"license_type": None},
        {"license_type": 5},
        {"license_type": "x" * 33},
        {"version": "1.0 beta"},
        {"version": ""},
        {"asset_count": -1},
        {"asset_count": 10_000_001},
        {"asset_count": "12"},
        {"asset_count": 1.5},
        {"asset_count": True},
        {"email": "not-an-email"},
        {"email": "a" * 250 + "@b.example"},
        {"db_server_type": ["x"]},
        {"install_id": "123"},
    ],
)
async def test_invalid_fields_are_422_and_store_nothing(service, db, change):
    install_id, token = await service.enroll()
    body = heartbeat_body(install_id)
    for k, v in change.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    status, resp, headers = await service.request("POST", "/v1/heartbeats", token=token, json=body)
    assert status == 422 and is_problem(resp, headers, 422)
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0


async def test_missing_install_id_is_422(service):
    install_id, token = await service.enroll()
    body = heartbeat_body(install_id)
    del body["install_id"]
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=body)
    assert status == 422


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b""])
async def test_not_a_json_object_is_400(service, db, raw):
    _, token = await service.enroll()
    status, body, headers = await service.request("POST", "/v1/heartbeats", token=token, data=raw, headers=JSON)
    assert status == 400 and is_problem(body, headers, 400)
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0


async def test_other_installation_is_403(service, db):
    a, _ = await service.enroll()
    _, token_b = await service.enroll()
    status, body, headers = await service.request("POST", "/v1/heartbeats", token=token_b, json=heartbeat_body(a))
    assert status == 403 and is_problem(body, headers, 403)
    assert await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", a) is None


async def test_auth_failures(service):
    install_id, token = await service.enroll()
    body = heartbeat_body(install_id)
    assert (await service.request("POST", "/v1/heartbeats", json=body))[0] == 401
    assert (await service.request("POST", "/v1/heartbeats", token="tii_" + "A" * 43, json=body))[0] == 401
    admin = service.create_secret("admin-token")
    assert (await service.request("POST", "/v1/heartbeats", token=admin, json=body))[0] == 403
    secret = service.create_secret()
    assert (await service.request("POST", "/v1/heartbeats", token=secret, json=body))[0] == 403


async def test_size_limit_with_and_without_content_length(service, db):
    install_id, token = await service.enroll()
    big = orjson.dumps(heartbeat_body(install_id, pad="x" * (1 << 20)))
    status, body, headers = await service.request("POST", "/v1/heartbeats", token=token, data=big, headers=JSON)
    assert status == 413 and is_problem(body, headers, 413)

    async def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with service.http.post(service.url + "/v1/heartbeats", data=chunks(),
                                 headers={**JSON, "Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 413
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0


async def test_compressed_heartbeats(service, db):
    install_id, token = await service.enroll()
    raw = orjson.dumps(heartbeat_body(install_id))
    for enc, data in (("gzip", gzip.compress(raw)), ("zstd", zstandard.ZstdCompressor().compress(raw))):
        status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, data=data, headers={**JSON, "Content-Encoding": enc})
        assert status == 200, body
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 2
    # inflating past the limit is 413, an unknown encoding 415, a corrupt stream 400
    bomb = gzip.compress(b"{" + b" " * (2 << 20) + b"}")
    assert (await service.request("POST", "/v1/heartbeats", token=token, data=bomb, headers={**JSON, "Content-Encoding": "gzip"}))[0] == 413
    assert (await service.request("POST", "/v1/heartbeats", token=token, data=raw, headers={**JSON, "Content-Encoding": "br"}))[0] == 415
    assert (await service.request("POST", "/v1/heartbeats", token=token, data=b"garbage", headers={**JSON, "Content-Encoding": "gzip"}))[0] == 400
    assert (await service.request("POST", "/v1/heartbeats", token=token, data=raw, headers={"Content-Type": "text/plain"}))[0] == 415
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 2


async def test_ip_is_anonymised_and_xff_ignored_from_untrusted_peer(service, db):
    install_id, token = await service.enroll()
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id),
                                         headers={"X-Forwarded-For": "198.51.100.77"})
    assert status == 200
    stored = await db.fetchval("SELECT ip_prefix FROM installations WHERE install_id = $1", install_id)
    assert stored == ipaddress.ip_network("127.0.0.0/24")
    assert await db.fetchval("SELECT ip_prefix FROM heartbeats WHERE install_id = $1", install_id) == stored
    dump = str([dict(r) for t in ("installations", "heartbeats") for r in await db.fetch(f"SELECT * FROM {t}")])
    assert "127.0.0.1" not in dump and "198.51.100" not in dump


async def test_xff_believed_from_trusted_proxy(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),)) as svc:
        install_id, token = await svc.enroll()
        for xff, expected in (("198.51.100.77", "198.51.100.0/24"), ("2001:db8:abcd:12::1, 127.0.0.5", "2001:db8:abcd::/48")):
            status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id), headers={"X-Forwarded-For": xff})
            assert status == 200
            assert await db.fetchval("SELECT ip_prefix FROM installations WHERE install_id = $1", install_id) == ipaddress.ip_network(expected)
        dump = str([dict(r) for r in await db.fetch("SELECT * FROM heartbeats")])
        assert "198.51.100.77" not in dump and "2001:db8:abcd:12" not in dump


async def test_email_is_encrypted_at_rest(service, db, master_key, ks):
    install_id, token = await service.enroll()
    email = f"admin-{uuid.uuid4().hex[:8]}@example.org"
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
    assert status == 200
    for conn, table in ((db, "installations"), (db, "heartbeats"), (db, "tokens"), (db, "audit_log"), (ks, "data_keys")):
        text = await conn.fetchval(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {table} t")
        assert email not in text and email.encode().hex() not in text
    ct = await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id)
    # readable with the installation's data key, and only in its own context
    kid, kek, wrapped = await ks.fetchrow("SELECT key_id, kek_id, wrapped FROM data_keys WHERE install_id = $1", install_id)
    key = DataKey.from_bytes(kid, KeyRing.from_setting(master_key).unwrap(kek, wrapped, wrap_context(install_id, kid)))
    assert open_(key, ct, email_context(install_id)).decode() == email
    with pytest.raises(Exception):
        open_(key, ct, email_context(uuid.uuid4()))


async def test_revoked_token_is_refused(service):
    install_id, token = await service.enroll()
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 200
    out = service.cli("tokens", "revoke", "-", input=token + "\n").stdout
    assert "revoked tid_" in out
    # the follower polls every 0.25 s; run one poll now instead of sleeping
    from ingest.keys import AUTH

    await service.app[AUTH].poll_revocations()
    status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 401
    assert service.cli("tokens", "revoke", "-", input=token, check=False).returncode == 1


async def test_revoke_by_id(service, db):
    secret = service.create_secret()
    token_id = await db.fetchval("SELECT token_id FROM tokens WHERE role = 'enroll'")
    service.cli("tokens", "revoke", token_id)
    status, _, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(uuid.uuid4())})
    assert status == 401
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["enroll_secret.create", "token.revoke"]


async def test_concurrent_heartbeats_are_group_committed(service, db):
    installs = [await service.enroll(secret=None) for _ in range(4)]
    n = 200

    async def send(i):
        install_id, token = installs[i % len(installs)]
        return (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, asset_count=i)))[0]

    statuses = await asyncio.gather(*(send(i) for i in range(n)))
    assert statuses == [200] * n
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == n
    assert sorted(r[0] for r in await db.fetch("SELECT asset_count FROM heartbeats")) == list(range(n))
    # rows written by one transaction share its xmin: fewer distinct xmins than rows means batching
    transactions = await db.fetchval("SELECT count(DISTINCT xmin::text) FROM heartbeats")
    assert transactions < n
    metrics = (await service.request("GET", "/metrics"))[1]
    assert f'telemetry_batch_rows_sum{{writer="heartbeat"}} {float(n)}' in metrics


async def test_full_queue_answers_503_with_retry_after(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, queue_size=1, batch_max_rows=1, db_timeout=15) as svc:
        install_id, token = await svc.enroll()
        # Hold the installation's row lock so the writer's batches cannot commit.
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        tasks = [asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, asset_count=i))) for i in range(8)]
        taken = HEARTBEAT_FLUSHERS + 1  # a batch of one being written per flusher, and one queued
        done = []
        for _ in range(200):
            done = [t for t in tasks if t.done()]
            if len(done) >= 8 - taken:  # the others must be refused
                break
            await asyncio.sleep(0.02)
        refused = [t.result() for t in done]
        assert len(refused) == 8 - taken and all(s == 503 and h.get("Retry-After") for s, _, h in refused)
        await tx.rollback()
        results = await asyncio.gather(*tasks)
        accepted = [r for r in results if r[0] == 200]
        assert len(accepted) == taken
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == taken


async def test_shutdown_commits_queued_heartbeats(db_dsn, master_key, tmp_path, db):
    ctx = start_service(db_dsn, master_key, tmp_path, db_timeout=15)  # the test holds a row lock
    svc = await ctx.__aenter__()
    install_id, token = await svc.enroll()
    tx = db.transaction()
    await tx.start()
    await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
    tasks = [asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))) for _ in range(20)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in tasks)
    stopping = asyncio.create_task(ctx.__aexit__(None, None, None))
    await asyncio.sleep(0.2)
    await tx.rollback()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await stopping
    ok = [r for r in results if not isinstance(r, BaseException) and r[0] == 200]
    assert len(ok) == 20
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 20


async def test_ops_endpoints_and_metrics_hold_no_identifiers(service):
    install_id, token = await service.enroll()
    email = "someone@example.org"
    await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
    await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, bad=1))
    await service.request("GET", f"/v1/installations/{install_id}")  # unknown route with an id in it
    assert (await service.request("GET", "/healthz"))[0] == 200
    assert (await service.request("GET", "/readyz"))[0] == 200
    status, text, headers = await service.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("telemetry_requests_total", "telemetry_request_duration_seconds_bucket", "telemetry_request_bytes_total",
                 "telemetry_fields_dropped_total", "telemetry_batch_rows_bucket", "telemetry_flush_duration_seconds_bucket",
                 "telemetry_queue_depth", "telemetry_db_pool_connections", "telemetry_encrypt_duration_seconds_bucket"):
        assert name in text, name
    for secret in (str(install_id), token, email, "127.0.0.1", install_id.hex):
        assert secret not in text


async def test_encrypt_duration_measures_sealing_not_the_data_key_load(db_dsn, master_key, tmp_path, ks):
    """The first heartbeat with an e-mail loads the data key; a lock makes that load wait 1 s. The
    seal itself takes microseconds, and that is all telemetry_encrypt_duration_seconds may show."""
    async with start_service(db_dsn, master_key, tmp_path, db_timeout=10) as svc:
        install_id, token = await svc.enroll()
        tx = ks.transaction()
        await tx.start()
        await ks.execute("LOCK TABLE data_keys IN ACCESS EXCLUSIVE MODE")
        sent = asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token,
                                               json=heartbeat_body(install_id, email="ops@example.com")))
        await asyncio.sleep(1.0)
        await tx.rollback()
        status, body, _ = await sent
        assert status == 200, body
        registry = svc.app[METRICS].registry
        labels = {"category": "installation"}
        assert registry.get_sample_value("telemetry_encrypt_duration_seconds_count", labels) == 1
        assert registry.get_sample_value("telemetry_encrypt_duration_seconds_sum", labels) < 0.5


async def _sampled(registry, name: str, labels: dict, want, timeout: float = 5.0):
    """Wait (up to timeout) until the gauge satisfies want(value); its last value. Nothing here scrapes /metrics."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = registry.get_sample_value(name, labels)
        if (value is not None and want(value)) or loop.time() > end:
            return value
        await asyncio.sleep(0.1)


async def test_pool_gauges_are_sampled_without_a_scrape_against_the_pools_maximum(db_dsn, master_key, tmp_path):
    async with start_service(db_dsn, master_key, tmp_path, db_pool_size=7) as svc:
        registry, pool = svc.app[METRICS].registry, svc.app[POOL]
        held = [await pool.acquire() for _ in range(3)]
        try:
            in_use = await _sampled(registry, "telemetry_db_pool_connections", {"state": "in_use"}, lambda v: v >= 3)
            assert in_use is not None and in_use >= 3
        finally:
            for conn in held:
                await pool.release(conn)
        assert registry.get_sample_value("telemetry_db_pool_connections", {"state": "max"}) == 7
        assert await _sampled(registry, "telemetry_db_pool_connections", {"state": "in_use"}, lambda v: v < 3) < 3


async def test_queue_fill_ratio_can_reach_the_alert_threshold_on_one_worker(db_dsn, master_key, tmp_path, db):
    """With the database holding every write, the heartbeat queue fills: its fill ratio (what
    TelemetryIngestQueueDepthHigh compares with 0.5) reaches 1, which a record count over the
    queue's own size never could."""
    async with start_service(db_dsn, master_key, tmp_path, queue_size=4, batch_max_rows=1, db_timeout=10) as svc:
        install_id, token = await svc.enroll()
        registry = svc.app[METRICS].registry
        assert await _sampled(registry, "telemetry_queue_fill_ratio", {"writer": "heartbeat"}, lambda v: True) == 0
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        sent = [asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))
                for _ in range(4 + HEARTBEAT_FLUSHERS)]  # one taken by each flusher (a batch of one), four queued
        try:
            fill = await _sampled(registry, "telemetry_queue_fill_ratio", {"writer": "heartbeat"}, lambda v: v >= 1.0)
        finally:
            await tx.rollback()
        statuses = [(await t)[0] for t in sent]
        assert fill == 1.0, fill
        assert statuses == [200] * (4 + HEARTBEAT_FLUSHERS)


async def test_method_not_allowed_is_a_problem_with_allow(service):
    status, body, headers = await service.request("PUT", "/v1/heartbeats", json={})
    assert status == 405 and body["type"].endswith("/method-not-allowed")
    assert headers["Allow"] == "POST"


async def test_the_batch_function_finds_every_row_by_index_whatever_the_tables_size(db):
    """write_heartbeat_batch runs with generic plans (migrations 0015 and 0016) whose joins are nested
    loops of primary-key lookups (migration 0022): with a few hundred installations and tokens, where
    a generic plan (which takes a batch for ten rows) read whole tables into hash joins, and with
    thousands, where it took bitmap scans over `= ANY(array)`. The plans are the function's own, as
    auto_explain logs each statement it runs, not a copy of its text."""
    import datetime as dt
    import re

    from crypto.tokens import new_token
    from storage.installations import HeartbeatRow, write_heartbeats
    from storage.partitions import ensure_partitions

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date())
    config = await db.fetchval("SELECT proconfig FROM pg_proc WHERE oid = 'write_heartbeat_batch(heartbeat_row[])'::regprocedure")
    assert config == ["plan_cache_mode=force_generic_plan", "enable_hashjoin=off", "enable_mergejoin=off"]
    try:
        await db.execute("LOAD 'auto_explain'")
    except asyncpg.PostgresError as exc:  # a server of one's own (TELEMETRY_TEST_DSN) may not allow it
        pytest.skip(f"auto_explain cannot be loaded on this server: {exc}")
    messages: list[str] = []
    db.add_log_listener(lambda conn, message: messages.append(message.message))
    known: list[tuple[uuid.UUID, str]] = []
    for fleet in (300, 3000):
        fresh = [(uuid.uuid4(), new_token("installation")) for _ in range(fleet - len(known))]
        await db.executemany("INSERT INTO installations (install_id) VALUES ($1)", [(i,) for i, _ in fresh])
        await db.executemany("INSERT INTO tokens (token_id, token_hash, role, install_id) VALUES ($1, $2, 'installation', $3)",
                             [(tid, digest, i) for i, (tid, _, digest) in fresh])
        known += [(i, tid) for i, (tid, _, _) in fresh]
        await db.execute("ANALYZE installations; ANALYZE tokens")  # (invalidates the cached plans: made again)
        await db.execute("SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; "
                         "SET auto_explain.log_level = notice; SET client_min_messages = notice")
        now = dt.datetime.now(dt.timezone.utc)
        batch = [HeartbeatRow(i, now + dt.timedelta(microseconds=n), "pro", "4.2.0", 1, None, None, None, "192.0.2.0/24", tid)
                 for n, (i, tid) in enumerate(known[:: fleet // 12])]
        messages.clear()
        assert await write_heartbeats(db, batch) == ["stored"] * len(batch)
        await db.execute("RESET auto_explain.log_min_duration; RESET client_min_messages")
        for _ in range(50):  # notices arrive with the call's answer; give the listener its turn
            if sum("Query Text" in m for m in messages) >= 3:  # the call and its two statements
                break
            await asyncio.sleep(0.01)
        locking = [m for m in messages if "Query Text" in m and "FOR UPDATE OF i" in m]
        judging = [m for m in messages if "Query Text" in m and "INSERT INTO heartbeats" in m]
        assert len(locking) == 1 and len(judging) == 1, messages
        for plan in locking + judging:
            assert not re.search(r"Seq Scan on (installations|tokens)|Bitmap|Hash( \w+)* Join|Merge", plan), plan
        # each lookup by the batch's key (an ordered walk of a whole index would also read "Index Scan")
        assert re.search(r"Index Scan using installations_pkey .*\n\s*Index Cond: \(install_id = b\.install_id\)",
                         locking[0]), locking[0]
        assert re.search(r"Index Scan using installations_pkey .*\n\s*Index Cond: \(install_id = u\.install_id\)",
                         judging[0]), judging[0]
        assert re.search(r"Index Scan using tokens_pkey .*\n\s*Index Cond: \(token_id = u\.token_id\)",
                         judging[0]), judging[0]


async def test_current_record_updates_are_heap_only(db):
    """A heartbeat that changes its installation's current record rewrites it: no index may cover a
    column it changes (last_seen_at among them, in a key or a partial index's predicate), so PostgreSQL
    can update the row in place (HOT) without touching the indexes (migration 0014)."""
    import datetime as dt

    from storage import installations
    from storage.partitions import ensure_partitions

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date())
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", install_id)
    async with db.transaction():  # pg_stat_xact_user_tables counts this transaction's own updates
        for n in range(3):
            row = installations.HeartbeatRow(install_id, dt.datetime.now(dt.timezone.utc), "enterprise", f"4.2.{n}", n,
                                             "postgresql", None, b"sealed", "192.0.2.0/24")
            assert await installations.write_heartbeats(db, [row]) == [installations.STORED]
        upd, hot = await db.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'installations'")
    assert upd == 3 and hot == 3
    for column in ("last_seen_at", "heartbeat_at"):  # the columns every heartbeat's update sets
        covered = await db.fetchval(
            "SELECT count(*) FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attname = $1 "
            "WHERE x.indrelid = 'installations'::regclass AND (a.attnum = ANY(x.indkey) "
            "OR pg_get_expr(x.indpred, x.indrelid) LIKE '%' || $1 || '%')", column)
        assert covered == 0, column


_CHANGES = {"license_type": "enterprise", "version": "1.1", "asset_count": 6, "db_server_type": "postgresql",
            "web_server_type": None, "email_ct": b"sealed-2", "ip_prefix": "198.51.100.0/24"}


async def _repeat_fixture(db):
    """An installation whose current record holds `first` (received at t0), and a writer that returns its row."""
    import datetime as dt

    from storage import installations
    from storage.partitions import ensure_partitions

    t0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    await ensure_partitions(db, t0.date())
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", install_id)
    first = installations.HeartbeatRow(install_id, t0, "pro", "1.0", 5, None, "nginx", b"sealed-1", "192.0.2.0/24")

    async def write(*rows):
        assert await installations.write_heartbeats(db, list(rows)) == [installations.STORED] * len(rows)
        return await db.fetchrow("SELECT xmin::text AS row_version, * FROM installations WHERE install_id = $1", install_id)

    before = await write(first)
    assert before["last_seen_at"] == t0 and before["email_ct"] == b"sealed-1"
    return first, write, before


@pytest.mark.parametrize("change", [*_CHANGES, "e-mail cleared", "a second later"])
async def test_a_heartbeat_that_repeats_the_current_record_leaves_the_row_alone(db, change):
    """Data migration 0017: a stored heartbeat that repeats its installation's current record, less
    than a second after the heartbeat it came from (heartbeat_at since 0019), is appended to the history and leaves the row as it was (no new
    row version); one that differs in any field (an e-mail left out clears the stored one), or comes a
    second or more later, rewrites it."""
    import datetime as dt

    first, write, before = await _repeat_fixture(db)
    t0 = first.received_at
    repeat = await write(first._replace(received_at=t0 + dt.timedelta(milliseconds=999)))
    assert repeat["row_version"] == before["row_version"] and repeat["last_seen_at"] == t0
    if change == "a second later":
        row = first._replace(received_at=t0 + dt.timedelta(seconds=1))
    else:
        field, value = ("email_ct", None) if change == "e-mail cleared" else (change, _CHANGES[change])
        row = first._replace(received_at=t0 + dt.timedelta(milliseconds=999), **{field: value})
    after = await write(row)
    assert after["row_version"] != before["row_version"] and after["last_seen_at"] == row.received_at
    stored = {"ip_prefix": str(after["ip_prefix"]),
              "email_ct": None if after["email_ct"] is None else bytes(after["email_ct"])}
    assert all(stored.get(f, after[f]) == getattr(row, f) for f in _CHANGES)
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", first.install_id) == 3


async def test_a_repeat_judged_by_the_batch_s_latest_heartbeat_and_never_moving_last_seen_back(db):
    """The batch's latest heartbeat of an installation decides: an earlier one that differs is history only.
    A repeat stamped before last_seen_at (another worker's clock) leaves last_seen_at where it is. The
    ten-array form of older code (migration 0014) takes the same path."""
    import datetime as dt

    first, write, before = await _repeat_fixture(db)
    t0 = first.received_at
    after = await write(first._replace(received_at=t0 + dt.timedelta(milliseconds=300), version="1.1"),
                        first._replace(received_at=t0 + dt.timedelta(milliseconds=600)))
    assert after["row_version"] == before["row_version"] and after["version"] == "1.0"
    skewed = await write(first._replace(received_at=t0 - dt.timedelta(seconds=5)))
    assert skewed["row_version"] == before["row_version"] and skewed["last_seen_at"] == t0
    row = first._replace(received_at=t0 + dt.timedelta(milliseconds=900))
    outcomes = await db.fetchval(
        "SELECT write_heartbeat_batch($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::int[], "
        "$6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[])", *[[v] for v in row])
    assert outcomes == ["stored"]
    assert await db.fetchval("SELECT xmin::text FROM installations WHERE install_id = $1", first.install_id) == before["row_version"]
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", first.install_id) == 5


async def test_a_changed_heartbeat_committed_after_a_later_one_is_history_only(db):
    """Data migrations 0018 and 0019: heartbeats of one installation may commit out of order (two
    workers, two nodes). One received before the heartbeat the current record came from, changed or
    not, even by a microsecond, is appended to the history and leaves the record as the later one made
    it; one received at or after it still rewrites it."""
    import datetime as dt

    first, write, before = await _repeat_fixture(db)
    t0 = first.received_at
    for earlier in (dt.timedelta(seconds=2), dt.timedelta(microseconds=1)):
        late = await write(first._replace(received_at=t0 - earlier, version="0.9", asset_count=1, email_ct=b"sealed-0"))
        assert late["row_version"] == before["row_version"]
        assert (late["last_seen_at"], late["version"], late["asset_count"], bytes(late["email_ct"])) == (t0, "1.0", 5, b"sealed-1")
    same_time = await write(first._replace(version="1.1"))
    assert same_time["row_version"] != before["row_version"] and same_time["version"] == "1.1"
    assert same_time["last_seen_at"] == same_time["heartbeat_at"] == t0
    history = await db.fetch("SELECT received_at, version FROM heartbeats WHERE install_id = $1 ORDER BY received_at, version",
                             first.install_id)
    assert [(r["received_at"], r["version"]) for r in history] == [
        (t0 - dt.timedelta(seconds=2), "0.9"), (t0 - dt.timedelta(microseconds=1), "0.9"), (t0, "1.0"), (t0, "1.1")]


async def test_a_heartbeat_is_judged_by_its_own_time_not_by_last_seen_at_which_records_move(db):
    """Data migration 0019: a stored record moves last_seen_at to the database's clock
    (storage.records.write_records), possibly past a heartbeat received earlier and committed later; that heartbeat
    still updates the current record (judged against heartbeat_at), and last_seen_at does not move
    back. Within one batch, the latest heartbeat of an installation by receipt time decides, whatever
    its position (at equal times, the later one in the batch)."""
    import datetime as dt

    from storage import records

    first, write, before = await _repeat_fixture(db)
    t0 = first.received_at  # the fixture's now, cut to the second
    record = records.RecordRow("diagnostic", first.install_id, "r-1", dt.datetime.now(dt.timezone.utc), 24, b"{}",
                               None, None, None, None, False)
    assert [o.status for o in await records.write_records(db, [record])] == [records.STORED]
    record_time = await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", first.install_id)
    received = t0 + dt.timedelta(microseconds=1)  # after the record's heartbeat, before the stored record
    assert received < record_time
    after = await write(first._replace(received_at=received, version="1.1"))
    assert after["version"] == "1.1" and after["heartbeat_at"] == received
    assert after["last_seen_at"] == record_time
    batch = await write(first._replace(received_at=t0 + dt.timedelta(seconds=12), version="2.0"),
                        first._replace(received_at=t0 + dt.timedelta(seconds=11), version="1.5"))
    assert batch["version"] == "2.0" and batch["heartbeat_at"] == batch["last_seen_at"] == t0 + dt.timedelta(seconds=12)
    same = t0 + dt.timedelta(seconds=13)  # received at the same time: the later in the batch decides
    tie = await write(first._replace(received_at=same, version="3.0"), first._replace(received_at=same, version="3.1"))
    assert tie["version"] == "3.1" and tie["heartbeat_at"] == same


async def test_a_record_from_before_heartbeat_at_is_judged_against_last_seen_at(db):
    """Data migration 0020: an installation whose current record was written before heartbeat_at existed
    (heartbeat_at NULL, last_seen_at set) is judged against last_seen_at, so an older changed heartbeat is
    history only there too; its first heartbeat at or after last_seen_at sets heartbeat_at."""
    import datetime as dt

    first, write, before = await _repeat_fixture(db)
    t0 = first.received_at
    await db.execute("UPDATE installations SET heartbeat_at = NULL WHERE install_id = $1", first.install_id)
    before = await db.fetchrow("SELECT xmin::text AS row_version FROM installations WHERE install_id = $1", first.install_id)
    older = await write(first._replace(received_at=t0 - dt.timedelta(seconds=5), version="0.1"))
    assert older["row_version"] == before["row_version"] and older["version"] == "1.0" and older["heartbeat_at"] is None
    newer = await write(first._replace(received_at=t0 + dt.timedelta(milliseconds=10), version="1.1"))
    assert newer["version"] == "1.1" and newer["heartbeat_at"] == t0 + dt.timedelta(milliseconds=10)


async def test_repeated_seals_hand_out_one_ciphertext_per_email_and_key():
    """The heartbeat path's e-mail sealing (ingest.pipeline.sealed.RepeatedSeals): the same e-mail under the
    same data key gets the same ciphertext again, which opens to it; another e-mail, another data key (a new
    epoch, or a key of the same id after an erasure and re-enrollment) or another installation is sealed
    anew; the oldest entry goes past the bound, and no e-mail is kept in plaintext."""
    import os

    from ingest.pipeline.sealed import RepeatedSeals

    seals = RepeatedSeals(max_entries=2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    key1, key2, key1_again = DataKey.from_bytes(1, os.urandom(32)), DataKey.from_bytes(2, os.urandom(32)), DataKey.from_bytes(1, os.urandom(32))
    first, sealed_now = seals.seal(key1, a, "ops@example.org")
    assert sealed_now and seals.seal(key1, a, "ops@example.org") == (first, False)
    assert open_(key1, first, email_context(a)) == b"ops@example.org"
    other, sealed_now = seals.seal(key1, a, "it@example.org")
    assert sealed_now and other != first and open_(key1, other, email_context(a)) == b"it@example.org"
    again, sealed_now = seals.seal(key1, a, "ops@example.org")
    assert sealed_now and again not in (first, other)  # the entry holds the last e-mail only
    for key in (key2, key1_again):
        fresh, sealed_now = seals.seal(key, a, "ops@example.org")
        assert sealed_now and open_(key, fresh, email_context(a)) == b"ops@example.org"
    elsewhere, sealed_now = seals.seal(key1, b, "ops@example.org")
    assert sealed_now and open_(key1, elsewhere, email_context(b)) == b"ops@example.org"
    seals.seal(key1, c, "ops@example.org")
    assert len(seals) == 2 and a not in seals and b in seals
    seals.forget(b)
    assert b not in seals and len(seals) == 1
    assert b"ops@example.org" not in repr(seals._last).encode() and "ops@example.org" not in repr(seals._last)


async def test_a_worker_forgets_a_sealed_email_once_its_installation_s_token_is_revoked(service):
    """A revoked installation token (an erasure revokes them all) drops the installation's entry from
    the worker's repeated seals, as it drops its data keys: nothing of it stays for the next heartbeat."""
    from ingest.keys import AUTH, EMAIL_SEALS

    install_id, token = await service.enroll()
    body = heartbeat_body(install_id, email="ops@example.org")
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=body))[0] == 200
    seals = service.app[EMAIL_SEALS]
    assert install_id in seals
    assert service.cli("tokens", "revoke", "-", input=token + "\n").returncode == 0
    await service.app[AUTH].poll_revocations()
    assert install_id not in seals


async def test_a_repeated_heartbeat_over_http_keeps_the_row_and_its_email(service, db):
    """End to end: the same heartbeat twice within a second is two history rows and one version of the
    current record (the worker handed out the e-mail's ciphertext again)."""
    import datetime as dt

    install_id, token = await service.enroll()
    body = heartbeat_body(install_id, email="ops@example.org")
    versions = set()
    for _ in range(2):
        assert (await service.request("POST", "/v1/heartbeats", token=token, json=body))[0] == 200
        versions.add(await db.fetchval("SELECT xmin::text FROM installations WHERE install_id = $1", install_id))
    received = [r[0] for r in await db.fetch(
        "SELECT received_at FROM heartbeats WHERE install_id = $1 ORDER BY received_at", install_id)]
    last_seen = await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", install_id)
    assert len(received) == 2
    if received[1] - received[0] < dt.timedelta(seconds=1):  # the second left the row alone: same ciphertext
        assert len(versions) == 1 and last_seen == received[0]
    else:  # the second came a second or more later (a slow machine): it rewrote the row
        assert len(versions) == 2 and last_seen == received[1]


async def test_the_ten_array_form_of_older_code_judges_and_writes_as_the_row_form(db):
    """Older code on the new schema (a rolling upgrade) calls write_heartbeat_batch with ten arrays
    (migration 0014); since 0016 that form hands its batch to the row form: stored, gone, revoked and
    restricted alike, in order, and the history and current record written."""
    import datetime as dt
    import ipaddress

    from storage import installations
    from storage.partitions import ensure_partitions

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date())
    live, revoked, restricted = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.executemany("INSERT INTO installations (install_id, restricted) VALUES ($1, $2)",
                         [(live, False), (revoked, False), (restricted, True)])
    await db.executemany("INSERT INTO tokens (token_id, token_hash, role, install_id, revoked_at) VALUES ($1, $2, 'installation', $3, $4)",
                         [("tok-live", b"a" * 32, live, None), ("tok-revoked", b"b" * 32, revoked, dt.datetime.now(dt.timezone.utc))])
    now = dt.datetime.now(dt.timezone.utc)
    rows = [installations.HeartbeatRow(i, now, "pro", "1.0", 1, None, None, b"sealed", "192.0.2.0/24", token)
            for i, token in [(live, "tok-live"), (uuid.uuid4(), None), (revoked, "tok-revoked"), (restricted, None),
                             (live, None)]]
    columns = [list(c) for c in zip(*rows)]
    outcomes = await db.fetchval(
        "SELECT write_heartbeat_batch($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::int[], "
        "$6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[])", *columns)
    assert outcomes == [installations.STORED, installations.GONE, installations.REVOKED, installations.RESTRICTED,
                        installations.STORED]
    # the row form, with the address prefix also given as an ipaddress network (the non-request callers)
    rows[-1] = rows[-1]._replace(ip_prefix=ipaddress.ip_network("2001:db8:1::/48"))
    assert await installations.write_heartbeats(db, rows) == outcomes
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", live) == 4
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = ANY($1)", [revoked, restricted]) == 0
    assert await db.fetchval("SELECT ip_prefix::text FROM installations WHERE install_id = $1", live) == "2001:db8:1::/48"


async def test_deferred_metric_writes_equal_direct_ones():
    """The tally (ingest.metrics.Tally) writes the same values as direct calls would."""
    from prometheus_client import generate_latest

    from ingest.metrics import Metrics

    direct, deferred = Metrics(), Metrics()
    samples = [0.0005, 0.001, 0.003, 0.2, 7.0, 99.0, 0.001]
    for i, seconds in enumerate(samples):
        direct.requests.labels("/r", "POST", "200").inc()
        direct.latency.labels("/r").observe(seconds)
        direct.request_bytes.labels("/r", "wire").inc(i * 10)
        direct.reject("auth")
        deferred.observe_request("/r", "POST", 200, seconds)
        deferred.deferred(deferred.request_bytes.labels("/r", "wire")).inc(i * 10)
        deferred.reject("auth")
    def values(m):  # every sample but the _created timestamps
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]

    assert values(deferred) != values(direct)  # not yet written: the turn is not over
    await asyncio.sleep(0)
    assert values(deferred) == values(direct)
    assert 'telemetry_request_duration_seconds_bucket{le="0.001",route="/r"} 3.0' in values(deferred)


async def test_a_restriction_committed_while_the_batch_waits_for_its_lock_wins(db, db_dsn):
    """The batch function locks the installations first and judges in a fresh snapshot afterwards: a
    restriction that holds the row lock and commits while the batch waits for it is seen (nothing stored)."""
    import datetime as dt

    from storage import installations
    from storage.partitions import ensure_partitions
    from storage.pool import connect

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date())
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", install_id)
    admin = await connect(db_dsn)
    writer = await connect(db_dsn)
    try:
        tx = admin.transaction()
        await tx.start()
        await admin.execute("UPDATE installations SET restricted = true WHERE install_id = $1", install_id)
        row = installations.HeartbeatRow(install_id, dt.datetime.now(dt.timezone.utc), "enterprise", "4.2.1", 1,
                                         None, None, None, None)
        batch = asyncio.create_task(installations.write_heartbeats(writer, [row]))
        pid = writer.get_server_pid()
        while not await db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid):
            await asyncio.sleep(0.01)  # until the batch waits for the row lock
        await tx.commit()
        assert await batch == [installations.RESTRICTED]
    finally:
        await admin.close()
        await writer.close()
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0
    assert await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", install_id) is None
