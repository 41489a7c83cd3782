"""`telemetry-ingest serve` as a real process: workers, shared metrics, replacement, signals, start-up checks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid

import aiohttp
import asyncpg
import orjson
import psutil
import pytest

from tests.support import ROOT, heartbeat_body, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A `serve` subprocess with its environment."""

    def __init__(self, env: dict[str, str], *args: str, entry: tuple[str, ...] = ("-m", "ingest")) -> None:
        import tempfile

        self.port = free_port()
        # Files, not pipes: a full pipe would block the server's logging.
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env.update(env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "serve", "--port", str(self.port), *args],
            env=self.env, cwd=ROOT, stdout=self._out, stderr=self._err, text=True,
        )

    @property
    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited {self.proc.returncode}: {self.stderr}")
                try:
                    async with http.get(self.url + "/readyz") as r:
                        if r.status == 200 and self.listening():
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError("serve did not become ready")

    def listening(self) -> bool:
        """Whether this serve (or one of its workers) holds the listening socket of self.port: under
        xdist another test's server can take the port free_port() gave before this one binds it, and
        its /readyz is not this one's (this serve then fails to bind and exits, which wait_ready reports)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        for proc in procs:
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in proc.net_connections("tcp")):
                    return True
            except psutil.Error:
                pass
        return False

    def workers(self) -> list[int]:
        """The live workers' pids: a killed one the supervisor has not reaped yet (a zombie) is not one."""
        pids = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._out.close()
            self._err.close()


@pytest.fixture
def external_env(db_dsn, master_key, tmp_path) -> dict[str, str]:
    return {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}


async def enroll(http, url, env) -> tuple[uuid.UUID, str]:
    secret = run_cli("enroll-secret", "create", env=env).stdout.strip().splitlines()[-1]
    install_id = uuid.uuid4()
    async with http.post(url + "/v1/enroll", json={"install_id": str(install_id)}, headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status == 201
        return install_id, (await r.json())["token"]


def metric_value(text: str, line_prefix: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_workers_share_port_and_metrics_and_are_replaced(external_env, db):
    server = ServeProcess(external_env, "--workers", "2")
    try:
        await server.wait_ready()
        pids = server.workers()
        assert len(pids) == 2
        n = 40
        # A new connection per request, so both workers answer some.
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, external_env)
        for _ in range(n):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == n
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            seen = []
            for _ in range(4):  # whichever worker answers, it reports the whole service
                until = time.monotonic() + 5  # another worker's last 10 ms of counts may not be written yet
                while True:
                    async with http.get(server.url + "/metrics") as r:
                        text = await r.text()
                    count = metric_value(text, 'telemetry_requests_total{method="POST",route="/v1/heartbeats",status="200"}')
                    if count == n or time.monotonic() > until:
                        break
                    await asyncio.sleep(0.02)
                seen.append(count)
            assert seen == [n] * 4
        # A worker killed outright is replaced, and the service keeps answering.
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = server.workers()
            if len(now) == 2 and pids[0] not in now:
                break
            await asyncio.sleep(0.1)
        assert len(server.workers()) == 2 and pids[0] not in server.workers()
        await server.wait_ready()
        # revocation reaches every worker: poll generously, this is not a timing assertion
        run_cli("tokens", "revoke", "-", env=external_env, input=token + "\n")
        deadline = time.monotonic() + 10
        statuses = []
        while time.monotonic() < deadline:
            statuses = []
            for _ in range(6):
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                         headers={"Authorization": f"Bearer {token}"}) as r:
                        statuses.append(r.status)
            if set(statuses) == {401}:
                break
            await asyncio.sleep(0.2)
        assert set(statuses) == {401}
        stderr = server.stderr
    finally:
        code = server.stop()
    assert code == 0
    assert token not in stderr, [l for l in stderr.splitlines() if token in l]
    assert str(install_id) not in stderr


async def test_sigterm_with_requests_in_flight_commits_them(external_env, db):
    server = ServeProcess(external_env, "--workers", "1", "--db-timeout", "15")  # the test holds a row lock ~1 s
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, external_env)
            # Hold the row lock so the heartbeats wait in the writer when SIGTERM arrives.
            tx = db.transaction()
            await tx.start()
            await db.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR UPDATE", install_id)

            async def send():
                async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status

            tasks = [asyncio.create_task(send()) for _ in range(10)]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            await tx.rollback()
            statuses = await asyncio.gather(*tasks, return_exceptions=True)
        code = await asyncio.to_thread(server.proc.wait, 15)
        assert code == 0 and time.monotonic() - started < 10
        ok = [s for s in statuses if s == 200]
        assert all(s in (200, 503) for s in statuses), statuses
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == len(ok) == 10
    finally:
        server.stop()


