"""Hostile callers of authentication and enrollment (issue 12, points 4-7), against the real service over HTTP.

Revoked tokens stop writing at once; unknown tokens cost no database round trip each; a
prefix sending too fast is refused before authentication; enrollment secrets run out and
expire; quotas answer 429 naming the quota; no secret is taken from the command line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid

import pytest

from storage.pool import connect
from tests.fault_tools import agent_of, raw_http, scan_body
from tests.support import heartbeat_body, run_cli, start_service


async def scans_of(db, agent_id: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM scans WHERE agent_id = $1", agent_id)


# ------------------------------------------------------------------ 4. revocation at once for writes


async def test_a_deleted_agent_cannot_store_a_scan_even_on_a_worker_that_still_caches_its_token(db_dsn, master_key, tmp_path, db):
    """Two workers on one database: A deletes the agent, B (whose cache still holds the token, and whose
    follower polls only every 0.25 s) receives scans right after the 204, and one sent concurrently."""
    async with start_service(db_dsn, master_key, tmp_path / "a") as a, start_service(db_dsn, master_key, tmp_path / "b") as b:
        _, token = await a.enroll()
        for trial in range(10):
            agent_id, agent_token = await agent_of(a, token, f"agent-{trial}")
            # B caches the agent's token (and would keep it until its follower's next poll).
            assert (await b.request("POST", "/v1/scans", token=agent_token, json=scan_body()))[0] == 201
            racing = asyncio.create_task(b.request("POST", "/v1/scans", token=agent_token, json=scan_body()))
            status, _, _ = await a.request("DELETE", f"/v1/agents/{agent_id}", token=token)
            assert status == 204
            after, problem, _ = await b.request("POST", "/v1/scans", token=agent_token, json=scan_body())
            assert after == 401, (trial, after, problem)
            assert problem["status"] == 401
            raced, _, _ = await racing
            assert raced in (201, 401), raced
            # Whatever the race's answer, it is the truth: 201 only if stored, and nothing after the 204.
            assert await scans_of(db, agent_id) == 1 + (raced == 201), trial
        # The heartbeat path too: a revoked installation token stores nothing, at once, on the other worker.
        install_id, token2 = await a.enroll()
        assert (await b.request("POST", "/v1/heartbeats", token=token2, json=heartbeat_body(install_id)))[0] == 200
        token_id = await db.fetchval("SELECT token_id FROM tokens WHERE install_id = $1 AND role = 'installation'", install_id)
        a.cli("tokens", "revoke", token_id)
        status, problem, _ = await b.request("POST", "/v1/heartbeats", token=token2, json=heartbeat_body(install_id))
        assert status == 401, problem
        assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 1


async def _waiting_for_locks(db, n: int) -> None:
    """Until n other backends wait for a lock (within 30 s: on a loaded machine a request takes seconds to reach it).

    db must not be inside a transaction: PostgreSQL shows a transaction the backends as they were
    at its first look at pg_stat_activity, so a connection opened later would never be seen."""
    deadline = time.monotonic() + 30
    while await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()") < n:
        assert time.monotonic() < deadline, ("nobody is waiting", n, await db.fetch("SELECT wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity WHERE datname = current_database()"))
        await asyncio.sleep(0.02)


async def test_a_scan_queued_before_the_delete_answered_but_committed_after_it_is_refused(db_dsn, master_key, tmp_path, db):
    """The race made certain: the installation row is held, so the revocation and then the scan's batch both
    wait; the revocation commits first (204), the batch then sees it: 401 and nothing stored."""
    # db_timeout well above the waits below: a request must still be waiting on the lock when it is released.
    async with start_service(db_dsn, master_key, tmp_path / "a", db_timeout=90) as a, \
            start_service(db_dsn, master_key, tmp_path / "b", db_timeout=90) as b:
        install_id, token = await a.enroll()
        watcher = await connect(db_dsn)  # outside the transaction that holds the row (see _waiting_for_locks)
        for trial in range(3):
            agent_id, agent_token = await agent_of(a, token, f"agent-{trial}")
            assert (await b.request("POST", "/v1/scans", token=agent_token, json=scan_body()))[0] == 201  # B caches it
            tx = db.transaction()
            await tx.start()
            await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
            delete = asyncio.create_task(a.request("DELETE", f"/v1/agents/{agent_id}", token=token))
            await _waiting_for_locks(watcher, 1)
            scan = asyncio.create_task(b.request("POST", "/v1/scans", token=agent_token, json=scan_body()))
            await _waiting_for_locks(watcher, 2)
            await tx.commit()
            assert (await delete)[0] == 204
            status, problem, _ = await scan
            assert status == 401, (trial, status, problem)
            assert await scans_of(db, agent_id) == 1, trial
        await watcher.close()


# ------------------------------------------------------------------ 7. secrets never on the command line


def test_serve_offers_no_secret_flag_and_refuses_one(tmp_path):
    env = {"TELEMETRY_DATA_DIR": str(tmp_path / "none")}
    shown = run_cli("serve", "--help", env=env).stdout
    assert "--port" in shown  # the ordinary flags are there...
    for flag in ("--dsn", "--master-key", "--keystore-dsn"):
        assert flag not in shown  # ...the secret ones are not
    for flag, var in (("--dsn", "TELEMETRY_DSN"), ("--master-key", "TELEMETRY_MASTER_KEY")):
        proc = run_cli("serve", flag, "s3cret-value", env=env, check=False)
        assert proc.returncode == 2
        assert var in proc.stderr and "s3cret-value" not in proc.stderr
        assert not (tmp_path / "none").exists()  # refused before anything started


async def test_tokens_revoke_takes_an_id_or_the_token_on_standard_input_never_as_an_argument(service, db):
    install_id, token = await service.enroll()
    refused = service.cli("tokens", "revoke", token, check=False)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1 and "`-`" in refused.stderr and token not in refused.stderr
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE revoked_at IS NOT NULL") == 0
    out = service.cli("tokens", "revoke", "-", input=token + "\n").stdout
    token_id = await db.fetchval("SELECT token_id FROM tokens WHERE install_id = $1", install_id)
    assert out.strip() == f"revoked {token_id}"
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM tokens WHERE token_id = $1", token_id)
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 401  # at once: the batch checks the token (point 4), whatever the cache holds
    assert service.cli("tokens", "revoke", "-", input="not-a-token\n", check=False).returncode == 1


# ------------------------------------------------------------------ 5. unknown tokens are cheap; a rate limit before authentication


async def _transactions(server, database: str) -> int:
    """Committed plus rolled-back transactions of a database, once the statistics have settled (read from
    another database, so reading them adds none)."""
    import asyncpg

    conn = await asyncpg.connect(server)
    try:
        last, stable_since = None, time.monotonic()
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            now = await conn.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", database)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 0.5:
                return now
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def test_200_requests_with_one_unknown_token_cost_under_60_transactions(pg_server_dsn, db_dsn, master_key, tmp_path):
    """The service's whole life (start, 200 requests with a well-formed unknown token, stop) is counted, against
    the same life without the requests; the statistics are complete once its connections have closed."""
    from urllib.parse import urlsplit

    database = urlsplit(db_dsn).path.lstrip("/")
    unknown = "tii_" + "A" * 43

    async def life(requests: int) -> int:
        before = await _transactions(pg_server_dsn, database)
        async with start_service(db_dsn, master_key, tmp_path) as svc:
            started = time.monotonic()
            for _ in range(requests):
                status, problem, _ = await svc.request("POST", "/v1/heartbeats", token=unknown, json={"install_id": str(uuid.uuid4())})
                assert status == 401 and problem["status"] == 401
            await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - started)))  # both lives last as long
        return await _transactions(pg_server_dsn, database) - before

    await life(0)  # the first start does one-off work (the first sweep makes partitions): not counted
    quiet = await life(0)
    busy = await life(200)
    print(f"transactions: {quiet} without requests, {busy} with 200 requests of one unknown token")
    assert busy - quiet < 60, (quiet, busy)


async def test_a_token_created_after_it_was_refused_is_not_hidden_by_the_negative_cache(service, db):
    """A token presented before it exists is refused (and remembered as unknown); once it is created (here by
    another process, straight into the database), the follower drops the memory within a poll."""
    from crypto.tokens import new_token
    from storage.tokens import insert_token

    install_id, _ = await service.enroll()
    token_id, token, token_hash = new_token("installation")
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 401
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 401
    await insert_token(db, token_id, token_hash, "installation", install_id)
    await asyncio.sleep(0.6)  # two follower polls (0.25 s), well inside the negative entries' 2 s
    status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 200, body
    # And one made by the service itself is usable at once: enroll, then straight to a heartbeat.
    install2, token2 = await service.enroll()
    assert (await service.request("POST", "/v1/heartbeats", token=token2, json=heartbeat_body(install2)))[0] == 200


async def test_a_sender_over_the_address_prefix_rate_is_refused_before_authentication(db_dsn, master_key, tmp_path, db):
    """Per /24 (IPv4) or /48 (IPv6), before the token is looked at; other prefixes are not affected."""
    async with start_service(db_dsn, master_key, tmp_path, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
                             address_rate_limit=0.01, address_rate_burst=5) as svc:
        install_id, token = await svc.enroll()  # from loopback: exempt
        hostile = {"X-Forwarded-For": "203.0.113.7"}
        statuses = []
        for i in range(8):
            status, problem, headers = await svc.request("POST", "/v1/heartbeats", token="tii_" + "B" * 43,
                                                         json={}, headers={**hostile, "X-Forwarded-For": f"203.0.113.{i}"})
            statuses.append(status)
        assert statuses == [401] * 5 + [429] * 3
        assert problem["status"] == 429 and problem["type"].endswith("/rate-limited")
        assert int(headers["Retry-After"]) >= 1
        # Even a valid token from that prefix waits: the limit comes before authentication.
        status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id), headers=hostile)
        assert status == 429
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0
        # Another prefix, and loopback, are served.
        assert (await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id),
                                  headers={"X-Forwarded-For": "198.51.100.9"}))[0] == 200
        assert (await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 200


async def test_the_authorization_header_is_checked_before_the_body_is_read(service):
    """A request announcing a 900 MiB body with an unknown or malformed token is answered 401 without the body
    ever being sent."""
    port = int(service.url.rsplit(":", 1)[1])
    for auth in ("Bearer tia_" + "C" * 43, "Bearer nonsense", "Basic dXNlcjpwYXNz"):
        request = (f"POST /v1/scans HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {900 << 20}\r\n\r\n").encode()
        started = time.monotonic()
        status, _, body = await raw_http(port, request, timeout=10)
        assert status == 401, (auth, status, body[:200])
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------ 6. enrollment under control; quotas


def _secret(service, *args: str) -> str:
    return service.cli("enroll-secret", "create", *args).stdout.strip().splitlines()[-1]


async def _enroll(service, secret: str):
    return await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(uuid.uuid4())})


async def test_an_enrollment_secret_is_refused_once_used_up_even_by_concurrent_enrollments(service, db):
    secret = _secret(service, "--max-uses", "3")
    answers = await asyncio.gather(*(_enroll(service, secret) for _ in range(12)))
    statuses = sorted(a[0] for a in answers)
    assert statuses == [201] * 3 + [401] * 9, statuses
    assert all(a[1]["status"] == 401 for a in answers if a[0] == 401)
    assert await db.fetchval("SELECT count(*) FROM installations") == 3
    assert await db.fetchval("SELECT uses FROM tokens WHERE role = 'enroll'") == 3
    assert (await _enroll(service, secret))[0] == 401  # and later too
    # A 409 (install_id already enrolled) does not use the secret up.
    two = _secret(service, "--max-uses", "1")
    taken = uuid.UUID((await db.fetchrow("SELECT install_id FROM installations LIMIT 1"))["install_id"].hex)
    status, _, _ = await service.request("POST", "/v1/enroll", token=two, json={"install_id": str(taken)})
    assert status == 409
    assert (await _enroll(service, two))[0] == 201


async def test_an_enrollment_secret_is_refused_once_expired(service, db):
    secret = _secret(service, "--expires-in", "2s")
    assert (await _enroll(service, secret))[0] == 201
    expires = await db.fetchval("SELECT expires_at - created_at FROM tokens WHERE role = 'enroll'")
    assert expires.total_seconds() == pytest.approx(2, abs=0.5)
    await asyncio.sleep(2.2)
    status, problem, _ = await _enroll(service, secret)
    assert status == 401 and problem["status"] == 401
    assert await db.fetchval("SELECT count(*) FROM installations") == 1
    # Durations are checked: no unit, a unit we do not know, zero.
    for bad in ("10", "5w", "0m", "-1h"):
        proc = service.cli("enroll-secret", "create", f"--expires-in={bad}", check=False)
        assert proc.returncode == 2 and "duration" in proc.stderr, bad
    for good, seconds in (("30m", 1800), ("12h", 43200), ("7d", 604800)):
        service.cli("enroll-secret", "create", "--expires-in", good)
        got = await db.fetchval("SELECT extract(epoch FROM expires_at - created_at) FROM tokens ORDER BY created_at DESC LIMIT 1")
        assert float(got) == pytest.approx(seconds, abs=5)


async def test_tokens_list_shows_ids_roles_uses_and_dates_never_a_secret(service, db):
    secret = _secret(service, "--max-uses", "5", "--expires-in", "7d")
    install_id, token = await service.enroll(secret=secret)
    _, agent_token = await agent_of(service, token)
    out = service.cli("tokens", "list").stdout
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert lines[0] == ["token_id", "role", "install_id", "agent_id", "uses", "max_uses", "expires_at", "created_at", "revoked_at"]
    rows = {r[1]: r for r in lines[1:]}
    assert set(rows) == {"enroll", "installation", "agent"}
    assert rows["enroll"][4:6] == ["1", "5"] and rows["enroll"][6] != "-"
    assert rows["installation"][2] == str(install_id)
    ids = {r["token_id"] for r in await db.fetch("SELECT token_id FROM tokens")}
    assert {r[0] for r in lines[1:]} == ids
    hashes = [bytes(r["token_hash"]).hex() for r in await db.fetch("SELECT token_hash FROM tokens")]
    for never in (secret, token, agent_token, *hashes):
        assert never not in out


async def test_quotas_answer_429_naming_the_quota(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, agents_per_installation=2, scan_bytes_per_installation=1 << 20) as svc:
        install_id, token = await svc.enroll()
        first, _ = await agent_of(svc, token, "one")
        _, agent = await agent_of(svc, token, "two")
        status, problem, headers = await svc.request("POST", "/v1/agents", token=token, json={"name": "three"})
        assert status == 429, problem
        assert problem["quota"] == "agents_per_installation" and problem["limit"] == 2
        assert "agents_per_installation" in problem["detail"] and problem["type"].endswith("/quota-exceeded")
        assert int(headers["Retry-After"]) == 3600
        assert await db.fetchval("SELECT count(*) FROM agents") == 2
        # A deleted agent frees its place.
        assert (await svc.request("DELETE", f"/v1/agents/{first}", token=token))[0] == 204
        await agent_of(svc, token, "three")

        # Scans of random hex (about 300 KiB sealed each, whatever the compression): the quota is reached by the fourth.
        import os

        def big() -> dict:
            return scan_body(asset={"name": "WS-1", "serial_number": os.urandom(150).hex()},
                             software=[{"name": os.urandom(512).hex()} for _ in range(600)])

        stored, first_body = [], None
        for _ in range(6):
            body = big()
            first_body = first_body or body
            status, answer, headers = await svc.request("POST", "/v1/scans", token=agent, json=body)
            stored.append(status)
            if status == 429:
                assert answer["quota"] == "scan_bytes_per_installation" and answer["limit"] == 1 << 20
                assert int(headers["Retry-After"]) == 3600
        sizes = [r[0] for r in await db.fetch("SELECT octet_length(ciphertext) FROM scans ORDER BY received_at")]
        assert all(250_000 < n < 1 << 20 for n in sizes), sizes
        assert stored == [201] * len(sizes) + [429] * (6 - len(sizes)) and 2 <= len(sizes) <= 4, (stored, sizes)
        used = sum(sizes)
        assert used <= 1 << 20 < used + min(sizes)
        # A replay of a stored scan is still answered 200: it stores nothing new.
        assert (await svc.request("POST", "/v1/scans", token=agent, json=first_body))[0] == 200
        assert await db.fetchval("SELECT sum(bytes) FROM scan_usage WHERE install_id = $1", install_id) == used
        # Another installation has its own quota.
        _, token2 = await svc.enroll()
        _, agent2 = await agent_of(svc, token2)
        assert (await svc.request("POST", "/v1/scans", token=agent2, json=big()))[0] == 201
        # Usage of days already past is deleted by the next batch of that installation.
        await db.execute("INSERT INTO scan_usage VALUES ($1, '2000-01-01', 5)", install_id)
        assert (await svc.request("POST", "/v1/scans", token=agent, json=first_body))[0] == 200
        assert await db.fetchval("SELECT count(*) FROM scan_usage WHERE expires_on < current_date - 1") == 0
        # The new columns and table are declared: `audit` finds nothing outside the layout, secrets' limits included.
        svc.cli("enroll-secret", "create", "--max-uses", "2", "--expires-in", "1d")
        proc = svc.cli("audit", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
