"""Agents, scan uploads and scan retention settings, over real HTTP against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import gzip
import os
import struct
import threading
import time
import uuid
import zlib

import orjson
import psutil
import pytest
import zstandard

from crypto.datakeys import epoch_key_id
from crypto.errors import DecryptionError
from ingest.http.routes.scans import SCAN_FLUSHERS
from ingest.keys import AUTH, DATA_KEYS, RESTRICTIONS
from ingest.pipeline.sealed import read_scan, read_scans
from storage import scans as scan_store
from tests.support import heartbeat_body, start_service

JSON = {"Content-Type": "application/json"}


def is_problem(body, headers, status):
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["type"] and body["title"] and body["detail"]
    return True


def scan_body(scan_id: str | None = None, *, apps: int = 3, **extra) -> dict:
    """A scan with every declared section and nothing undeclared."""
    body = {
        "scan_id": scan_id or str(uuid.uuid4()),
        "scanned_at": "2025-01-15T10:30:00Z",
        "agent_version": "7.1.0",
        "asset": {"name": "WS-0042", "domain": "corp.example.com", "type": "Windows", "serial_number": "5CG1234XYZ"},
        "os": {"name": "Windows 11 Pro", "version": "23H2", "build": "22631.3007", "architecture": "x64"},
        "hardware": {"processor": "i7-11700", "cores": 8, "memory_mb": 32768, "bios_version": "1.14.0"},
        "disks": [{"name": "C:", "size_gb": 512, "free_gb": 100.5, "filesystem": "NTFS"}],
        "software": [{"name": f"App {i}", "version": f"1.{i}", "publisher": "Example", "install_date": "2024-01-01"} for i in range(apps)],
        "network": [{"adapter": "Ethernet", "ip_address": "10.1.2.3", "mac_address": "00:1A:2B:3C:4D:5E", "dhcp": True}],
        "hotfixes": [{"id": "KB5034441", "installed_on": "2024-12-10"}],
        "services": [{"name": "Spooler", "state": "Running", "start_mode": "Auto"}],
    }
    body.update(extra)
    return body


async def new_agent(service, token: str, name: str = "agent-1") -> tuple[uuid.UUID, str]:
    status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": name})
    assert status == 201, body
    return uuid.UUID(body["agent_id"]), body["token"]


async def installation_with_agent(service) -> tuple[uuid.UUID, str, uuid.UUID, str]:
    install_id, token = await service.enroll()
    agent_id, agent_token = await new_agent(service, token)
    return install_id, token, agent_id, agent_token


async def upload(service, agent_token: str, body: dict | bytes, encoding: str = "identity", headers: dict | None = None):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    h = {**JSON, **(headers or {})}
    if encoding == "gzip":
        data = gzip.compress(data)
        h["Content-Encoding"] = "gzip"
    elif encoding == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
        h["Content-Encoding"] = "zstd"
    return await service.request("POST", "/v1/scans", token=agent_token, data=data, headers=h)


async def decrypted(service, db, install_id: uuid.UUID, scan_id: str) -> dict | None:
    return await read_scan(db, service.app[DATA_KEYS], install_id, uuid.UUID(scan_id))


async def all_tables_as_text(db) -> str:
    """Every row of every table (partitions included), every column, as text."""
    tables = [r[0] for r in await db.fetch(
        "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")]
    assert any("scans" in t for t in tables)
    texts = [await db.fetchval(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {t} t") for t in tables]
    return "\n".join(texts)


def nested(depth: int):
    value = "deep"
    for _ in range(depth):
        value = [value]
    return value


def metric_value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------ agents


async def test_agent_is_created_with_an_agent_token(service, db):
    install_id, token = await service.enroll()
    agent_id, agent_token = await new_agent(service, token, "build-server")
    assert agent_token.startswith("tia_")
    row = await db.fetchrow("SELECT * FROM agents WHERE agent_id = $1", agent_id)
    assert row["install_id"] == install_id and row["name"] == "build-server" and row["revoked_at"] is None
    tok = await db.fetchrow("SELECT * FROM tokens WHERE agent_id = $1", agent_id)
    assert (tok["role"], tok["install_id"]) == ("agent", install_id)
    assert agent_token not in str([dict(r) for r in await db.fetch("SELECT * FROM tokens")])


async def test_agent_bodies_and_roles(service):
    install_id, token, _, agent_token = await installation_with_agent(service)
    for bad in ({}, {"name": 5}, {"name": "x" * 129}):
        status, body, h = await service.request("POST", "/v1/agents", token=token, json=bad)
        assert status == 422 and is_problem(body, h, 422)
    assert (await service.request("POST", "/v1/agents", token=token, data=b"[]", headers=JSON))[0] == 400
    # an agent token may upload scans only; an installation token may not upload scans
    assert (await service.request("POST", "/v1/agents", token=agent_token, json={"name": "x"}))[0] == 403
    assert (await service.request("PUT", "/v1/installation/settings", token=agent_token, json={"scan_retention_hours": 1}))[0] == 403
    assert (await service.request("POST", "/v1/heartbeats", token=agent_token, json=heartbeat_body(install_id)))[0] == 403
    status, body, h = await upload(service, token, scan_body())
    assert status == 403 and is_problem(body, h, 403)
    assert (await service.request("POST", "/v1/agents", json={"name": "x"}))[0] == 401


async def test_deleted_agent_is_refused_at_once(service, db):
    install_id, token, agent_id, agent_token = await installation_with_agent(service)
    _, other_agent = await new_agent(service, token, "second")
    assert (await upload(service, agent_token, scan_body()))[0] == 201
    status, body, _ = await service.request("DELETE", f"/v1/agents/{agent_id}", token=token)
    assert status == 204 and body is None
    # no sleep: the worker that answered the DELETE has already forgotten the token
    status, body, h = await upload(service, agent_token, scan_body())
    assert status == 401 and is_problem(body, h, 401)
    assert (await upload(service, other_agent, scan_body()))[0] == 201  # the installation's other agent is untouched
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM agents WHERE agent_id = $1", agent_id)
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE agent_id = $1 AND revoked_at IS NULL", agent_id) == 0
    assert (await service.request("DELETE", f"/v1/agents/{agent_id}", token=token))[0] == 404  # already gone
    assert (await service.request("DELETE", f"/v1/agents/{uuid.uuid4()}", token=token))[0] == 404
    assert (await service.request("DELETE", "/v1/agents/not-a-uuid", token=token))[0] == 404


async def test_installation_cannot_touch_another_installations_agent(service):
    _, _, agent_a, agent_a_token = await installation_with_agent(service)
    _, token_b = await service.enroll()
    status, body, h = await service.request("DELETE", f"/v1/agents/{agent_a}", token=token_b)
    assert status == 404 and is_problem(body, h, 404)
    await service.app[AUTH].poll_revocations()
    assert (await upload(service, agent_a_token, scan_body()))[0] == 201


# ------------------------------------------------------------------ uploads


@pytest.mark.parametrize("encoding", ["identity", "gzip", "zstd"])
async def test_upload_is_stored_sealed_and_reads_back(service, db, encoding):
    install_id, _, agent_id, agent_token = await installation_with_agent(service)
    body = scan_body(apps=50)
    status, resp, _ = await upload(service, agent_token, body, encoding)
    assert status == 201, resp
    assert resp["scan_id"] == body["scan_id"] and resp["dropped_fields"] == []
    row = await db.fetchrow("SELECT * FROM scans WHERE scan_id = $1", uuid.UUID(body["scan_id"]))
    # sealed under the key of the retention epoch (UTC day) it expires in, not the record key
    assert row["install_id"] == install_id and row["agent_id"] == agent_id and row["key_id"] == epoch_key_id(row["expires_at"])
    assert resp["expires_at"] == row["expires_at"].astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    assert row["expires_at"] - row["received_at"] == dt.timedelta(hours=720)
    raw = orjson.dumps(body)
    assert row["size_decoded"] == len(raw) and row["size_plain"] > 0
    assert (row["size_wire"] == len(raw)) == (encoding == "identity")
    assert b"WS-0042" not in bytes(row["ciphertext"])
    assert await decrypted(service, db, install_id, body["scan_id"]) == body


async def test_undeclared_fields_are_dropped_at_every_depth(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    body = scan_body(custom_inventory={"rack": "B4"})
    body["asset"]["owner_phone"] = "+1 555 0100"
    body["hardware"]["tpm"] = {"version": "2.0"}
    body["software"][1]["license_key"] = "AAAA-BBBB"
    body["software"][2]["license_key"] = "CCCC-DDDD"
    body["software"][2]["uninstall"] = ["msiexec"]
    body["disks"][0]["serial"] = "DISK-1"
    body["network"][0]["extra"] = {"deep": {"er": 1}}
    status, resp, _ = await upload(service, agent_token, body)
    assert status == 201, resp
    assert resp["dropped_fields"] == [
        "asset.owner_phone", "hardware.tpm", "disks[].serial", "software[].license_key", "software[].uninstall",
        "network[].extra", "custom_inventory",
    ]
    kept = await decrypted(service, db, install_id, body["scan_id"])
    assert "custom_inventory" not in kept and "owner_phone" not in kept["asset"] and "tpm" not in kept["hardware"]
    assert all(set(s) == {"name", "version", "publisher", "install_date"} for s in kept["software"])
    assert set(kept["disks"][0]) == {"name", "size_gb", "free_gb", "filesystem"}
    assert set(kept["network"][0]) == {"adapter", "ip_address", "mac_address", "dhcp"}
    text = (await service.request("GET", "/metrics"))[1]
    assert metric_value(text, 'telemetry_fields_dropped_total{category="scan"}') == 7.0


async def test_null_optional_fields_are_stored_as_absent(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    body = scan_body()
    body["asset"]["last_user"] = None
    body["software"][1]["publisher"] = None
    body["hotfixes"] = None
    status, resp, _ = await upload(service, agent_token, body)
    assert status == 201 and resp["dropped_fields"] == []
    kept = await decrypted(service, db, install_id, body["scan_id"])
    assert "last_user" not in kept["asset"] and "publisher" not in kept["software"][1] and "hotfixes" not in kept
    assert kept["software"][0] == body["software"][0]


async def test_reject_mode_refuses_undeclared_fields(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, unknown_fields="reject") as svc:
        _, _, _, agent_token = await installation_with_agent(svc)
        body = scan_body()
        body["software"][0]["license_key"] = "k"
        status, resp, h = await upload(svc, agent_token, body)
        assert status == 422 and is_problem(resp, h, 422) and "software[].license_key" in resp["detail"]
        assert await db.fetchval("SELECT count(*) FROM scans") == 0
        assert (await upload(svc, agent_token, scan_body()))[0] == 201


async def test_markers_never_stored_in_the_clear(service, db):
    install_id, token, _, agent_token = await installation_with_agent(service)
    allowed = "allowed-" + uuid.uuid4().hex
    disallowed = "disallowed-" + uuid.uuid4().hex
    body = scan_body()
    body["software"][0]["name"] = allowed
    body["asset"]["last_user"] = allowed
    body["software"][1]["license_key"] = disallowed
    body["asset"]["owner"] = {"phone": disallowed}
    body["custom"] = disallowed
    status, resp, _ = await upload(service, agent_token, body, "gzip")
    assert status == 201
    # a second scan, and a replay, so nothing differs on a second path through the writer
    assert (await upload(service, agent_token, body))[0] == 200
    assert (await upload(service, agent_token, {**body, "scan_id": str(uuid.uuid4())}, "zstd"))[0] == 201
    assert await db.fetchval("SELECT count(*) FROM scans") == 2
    text = await all_tables_as_text(db)
    for marker in (allowed, disallowed):
        for form in (marker, marker.encode().hex(), marker[8:], marker[-12:]):
            assert form not in text
    kept = await decrypted(service, db, install_id, body["scan_id"])
    assert kept["software"][0]["name"] == allowed and kept["asset"]["last_user"] == allowed
    assert disallowed not in orjson.dumps(kept).decode()
    metrics = (await service.request("GET", "/metrics"))[1]
    assert allowed not in metrics and disallowed not in metrics and str(install_id) not in metrics


async def test_agent_cannot_upload_for_another_installation(service, db):
    install_a, token_a, _, agent_a = await installation_with_agent(service)
    install_b, _ = await service.enroll()
    status, body, h = await upload(service, agent_a, scan_body(install_id=str(install_b)))
    assert status == 403 and is_problem(body, h, 403)
    assert await db.fetchval("SELECT count(*) FROM scans") == 0
    # naming its own installation is allowed (and not reported as dropped); the scan is filed under it
    scan = scan_body(install_id=str(install_a))
    status, body, _ = await upload(service, agent_a, scan)
    assert status == 201 and body["dropped_fields"] == []
    assert await db.fetchval("SELECT install_id FROM scans") == install_a
    assert (await upload(service, agent_a, scan_body(install_id="nope")))[0] == 422
    # a scan of A is not B's: B's scan with the same scan_id is its own
    assert await decrypted(service, db, install_b, scan["scan_id"]) is None


async def test_replay_answers_200_and_other_content_409(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    body = scan_body()
    first = await upload(service, agent_token, body)
    assert first[0] == 201
    again = await upload(service, agent_token, body, "zstd")
    assert again[0] == 200 and again[1] == first[1]
    # undeclared keys are not content: the same filtered document is a replay
    noisy = {**body, "custom": 1}
    status, resp, _ = await upload(service, agent_token, noisy)
    assert status == 200 and resp["expires_at"] == first[1]["expires_at"] and resp["dropped_fields"] == ["custom"]
    changed = scan_body(body["scan_id"])
    changed["software"][0]["version"] = "9.9"
    status, resp, h = await upload(service, agent_token, changed)
    assert status == 409 and is_problem(resp, h, 409)
    assert await db.fetchval("SELECT count(*) FROM scans") == 1
    assert (await decrypted(service, db, install_id, body["scan_id"])) == body
    # another installation's scan_id space is its own
    _, _, _, other_agent = await installation_with_agent(service)
    assert (await upload(service, other_agent, changed))[0] == 201
    metrics = (await service.request("GET", "/metrics"))[1]
    assert metric_value(metrics, "telemetry_scans_received_total") == 2.0


async def test_replay_compared_under_the_key_that_sealed_it(service, db, master_key, ks):
    install_id, install_token, _, agent_token = await installation_with_agent(service)
    body = scan_body()
    first = await upload(service, agent_token, body)
    assert first[0] == 201
    first_key = await db.fetchval("SELECT key_id FROM scans WHERE scan_id = $1", uuid.UUID(body["scan_id"]))
    # a shorter retention: new scans expire in another epoch, so they are sealed under another key
    status, _, _ = await service.request("PUT", "/v1/installation/settings", token=install_token, json={"scan_retention_hours": 24})
    assert status == 200
    other = scan_body()
    assert (await upload(service, agent_token, other))[0] == 201
    other_key = await db.fetchval("SELECT key_id FROM scans WHERE scan_id = $1", uuid.UUID(other["scan_id"]))
    assert other_key != first_key and await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 3
    again = await upload(service, agent_token, body)
    # the same scan, its expiry brought forward by the shorter retention
    assert again[0] == 200 and {**again[1], "expires_at": None} == {**first[1], "expires_at": None}
    assert again[1]["expires_at"] < first[1]["expires_at"]
    changed = {**body, "agent_version": "8.0"}
    assert (await upload(service, agent_token, changed))[0] == 409
    assert await decrypted(service, db, install_id, body["scan_id"]) == body
    assert await decrypted(service, db, install_id, other["scan_id"]) == other


async def test_concurrent_uploads_of_one_scan_id_store_it_once(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    scan_id = str(uuid.uuid4())
    one, two = scan_body(scan_id), scan_body(scan_id, apps=4)
    results = await asyncio.gather(*(upload(service, agent_token, one if i % 2 else two) for i in range(20)))
    statuses = [r[0] for r in results]
    assert statuses.count(201) == 1 and await db.fetchval("SELECT count(*) FROM scans") == 1
    stored = await decrypted(service, db, install_id, scan_id)
    for i, status in enumerate(statuses):
        sent = one if i % 2 else two
        assert status in ((200, 201) if sent == stored else (409,)), (i, status)


async def test_expired_scan_is_gone_before_the_sweeper_runs(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    body = scan_body()
    assert (await upload(service, agent_token, body))[0] == 201
    await db.execute("UPDATE scans SET received_at = now() - interval '2 hours', expires_at = now() - interval '1 hour'")
    assert await decrypted(service, db, install_id, body["scan_id"]) is None
    assert [s async for s in read_scans(db, service.app[DATA_KEYS], install_id)] == []
    # the same scan_id is new again (the expired row is not a previous upload any more)
    changed = {**body, "agent_version": "8.0"}
    status, resp, _ = await upload(service, agent_token, changed)
    assert status == 201
    assert await decrypted(service, db, install_id, body["scan_id"]) == changed


async def test_restricted_installation_gets_403_and_nothing_stored(service, db):
    install_id, _, _, agent_token = await installation_with_agent(service)
    await db.execute("UPDATE installations SET restricted = true WHERE install_id = $1", install_id)
    status, body, h = await upload(service, agent_token, scan_body())
    assert status == 403 and is_problem(body, h, 403) and body["type"].endswith("/restricted")
    assert await db.fetchval("SELECT count(*) FROM scans") == 0
    await db.execute("UPDATE installations SET restricted = false WHERE install_id = $1", install_id)
    await service.app[RESTRICTIONS].poll()  # what every worker's follower does every 0.25 s
    assert (await upload(service, agent_token, scan_body()))[0] == 201


# ------------------------------------------------------------------ sealing


async def test_swapped_or_moved_ciphertexts_do_not_open(service, db):
    install_a, _, _, agent_a = await installation_with_agent(service)
    install_b, _, _, agent_b = await installation_with_agent(service)
    s1, s2, s3 = scan_body(), scan_body(), scan_body()
    for agent, s in ((agent_a, s1), (agent_a, s2), (agent_b, s3)):
        assert (await upload(service, agent, s))[0] == 201
    keys = service.app[DATA_KEYS]
    assert await decrypted(service, db, install_a, s1["scan_id"]) == s1
    # swap the ciphertexts of two rows of one installation: both fail
    await db.execute(
        "UPDATE scans s SET ciphertext = o.ciphertext FROM scans o "
        "WHERE s.scan_id = $1 AND o.scan_id = $2 OR s.scan_id = $2 AND o.scan_id = $1",
        uuid.UUID(s1["scan_id"]), uuid.UUID(s2["scan_id"]),
    )
    for s in (s1, s2):
        with pytest.raises(DecryptionError):
            await decrypted(service, db, install_a, s["scan_id"])
    # move B's ciphertext into A's row, rewriting key_id too: still fails
    await db.execute(
        "UPDATE scans s SET ciphertext = o.ciphertext, key_id = o.key_id FROM scans o WHERE s.scan_id = $1 AND o.scan_id = $2",
        uuid.UUID(s1["scan_id"]), uuid.UUID(s3["scan_id"]),
    )
    with pytest.raises(DecryptionError):
        await decrypted(service, db, install_a, s1["scan_id"])
    assert await decrypted(service, db, install_b, s3["scan_id"]) == s3
    # and every listing of an installation meets the same
    with pytest.raises(DecryptionError):
        [s async for s in read_scans(db, keys, install_a)]


# ------------------------------------------------------------------ bodies and limits


async def test_bad_scan_bodies(service, db):
    _, _, _, agent_token = await installation_with_agent(service)
    cases = [
        (scan_body(scan_id="nope"), 422),
        ({k: v for k, v in scan_body().items() if k != "scan_id"}, 422),
        ({k: v for k, v in scan_body().items() if k != "scanned_at"}, 422),
        (scan_body(scanned_at="yesterday"), 422),
        (scan_body(scanned_at="2025-01-15T10:30:00"), 422),  # no offset
        (scan_body(software=[{"name": 5}]), 422),
        (scan_body(software={"name": "x"}), 422),
        (scan_body(software=["x"]), 422),
        (scan_body(hardware={"cores": "8"}), 422),
        (scan_body(network=[{"dhcp": "yes"}]), 422),
        (scan_body(agent_version="x" * 33), 422),
        (scan_body(software=[{"name": "x" * 1025}]), 422),
        (scan_body(custom=nested(34)), 400),
    ]
    for body, expected in cases:
        status, resp, h = await upload(service, agent_token, body)
        assert status == expected and is_problem(resp, h, expected), (body, resp)
    status, resp, _ = await upload(service, agent_token, scan_body(software=[{"name": 5}]))
    assert "software[].name" in resp["detail"]
    for data, headers, expected in (
        (b"{nope", {}, 400),
        (b"[]", {}, 400),
        (b"\xff\xfe", {}, 400),
        (orjson.dumps(scan_body()), {"Content-Type": "text/plain"}, 415),
        (orjson.dumps(scan_body()), {"Content-Encoding": "br"}, 415),
        (orjson.dumps(scan_body()), {"Content-Encoding": "gzip"}, 400),  # says gzip, is not
        (gzip.compress(orjson.dumps(scan_body()))[:-10], {"Content-Encoding": "gzip"}, 400),
    ):
        status, resp, h = await upload(service, agent_token, data, headers=headers)
        assert status == expected and is_problem(resp, h, expected), (data[:20], headers)
    assert await db.fetchval("SELECT count(*) FROM scans") == 0


async def test_size_limits_on_the_wire_and_after_inflating(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, scan_max_bytes=64 * 1024, scan_max_decoded_bytes=256 * 1024) as svc:
        _, _, _, agent_token = await installation_with_agent(svc)
        big = scan_body(apps=2500)  # ~250 KiB of JSON, very compressible
        raw = orjson.dumps(big)
        assert 64 * 1024 < len(raw) < 256 * 1024
        status, body, h = await upload(svc, agent_token, big)
        assert status == 413 and is_problem(body, h, 413)
        assert (await upload(svc, agent_token, big, "gzip"))[0] == 201  # small on the wire, within the decoded limit
        bigger = scan_body(apps=4000)
        assert len(orjson.dumps(bigger)) > 256 * 1024
        for encoding in ("gzip", "zstd"):
            status, body, h = await upload(svc, agent_token, bigger, encoding)
            assert status == 413 and is_problem(body, h, 413), encoding
        assert await db.fetchval("SELECT count(*) FROM scans") == 1


def gzip_bomb(total: int) -> bytes:
    """A valid gzip member inflating to `total` zero bytes (a multiple of 1 MiB), about total/1000 long."""
    chunk = b"\0" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)  # self-contained: can be repeated
    crc = 0
    for _ in range(total >> 20):
        crc = zlib.crc32(chunk, crc)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + block * (total >> 20) + b"\x03\x00" + struct.pack("<II", crc, total & 0xFFFFFFFF)


def zstd_bomb(total: int) -> bytes:
    """A zstd stream (no content size in its header) inflating to `total` zero bytes."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    chunk = b"\0" * (1 << 20)
    return b"".join(c.compress(chunk) for _ in range(total >> 20)) + c.flush()


