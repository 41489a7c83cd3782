"""Bounded work per request (CONTRACT 4a), no people in plaintext (3), exact encodings and times (2, 4).

Against the real service over HTTP (and a real `serve` worker for the memory bound); the
value counter and the prepare slots also directly, with hypothesis for the counter.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from unittest import mock

import aiohttp
import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.http.budget import JsonBudget, check_budget
from ingest.errors import BadRequest, TooLarge, Unavailable
from ingest.keys import POOL, RESTRICTIONS
from ingest.http.slots import PrepareSlots
from tests.fault_tools import JSON, agent_of, gzip_bomb, scan_body
from tests.support import heartbeat_body, start_service

MIB = 1 << 20


def values_bomb(objects: int) -> bytes:
    """`{"x":[{},{},...]}` with that many empty objects, as one zstd frame (about 1.3 KiB for 5 million)."""
    text = b'{"x":[' + b",".join([b"{}"] * objects) + b"]}"
    return zstandard.ZstdCompressor(level=19).compress(text)


def vm_hwm(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def stored(service) -> tuple[int, int]:
    async with service.app[POOL].acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM heartbeats"), await conn.fetchval("SELECT count(*) FROM scans")


def decoded_scan_bytes(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("telemetry_request_bytes_total") and '"/v1/scans"' in line and '"decoded"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------ the value bomb against a serve worker


@pytest.mark.slow
async def test_value_bomb_is_refused_with_little_memory_while_a_heartbeat_is_served(db_dsn, master_key, tmp_path, db):
    from tests.test_serve import ServeProcess, enroll

    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}
    server = ServeProcess(env, "--workers", "1")
    bombs = {"14 MiB": values_bomb(5_000_000), "60 MiB": values_bomb(21_000_000)}
    assert len(bombs["14 MiB"]) < 1400 and len(bombs["60 MiB"]) < 6000
    try:
        await server.wait_ready()
        [worker] = server.workers()
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, env)
            async with http.post(server.url + "/v1/agents", json={"name": "a"}, headers={"Authorization": f"Bearer {token}"}) as r:
                agent_token = (await r.json())["token"]
            hb = {"Authorization": f"Bearer {token}"}
            agent = {**JSON, "Authorization": f"Bearer {agent_token}", "Content-Encoding": "zstd"}
            # Warm up every path the bomb and the heartbeat take (threads, pools, caches), then take the baseline.
            async with http.post(server.url + "/v1/scans", data=zstandard.ZstdCompressor().compress(orjson.dumps(scan_body())),
                                 headers=agent) as r:
                assert r.status == 201
            async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id), headers=hb) as r:
                assert r.status == 200
            baseline = vm_hwm(worker)
            for name, bomb in bombs.items():

                async def send_bomb():
                    async with http.post(server.url + "/v1/scans", data=bomb, headers=agent) as r:
                        return r.status, await r.json()

                async def heartbeat_meanwhile():
                    await asyncio.sleep(0.005)  # the bomb is on its way first
                    async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id), headers=hb) as r:
                        return r.status

                (status, body), hb_status = await asyncio.gather(send_bomb(), heartbeat_meanwhile())
                peak = vm_hwm(worker)
                print(f"{name} bomb ({len(bomb)} bytes): {status}, worker peak {(peak - baseline) / MIB:.1f} MiB above baseline")
                assert status == 413 and "JSON values" in body["detail"], body
                assert hb_status == 200
                assert peak - baseline < 100 * MIB
        assert server.workers() == [worker]
        assert await db.fetchval("SELECT count(*) FROM scans") == 1
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 1 + len(bombs)
    finally:
        assert server.stop() == 0


# ------------------------------------------------------------------ the value budget over HTTP


async def test_value_budget_is_exact_at_the_boundary(db_dsn, master_key, tmp_path):
    async with start_service(db_dsn, master_key, tmp_path, json_max_values=100) as svc:
        install_id, token = await svc.enroll()
        base = heartbeat_body(install_id)  # 7 values: the object and its six fields

        def with_extra(n: int) -> dict:
            return {**base, "extra": list(range(n - len(base) - 2))}  # the list and its items: n values in all

        status, body, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=with_extra(100))
        assert status == 200 and body["dropped_fields"] == ["extra"], body
        for doc in (with_extra(101), {**base, "extra": ",:[{" * 200}):  # strings' structural bytes do not count
            status, body, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=doc)
            if "extra" in doc and isinstance(doc["extra"], str):
                assert status == 200, body
            else:
                assert status == 413 and "more than 100 JSON values" in body["detail"], body
        packed = gzip.compress(orjson.dumps(with_extra(101)))
        status, body, _ = await svc.request("POST", "/v1/heartbeats", token=token, data=packed, headers={**JSON, "Content-Encoding": "gzip"})
        assert status == 413, body
        assert await stored(svc) == (2, 0)


async def test_restricted_installation_scan_bomb_is_refused_before_inflating(service, db):
    install_id, token = await service.enroll()
    _, agent_token = await agent_of(service, token)
    admin = service.create_secret("admin-token")
    restrict = "/v1/admin/installations/%s/restriction" % install_id
    assert (await service.request("PUT", restrict, token=admin, json={"restricted": True}))[0] == 200
    before = decoded_scan_bytes((await service.request("GET", "/metrics"))[1])
    for bomb, enc in ((values_bomb(5_000_000), "zstd"), (gzip_bomb(256 * MIB), "gzip")):
        status, body, _ = await service.request("POST", "/v1/scans", token=agent_token, data=bomb,
                                                headers={**JSON, "Content-Encoding": enc})
        assert status == 403 and body["status"] == 403 and "restricted" in body["detail"], body
    assert decoded_scan_bytes((await service.request("GET", "/metrics"))[1]) == before  # nothing was inflated
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 403
    # Lifted: accepted again at once on this worker.
    assert (await service.request("PUT", restrict, token=admin, json={"restricted": False}))[0] == 200
    assert (await service.request("POST", "/v1/scans", token=agent_token, json=scan_body()))[0] == 201
    # A change another worker made (here: straight in the database) is followed within a poll or two.
    await db.execute("UPDATE installations SET restricted = true WHERE install_id = $1", install_id)
    for _ in range(100):
        status, _, _ = await service.request("POST", "/v1/scans", token=agent_token, json=scan_body())
        if status == 403:
            break
        await asyncio.sleep(0.05)
    assert status == 403
    # The writer still checks the row itself: with this worker's cache behind, nothing is stored either.
    service.app[RESTRICTIONS]._restricted.discard(install_id)
    count = await db.fetchval("SELECT count(*) FROM scans")
    status, body, _ = await service.request("POST", "/v1/scans", token=agent_token, json=scan_body())
    assert status == 403 and body["type"].endswith("/restricted"), body
    assert await db.fetchval("SELECT count(*) FROM scans") == count == 1


# ------------------------------------------------------------------ no people in plaintext


PERSONAL = [
    "bob@corp.example", "alice.smith@corp.example laptop", "10.1.2.3", "host 192.168.0.17", "10.1.2.3:8080",
    "2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1", "00:1A:2B:3C:4D:5E", "00-1a-2b-3c-4d-5e", "001a.2b3c.4d5e",
]
ORDINARY = ["enterprise", "4.2.1", "postgresql", "IIS 10.0", "MySQL 8.0.36", "nginx/1.25.3", "10.0.19041.1",
            "8.0.36-0ubuntu0.22.04.1", "Microsoft-SQL-Server-2019"]


async def test_plaintext_fields_refuse_personal_shapes_and_take_ordinary_values(service, db):
    install_id, token = await service.enroll()
    for field in ("license_type", "db_server_type", "web_server_type", "version"):
        for value in PERSONAL:
            if field == "version" and not all(c.isalnum() or c in ".+-" for c in value):
                continue  # the version's own pattern refuses it first (also 422)
            status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, **{field: value[:32]}))
            assert status == 422 and body["detail"].startswith(field + ":") and "e-mail" in body["detail"], (field, value, body)
    for value in PERSONAL:
        status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": value})
        assert status == 422 and body["detail"].startswith("name:"), (value, body)
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0
    assert await db.fetchval("SELECT count(*) FROM agents") == 0
    assert await db.fetchval("SELECT count(*) FROM installations WHERE license_type IS NOT NULL") == 0
    # A trailing newline is not part of a version (the pattern matches the whole value).
    status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, version="1.0\n"))
    assert status == 422 and body["detail"].startswith("version:"), body
    for value in ORDINARY:
        for field in ("license_type", "db_server_type", "web_server_type", "version"):
            if field == "version" and not all(c.isalnum() or c in ".+-" for c in value):
                continue  # not a version by the version's own pattern
            status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, **{field: value}))
            assert status == 200, (field, value, body)
            assert await db.fetchval(f"SELECT {field} FROM installations WHERE install_id = $1", install_id) == value
        status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": value})
        assert status == 201, body
    # A scan is sealed whole: its addresses are declared fields, encrypted, and accepted.
    _, agent_token = await agent_of(service, token)
    status, _, _ = await service.request("POST", "/v1/scans", token=agent_token, json=scan_body(
        asset={"name": "ws", "ip_address": "10.1.2.3", "mac_address": "00:1A:2B:3C:4D:5E", "last_user": "bob@corp.example"}))
    assert status == 201


# ------------------------------------------------------------------ exact encodings


async def test_encodings_are_exactly_one_member_or_frame(service, db):
    install_id, token = await service.enroll()
    _, agent_token = await agent_of(service, token)
    hb = orjson.dumps(heartbeat_body(install_id))
    scan = orjson.dumps(scan_body())
    for path, tok, doc in (("/v1/heartbeats", token, hb), ("/v1/scans", agent_token, scan)):
        g = gzip.compress(doc)
        z = zstandard.ZstdCompressor().compress(doc)
        z_checked = zstandard.ZstdCompressor(write_checksum=True).compress(doc)
        cases = {
            "gzip": [g + g, g + b"\0", g + b"trailing", g[:-4], g[:10]],
            "zstd": [z + z, z + b"\0", z + b"trailing", z[:-1], z[: len(z) // 2], z_checked[:-2]],
        }
        for enc, bodies in cases.items():
            for data in bodies:
                status, body, _ = await service.request("POST", path, token=tok, data=data, headers={**JSON, "Content-Encoding": enc})
                assert status == 400 and enc in body["detail"], (path, enc, data[-12:], body)
        for enc, data in (("gzip", g), ("zstd", z), ("zstd", z_checked)):
            status, body, _ = await service.request("POST", path, token=tok, data=data, headers={**JSON, "Content-Encoding": enc})
            assert status in (200, 201), (path, enc, body)
    assert await db.fetchval("SELECT count(*) FROM scans") == 1  # the same scan three times: stored once, replayed


# ------------------------------------------------------------------ times, integers, 405


async def test_scanned_at_is_strictly_rfc3339(service, db):
    install_id, token = await service.enroll()
    _, agent_token = await agent_of(service, token)
    for bad in ("2026-W48-2T10:00:00Z", "2026-335T10:00:00Z", "2026-12-01T10:00:00", "2026-12-01 10:00:00Z",
                "2026-12-01T10:00Z", "20261201T100000Z", "2026-12-01T10:00:00+0530", "2026-12-01T10:00:00Z\n",
                "2026-02-30T10:00:00Z", "2026-12-01T24:00:00Z", "2026-12-01", "T10:00:00Z"):
        status, body, _ = await service.request("POST", "/v1/scans", token=agent_token, json=scan_body(scanned_at=bad))
        assert status == 422 and body["detail"].startswith("scanned_at:"), (bad, body)
    assert await db.fetchval("SELECT count(*) FROM scans") == 0
    for good in ("2026-12-01T10:00:00Z", "2026-12-01t10:00:00.123456789+05:30", "2026-12-01T10:00:00-00:00", "2016-12-31T23:59:60Z"):
        status, body, _ = await service.request("POST", "/v1/scans", token=agent_token, json=scan_body(scanned_at=good))
        assert status == 201, (good, body)


async def test_integral_numbers_are_integers(service, db):
    install_id, token = await service.enroll()
    _, agent_token = await agent_of(service, token)
    status, body, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, asset_count=4215.0))
    assert status == 200, body
    assert await db.fetchval("SELECT asset_count FROM installations WHERE install_id = $1", install_id) == 4215
    status, body, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 24.0})
    assert status == 200 and body == {"scan_retention_hours": 24}
    scan = scan_body(hardware={"cores": 8.0, "memory_mb": 32768.0})
    assert (await service.request("POST", "/v1/scans", token=agent_token, json=scan))[0] == 201
    for bad in (4215.5, 1e300):
        status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, asset_count=bad))
        assert status == 422


async def test_405_carries_allow(service):
    for method, path, allowed in (("GET", "/v1/heartbeats", {"POST"}), ("DELETE", "/v1/scans", {"POST"}),
                                  ("POST", "/healthz", {"GET", "HEAD"}), ("GET", "/v1/agents/" + str(uuid.uuid4()), {"DELETE"})):
        status, body, headers = await service.request(method, path)
        assert status == 405 and body["status"] == 405
        assert {m.strip() for m in headers["Allow"].split(",")} == allowed, (path, headers.get("Allow"))


# ------------------------------------------------------------------ the prepare slots


async def test_prepare_slots_bound_the_worker_and_share_it_between_tokens():
    slots = PrepareSlots(2, 1, wait=0.2, retry_after=3)
    async with slots.hold("a"):
        with pytest.raises(Unavailable) as refused:  # a's share is taken: a waits, then 503
            async with slots.hold("a"):
                pass
        assert refused.value.headers == {"Retry-After": "3"}
        async with slots.hold("b"):  # another token still finds a slot
            assert slots.busy == 2
            with pytest.raises(Unavailable):
                async with slots.hold("c"):  # both taken
                    pass
    assert slots.busy == 0

    # Waiters get the slot when it frees, within their wait.
    order = []

    async def use(token, hold_for):
        async with slots.hold(token):
            order.append(token)
            await asyncio.sleep(hold_for)

    await asyncio.gather(use("a", 0.05), use("a", 0), use("b", 0.05), use("c", 0))
    assert sorted(order) == ["a", "a", "b", "c"] and slots.busy == 0


async def test_prepare_slots_hand_a_freed_slot_to_the_first_waiter_it_may_go_to():
    """Waiters go in arrival order, one per freed slot; one at its token's share does not hold up a later
    one of another token; a waiter whose wait ends (503) or that is cancelled takes no slot with it."""
    slots = PrepareSlots(1, 1, wait=5.0, retry_after=1)
    order: list[str] = []
    release = asyncio.Event()

    async def use(token: str, name: str) -> None:
        async with slots.hold(token):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(use("a", "first"))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(use(t, n)) for t, n in [("a", "a2"), ("b", "b1"), ("c", "c1"), ("b", "b2")]]
    await asyncio.sleep(0.01)
    assert order == ["first"] and slots.busy == 1
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == ["first", "a2", "b1", "c1", "b2"] and slots.busy == 0

    # two slots, token a holds one and queues again; b, arriving later, takes the other at once
    slots = PrepareSlots(2, 1, wait=5.0, retry_after=1)
    async with slots.hold("a"):
        queued = asyncio.create_task(use("a", "a-again"))
        await asyncio.sleep(0.01)
        async with slots.hold("b"):
            assert slots.busy == 2 and not queued.done()
        await asyncio.sleep(0.01)
        assert slots.busy == 1 and not queued.done()  # b's slot freed, but a is at its share
    await queued
    assert slots.busy == 0

    # a queued waiter at its token's share is passed over for a later one of another token
    slots = PrepareSlots(2, 1, wait=5.0, retry_after=1)
    order.clear()
    gate = asyncio.Event()

    async def hold_until_gate(token: str) -> None:
        async with slots.hold(token):
            order.append(token)
            await gate.wait()

    holders = [asyncio.create_task(hold_until_gate(t)) for t in ("a", "b")]
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(use(t, n)) for t, n in [("a", "a-queued"), ("c", "c-queued")]]
    await asyncio.sleep(0.01)
    holders[1].cancel()  # b's slot frees while a still holds its own: a-queued must wait, c-queued goes
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c-queued"] and not queued[0].done()
    gate.set()
    await asyncio.gather(holders[0], *queued)
    assert order[-1] == "a-queued" and slots.busy == 0

    # a waiter cancelled in the same step as its slot is handed to it hands the slot on
    slots = PrepareSlots(1, 1, wait=5.0, retry_after=1)
    order.clear()
    held = slots.hold("a")
    await held.__aenter__()
    never, later = asyncio.create_task(use("b", "b-never")), asyncio.create_task(use("c", "c-later"))
    await asyncio.sleep(0.01)
    await held.__aexit__(None, None, None)  # hands the slot to b's turn; b has not run yet
    never.cancel()
    await asyncio.gather(never, later, return_exceptions=True)
    assert order == ["c-later"] and never.cancelled() and slots.busy == 0

    # a wait that ends, and a waiter cancelled: neither keeps a slot
    slots = PrepareSlots(1, 1, wait=0.05, retry_after=1)
    async with slots.hold("a"):
        with pytest.raises(Unavailable):
            async with slots.hold("b"):
                pass
        cancelled = asyncio.create_task(use("c", "never"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert slots.busy == 0
    async with slots.hold("d"):
        assert slots.busy == 1


# ------------------------------------------------------------------ the counter itself


def _values(v) -> int:
    if isinstance(v, dict):
        return 1 + sum(_values(x) for x in v.values())
    if isinstance(v, list):
        return 1 + sum(_values(x) for x in v)
    return 1


def _empty_arrays(v) -> int:
    if isinstance(v, dict):
        return sum(_empty_arrays(x) for x in v.values())
    if isinstance(v, list):
        return (not v) + sum(_empty_arrays(x) for x in v)
    return 0


def _depth(v) -> int:
    if isinstance(v, (dict, list)):
        children = v.values() if isinstance(v, dict) else v
        return 1 + max((_depth(c) for c in children), default=0)
    return 0


TRICKY = st.text(alphabet='{}[],:"\\ab \u00e9\u2028/', max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TRICKY,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(TRICKY, c, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(JSON_VALUES, st.sampled_from([None, 0, 2]), st.booleans(), st.lists(st.integers(1, 40), max_size=6), st.integers(1, 12))
@example(["\\", "\\\\", '\\"', '"'], None, True, [1, 2, 3], 3)
@example({"a\\": "\\\\\"{"}, None, False, [], 2)
@example({"a": {}, "b": [{}, {}]}, 2, True, [6, 1, 1, 9, 1], 3)
def test_counter_bounds_values_and_depth_however_the_text_is_cut(value, indent, ascii_only, cuts, max_depth):
    """The count is at least the number of values and at most that plus the empty arrays; the depth limit is exact;
    wherever the text is cut into pieces (inside strings, escapes, between brackets)."""
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    budget = JsonBudget(10**9, max_depth)
    start = 0
    for n in cuts:
        budget.feed(text[start : start + n])
        start += n
    budget.feed(text[start:])
    true = _values(value)
    assert true <= budget.values <= true + _empty_arrays(value)
    if _depth(value) > max_depth:
        with pytest.raises(BadRequest):
            budget.finish()
    else:
        budget.finish()
    if true > 1:
        with pytest.raises(TooLarge):
            check_budget(text, true - 1, 1000)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(JSON_VALUES, st.lists(st.integers(1, 40), max_size=8), st.integers(-3, 3))
@example([0] * 60, [10] * 12, -1)
def test_a_count_left_for_later_keeps_the_limit_exactly_however_the_text_is_cut(value, cuts, slack):
    """While what was fed cannot pass max_values, its values are counted only when asked for or when more comes:
    a limit under the count is still refused while feeding, one above it never, wherever the text is cut. (At
    the count itself, an empty object cut between its braces is counted once until its "}" comes, as before.)"""
    text = json.dumps(value).encode()
    count = check_budget(text, 10**9, 1000)
    limit = max(count + slack, 1)

    def feed_all(budget: JsonBudget) -> None:
        start = 0
        for n in cuts:
            budget.feed(text[start : start + n])
            start += n
        budget.feed(text[start:])

    budget = JsonBudget(limit, 1000)
    if count > limit:
        with pytest.raises(TooLarge):
            feed_all(budget)
    elif count < limit:
        feed_all(budget)
        assert budget.values == count


def test_a_usual_body_is_counted_only_when_asked_for():
    """The fifty software items of a small scan cannot pass the default limit: nothing is counted while feeding."""
    text = json.dumps({"software": [{"name": f"app {i}", "version": "1.0"} for i in range(50)]}).encode()
    budget = JsonBudget(1_000_000, 32)
    budget.feed(text)
    budget.finish()
    assert budget._uncounted  # left for later
    assert budget.values == _values(json.loads(text)) and not budget._uncounted


def test_pieces_left_for_later_hold_memory_by_the_structure_not_by_the_number_of_pieces():
    """A caller feeding a long run of whitespace a byte at a time keeps nothing for each piece."""
    import tracemalloc

    budget = JsonBudget(1_000_000, 32)
    budget.feed(b"[")
    tracemalloc.start()
    try:
        for _ in range(100_000):
            budget.feed(b" ")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget.feed(b"0]")
    budget.finish()
    assert held < 64 * 1024  # one kept entry per piece was about 800 KB here
    assert budget.values == 2


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(["\\", '"', "\n", "a", "\u00e9", "/", "{", ",", ":"]), max_size=200))
def test_escapes_are_cut_as_a_parser_reads_them_whether_few_or_many(parts):
    """Escapes are cut one by one up to FEW_ESCAPES per chunk and in bulk past them: the count is exact either way."""
    from ingest.http import budget

    text = json.dumps({"k": "".join(parts), "l": ["".join(reversed(parts)), {"m": "\\" * len(parts)}]}).encode()
    for few in (0, 1, 3, budget.FEW_ESCAPES):
        with mock.patch.object(budget, "FEW_ESCAPES", few):
            assert check_budget(text, 10**9, 32) == _values(json.loads(text)) == 6
            for piece in (2, 5):  # and cut: the bulk switch may come right after a piece's first byte
                counter = JsonBudget(10**9, 32)
                for start in range(0, len(text), piece):
                    counter.feed(text[start : start + piece])
                assert counter.values == 6


def test_a_run_of_backslashes_across_pieces_is_counted_exactly_in_constant_memory():
    """A string of backslashes fed in pieces (odd and even cuts) keeps at most one unpaired backslash between
    pieces, not the run so far (which cost quadratic time and the run's memory), and counts exactly."""
    from ingest.http.budget import CHUNK

    for run in (1, 2, 3, 2 * CHUNK + 6):
        text = json.dumps({"a": "\\" * run + '"', "b": ["\\" * run]}).encode()
        for piece in (1, 2, 3, 7, CHUNK - 1):
            if piece < 64 and len(text) > 100_000:
                continue  # byte-sized pieces of megabytes: the short texts cover those cuts
            budget = JsonBudget(10**9, 32)
            longest_tail = 0
            for start in range(0, len(text), piece):
                budget.feed(text[start : start + piece])
                longest_tail = max(longest_tail, len(budget._tail))
            budget.finish()
            assert longest_tail <= 1 and budget.values == 4, (run, piece)


def test_counter_is_exact_without_empty_arrays_or_cuts():
    for text in (b'{}', b'{"a":1}', b'{"x":[{},{}]}', b'{"a":"b,c:[{","d":["\\"",1,2]}', b'{"a\\\\":"\\\\\\"{"}',
                 b'{ "a" : [ 1 , { "b" : null } ] , "c" : "]]]" }'):
        assert check_budget(text, 10**9, 32) == _values(json.loads(text)), text


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=300) | st.text(alphabet='{}[],:"\\ 0a\n', max_size=300).map(str.encode),
       st.sampled_from(["identity", "gzip", "zstd"]), st.integers(1, 50), st.integers(2, 8))