async def test_refuses_database_without_synchronous_commit(external_env, db_dsn, db):
    dbname = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    proc = await asyncio.to_thread(run_cli, "serve", "--port", str(free_port()), env=external_env, check=False, timeout=60)
    assert proc.returncode != 0
    assert "synchronous_commit" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "env, name",
    [
        ({"TELEMETRY_PORT": "eighty"}, "TELEMETRY_PORT"),
        ({"TELEMETRY_WORKERS": "0"}, "TELEMETRY_WORKERS"),
        ({"TELEMETRY_UNKNOWN_FIELDS": "keep"}, "TELEMETRY_UNKNOWN_FIELDS"),
        ({"TELEMETRY_TRUSTED_PROXIES": "10.0.0.0/33"}, "TELEMETRY_TRUSTED_PROXIES"),
        ({"TELEMETRY_SWEEP_INTERVAL": "-1"}, "TELEMETRY_SWEEP_INTERVAL"),
        ({"TELEMETRY_MASTER_KEY": "c2hvcnQ="}, "TELEMETRY_MASTER_KEY"),
        ({"TELEMETRY_DSN": "notadsn"}, "TELEMETRY_DSN"),
        ({"TELEMETRY_DSN": "postgresql://u:pw@localhost:99999/db"}, "TELEMETRY_DSN"),
        ({"TELEMETRY_DSN": "postgresql://localhost/db?sslmode=bogus"}, "TELEMETRY_DSN"),  # refused by asyncpg itself
        ({"TELEMETRY_HOST": "256.1.1.1"}, "TELEMETRY_HOST"),
        ({"TELEMETRY_HOST": "192.0.2.1"}, "TELEMETRY_HOST"),  # well formed, but not an address of this machine: bind fails
        ({"TELEMETRY_DATA_DIR": "/proc/version"}, "TELEMETRY_DATA_DIR"),  # a file: no metrics directory under it
    ],
)
def test_bad_setting_stops_with_one_line_naming_it(external_env, env, name):
    port = [] if "TELEMETRY_PORT" in env else ["--port", str(free_port())]  # a flag would win over the variable
    proc = run_cli("serve", *port, env={**external_env, **env}, check=False, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], proc.stderr
    assert "pw" not in proc.stderr  # a DSN is never echoed: it may hold a password


def test_port_in_use_stops_with_one_line(external_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), env=external_env, check=False, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TELEMETRY_PORT" in lines[0] and "in use" in lines[0], proc.stderr


def test_bad_flag_names_the_flag(external_env):
    proc = run_cli("serve", "--port", "99999", env=external_env, check=False)
    assert proc.returncode == 2 and "--port" in proc.stderr.strip().splitlines()[-1]


def test_dsn_without_master_key_is_refused(db_dsn, tmp_path):
    proc = run_cli("serve", env={"TELEMETRY_DSN": db_dsn, "TELEMETRY_DATA_DIR": str(tmp_path)}, check=False)
    assert proc.returncode == 1 and "TELEMETRY_MASTER_KEY" in proc.stderr


async def test_embedded_default_starts_keeps_data_and_stops(own_data_dir):
    data_dir = own_data_dir
    env = {"TELEMETRY_DATA_DIR": str(data_dir)}
    # Only serve creates the data directory (CONTRACT 8): before it ever ran, a command names where it looked.
    proc = run_cli("enroll-secret", "create", env=env, check=False)
    assert proc.returncode == 1 and str(data_dir) in proc.stderr and not data_dir.exists()
    install_id = uuid.uuid4()
    server = ServeProcess(env, "--workers", "1")
    try:
        await server.wait_ready()
        assert "embedded PostgreSQL" in server.stderr
        # The start-up line names the address; the data directory holds it for demo and send.
        assert f"telemetry-ingest listening on {server.url} with 1 worker(s)" in server.stderr.splitlines()
        assert orjson.loads((data_dir / "serve.json").read_bytes())["url"] == server.url
        key_file = data_dir / "master.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # Commands work while serve runs, against the same data directory...
        admin = run_cli("admin-token", "create", env=env).stdout.strip().splitlines()[-1]
        assert admin.startswith("tiadm_")
        secret = run_cli("enroll-secret", "create", env=env).stdout.strip().splitlines()[-1]
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/enroll", json={"install_id": str(install_id)}, headers={"Authorization": f"Bearer {secret}"}) as r:
                assert r.status == 201
    finally:
        assert server.stop() == 0
    pgdata = data_dir / "pgdata"
    assert not (pgdata / "postmaster.pid").exists()  # stopped with serve
    assert not (data_dir / "serve.json").exists()  # and its address with it
    # ...and once it has made the data directory, without it (they start the embedded server, and stop it).
    second = run_cli("enroll-secret", "create", env=env).stdout.strip().splitlines()[-1]
    assert not (pgdata / "postmaster.pid").exists()
    server = ServeProcess(env, "--workers", "1")
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/enroll", json={"install_id": str(install_id)}, headers={"Authorization": f"Bearer {secret}"}) as r:
                assert r.status == 409  # the enrollment survived the restart
            async with http.post(server.url + "/v1/enroll", json={"install_id": str(uuid.uuid4())}, headers={"Authorization": f"Bearer {second}"}) as r:
                assert r.status == 201  # the secret made while serve was stopped
    finally:
        assert server.stop() == 0


