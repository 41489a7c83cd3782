"""The reference client (client/, telemetry_ingest_client) against the real service, stopped and restarted
under it; `send` and `demo` as commands.

The service runs on this test's event loop, so the clients here are AsyncClients (each call in a worker
thread); the synchronous Client is the same code, and tests/test_client_package.py drives it directly."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest
from telemetry_ingest_client import REJECTED_DIR, AsyncClient, Client, Backoff, Rejected, Spooled, Unreachable, parse_retry_after

from ingest.cli.demo import demo_scan
from tests.support import ROOT, heartbeat_body, start_service


def max_jitter(lo: float, hi: float) -> float:
    return hi


def recorder():
    """(delays, sleep): a sleep that returns at once and remembers what it was asked to wait."""
    delays: list[float] = []

    def sleep(seconds: float) -> None:  # the client's sleep runs in its worker thread
        delays.append(seconds)

    return delays, sleep


def on_loop(coro, loop):
    """Run coro on the test's event loop from a client's worker thread, and wait for it."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(60)


class Restartable:
    """The real app on one loopback port, stopped and started again (same database) while clients use it."""

    def __init__(self, dsn: str, master_key: str, data_dir: Path) -> None:
        self.args = (dsn, master_key, data_dir)
        self.port = 0
        self.svc = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, **settings):
        self._stack = contextlib.AsyncExitStack()
        self.svc = await self._stack.enter_async_context(start_service(*self.args, port=self.port, **settings))
        self.port = int(self.svc.url.rsplit(":", 1)[1])
        return self.svc

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack, self.svc = self._stack, None, None
            await stack.aclose()


@pytest.fixture
async def server(db_dsn, master_key, tmp_path):
    s = Restartable(db_dsn, master_key, tmp_path / "server")
    yield s
    await s.stop()


async def heartbeat_counts(db, install_id) -> list[int]:
    rows = await db.fetch("SELECT asset_count FROM heartbeats WHERE install_id = $1 ORDER BY received_at", install_id)
    return [r["asset_count"] for r in rows]


# ------------------------------------------------------------------ backoff