class PeakRss:
    """Samples this process's resident size on a thread while the block runs."""

    def __enter__(self):
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
async def test_compression_bomb_is_stopped_early_and_small(service, db, kind):
    """A body of about a MiB that would inflate to 1 GiB: 413, and the process (which runs the app) stays small."""
    _, _, _, agent_token = await installation_with_agent(service)
    bomb = gzip_bomb(1 << 30) if kind == "gzip" else zstd_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    with PeakRss() as rss:
        status, body, h = await service.request(
            "POST", "/v1/scans", token=agent_token, data=bomb, headers={**JSON, "Content-Encoding": kind})
    assert status == 413 and is_problem(body, h, 413)
    print(f"{kind} bomb: peak RSS growth {rss.growth / 2**20:.1f} MiB")
    assert rss.growth < 100 << 20, f"grew {rss.growth >> 20} MiB"
    assert await db.fetchval("SELECT count(*) FROM scans") == 0


async def test_zstd_frame_asking_for_a_huge_window_is_refused(service):
    _, _, _, agent_token = await installation_with_agent(service)
    params = zstandard.ZstdCompressionParameters.from_level(22, window_log=27, enable_ldm=True)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = c.compress(orjson.dumps(scan_body())) + c.flush()
    status, body, h = await service.request("POST", "/v1/scans", token=agent_token, data=data, headers={**JSON, "Content-Encoding": "zstd"})
    assert status == 413 and is_problem(body, h, 413)