def test_decode_takes_any_bytes_and_answers_only_400_or_413(data, encoding, max_values, max_depth):
    """Whatever the bytes (raw, or compressed whole), counting them never fails otherwise than as a 400 or a 413."""
    from ingest.http.body import decode, parse_object

    packed = {"identity": data, "gzip": gzip.compress(data), "zstd": zstandard.ZstdCompressor().compress(data)}[encoding]
    try:
        out = decode(packed, encoding, 1000, max_values=max_values, max_depth=max_depth)
    except (BadRequest, TooLarge):
        return
    assert out == data
    try:
        doc = parse_object(out)
    except BadRequest:
        return
    assert _values(doc) <= max_values and _depth(doc) <= max_depth


class _Clock:
    """A loop stand-in for _Deadlines: a settable time, and timers that fire as uvloop's do, at the
    nearest whole millisecond (up to half a millisecond early)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []  # [fires at, callback, args, cancelled]

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback, *args):
        timer = [round(when * 1000) / 1000, callback, args, False]
        self.timers.append(timer)

        class Handle:
            def cancel(self_inner) -> None:
                timer[3] = True

        return Handle()

    def run_until(self, until: float, after_each) -> None:
        """Fire due timers in time order up to `until`, calling after_each(now) after each."""
        while True:
            due = [t for t in self.timers if not t[3] and t[0] <= until]
            if not due:
                self.now = max(self.now, until)
                return
            timer = min(due, key=lambda t: t[0])
            self.timers.remove(timer)
            self.now = max(self.now, timer[0])
            timer[1](*timer[2])
            after_each(self.now)


_TIMEOUT = 1.5  # each record's deadline: queued at + _TIMEOUT + jitter


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3),  # queued at
                          st.one_of(st.floats(-0.2, 0.2), st.floats(-1.4, -0.3)),  # near order; far out of it
                          st.one_of(st.none(), st.floats(0, 2.5))),  # answered this long after queuing, or never
                min_size=1, max_size=60))
@example([(0.0, 0.2, 0.1), (0.2, -1.4, None)])  # the deque starts again with a deadline before the armed timer
def test_deadlines_fail_each_waiting_record_after_its_deadline_and_at_most_slack_later(records):
    """The group-commit writer's deadlines (ingest.pipeline.batching._Deadlines: one timer for the records
    queued nearly in deadline order, one of its own for a record far out of order), on a clock that fires
    timers up to half a millisecond early as uvloop does: a record not answered by its deadline fails
    after it and at most SLACK + LATE after it; one answered first never fails; after every queuing the
    first record waiting is unanswered (answered ones leave from the front)."""
    from ingest.pipeline.batching import _Deadlines, _Expired

    loop = asyncio.new_event_loop()
    try:
        clock = _Clock()
        deadlines = _Deadlines(clock)
        failed_at: dict[int, float] = {}
        futures: list[tuple[asyncio.Future, float, float | None]] = []

        def note(now: float) -> None:
            for n, (fut, _, _) in enumerate(futures):
                if n not in failed_at and fut.done() and not fut.cancelled() and fut.exception() is not None:
                    failed_at[n] = now

        events = []  # (time, order, kind, record index)
        for n, (queued_at, jitter, answer_after) in enumerate(records):
            events.append((queued_at, 0, "queue", n))
            if answer_after is not None:
                events.append((queued_at + answer_after, 1, "answer", n))
        index: dict[int, int] = {}
        for at, _, kind, n in sorted(events):
            clock.run_until(at, note)
            if kind == "queue":
                fut = loop.create_future()
                deadline = at + _TIMEOUT + records[n][1]
                index[n] = len(futures)
                futures.append((fut, deadline, None if records[n][2] is None else at + records[n][2]))
                deadlines.add(deadline, fut)
                assert not deadlines._waiting or not deadlines._waiting[0][1].done()
            elif not futures[index[n]][0].done():
                futures[index[n]][0].set_result("stored")
        clock.run_until(20.0, note)
        late = _Deadlines.SLACK + _Deadlines.LATE + 0.0005
        for n, (fut, deadline, answered_at) in enumerate(futures):
            assert fut.done(), (n, deadline)
            if fut.exception() is None:  # answered before it failed
                assert n not in failed_at and answered_at is not None
            else:
                assert isinstance(fut.exception(), _Expired)
                assert deadline <= failed_at[n] <= deadline + late, (n, deadline, failed_at[n])
                assert answered_at is None or answered_at >= deadline, (n, deadline, answered_at)
    finally:
        loop.close()