def test_backoff_is_exponential_full_jitter_capped():
    b = Backoff(base=0.5, cap=4.0)
    assert [b.delay(n, None, max_jitter) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    asked = []
    assert b.delay(3, None, lambda lo, hi: asked.append((lo, hi)) or 0.7) == 0.7
    assert asked == [(0.0, 2.0)]  # full jitter: anywhere from nothing to the ceiling
    # Retry-After is a floor: the jitter is added to it, never taken from it
    assert b.delay(1, 7.0, max_jitter) == 7.5 and b.delay(5, 7.0, lambda lo, hi: lo) == 7.0


def test_retry_after_header_forms():
    now = time.time()
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after(None, now) is None and parse_retry_after("soon", now) is None and parse_retry_after("-3", now) is None


# ------------------------------------------------------------------ the service goes away and comes back


async def test_records_spooled_while_service_is_down_are_delivered_once_after_restart(server, db, tmp_path):
    install_id, token = await (await server.start()).enroll()
    await server.stop()
    spool = tmp_path / "spool"
    delays, sleep = recorder()
    async with AsyncClient(server.url, token, spool_dir=spool, backoff=Backoff(attempts=3), sleep=sleep) as client:
        for i in range(3):
            with pytest.raises(Spooled) as caught:
                await client.heartbeat(heartbeat_body(install_id, asset_count=i))
            assert caught.value.path.exists()
        assert len(delays) == 3 * 2  # each send retried the connection twice, then left the spool as it was
        files = client.pending()
    assert len(files) == 3 and not list(spool.glob(".tmp-*"))
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert token not in f.read_text() and token[4:] not in f.read_text()  # the spool never holds the token

    await server.start()
    # A new client over the same directory: as after the agent itself restarted.
    async with AsyncClient(server.url, token, spool_dir=spool, sleep=sleep) as client:
        report = await client.flush_spool()
        assert [name for name, _ in report.delivered] == [f.name for f in files]  # in the order spooled
        assert all(a.status == 200 and a["stored"] for _, a in report.delivered)
        assert report.remaining == 0 and report.rejected == [] and client.pending() == []
        again = await client.flush_spool()
        assert again.delivered == [] and again.remaining == 0
    assert await heartbeat_counts(db, install_id) == [0, 1, 2]  # each once, in order


async def test_retries_reach_the_service_when_it_comes_back(server, db):
    install_id, token = await (await server.start()).enroll()
    await server.stop()
    delays = []
    loop = asyncio.get_running_loop()

    def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 2:
            on_loop(server.start(), loop)

    async with AsyncClient(server.url, token, backoff=Backoff(attempts=4), sleep=sleep) as client:
        answer = await client.heartbeat(heartbeat_body(install_id))
    assert answer.status == 200 and len(delays) == 2
    assert await heartbeat_counts(db, install_id) == [120]


async def test_unreachable_without_spool_raises_after_the_attempts(server):
    _, token = await (await server.start()).enroll()
    await server.stop()
    delays, sleep = recorder()
    async with AsyncClient(server.url, token, backoff=Backoff(attempts=4, base=1.0, cap=3.0), sleep=sleep, uniform=max_jitter) as client:
        with pytest.raises(Unreachable) as caught:
            await client.heartbeat(heartbeat_body(uuid.uuid4()))
    assert not isinstance(caught.value, Spooled)
    assert delays == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------ Retry-After


async def test_429_retry_after_is_honoured_and_the_record_stays_spooled(server, db, tmp_path):
    svc = await server.start(rate_limit=0.01, rate_burst=1)  # one request, then one every 100 s
    install_id, token = await svc.enroll()
    spool = tmp_path / "spool"
    delays, sleep = recorder()
    async with AsyncClient(server.url, token, spool_dir=spool, backoff=Backoff(attempts=2), sleep=sleep, uniform=max_jitter) as client:
        assert (await client.heartbeat(heartbeat_body(install_id, asset_count=1))).status == 200
        with pytest.raises(Spooled):
            await client.heartbeat(heartbeat_body(install_id, asset_count=2))
        assert delays == [100 + 0.5]  # Retry-After: 100, plus the first retry's jitter ceiling
        # A Retry-After beyond what this client will wait ends the attempts at once.
        client.backoff = Backoff(attempts=5, max_retry_after=60)
        with pytest.raises(Spooled):
            await client.heartbeat(heartbeat_body(install_id, asset_count=3))
        assert delays == [100.5] and len(client.pending()) == 2
        assert not list((spool / REJECTED_DIR).iterdir())  # 429 is not the record's fault
    await server.stop()
    await server.start()
    async with AsyncClient(server.url, token, spool_dir=spool) as client:
        assert len((await client.flush_spool()).delivered) == 2
    assert await heartbeat_counts(db, install_id) == [1, 2, 3]


async def test_503_retry_after_from_a_full_queue_is_honoured(db_dsn, master_key, tmp_path, db):
    # db_timeout: long, so that on a slow machine the held lock does not also time the waiting requests out.
    async with start_service(db_dsn, master_key, tmp_path, queue_size=1, batch_max_rows=1, retry_after=3, db_timeout=60) as svc:
        install_id, token = await svc.enroll()
        # Hold the installation's row so no batch can commit: the queue fills and stays full.
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        others = [asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))
                  for _ in range(6)]
        for _ in range(500):
            if any(t.done() for t in others):
                break
            await asyncio.sleep(0.01)
        assert [t.result()[0] for t in others if t.done()][:1] == [503]
        delays = []
        loop = asyncio.get_running_loop()

        async def free_up():
            await tx.rollback()  # the database frees up while the client waits
            await asyncio.gather(*others)

        def sleep(seconds):
            delays.append(seconds)
            if len(delays) == 1:
                on_loop(free_up(), loop)
            else:
                time.sleep(0.05)  # the queue is still draining

        async with AsyncClient(svc.url, token, backoff=Backoff(attempts=10), sleep=sleep, uniform=max_jitter) as client:
            answer = await client.heartbeat(heartbeat_body(install_id, asset_count=77))
        assert answer.status == 200 and delays[0] == 3 + 0.5 and all(d >= 3 for d in delays)
    assert 77 in await heartbeat_counts(db, install_id)


# ------------------------------------------------------------------ final answers