# ------------------------------------------------------------------ retention settings


async def test_retention_setting_applies_to_new_and_stored_scans(service, db):
    install_id, token, _, agent_token = await installation_with_agent(service)
    old = scan_body()
    assert (await upload(service, agent_token, old))[0] == 201
    status, body, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 48})
    assert status == 200 and body == {"scan_retention_hours": 48}
    assert await db.fetchval("SELECT scan_retention_hours FROM installations WHERE install_id = $1", install_id) == 48

    async def lifetime(scan_id):
        r = await db.fetchrow("SELECT received_at, expires_at FROM scans WHERE scan_id = $1", uuid.UUID(scan_id))
        return r["expires_at"] - r["received_at"]

    assert await lifetime(old["scan_id"]) == dt.timedelta(hours=48)  # shortened
    new = scan_body()
    status, resp, _ = await upload(service, agent_token, new)
    assert status == 201 and await lifetime(new["scan_id"]) == dt.timedelta(hours=48)
    expires = dt.datetime.fromisoformat(resp["expires_at"])
    assert dt.timedelta(hours=47, minutes=59) < expires - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=48)
    # lengthening applies to new scans only: stored ones never live longer than they were promised
    status, body, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 720})
    assert status == 200 and body == {"scan_retention_hours": 720}
    assert await lifetime(old["scan_id"]) == dt.timedelta(hours=48)
    newest = scan_body()
    assert (await upload(service, agent_token, newest))[0] == 201
    assert await lifetime(newest["scan_id"]) == dt.timedelta(hours=720)
    # a replay answers with the expiry as stored now
    status, resp, _ = await upload(service, agent_token, old)
    row = await db.fetchrow("SELECT expires_at FROM scans WHERE scan_id = $1", uuid.UUID(old["scan_id"]))
    assert status == 200 and dt.datetime.fromisoformat(resp["expires_at"]) == row["expires_at"]
    # shortening below a stored scan's age hides it at once
    await db.execute("UPDATE scans SET received_at = now() - interval '3 hours', expires_at = now() + interval '1 hour' "
                     "WHERE scan_id = $1", uuid.UUID(newest["scan_id"]))
    assert (await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 1}))[0] == 200
    assert await decrypted(service, db, install_id, newest["scan_id"]) is None
    assert await decrypted(service, db, install_id, new["scan_id"]) is not None


