"""Hostile input: each answered by the contract's 4xx, never a 500; the worker stays up; nothing is stored.

Over real HTTP (and below it, with raw bytes on a socket, where a client library would
refuse to send such a thing), against the real app and a real PostgreSQL; the last test
does the same to a `serve` worker process and checks it is the same process afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
import uuid

import aiohttp
import orjson
import pytest
import zstandard

from ingest.keys import POOL
from tests.fault_tools import JSON, agent_of, chunked, gzip_bomb, http_request, raw_http, scan_body, zstd_bomb
from tests.support import heartbeat_body, start_service

MIB = 1 << 20


def port_of(service) -> int:
    return int(service.url.rsplit(":", 1)[1])


@pytest.fixture
async def target(service):
    """An installation and its agent on the default-configured service; checks afterwards that nothing broke."""
    install_id, token = await service.enroll()
    _, agent_token = await agent_of(service, token)
    t = Target(service, install_id, token, agent_token)
    yield t
    await t.still_serving()


class Target:
    def __init__(self, service, install_id, token, agent_token):
        self.service, self.install_id, self.token, self.agent_token = service, install_id, token, agent_token
        self.port = port_of(service)

    def heartbeat(self, **extra) -> bytes:
        return orjson.dumps(heartbeat_body(self.install_id, **extra))

    async def send(self, path: str, data: bytes, headers: dict | None = None, *, token: str | None = None):
        token = token or (self.agent_token if path == "/v1/scans" else self.token)
        return await self.service.request("POST", path, token=token, data=data, headers={**JSON, **(headers or {})})

    async def expect(self, status: int | tuple[int, ...], path: str, data: bytes, headers: dict | None = None, **kw):
        """POST data; the answer must be (one of) status, as a problem document."""
        got, body, h = await self.send(path, data, headers, **kw)
        wanted = (status,) if isinstance(status, int) else status
        assert got in wanted, (path, got, body, data[:60])
        assert h["Content-Type"].startswith("application/problem+json") and body["status"] == got, body
        return got

    async def stored(self) -> tuple[int, int]:
        async with self.service.app[POOL].acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM heartbeats"), await conn.fetchval("SELECT count(*) FROM scans")

    async def still_serving(self) -> None:
        """The process answers, a valid heartbeat and scan are accepted, nothing hostile was stored, no 500 ever."""
        assert (await self.service.request("GET", "/healthz"))[0] == 200
        before = await self.stored()
        assert before == (0, 0), f"hostile input was stored: {before}"
        assert (await self.send("/v1/heartbeats", self.heartbeat()))[0] == 200
        assert (await self.send("/v1/scans", orjson.dumps(scan_body())))[0] == 201
        metrics = (await self.service.request("GET", "/metrics"))[1]
        assert 'status="500"' not in metrics


# ------------------------------------------------------------------ bodies over the limits


async def test_bodies_over_the_limits_with_and_without_content_length(target):
    limits = {"/v1/heartbeats": MIB, "/v1/scans": 16 * MIB, "/v1/enroll": 64 * 1024}
    tokens = {"/v1/heartbeats": target.token, "/v1/scans": target.agent_token, "/v1/enroll": target.service.create_secret()}
    for path, limit in limits.items():
        token = tokens[path]
        body = b'{"pad": "' + b"x" * limit + b'"}'
        # With Content-Length: refused from the header, before reading.
        status, _, raw = await raw_http(target.port, http_request("POST", path, token=token, body=body, headers=JSON))
        assert status == 413, (path, status, raw)
        # Declaring 10 GiB and sending little: refused from the header too.
        status, _, _ = await raw_http(target.port, http_request("POST", path, token=token, body=b"{}",
                                                                headers={**JSON, "Content-Length": str(10 << 30)}, length=False))
        assert status == 413, (path, status)
        # Without Content-Length (chunked): refused while reading, once past the limit.
        status, _, raw = await raw_http(target.port, http_request("POST", path, token=token, body=chunked(body),
                                                                  headers={**JSON, "Transfer-Encoding": "chunked"}, length=False))
        assert status == 413, (path, status, raw)
    # The same through the client library, streamed without a length.
    async def stream(n):
        for _ in range(n):
            yield b"x" * MIB

    for path, n in (("/v1/heartbeats", 2), ("/v1/scans", 17)):
        try:
            status, body, _ = await target.send(path, stream(n))
            assert status == 413 and body["status"] == 413
        except aiohttp.ClientError:
            pass  # the server may answer and close while the client still sends


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """256 MiB of zeros, compressed (four times the largest decoded scan)."""
    return {"gzip": gzip_bomb(256 * MIB), "zstd": zstd_bomb(256 * MIB)}


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_compression_bombs(target, bombs, encoding):
    bomb = bombs[encoding]
    assert len(bomb) < 2 * MIB
    for path in ("/v1/heartbeats", "/v1/scans"):
        await target.expect(413, path, bomb, {"Content-Encoding": encoding})
    # A bomb hidden in a valid document: a small heartbeat whose padding inflates past the limit.
    pad = heartbeat_body(target.install_id, pad="0" * (2 * MIB))
    packed = gzip.compress(orjson.dumps(pad)) if encoding == "gzip" else zstandard.ZstdCompressor().compress(orjson.dumps(pad))
    await target.expect(413, "/v1/heartbeats", packed, {"Content-Encoding": encoding})
    # Truncated and corrupt streams
    scan = orjson.dumps(scan_body())
    packed = gzip.compress(scan) if encoding == "gzip" else zstandard.ZstdCompressor().compress(scan)
    await target.expect(400, "/v1/scans", packed[: len(packed) // 2], {"Content-Encoding": encoding})
    await target.expect(400, "/v1/heartbeats", b"\x1f\x8b\x08\x00garbage" if encoding == "gzip" else b"\x28\xb5\x2f\xfdgarbage",
                        {"Content-Encoding": encoding})


# ------------------------------------------------------------------ JSON


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return b'{"custom": ' + open_ * depth + close * depth + b"}"


async def test_json_nested_a_million_deep(target):
    deep = nested(1_000_000)  # 2 MB
    await target.expect(413, "/v1/heartbeats", deep)  # over the heartbeat limit as it stands
    await target.expect(413, "/v1/heartbeats", gzip.compress(deep), {"Content-Encoding": "gzip"})
    # Within the scan's size limit, but 1,000,002 values: over TELEMETRY_JSON_MAX_VALUES.
    await target.expect(413, "/v1/scans", deep)
    await target.expect(413, "/v1/scans", zstandard.ZstdCompressor().compress(deep), {"Content-Encoding": "zstd"})
    # Within both: too deep, not acceptable JSON.
    deep = nested(900_000)
    await target.expect(400, "/v1/scans", deep)
    await target.expect(400, "/v1/scans", zstandard.ZstdCompressor().compress(deep), {"Content-Encoding": "zstd"})
    objects = b'{"custom": ' + b'{"a":' * 900_000 + b"1" + b"}" * 900_000 + b"}"
    await target.expect(400, "/v1/scans", objects)
    # Deeper than the policy allows, in every range of the parsers: 33, past orjson's writer (254),
    # past the interpreter's recursion limit, past orjson's reader (1024).
    for depth in (33, 300, 1000, 1030):
        body = orjson.loads(target.heartbeat())
        text = orjson.dumps(body)[:-1] + b', "custom": ' + b"[" * depth + b"]" * depth + b"}"
        await target.expect(400, "/v1/heartbeats", text)
        await target.expect(400, "/v1/scans", b'{"scan_id": "%s", "scanned_at": "2025-01-01T00:00:00Z", "x": ' % str(uuid.uuid4()).encode()
                            + b"{\"a\":" * depth + b"1" + b"}" * depth + b"}")


async def test_numbers_with_5000_digits(target):
    digits = "9" * 5000
    for value in (digits, "-" + digits, "1" + "0" * 4999, "1e5000", "-1e5000"):
        text = target.heartbeat()[:-1] + b', "asset_count": ' + value.encode() + b"}"
        await target.expect(400, "/v1/heartbeats", text.replace(b'"asset_count":120,', b""))
    # Read as floats: finite ones with a fraction are not integers (422), the rest are not acceptable JSON numbers (400).
    for value, expected in (("1." + "5" * 5000, 422), ("0.5", 422), ("1e-300", 422), (digits[:400] + ".5", 400)):
        text = target.heartbeat().replace(b'"asset_count":120', b'"asset_count":' + value.encode())
        await target.expect(expected, "/v1/heartbeats", text)
    # Numbers are read as IEEE 754 doubles (as most JSON Schema validators read them): a decimal that
    # rounds to a whole double is that integer.
    for value, stored in (("0." + digits, 1), ("1e-5000", 0), ("4215.0", 4215), ("4.215e3", 4215)):
        text = target.heartbeat().replace(b'"asset_count":120', b'"asset_count":' + value.encode())
        status, body, _ = await target.send("/v1/heartbeats", text)
        assert status == 200, body
        async with target.service.app[POOL].acquire() as conn:
            assert await conn.fetchval("SELECT asset_count FROM installations WHERE install_id = $1", target.install_id) == stored
            await conn.execute("DELETE FROM heartbeats")  # "nothing hostile stored" stays a plain count
    scan = orjson.dumps(scan_body()).replace(b'"cores":8', b'"cores":' + digits.encode())
    await target.expect(400, "/v1/scans", scan)
    scan = orjson.dumps(scan_body()).replace(b'"size_gb":512', b'"size_gb":' + ("1" + "0" * 400).encode())
    await target.expect((400, 422), "/v1/scans", scan)


async def test_duplicate_keys(target):
    other = str(uuid.uuid4()).encode()
    hb = target.heartbeat()
    cases = [
        ("/v1/heartbeats", hb[:-1] + b', "install_id": "' + other + b'"}'),  # the last would win: another installation's id
        ("/v1/heartbeats", b'{"install_id": "' + other + b'", ' + hb[1:]),  # the first would
        ("/v1/heartbeats", hb[:-1] + b', "asset_count": 1}'),
        ("/v1/heartbeats", hb[:-1] + b', "\\u0061sset_count": 1}'),  # the same key, escaped
        ("/v1/heartbeats", hb[:-1] + b', "x": {"a": "10:00", "a": "10:00"}}'),  # deep, undeclared, colons in strings
        ("/v1/heartbeats", hb[:-1] + b',\n  "email" :  "a@example.com" ,\n"email":"b@example.com"}'),  # spacing
        ("/v1/scans", orjson.dumps(scan_body()).replace(b'"name":"App-plain"', b'"name":"App-plain","name":"x\\\\u003a"')),
        ("/v1/scans", orjson.dumps(scan_body())[:-1] + b',"scan_id":"' + str(uuid.uuid4()).encode() + b'"}'),
        ("/v1/enroll", b'{"install_id": "' + str(uuid.uuid4()).encode() + b'", "install_id": "' + other + b'"}'),
    ]
    secret = target.service.create_secret()
    for path, data in cases:
        token = secret if path == "/v1/enroll" else None
        got = await target.expect(400, path, data, token=token)
        assert got == 400
    # No false alarm: the same keys in different objects, and colons and escapes inside strings.
    fine = hb[:-1] + b', "x": [{"a": "10:00\\u003a"}, {"a": "\\\\u003a"}], "y": {"a": {"a": 1}}}'
    status, body, _ = await target.send("/v1/heartbeats", fine)
    assert status == 200 and body["dropped_fields"] == ["x", "y"]
    async with target.service.app[POOL].acquire() as conn:
        await conn.execute("DELETE FROM heartbeats")  # the accepted one: "nothing hostile stored" stays a plain count


INVALID_UTF8 = [
    b"\xff", b"\xc0\xaf",  # not UTF-8 at all; an overlong "/"
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xe2\x82",  # a truncated sequence
    b"\\ud800",  # an escaped lone surrogate
]


async def test_invalid_utf8(target):
    for bad in INVALID_UTF8:
        await target.expect(400, "/v1/heartbeats", target.heartbeat().replace(b'"enterprise"', b'"ent' + bad + b'"'))
        await target.expect(400, "/v1/heartbeats", target.heartbeat()[:-1] + b', "k' + bad + b'": 1}')
        await target.expect(400, "/v1/scans", orjson.dumps(scan_body()).replace(b'"App-plain"', b'"App' + bad + b'"'))
    # Invalid bytes in headers: no token of ours, whatever the prefix.
    status, _, _ = await raw_http(target.port, http_request("POST", "/v1/heartbeats", body=target.heartbeat(), headers={
        **JSON, "Authorization": "Bearer tii_\xff\xfe\xc0\xaf"}))
    assert status == 401


async def test_wrong_content_types_and_encodings(target):
    hb = target.heartbeat()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/json; charset=latin-1", "application/jsonp", "application/json-seq", ""):
        await target.expect(415, "/v1/heartbeats", hb, {"Content-Type": ctype})
        await target.expect(415, "/v1/scans", orjson.dumps(scan_body()), {"Content-Type": ctype})
    status, _, _ = await raw_http(target.port, http_request("POST", "/v1/heartbeats", token=target.token, body=hb))  # none at all
    assert status == 415
    for enc in ("br", "deflate", "compress", "gzip, gzip", "zstd, gzip", "x-gzip"):
        await target.expect(415, "/v1/heartbeats", hb, {"Content-Encoding": enc})
    # Valid JSON that is not an object
    for doc in (b"[]", b'"x"', b"null", b"1", b"", b" ", b"\xef\xbb\xbf{}"):
        await target.expect(400, "/v1/heartbeats", doc)


# ------------------------------------------------------------------ HTTP itself


async def test_headers_too_large_and_malformed_requests(target):
    hb = target.heartbeat()
    cases = {
        "one 16 KiB header": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, "X-Big": "a" * 16384}),
        "a 1 MiB header": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, "X-Big": "a" * MIB}),
        "a huge token": http_request("POST", "/v1/heartbeats", token="tii_" + "a" * 20000, body=hb, headers=JSON),
        "500 headers": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, **{f"X-H{i}": "v" for i in range(500)}}),
        "a 20 KiB URL": http_request("POST", "/v1/heartbeats?" + "a" * 20000, token=target.token, body=hb, headers=JSON),
        "Content-Length and chunked": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, "Transfer-Encoding": "chunked"}),
        "two Content-Lengths": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, "Content-Length": "3"}),
        "bad chunk size": http_request("POST", "/v1/heartbeats", token=target.token, body=b"zz\r\n{}\r\n0\r\n\r\n", headers={**JSON, "Transfer-Encoding": "chunked"}, length=False),
        "negative length": http_request("POST", "/v1/heartbeats", token=target.token, body=b"", headers={**JSON, "Content-Length": "-1"}, length=False),
        "NUL in a header": http_request("POST", "/v1/heartbeats", token=target.token, body=hb, headers={**JSON, "X-N": "a\0b"}),
        "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
    }
    for name, request in cases.items():
        status, headers, body = await raw_http(target.port, request)
        assert status is not None and 400 <= status < 500, (name, status, body[:100])
    # Unknown method, unknown path
    for method in ("BREW", "PATCH"):
        status, _, _ = await raw_http(target.port, http_request(method, "/v1/heartbeats", token=target.token, body=hb, headers=JSON))
        assert 400 <= status < 500, (method, status)
    status, _, _ = await raw_http(target.port, http_request("GET", "/v1/../v1/admin/stats", token=target.token))
    assert status in (403, 404)


# ------------------------------------------------------------------ slow clients


async def slowloris(port: int, request: bytes, interval: float, limit: float) -> tuple[float, int | None]:
    """Send a byte every interval until the server closes; (seconds until it did, status it answered if any)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    status = None
    try:
        for i in range(len(request)):
            if reader.at_eof() or writer.transport.is_closing() or time.monotonic() - started > limit:
                break
            try:
                writer.write(request[i : i + 1])
                await writer.drain()
            except ConnectionError:
                break
            try:
                data = await asyncio.wait_for(reader.read(1024), interval)
            except asyncio.TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 "):
                status = int(data[9:12])
            break
        else:
            return time.monotonic() - started, None
        return time.monotonic() - started, status
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


