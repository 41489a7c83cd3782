"""Hostile callers of authentication and enrollment (issue 12, points 4-7), against the real service over HTTP.

Revoked tokens stop writing at once; unknown tokens cost no database round trip each; a
prefix sending too fast is refused before authentication; enrollment secrets run out and
expire; quotas answer 429 naming the quota; no secret is taken from the command line.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from tests.fault_tools import JSON, agent_of, raw_http, scan_body
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