async def test_retention_setting_is_validated_and_per_installation(service, db):
    install_a, token_a, _, _ = await installation_with_agent(service)
    install_b, token_b, _, agent_b = await installation_with_agent(service)
    assert (await upload(service, agent_b, scan_body()))[0] == 201
    for bad in ({}, {"scan_retention_hours": 0}, {"scan_retention_hours": 721}, {"scan_retention_hours": "24"},
                {"scan_retention_hours": 24.5}, {"scan_retention_hours": None}, {"scan_retention_hours": True}):
        status, body, h = await service.request("PUT", "/v1/installation/settings", token=token_a, json=bad)
        assert status == 422 and is_problem(body, h, 422), bad
    assert (await service.request("PUT", "/v1/installation/settings", token=token_a, json={"scan_retention_hours": 24}))[0] == 200
    hours = dict(await db.fetch("SELECT install_id, scan_retention_hours FROM installations"))
    assert hours == {install_a: 24, install_b: 720}
    assert await db.fetchval("SELECT expires_at - received_at FROM scans") == dt.timedelta(hours=720)


# ------------------------------------------------------------------ group commit


async def test_scans_are_group_committed_with_metrics(service, db):
    _, _, _, agent_token = await installation_with_agent(service)
    n = 40
    results = await asyncio.gather(*(upload(service, agent_token, scan_body(), "gzip") for _ in range(n)))
    assert [r[0] for r in results] == [201] * n
    assert await db.fetchval("SELECT count(DISTINCT xmin::text) FROM scans") < n
    text = (await service.request("GET", "/metrics"))[1]
    assert metric_value(text, "telemetry_scans_received_total") == n
    assert metric_value(text, 'telemetry_batch_rows_sum{writer="scan"}') == n
    wire = metric_value(text, 'telemetry_request_bytes_total{route="/v1/scans",stage="wire"}')
    decoded = metric_value(text, 'telemetry_request_bytes_total{route="/v1/scans",stage="decoded"}')
    assert 0 < wire < decoded
    assert metric_value(text, 'telemetry_encrypt_duration_seconds_count{category="scan"}') == n
    assert 'telemetry_queue_depth{writer="scan"}' in text


