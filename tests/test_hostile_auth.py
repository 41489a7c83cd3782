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
