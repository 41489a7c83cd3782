"""Isolation: every role's token against every endpoint and the other installation's resources.

A table: for each endpoint, the roles that may call it and what they get; every other
cell must be refused (401 for no, unknown or revoked token, 403 for a token of the wrong
role or the wrong installation, 404 where the resource is not the caller's to see) and
must change nothing, which the test checks in the database afterwards.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fault_tools import agent_of, scan_body
from tests.support import heartbeat_body

pytestmark = pytest.mark.slow

UNAUTHENTICATED = ("none", "garbage", "revoked", "erased")
ROLES = (*UNAUTHENTICATED, "enroll", "inst_a", "agent_a", "inst_b", "agent_b", "admin")


@dataclass
class World:
    """Two installations (A, B), each with an agent, plus tokens of every other kind."""

    service: Any
    a: uuid.UUID
    b: uuid.UUID
    tokens: dict[str, str | None]
    scan_of_a: str  # a scan_id A has stored
    spare: list = field(default_factory=list)

    async def fresh_agent_of_a(self) -> tuple[uuid.UUID, str]:
        return await agent_of(self.service, self.tokens["inst_a"], "spare")

    async def fresh_installation(self) -> uuid.UUID:
        install_id, _ = await self.service.enroll(secret=self.tokens["enroll"])
        return install_id


@dataclass
class Endpoint:
    """One operation on one target; `allowed` maps role -> expected success status; `refused` overrides 403."""

    name: str
    method: str
    path: Callable[[World], Any]  # may be async
    body: Callable[[World], Any] | None
    allowed: dict[str, int]
    refused: dict[str, int] = field(default_factory=dict)


async def _value(fn, world):
    v = fn(world)
    if hasattr(v, "__await__"):
        v = await v
    return v


async def _agent_path(w: World) -> str:
    agent_id, _ = await w.fresh_agent_of_a()
    return f"/v1/agents/{agent_id}"


async def _installation_path(w: World) -> str:
    return f"/v1/admin/installations/{await w.fresh_installation()}"


ENDPOINTS = [
    Endpoint("enroll", "POST", lambda w: "/v1/enroll", lambda w: {"install_id": str(uuid.uuid4())}, {"enroll": 201}),
    Endpoint("heartbeat as A", "POST", lambda w: "/v1/heartbeats", lambda w: heartbeat_body(w.a), {"inst_a": 200}),
    Endpoint("heartbeat as B", "POST", lambda w: "/v1/heartbeats", lambda w: heartbeat_body(w.b), {"inst_b": 200}),
    Endpoint("own settings", "PUT", lambda w: "/v1/installation/settings", lambda w: {"scan_retention_hours": 700},
             {"inst_a": 200, "inst_b": 200}),
    Endpoint("create agent", "POST", lambda w: "/v1/agents", lambda w: {"name": "x"}, {"inst_a": 201, "inst_b": 201}),
    Endpoint("delete A's agent", "DELETE", _agent_path, None, {"inst_a": 204}, {"inst_b": 404}),
    Endpoint("scan", "POST", lambda w: "/v1/scans", lambda w: scan_body(), {"agent_a": 201, "agent_b": 201}),
    Endpoint("scan naming A", "POST", lambda w: "/v1/scans", lambda w: scan_body(install_id=str(w.a)), {"agent_a": 201}),
    # A's scan_id is no secret B could probe: B's agent stores its own scan under it (201), never 200 or 409.
    Endpoint("scan reusing A's scan_id", "POST", lambda w: "/v1/scans", lambda w: scan_body(w.scan_of_a, marker="other"),
             {"agent_b": 201, "agent_a": 409}),
    Endpoint("export A", "GET", lambda w: f"/v1/admin/installations/{w.a}/export", None, {"admin": 200}),
    Endpoint("erase an installation", "DELETE", _installation_path, None, {"admin": 204}),
    Endpoint("restrict A (to false)", "PUT", lambda w: f"/v1/admin/installations/{w.a}/restriction",
             lambda w: {"restricted": False}, {"admin": 200}),
    Endpoint("stats", "GET", lambda w: "/v1/admin/stats", None, {"admin": 200}),
    *(Endpoint(p, "GET", (lambda p: lambda w: p)(p), None, dict.fromkeys(ROLES, 200)) for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")),
]


def expected(endpoint: Endpoint, role: str) -> int:
    if role in endpoint.allowed:
        return endpoint.allowed[role]
    if role in UNAUTHENTICATED:
        return 401
    return endpoint.refused.get(role, 403)


@pytest.fixture
async def world(service, db) -> World:
    a, inst_a = await service.enroll()
    b, inst_b = await service.enroll()
    _, agent_a = await agent_of(service, inst_a, "a")
    _, agent_b = await agent_of(service, inst_b, "b")
    _, revoked = await agent_of(service, inst_a, "revoked")
    service.cli("tokens", "revoke", "-", input=revoked + "\n")
    erased_id, erased = await service.enroll()
    admin = service.create_secret("admin-token")
    status, _, _ = await service.request("DELETE", f"/v1/admin/installations/{erased_id}", token=admin)
    assert status == 204
    scan_id = str(uuid.uuid4())
    status, _, _ = await service.request("POST", "/v1/scans", token=agent_a, json=scan_body(scan_id, marker="a"))
    assert status == 201
    tokens = {
        "none": None, "garbage": "tii_" + secrets.token_urlsafe(32), "revoked": revoked, "erased": erased,
        "enroll": service.create_secret(), "inst_a": inst_a, "agent_a": agent_a, "inst_b": inst_b, "agent_b": agent_b, "admin": admin,
    }
    return World(service, a, b, tokens, scan_id)


async def snapshot(db, w: World) -> dict[str, Any]:
    """What each installation holds, in numbers the matrix can predict."""
    out = {}
    for name, install_id in (("a", w.a), ("b", w.b)):
        out[name] = {
            "heartbeats": await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id),
            "scans": await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1", install_id),
            "live agents": await db.fetchval("SELECT count(*) FROM agents WHERE install_id = $1 AND revoked_at IS NULL", install_id),
            "retention": await db.fetchval("SELECT scan_retention_hours FROM installations WHERE install_id = $1", install_id),
            "restricted": await db.fetchval("SELECT restricted FROM installations WHERE install_id = $1", install_id),
        }
    out["installations"] = await db.fetchval("SELECT count(*) FROM installations")
    return out


async def test_every_role_against_every_endpoint_only_allowed_cells_succeed(world, db):
    w, svc = world, world.service
    before = await snapshot(db, w)
    table, wrong = [], []
    for ep in ENDPOINTS:
        row = []
        for role in ROLES:
            path = await _value(ep.path, w)
            body = await _value(ep.body, w) if ep.body else None
            status, answer, _ = await svc.request(ep.method, path, token=w.tokens[role], json=body)
            want = expected(ep, role)
            row.append(f"{status}" + ("" if status == want else f"!={want}"))
            if status != want:
                wrong.append(f"{ep.name} with {role}: {status}, expected {want}: {str(answer)[:200]}")
        table.append(f"{ep.name:28} " + " ".join(f"{c:>8}" for c in row))
    print("\n" + " " * 29 + " ".join(f"{r:>8}" for r in ROLES) + "\n" + "\n".join(table))
    assert not wrong, "\n".join(wrong)

    after = await snapshot(db, w)
    # Exactly the allowed cells left their mark, each on its own installation.
    assert after["a"]["heartbeats"] == before["a"]["heartbeats"] + 1
    assert after["b"]["heartbeats"] == before["b"]["heartbeats"] + 1
    assert after["a"]["scans"] == before["a"]["scans"] + 2  # "scan" and "scan naming A" by agent_a
    assert after["b"]["scans"] == before["b"]["scans"] + 2  # "scan" and "scan reusing A's scan_id" by agent_b
    # One created by A; the spare agents made for the "delete A's agent" row: only A's own deletion took.
    assert after["a"]["live agents"] == before["a"]["live agents"] + 1 + len(ROLES) - 1
    assert after["b"]["live agents"] == before["b"]["live agents"] + 1
    assert after["a"]["retention"] == after["b"]["retention"] == 700
    assert after["a"]["restricted"] is False and after["b"]["restricted"] is False
    # Fresh installations made for the erase row: one per role, all but the admin's still there; plus one enrolled.
    assert after["installations"] == before["installations"] + len(ROLES) - 1 + 1


async def test_other_installations_resources_stay_out_of_reach(world, db):
    """Past the role check: A's token and agent never reach B's data, by any id they could send."""
    w, svc = world, world.service
    t = w.tokens
    # B's agent id, deleted with A's token: 404, and it still works.
    agent_b_id = await db.fetchval("SELECT agent_id FROM agents WHERE install_id = $1", w.b)
    assert (await svc.request("DELETE", f"/v1/agents/{agent_b_id}", token=t["inst_a"]))[0] == 404
    assert (await svc.request("POST", "/v1/scans", token=t["agent_b"], json=scan_body()))[0] == 201
    # A's agent naming B in a scan: 403, nothing stored for either.
    scans = await db.fetchval("SELECT count(*) FROM scans")
    assert (await svc.request("POST", "/v1/scans", token=t["agent_a"], json=scan_body(install_id=str(w.b))))[0] == 403
    assert await db.fetchval("SELECT count(*) FROM scans") == scans
    # A heartbeat of A naming B: 403; B's current record is untouched.
    assert (await svc.request("POST", "/v1/heartbeats", token=t["inst_a"], json=heartbeat_body(w.b, license_type="forged")))[0] == 403
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE license_type = 'forged'") == 0
    # B replays A's scan_id with A's content: stored as B's own, and A's export still shows only A's.
    status, body, _ = await svc.request("POST", "/v1/scans", token=t["agent_b"], json=scan_body(w.scan_of_a, marker="a"))
    assert status == 201 and body["scan_id"] == w.scan_of_a
    status, export_a, _ = await svc.request("GET", f"/v1/admin/installations/{w.a}/export", token=t["admin"])
    assert status == 200
    status, export_b, _ = await svc.request("GET", f"/v1/admin/installations/{w.b}/export", token=t["admin"])
    assert status == 200
    assert str(w.b) not in str(export_a) and str(w.a) not in str(export_b)
    assert [s["scan_id"] for s in export_a["scans"]] == [w.scan_of_a]
    assert all(s["agent_id"] != str(agent_b_id) for s in export_a["scans"])
    # Admin ids that are not UUIDs, or unknown: 404, never someone else's.
    for bad in ("not-a-uuid", str(uuid.uuid4()), str(w.a).upper().replace("-", "")[:-1]):
        status, _, _ = await svc.request("GET", f"/v1/admin/installations/{bad}/export", token=t["admin"])
        assert status == 404, bad