async def test_scan_batches_are_bounded_by_bytes(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, batch_max_bytes=1024, db_timeout=15) as svc:
        install_id, _, _, agent_token = await installation_with_agent(svc)
        # hold the writer back so every scan is queued before the first batch is taken
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        def noisy():  # 1.5 KiB of randomness: each sealed scan is over 1 KiB
            return scan_body(asset={k: os.urandom(500).hex() for k in ("name", "domain", "model")})

        tasks = [asyncio.create_task(upload(svc, agent_token, noisy())) for _ in range(8)]
        await asyncio.sleep(0.5)
        await tx.rollback()
        assert [r[0] for r in await asyncio.gather(*tasks)] == [201] * 8
        # each batch stops once it holds 1 KiB: one scan per transaction
        assert await db.fetchval("SELECT count(DISTINCT xmin::text) FROM scans") == 8


async def test_full_scan_queue_answers_503_and_heartbeats_carry_on(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, queue_size=1, batch_max_rows=1, db_timeout=15) as svc:
        install_a, _, _, agent_token = await installation_with_agent(svc)
        install_b, token_b = await svc.enroll()
        # Hold installation A's row: its scan batches cannot commit.
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_a)
        tasks = [asyncio.create_task(upload(svc, agent_token, scan_body())) for _ in range(8)]
        taken = SCAN_FLUSHERS + 1  # a batch of one in flight per flusher + 1 queued; the others are refused
        done = []
        for _ in range(300):
            done = [t for t in tasks if t.done()]
            if len(done) >= len(tasks) - taken:
                break
            await asyncio.sleep(0.02)
        refused = [t.result() for t in done]
        assert len(refused) == len(tasks) - taken and all(s == 503 and h.get("Retry-After") for s, _, h in refused)
        # the scan writer is stuck; heartbeats have their own queue and writer
        started = time.perf_counter()
        for i in range(5):
            assert (await svc.request("POST", "/v1/heartbeats", token=token_b, json=heartbeat_body(install_b, asset_count=i)))[0] == 200
        assert time.perf_counter() - started < 5
        await tx.rollback()
        results = await asyncio.gather(*tasks)
        assert sum(r[0] == 201 for r in results) == taken
        assert await db.fetchval("SELECT count(*) FROM scans") == taken