async def test_4xx_is_final_never_retried_and_set_aside(server, db, tmp_path):
    install_id, token = await (await server.start()).enroll()
    spool = tmp_path / "spool"
    delays, sleep = recorder()
    async with AsyncClient(server.url, token, sleep=sleep) as client:
        with pytest.raises(Rejected) as caught:
            await client.heartbeat(heartbeat_body(install_id, asset_count=-1))
        assert caught.value.status == 422 and caught.value.answer["status"] == 422
    async with AsyncClient(server.url, token, spool_dir=spool, sleep=sleep) as client:
        invalid = client.spool("heartbeat", heartbeat_body(install_id, asset_count=-1))
        foreign = client.spool("heartbeat", heartbeat_body(uuid.uuid4()))  # not this token's installation
        answer = await client.heartbeat(heartbeat_body(install_id, asset_count=5))
        assert answer.status == 200 and client.pending() == []
    rejected = spool / REJECTED_DIR
    # Only the answers are kept: the refused bodies are gone (they may hold what the policy forbids keeping).
    assert sorted(p.name for p in rejected.iterdir()) == sorted([invalid.stem + ".answer.json", foreign.stem + ".answer.json"])
    assert not invalid.exists() and not foreign.exists()
    kept = orjson.loads((rejected / (invalid.stem + ".answer.json")).read_bytes())
    assert kept["status"] == 422 and kept["kind"] == "heartbeat" and kept["answer"]["status"] == 422
    assert orjson.loads((rejected / (foreign.stem + ".answer.json")).read_bytes())["status"] == 403
    assert b"enterprise" not in b"".join(p.read_bytes() for p in rejected.iterdir())  # nothing of the body

    # A token the service does not know is this client's fault, not the record's: kept, not set aside.
    async with AsyncClient(server.url, "tii_" + "x" * 43, spool_dir=spool, sleep=sleep) as client:
        with pytest.raises(Spooled):
            await client.heartbeat(heartbeat_body(install_id, asset_count=6))
        assert len(client.pending()) == 1
    assert delays == []  # nothing above was retried
    async with AsyncClient(server.url, token, spool_dir=spool) as client:
        assert len((await client.flush_spool()).delivered) == 1
    assert await heartbeat_counts(db, install_id) == [5, 6]


async def test_one_flush_per_spool_at_a_time(server, tmp_path):
    install_id, token = await (await server.start()).enroll()
    spool = tmp_path / "spool"
    async with AsyncClient(server.url, token, spool_dir=spool) as a, AsyncClient(server.url, token, spool_dir=spool) as b:
        for i in range(20):
            a.spool("heartbeat", heartbeat_body(install_id, asset_count=i))
        ra, rb = await asyncio.gather(a.flush_spool(), b.flush_spool())
    assert sorted([ra.busy, rb.busy]) == [False, True]
    assert len(ra.delivered) + len(rb.delivered) == 20


# ------------------------------------------------------------------ scans


async def test_scan_is_gzipped_idempotent_and_survives_a_restart(server, db, tmp_path):
    svc = await server.start()
    install_id, token = await svc.enroll()
    async with AsyncClient(server.url, token) as installation:
        agent = await installation.create_agent("scanner")
    await server.stop()

    spool = tmp_path / "spool"
    delays, sleep = recorder()
    async with AsyncClient(server.url, agent["token"], spool_dir=spool, backoff=Backoff(attempts=2), sleep=sleep) as client:
        with pytest.raises(Spooled) as caught:
            await client.scan(demo_scan(dt.datetime.now(dt.timezone.utc)))
    record = orjson.loads(caught.value.path.read_bytes())
    scan_id = record["body"]["scan_id"]  # fixed once, when spooled
    assert uuid.UUID(scan_id)

    await server.start()
    async with AsyncClient(server.url, agent["token"], spool_dir=spool) as client:
        first = (await client.flush_spool()).delivered
        assert [a.status for _, a in first] == [201] and first[0][1]["scan_id"] == scan_id
        assert "asset.owner_phone" in first[0][1]["dropped_fields"]
        # The answer was lost, say, and the agent sends the record again: answered 200, stored once.
        client.spool("scan", record["body"])
        second = (await client.flush_spool()).delivered
        assert [a.status for _, a in second] == [200] and second[0][1] == first[0][1]
        # Same scan_id, other content: 409, set aside.
        client.spool("scan", {**record["body"], "agent_version": "9.9.9"})
        third = await client.flush_spool()
        assert [a.status for _, a in third.rejected] == [409] and client.pending() == []
    rows = await db.fetch("SELECT size_wire, size_decoded FROM scans WHERE install_id = $1 AND scan_id = $2", install_id, uuid.UUID(scan_id))
    assert len(rows) == 1  # delivered twice, stored once
    assert rows[0]["size_wire"] < rows[0]["size_decoded"]  # it travelled gzipped