@pytest.mark.slow
async def test_slow_clients_are_cut_off_after_the_read_timeout_without_starving_others(db_dsn, master_key, tmp_path):
    async with start_service(db_dsn, master_key, tmp_path, read_timeout=1.5) as svc:
        install_id, token = await svc.enroll()
        _, agent_token = await agent_of(svc, token)
        port = port_of(svc)
        hb = orjson.dumps(heartbeat_body(install_id))
        head_slow = http_request("POST", "/v1/heartbeats", token=token, body=hb, headers=JSON)
        body_slow = http_request("POST", "/v1/scans", token=agent_token, body=orjson.dumps(scan_body()), headers=JSON)
        # 30 clients trickling their headers, 10 their bodies (headers sent whole first), a byte every 0.3 s.
        heads = [asyncio.create_task(slowloris(port, head_slow, 0.3, limit=30)) for _ in range(30)]

        async def slow_body():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            split = body_slow.index(b"\r\n\r\n") + 4
            writer.write(body_slow[:split])
            started = time.monotonic()
            try:
                for i in range(split, len(body_slow)):
                    writer.write(body_slow[i : i + 1])
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(1024), 0.3)
                    except asyncio.TimeoutError:
                        continue
                    return time.monotonic() - started, int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None
                return time.monotonic() - started, None
            except ConnectionError:
                return time.monotonic() - started, None
            finally:
                writer.close()

        bodies = [asyncio.create_task(slow_body()) for _ in range(10)]
        # Meanwhile others are served, on fresh connections.
        served = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                async with http.post(svc.url + "/v1/heartbeats", data=hb, headers={**JSON, "Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
                    served += 1
        head_results = await asyncio.gather(*heads)
        body_results = await asyncio.gather(*bodies)
        print(f"slow headers closed after {max(t for t, _ in head_results):.1f} s at most; "
              f"slow bodies after {max(t for t, _ in body_results):.1f} s; {served} heartbeats served meanwhile")
        assert served >= 3
        # Cut off, well before they could have finished (a generous bound: not a timing assertion).
        assert all(t < 20 for t, _ in head_results), head_results
        assert all(t < 20 and s in (408, None) for t, s in body_results), body_results
        assert any(s == 408 for _, s in body_results)
        assert (await svc.request("GET", "/healthz"))[0] == 200


# ------------------------------------------------------------------ the same against a serve worker


@pytest.mark.slow
async def test_hostile_inputs_do_not_kill_a_serve_worker(db_dsn, master_key, tmp_path, bombs, db):
    from tests.test_serve import ServeProcess, enroll

    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}
    server = ServeProcess(env, "--workers", "1")
    try:
        await server.wait_ready()
        [worker] = server.workers()
        port = server.port
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, env)
            async with http.post(server.url + "/v1/agents", json={"name": "a"}, headers={"Authorization": f"Bearer {token}"}) as r:
                agent_token = (await r.json())["token"]
        hb = orjson.dumps(heartbeat_body(install_id))
        scan = orjson.dumps(scan_body())
        worst = [
            ("/v1/scans", agent_token, nested(1_000_000), {}),
            ("/v1/scans", agent_token, b'{"x":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}", {}),
            ("/v1/heartbeats", token, hb[:-1] + b', "x": ' + b"[" * 1020 + b"]" * 1020 + b"}", {}),
            ("/v1/scans", agent_token, bombs["gzip"], {"Content-Encoding": "gzip"}),
            ("/v1/scans", agent_token, bombs["zstd"], {"Content-Encoding": "zstd"}),
            ("/v1/heartbeats", token, hb.replace(b"120", b"9" * 5000), {}),
            ("/v1/heartbeats", token, hb[:-1] + b', "install_id": "' + str(uuid.uuid4()).encode() + b'"}', {}),
            ("/v1/scans", agent_token, scan.replace(b"App-plain", b"App\xed\xa0\x80"), {}),
            ("/v1/heartbeats", token, hb, {"X-Big": "a" * MIB}),
        ]
        for path, tok, data, headers in worst:
            status, _, body = await raw_http(port, http_request("POST", path, token=tok, body=data, headers={**JSON, **headers}), timeout=60)
            assert status is not None and 400 <= status < 500, (path, status, body[:200])
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/heartbeats", data=hb, headers={**JSON, "Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        assert server.workers() == [worker]  # the same process: never killed, never replaced
        assert "worker exited" not in server.stderr
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 1
        assert await db.fetchval("SELECT count(*) FROM scans") == 0
    finally:
        assert server.stop() == 0


# ------------------------------------------------------------------ values the database refuses


async def test_nul_characters_are_422_and_never_fail_other_requests(target):
    """PostgreSQL text cannot hold U+0000; a heartbeat with one must not fail the batch it would share (found by fuzzing)."""
    bad = target.heartbeat(license_type="ent\u0000erprise")
    results = await asyncio.gather(
        target.send("/v1/heartbeats", bad), *(target.send("/v1/heartbeats", target.heartbeat()) for _ in range(20)))
    assert results[0][0] == 422 and "license_type" in results[0][1]["detail"]
    assert [r[0] for r in results[1:]] == [200] * 20
    status, body, _ = await target.service.request("POST", "/v1/agents", token=target.token, json={"name": "a\u0000b"})
    assert status == 422 and body["status"] == 422
    async with target.service.app[POOL].acquire() as conn:
        await conn.execute("DELETE FROM heartbeats")  # the 20 valid ones: "nothing hostile stored" stays a plain count


async def test_a_record_the_database_refuses_fails_alone(db_dsn):
    """Defence in depth: a value validation let through but the database refuses costs only its own request (422)."""
    import asyncpg

    from ingest.pipeline.batching import GroupCommitWriter
    from ingest.errors import Invalid
    from ingest.metrics import Metrics
    from storage.pool import create_pool

    async def write(conn, records):
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (v text)")
            await conn.executemany("INSERT INTO t VALUES ($1)", [(r,) for r in records])
        return ["stored"] * len(records)

    pool = await create_pool(db_dsn, max_size=2)
    writer = GroupCommitWriter("test", pool, write, Metrics(), max_queue=100, max_rows=100, max_bytes=1 << 20)
    writer.start()
    try:
        results = await asyncio.gather(*(writer.submit(v) for v in ["a", "b", "c\u0000", "d"]), return_exceptions=True)
        assert results[:2] == ["stored", "stored"] and results[3] == "stored"
        assert isinstance(results[2], Invalid) and results[2].status == 422
        assert not isinstance(results[2], asyncpg.PostgresError)
    finally:
        await writer.close()
        await pool.close()