async def test_shutdown_commits_queued_scans(db_dsn, master_key, tmp_path, db):
    ctx = start_service(db_dsn, master_key, tmp_path, db_timeout=15)  # the test holds a row lock
    svc = await ctx.__aenter__()
    install_id, _, _, agent_token = await installation_with_agent(svc)
    tx = db.transaction()
    await tx.start()
    await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
    tasks = [asyncio.create_task(upload(svc, agent_token, scan_body())) for _ in range(10)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in tasks)
    stopping = asyncio.create_task(ctx.__aexit__(None, None, None))
    await asyncio.sleep(0.2)
    await tx.rollback()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await stopping
    assert sum(1 for r in results if not isinstance(r, BaseException) and r[0] == 201) == 10
    assert await db.fetchval("SELECT count(*) FROM scans") == 10


async def test_stored_scan_helpers(service, db):
    install_id, _, agent_id, agent_token = await installation_with_agent(service)
    bodies = [scan_body() for _ in range(3)]
    for b in bodies:
        assert (await upload(service, agent_token, b))[0] == 201
    listed = [(s, orjson.loads(doc)) async for s, doc in read_scans(db, service.app[DATA_KEYS], install_id)]
    assert sorted(d["scan_id"] for _, d in listed) == sorted(b["scan_id"] for b in bodies)
    assert all(s.agent_id == agent_id and s.install_id == install_id for s, _ in listed)
    found = await scan_store.find_scan(db, install_id, uuid.UUID(bodies[0]["scan_id"]))
    assert found is not None and found.key_id == epoch_key_id(found.expires_at)
    assert await scan_store.find_scan(db, uuid.uuid4(), uuid.UUID(bodies[0]["scan_id"])) is None


def sealed_row(install_id, scan_id=None, *, now, size=100, token=None, mac=None, key_id=1, key_expires=None):
    """A ScanRow for storage.scans.write_scans: size random sealed bytes (its sizes on the wire, decoded and
    plain all size), a fresh agent, a random MAC and a key epoch ending 40 days after now unless given."""
    return scan_store.ScanRow(install_id, uuid.uuid4(), scan_id or uuid.uuid4(), now, key_id,
                              key_expires or now + dt.timedelta(days=40), mac or os.urandom(32), size, size, size,
                              os.urandom(size), token)