async def test_migrations_are_safe_when_processes_start_at_once(pg_server_dsn):
    from storage.migrate import available, migrate
    from tests.conftest import _with_database

    name = f"ti_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conns = [await asyncpg.connect(_with_database(pg_server_dsn, name)) for _ in range(4)]
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        # each migration applied by exactly one of them (which one, is whoever took its lock first)
        assert sorted(name for a in applied for name in a) == sorted(name for _, name, _ in available())
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [v for v, _, _ in available()]
        for c in conns:
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


# ------------------------------------------------------------------ watchdog, reload, version


async def _wait_for(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    return predicate()


@pytest.mark.fault
async def _both_started(ks, pids) -> bool:
    """Every worker has started its app (it reported its key ids): its beats flow."""
    for _ in range(300):
        rows = {r["node_id"] for r in await ks.fetch("SELECT node_id FROM nodes")}
        if all(f"{socket.gethostname()}:{pid}" in rows for pid in pids):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_stopped_worker_is_killed_and_replaced_by_the_watchdog(external_env, db, ks):
    from ingest.server import WATCHDOG_TIMEOUT

    server = ServeProcess(external_env, "--workers", "2")
    try:
        await server.wait_ready()
        pids = server.workers()
        assert len(pids) == 2
        assert await _both_started(ks, pids)  # a worker stopped before its first beat gets the start grace instead
        os.kill(pids[0], signal.SIGSTOP)  # alive to waitpid, but answering nothing
        stopped = time.monotonic()
        replaced = await _wait_for(lambda: len(server.workers()) == 2 and pids[0] not in server.workers(), 40)
        took = time.monotonic() - stopped
        assert replaced, "a stopped worker was not replaced"
        assert WATCHDOG_TIMEOUT - 1 <= took <= WATCHDOG_TIMEOUT + 10, took  # the watchdog's bound, not an exit
        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
        assert pids[1] in server.workers()  # the healthy one was left alone
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, external_env)
            async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        stderr = server.stderr
    finally:
        code = server.stop()
    assert code == 0
    assert "stopped answering" in stderr


# `serve`, with one fault injected: the first worker to start blocks its event loop 2 s later
# (time.sleep inside the loop, as a runaway synchronous call would), and writes its pid to FLAG.
_BLOCKER = """
import asyncio, os, sys, time
from pathlib import Path

import ingest.server

flag = Path(sys.argv.pop(1))
real_run = ingest.server._run_worker


def run_worker(*args, **kw):  # in the worker, after the metrics directory is set
    import ingest.http.app

    real = ingest.http.app.create_app

    def create_app(settings, **kw):
        app = real(settings, **kw)

        async def block_later(app):
            try:  # only the first worker (O_EXCL: two starting at once cannot both win)
                fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            asyncio.get_running_loop().call_later(2, time.sleep, 3600)

        app.on_startup.append(block_later)
        return app

    ingest.http.app.create_app = create_app
    return real_run(*args, **kw)


ingest.server._run_worker = run_worker
from ingest.cli.main import main

sys.exit(main())
"""