async def test_agents_settings_and_records_of_any_category(server, db):
    install_id, token = await (await server.start()).enroll()
    async with AsyncClient(server.url, token) as installation:
        assert (await installation.settings(24))["scan_retention_hours"] == 24
        agent = await installation.create_agent("scanner")
        async with AsyncClient(server.url, agent["token"]) as scanner:
            assert (await scanner.scan(demo_scan(dt.datetime.now(dt.timezone.utc)))).status == 201
            await installation.delete_agent(agent["agent_id"])
            with pytest.raises(Rejected) as caught:  # its token stopped working at once
                await scanner.scan(demo_scan(dt.datetime.now(dt.timezone.utc)))
            assert caught.value.status == 401
        # A category the service does not receive is a final answer, not a retry.
        delays, sleep = recorder()
        installation.sync._sleep = sleep
        with pytest.raises(Rejected) as caught:
            await installation.record("download", {"program": "x"})
        assert caught.value.status in (404, 405) and delays == []
    assert await db.fetchval("SELECT count(*) FROM agents WHERE install_id = $1 AND revoked_at IS NULL", install_id) == 0


# ------------------------------------------------------------------ the commands


async def run_command(*args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run `telemetry-ingest ...` without blocking the event loop (the service under test runs on it)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", *args, env=full_env, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_send_command(server, db, tmp_path):
    install_id, token = await (await server.start()).enroll()
    body = orjson.dumps(heartbeat_body(install_id, asset_count=1, hostname="WS-0042"))
    rc, out, err = await run_command("send", "heartbeat", "--url", server.url, "--token", token, env={}, stdin=body)
    assert rc == 0, err
    assert orjson.loads(out) == {"stored": True, "dropped_fields": ["hostname"]}
    body_file = tmp_path / "hb.json"
    body_file.write_bytes(orjson.dumps(heartbeat_body(install_id, asset_count=-1)))
    rc, out, _ = await run_command("send", "heartbeat", "--url", server.url, "--file", str(body_file), env={"TELEMETRY_TOKEN": token})
    assert rc == 1 and orjson.loads(out)["status"] == 422  # the problem document, as answered

    await server.stop()
    spool = tmp_path / "spool"
    body_file.write_bytes(orjson.dumps(heartbeat_body(install_id, asset_count=2)))
    rc, out, _ = await run_command("send", "heartbeat", "--url", server.url, "--token", token, "--file", str(body_file),
                                   "--spool", str(spool), "--attempts", "1", env={})
    assert rc == 75 and Path(orjson.loads(out)["spooled"]).parent == spool
    await server.start()
    rc, out, err = await run_command("send", "flush", "--url", server.url, "--token", token, "--spool", str(spool), env={})
    assert rc == 0, err
    assert orjson.loads(out)["delivered"] == 1
    assert await heartbeat_counts(db, install_id) == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
async def test_demo_and_send_find_the_running_serve_and_demo_cleanup_erases(own_data_dir):
    """CONTRACT 8: serve names its address and leaves it in the data directory; demo and send find it there;
    demo --cleanup erases what it made; once serve is gone, demo says so at once."""
    env = {"TELEMETRY_DATA_DIR": str(own_data_dir)}  # no TELEMETRY_DSN: the embedded PostgreSQL
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(env)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    address_file = own_data_dir / "serve.json"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the server
        serve = subprocess.Popen([sys.executable, "-m", "ingest", "serve", "--workers", "1", "--port", str(port)],
                                 env=full_env, cwd=ROOT, stdout=log, stderr=log, text=True)
        try:
            deadline = time.monotonic() + 120
            async with aiohttp.ClientSession() as http:
                while True:
                    if serve.poll() is not None:
                        log.seek(0)
                        raise AssertionError(f"serve exited early ({serve.returncode}): {log.read()}")
                    assert time.monotonic() < deadline, "serve did not become ready"
                    try:
                        async with http.get(url + "/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
            log.seek(0)
            assert f"listening on {url} " in log.read()  # the start-up line names the address
            assert orjson.loads(address_file.read_bytes())["url"] == url

            rc, out, err = await run_command("demo", "--cleanup", env=env)  # no --url: found in the data directory
            assert rc == 0, out + err
            assert f"demo against {url}" in out
            assert "enrolled a demo installation" in out
            assert "heartbeat: HTTP 200, stored: true" in out
            assert "dropped: hostname, windows_user" in out
            assert "email (encrypted)" in out
            assert "created agent 'demo-agent'" in out and ": HTTP 201, kept until " in out
            assert "dropped: asset.owner_phone, software[].license_key, browser_history" in out
            assert "scan sent again with the same scan_id: HTTP 200, the same answer, stored once" in out
            secret_id = out.split("created enrollment secret ", 1)[1].split()[0]
            rc, _, err = await run_command("tokens", "revoke", secret_id, env=env)
            assert rc == 1 and "no active token" in err  # the demo's secret is no longer valid
            demo_id = out.split("install_id ", 1)[1].split()[0]
            assert f"cleanup: erased the demo installation {demo_id}" in out
            rc, _, err = await run_command("export", demo_id, env=env)
            assert rc == 1 and f"no installation {demo_id}" in err  # nothing of it is left

            # send without --url finds the service the same way.
            rc, out, _ = await run_command("enroll-secret", "create", env=env)
            secret = out.strip().splitlines()[-1]
            install_id = uuid.uuid4()
            token = await asyncio.to_thread(Client(url).enroll, secret, install_id)
            rc, out, err = await run_command("send", "heartbeat", env={**env, "TELEMETRY_TOKEN": token},
                                             stdin=orjson.dumps(heartbeat_body(install_id)))
            assert rc == 0 and orjson.loads(out)["stored"] is True, out + err
        finally:
            if serve.poll() is None:
                serve.send_signal(signal.SIGTERM)
            try:
                code = serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                raise
            log.seek(0)
            server_log = log.read()
        assert code == 0, server_log
    assert not address_file.exists()  # removed at exit
    rc, _, err = await run_command("demo", env=env)
    assert rc == 1 and f"no running serve found: {address_file.resolve()} does not exist" in err
    began = time.monotonic()
    rc, _, err = await run_command("demo", "--url", url, env=env)
    assert rc == 1 and err.strip().splitlines() == [f"telemetry-ingest: nothing listening at {url}: is serve running?"]
    assert time.monotonic() - began < 10  # at once: no retries (the interpreter's start is most of it)


async def test_a_refused_record_keeps_only_its_answer_and_flush_exits_1(server, db, tmp_path):
    """Issue 12 point 8 and issue 17 row 15: the body of a refused record is deleted (an e-mail in a
    plaintext field, an undeclared field), its answer kept; `send flush` exits 1 though nothing remains."""
    install_id, token = await (await server.start()).enroll()
    spool = tmp_path / "spool"
    (spool / REJECTED_DIR).mkdir(parents=True)
    legacy = spool / REJECTED_DIR / "00000000000000000001-abcdef01.json"  # a body an older client set aside
    legacy.write_bytes(orjson.dumps({"v": 1, "kind": "heartbeat", "body": {"email": "old@corp.example"}}))
    async with AsyncClient(server.url, token, spool_dir=spool) as client:
        refused = client.spool("heartbeat", heartbeat_body(install_id, asset_count=-1, email="alice@corp.example",
                                                             hostname="WS-SECRET"))
    rc, out, err = await run_command("send", "flush", "--url", server.url, "--token", token, "--spool", str(spool), env={})
    assert rc == 1, (out, err)
    summary = orjson.loads(out)
    assert summary["rejected"] == 1 and summary["remaining"] == 0
    files = list((spool / REJECTED_DIR).iterdir())
    assert [p.name for p in files] == [refused.stem + ".answer.json"]
    text = files[0].read_bytes()
    assert b"alice@corp.example" not in text and b"WS-SECRET" not in text and b"old@corp.example" not in text
    assert orjson.loads(text)["status"] == 422
    assert not refused.exists() and not legacy.exists()
    assert await heartbeat_counts(db, install_id) == []
    # A flush with nothing refused and nothing left still exits 0.
    rc, out, _ = await run_command("send", "flush", "--url", server.url, "--token", token, "--spool", str(spool), env={})
    assert rc == 0 and orjson.loads(out)["rejected"] == 0