async def test_one_batch_judges_each_scan_in_order(db):
    """write_scans judges one batch row by row: gone, being erased, restricted and revoked-token scans are
    refused; a scan_id stored earlier, or earlier in the same
    batch, is EXISTS with the stored scan's expiry, key and MAC; the quota is spent in batch order (a scan
    over it refused, a smaller later one of the same installation stored); a scan expires with its
    installation's retention or its key's epoch, whichever comes first; the usage rows add up."""
    from storage.partitions import ensure_partitions

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    ok, other, restricted, erasing, gone = (uuid.uuid4() for _ in range(5))
    await db.execute("INSERT INTO installations (install_id, scan_retention_hours) VALUES ($1, 24), ($2, 720)", ok, other)
    await db.execute("INSERT INTO installations (install_id, restricted) VALUES ($1, true)", restricted)
    await db.execute("INSERT INTO installations (install_id, erasing) VALUES ($1, true)", erasing)
    live, revoked = "tok_live_" + uuid.uuid4().hex, "tok_revoked_" + uuid.uuid4().hex
    await db.execute("INSERT INTO tokens (token_id, token_hash, role, install_id, revoked_at) VALUES "
                     "($1, $3, 'agent', $5, NULL), ($2, $4, 'agent', $5, now())", live, revoked, os.urandom(32), os.urandom(32), ok)
    stored_before = uuid.uuid4()
    key_end = now + dt.timedelta(hours=100)

    row = functools.partial(sealed_row, now=now, token=live, key_id=7, key_expires=key_end)

    first = await scan_store.write_scans(db, [row(ok, stored_before, mac=b"m" * 32, key_id=5)], max_bytes=1000)
    assert first == [scan_store.ScanOutcome("stored", now + dt.timedelta(hours=24))]
    repeated = uuid.uuid4()
    batch = [
        row(gone), row(erasing), row(restricted), row(ok, token=revoked),
        row(ok, stored_before),                                          # stored by the batch before
        row(ok, repeated, mac=b"a" * 32, key_id=6, size=300),            # stored ...
        row(ok, repeated, mac=b"b" * 32),                                # ... and found later in this batch
        row(ok, size=700),                                               # 100 + 300 + 700 > 1000
        row(ok, size=500),                                               # 100 + 300 + 500 fits
        row(other, key_expires=now + dt.timedelta(hours=3)),             # its key's epoch ends first
        row(other, token=None),                                          # no token to check
    ]
    out = await scan_store.write_scans(db, batch, max_bytes=1000)
    assert [o.status for o in out] == ["gone", "gone", "restricted", "revoked", "exists", "stored", "exists",
                                       "over_quota", "stored", "stored", "stored"]
    assert out[4] == scan_store.ScanOutcome("exists", now + dt.timedelta(hours=24), 5, b"m" * 32)
    assert out[6] == scan_store.ScanOutcome("exists", now + dt.timedelta(hours=24), 6, b"a" * 32)
    assert out[5].expires_at == out[8].expires_at == now + dt.timedelta(hours=24)
    assert out[9].expires_at == now + dt.timedelta(hours=3)
    assert out[10].expires_at == key_end
    stored = await db.fetch("SELECT install_id, size_plain FROM scans WHERE install_id = ANY($1::uuid[])",
                            [ok, other, restricted, erasing, gone])
    assert sorted((r["install_id"], r["size_plain"]) for r in stored) == sorted(
        [(ok, 100), (ok, 300), (ok, 500), (other, 100), (other, 100)])
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1 AND scan_id = $2", ok, repeated) == 1
    usage = {r["install_id"]: r["bytes"] for r in await db.fetch(
        "SELECT install_id, sum(bytes)::bigint AS bytes FROM scan_usage WHERE install_id = ANY($1::uuid[]) GROUP BY 1", [ok, other])}
    assert usage == {ok: 900, other: 200}
    assert await scan_store.write_scans(db, [], max_bytes=1000) == []


async def test_a_batch_of_interleaved_installations_keeps_its_order_and_each_quota(db):
    """write_scan_batch (data migration 0024) decides per installation but answers in the batch's order:
    one scan_id in two installations is two scans, each installation spends its own quota, a quota of
    None stores everything, and usage of days already past is dropped before the quota is counted."""
    from storage.partitions import ensure_partitions

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    a, b = sorted((uuid.uuid4(), uuid.uuid4()), reverse=True)  # the later install_id first in the batch
    await db.execute("INSERT INTO installations (install_id) VALUES ($1), ($2)", a, b)
    # A past day's usage that would put a over its quota if it still counted.
    await db.execute("INSERT INTO scan_usage (install_id, expires_on, bytes) VALUES ($1, $2, 10000)", a,
                     (now - dt.timedelta(days=2)).date())
    shared = uuid.uuid4()

    row = functools.partial(sealed_row, now=now, size=400)

    batch = [row(a, shared), row(b, shared), row(a), row(b), row(a), row(b, shared)]
    out = await scan_store.write_scans(db, batch, max_bytes=1000)
    assert [o.status for o in out] == ["stored", "stored", "stored", "stored", "over_quota", "exists"]
    assert out[5].content_mac == batch[1].content_mac and out[5].key_id == 1
    assert await db.fetchval("SELECT count(*) FROM scan_usage WHERE install_id = $1 AND expires_on < $2", a, now.date()) == 0
    out = await scan_store.write_scans(db, [row(a, size=5000), row(b, shared, size=5000)], max_bytes=None)
    assert [o.status for o in out] == ["stored", "exists"]
    sizes = {r["install_id"]: r["n"] for r in await db.fetch(
        "SELECT install_id, sum(size_plain)::bigint AS n FROM scans WHERE install_id = ANY($1::uuid[]) GROUP BY 1", [a, b])}
    assert sizes == {a: 5800, b: 800}


async def _wait_for_lock(db, conn, task: asyncio.Task) -> None:
    """Until conn's statement waits for a lock (a row lock or an advisory lock), or task is done without waiting."""
    pid = conn.get_server_pid()
    while not task.done() and not await db.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid):
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("change", "outcome"), [
    ("UPDATE installations SET restricted = true WHERE install_id = $1", "restricted"),
    ("UPDATE installations SET erasing = true WHERE install_id = $1", "gone"),
    ("DELETE FROM installations WHERE install_id = $1", "gone"),
])
async def test_a_restriction_or_erasure_committed_while_the_scan_batch_waits_for_its_lock_wins(db, db_dsn, change, outcome):
    """write_scan_batch locks the installations first and judges them in a fresh snapshot afterwards: a
    restriction, an erasure's start or a deletion that holds the row lock and commits while the batch
    waits for it is seen, and nothing is stored."""
    from storage.partitions import ensure_partitions
    from storage.pool import connect

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", install_id)
    row = sealed_row(install_id, now=now)
    admin, writer = await connect(db_dsn), await connect(db_dsn)
    try:
        tx = admin.transaction()
        await tx.start()
        await admin.execute(change, install_id)
        batch = asyncio.create_task(scan_store.write_scans(writer, [row], max_bytes=None))
        await _wait_for_lock(db, writer, batch)
        await tx.commit()
        assert [o.status for o in await batch] == [outcome]
    finally:
        await admin.close()
        await writer.close()
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1", install_id) == 0
    assert await db.fetchval("SELECT count(*) FROM scan_usage WHERE install_id = $1", install_id) == 0