@pytest.mark.fault
async def test_a_worker_whose_event_loop_blocks_is_killed_and_replaced(external_env, db, tmp_path):
    from ingest.server import WATCHDOG_TIMEOUT

    script, flag = tmp_path / "blocker.py", tmp_path / "blocked.pid"
    script.write_text(_BLOCKER)
    server = ServeProcess(external_env, "--workers", "2", entry=(str(script), str(flag)))
    try:
        await server.wait_ready()
        assert await _wait_for(flag.exists, 30)
        await asyncio.sleep(0.2)
        blocked = int(flag.read_text())
        assert blocked in server.workers()
        since = time.monotonic()
        replaced = await _wait_for(lambda: len(server.workers()) == 2 and blocked not in server.workers(), 40)
        took = time.monotonic() - since
        assert replaced, "a worker with a blocked event loop was not replaced"
        assert WATCHDOG_TIMEOUT <= took <= WATCHDOG_TIMEOUT + 12, took  # blocked 2 s after the flag, then 10 s silent
        await server.wait_ready()
        stderr = server.stderr
    finally:
        code = server.stop()
    assert code == 0
    assert "stopped answering" in stderr and f"worker_pid={blocked}" in stderr


async def test_sighup_replaces_workers_one_at_a_time_refusing_nothing(external_env, db):
    server = ServeProcess(external_env, "--workers", "2")
    try:
        await server.wait_ready()
        old = set(server.workers())
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, external_env)
        statuses: list[object] = []
        done = asyncio.Event()

        async def traffic():  # a new connection per request: each one goes through accept()
            while not done.is_set():
                try:
                    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                        async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                             headers={"Authorization": f"Bearer {token}"}) as r:
                            statuses.append(r.status)
                except aiohttp.ClientError as exc:
                    statuses.append(type(exc).__name__)

        clients = [asyncio.create_task(traffic()) for _ in range(3)]
        await asyncio.sleep(0.5)
        server.proc.send_signal(signal.SIGHUP)
        seen_at_once = []

        def reloaded():
            now = set(server.workers())
            seen_at_once.append(len(now))
            return len(now) == 2 and not (now & old)

        assert await _wait_for(reloaded, 60), f"workers not all replaced: {old} -> {server.workers()}"
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*clients)
        stderr = server.stderr
    finally:
        code = server.stop()
    assert code == 0
    assert len(statuses) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == len(statuses)
    assert max(seen_at_once) <= 3  # one at a time: never more than one extra worker
    assert "workers reloaded" in stderr


def test_version(external_env):
    from importlib.metadata import version

    proc = run_cli("--version", env=external_env)
    assert proc.stdout.strip().startswith(f"telemetry-ingest {version('telemetry-ingest')} ")


async def test_build_info_metric(external_env, db):
    import platform
    from importlib.metadata import version

    server = ServeProcess(external_env, "--workers", "2")
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as r:
            text = await r.text()
    finally:
        server.stop()
    pg = await db.fetchval("SHOW server_version")
    lines = [l for l in text.splitlines() if l.startswith("telemetry_build_info{")]
    assert len(lines) == 1, lines  # one series however many workers
    assert f'postgresql="{pg}"' in lines[0] and f'python="{platform.python_version()}"' in lines[0]
    assert f'version="{version("telemetry-ingest")}"' in lines[0] and lines[0].endswith(" 1.0")


async def test_sighup_keeps_the_policy_serve_checked_at_start(external_env, db, tmp_path):
    """An edited policy file takes effect at a restart, after the start checks; never through a reload."""
    import shutil

    path = tmp_path / "policy.toml"
    shutil.copy(ROOT / "examples" / "policies" / "download-log.toml", path)
    env = external_env | {"TELEMETRY_POLICY": str(path)}
    server = ServeProcess(env, "--workers", "1")
    body = {"download_id": str(uuid.uuid4()), "downloaded_at": "2026-12-01T10:00:00Z", "licence_number": "ABCD-1234",
            "program": "inventory", "version": "4.2.1", "address": "203.0.113.7"}
    try:
        await server.wait_ready()
        old = set(server.workers())
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, env)
            # The file now says the service keeps no downloads: a start would refuse it until
            # `policy apply --confirm`; a reload must not quietly enforce it instead.
            path.write_text((ROOT / "policy" / "builtin.toml").read_text())
            server.proc.send_signal(signal.SIGHUP)
            assert await _wait_for(lambda: (now := set(server.workers())) and not (now & old), 60), "workers not replaced"
            async with http.post(server.url + "/v1/records/download", json=body,
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                status = r.status
            async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                heartbeat_status = r.status
    finally:
        assert server.stop() == 0
    assert status == 201  # the new worker serves the policy checked at start
    assert heartbeat_status == 404  # ... which has no heartbeats
    assert await db.fetchval("SELECT count(*) FROM records WHERE category = 'download'") == 1