async def test_a_scan_id_committed_while_the_batch_waits_for_its_advisory_lock_is_found(db, db_dsn):
    """The replay lookup comes after the (installation, scan_id) advisory lock, in a snapshot of its own: a
    batch that waits for another writer of the same scan_id finds that writer's scan once it commits
    (EXISTS, with its MAC and key), and stores no second copy."""
    from storage.partitions import ensure_partitions
    from storage.pool import connect

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    install_id, scan_id = uuid.uuid4(), uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", install_id)

    def row(mac, key_id):
        return sealed_row(install_id, scan_id, now=now, mac=mac, key_id=key_id)

    first, second = await connect(db_dsn), await connect(db_dsn)
    try:
        tx = first.transaction()
        await tx.start()
        assert [o.status for o in await scan_store.write_scans(first, [row(b"f" * 32, 3)], max_bytes=None)] == ["stored"]
        batch = asyncio.create_task(scan_store.write_scans(second, [row(b"s" * 32, 4)], max_bytes=None))
        await _wait_for_lock(db, second, batch)
        await tx.commit()
        [out] = await batch
    finally:
        await first.close()
        await second.close()
    assert (out.status, out.key_id, out.content_mac) == ("exists", 3, b"f" * 32)
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1 AND scan_id = $2", install_id, scan_id) == 1


async def test_a_scan_row_is_sent_in_the_order_of_the_databases_type(db):
    """write_scans sends each ScanRow as it is, plus its lock key, as the composite type scan_row: the
    fields must be the type's attributes, in its order (a field added to one and not the other, or two
    swapped, would write values into the wrong columns or fail only at the first batch)."""
    attributes = [r["attname"] for r in await db.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'scan_row'::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum")]
    assert attributes == [*scan_store.ScanRow._fields, "lock_key"]


async def test_two_batches_naming_the_same_scans_in_opposite_orders_do_not_deadlock(db, db_dsn):
    """write_scan_batch takes a batch's advisory locks in sorted order, whatever the batch's order: two
    batches holding the same two scans in opposite orders queue behind each other instead of each
    holding one lock and waiting for the other (a deadlock, which PostgreSQL would break by failing one
    batch: 503s under contention). Made deterministic: a third session holds the lower lock while both
    batches line up behind it."""
    from storage.partitions import ensure_partitions
    from storage.pool import connect

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    a, b = uuid.uuid4(), uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1), ($2)", a, b)

    rows = sorted((sealed_row(a, now=now), sealed_row(b, now=now)), key=lambda r: scan_store.lock_key(r.install_id, r.scan_id))
    low, high = rows  # by lock key
    holder, first, second = [await connect(db_dsn) for _ in range(3)]
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", scan_store.lock_key(low.install_id, low.scan_id))
        one = asyncio.create_task(scan_store.write_scans(first, [low, high], max_bytes=None))
        await _wait_for_lock(db, first, one)
        two = asyncio.create_task(scan_store.write_scans(second, [high, low], max_bytes=None))
        await _wait_for_lock(db, second, two)
        await tx.commit()
        outcomes = await asyncio.gather(one, two)
    finally:
        for conn in (holder, first, second):
            await conn.close()
    assert [[o.status for o in out] for out in outcomes] == [["stored", "stored"], ["exists", "exists"]]
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = ANY($1::uuid[])", [a, b]) == 2


async def test_a_batch_refused_whole_and_a_repeat_after_an_over_quota_scan(db):
    """Two paths of write_scan_batch the larger batch tests do not take: a batch in which every scan is
    refused (answered before any advisory lock or lookup, nothing stored, no usage row), and a scan_id
    refused over the quota and repeated later in the same batch, smaller: the repeat is judged afresh
    (an over-quota scan is not stored, so there is nothing for it to repeat) and stored."""
    from storage.partitions import ensure_partitions

    now = dt.datetime.now(dt.timezone.utc)
    await ensure_partitions(db, now.date())
    ok, restricted, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id) VALUES ($1)", ok)
    await db.execute("INSERT INTO installations (install_id, restricted) VALUES ($1, true)", restricted)
    revoked = "tok_revoked_" + uuid.uuid4().hex
    await db.execute("INSERT INTO tokens (token_id, token_hash, role, install_id, revoked_at) VALUES ($1, $2, 'agent', $3, now())",
                     revoked, os.urandom(32), ok)

    row = functools.partial(sealed_row, now=now)

    out = await scan_store.write_scans(db, [row(gone), row(restricted), row(ok, token=revoked), row(restricted)], max_bytes=1000)
    assert [o.status for o in out] == ["gone", "restricted", "revoked", "restricted"]
    assert all(o.expires_at is None for o in out)
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = ANY($1::uuid[])", [ok, restricted, gone]) == 0
    assert await db.fetchval("SELECT count(*) FROM scan_usage WHERE install_id = ANY($1::uuid[])", [ok, restricted, gone]) == 0

    again = uuid.uuid4()
    out = await scan_store.write_scans(db, [row(ok, again, size=1200), row(ok, again, size=300)], max_bytes=1000)
    assert [o.status for o in out] == ["over_quota", "stored"]
    assert await db.fetchval("SELECT size_plain FROM scans WHERE install_id = $1 AND scan_id = $2", ok, again) == 300
    assert await db.fetchval("SELECT sum(bytes) FROM scan_usage WHERE install_id = $1", ok) == 300
