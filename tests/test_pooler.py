"""Behind a real PgBouncer in transaction mode (CONTRACT.md section 10): `serve` and its restarts,
every command, the sweeper and migrations, with TELEMETRY_DB_STATEMENT_CACHE=0.

In transaction mode a client's consecutive transactions may run on different server connections,
and a server connection passes from client to client with whatever session state it has (named
prepared statements, session settings, session advisory locks). So the service must keep none.
The PgBouncer here is Debian's (`.ci/run` installs it); without the binary these tests skip.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from storage.pool import connect
from storage.sweeper import Lease, sweep
from tests.support import heartbeat_body, run_cli, service_role_dsn
from tests.test_serve import ServeProcess

pytestmark = pytest.mark.slow



def _binary() -> str | None:
    return shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bouncer:
    """A PgBouncer in transaction mode in front of the test server; `dsn(direct)` routes a DSN through it."""

    def __init__(self, server_dsn: str) -> None:
        binary = _binary()
        if binary is None:
            pytest.skip("pgbouncer is not installed (Debian package `pgbouncer`; .ci/run installs it)")
        parts = urlsplit(server_dsn)
        self.user = parts.username or "postgres"
        query = dict(parse_qsl(parts.query))
        # The embedded server listens on a Unix socket in its data directory (host=<dir> in the query).
        host = query.get("host") or parts.hostname or "127.0.0.1"
        port = query.get("port") or parts.port or 5432
        # PgBouncer refuses to run as root: as root it runs as the owner of the server's socket
        # directory (the embedded server's user, who alone may enter it), or nobody for TCP.
        run_as = None
        if os.geteuid() == 0:
            run_as = pwd.getpwuid(Path(host).stat().st_uid).pw_name if host.startswith("/") else "nobody"
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="telemetry-test-pgbouncer-"))
        self.dir.chmod(0o777)
        # Clients are trusted; PgBouncer logs in to the server with this password (TELEMETRY_TEST_DSN's, if any).
        (self.dir / "users.txt").write_text(f'"{self.user}" "{parts.password or ""}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            # Every database of the test server, the data databases and their `_keys` key stores alike.
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "default_pool_size = 8\n"
            "max_client_conn = 1000\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        for f in self.dir.iterdir():
            f.chmod(0o666)
        cmd = [binary, *(["-u", run_as] if run_as else []), str(self.dir / "pgbouncer.ini")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited: {self.proc.stderr.read().decode()} {self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("pgbouncer did not start")

    def dsn(self, direct: str) -> str:
        parts = urlsplit(direct)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
        return urlunsplit(parts._replace(netloc=f"{self.user}@127.0.0.1:{self.port}", query=query))

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bouncer(pg_server_dsn):
    b = Bouncer(pg_server_dsn)
    yield b
    b.stop()


@pytest.fixture
def pooled_env(bouncer, db_dsn, master_key, tmp_path) -> dict[str, str]:
    """The service's environment with TELEMETRY_DSN through PgBouncer (the key store follows: `<name>_keys`)."""
    return {"TELEMETRY_DSN": bouncer.dsn(db_dsn), "TELEMETRY_DB_STATEMENT_CACHE": "0",
            "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}


def _clean(proc_or_text) -> None:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    for bad in ("Traceback", "DuplicatePreparedStatement", "prepared statement", "sweep failed"):
        assert bad not in text, text


async def test_the_pooler_is_in_transaction_mode(bouncer, db_dsn):
    """The premise: consecutive transactions of one client may run on different server connections.

    Not left to chance (on a fast server twelve clients' queries need not overlap): client a's
    first statement ran on server connection X; other clients then hold transactions open until
    one of them holds X (at most default_pool_size - 1 of them); a's next statement must run on
    another one. In session mode a keeps X throughout, and nobody else gets it."""
    clients = [await connect(bouncer.dsn(db_dsn), statement_cache_size=0) for _ in range(8)]
    held = []
    try:
        a, others = clients[0], clients[1:]
        first = await a.fetchval("SELECT pg_backend_pid()")
        for c in others:  # 7 = default_pool_size - 1: a server stays free for a
            tx = c.transaction()
            await tx.start()
            held.append(tx)
            if await c.fetchval("SELECT pg_backend_pid()") == first:
                break
        second = await a.fetchval("SELECT pg_backend_pid()")
        assert second != first, "client a kept its server connection while another client held it: not transaction mode"
    finally:
        for tx in held:
            await tx.rollback()
        for c in clients:
            await c.close()


async def test_serve_restarted_three_times_behind_pgbouncer(pooled_env, db, bouncer):
    stored = scans = 0
    for start in range(4):  # the first start and three restarts
        server = ServeProcess({**pooled_env, "TELEMETRY_SWEEP_INTERVAL": "0.5"}, "--workers", "2")
        try:
            await server.wait_ready()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                secret = run_cli("enroll-secret", "create", env=pooled_env).stdout.strip().splitlines()[-1]
                install_id = uuid.uuid4()
                async with http.post(server.url + "/v1/enroll", json={"install_id": str(install_id)},
                                     headers={"Authorization": f"Bearer {secret}"}) as r:
                    assert r.status == 201, await r.text()
                    token = (await r.json())["token"]
                for _ in range(5):  # each worker, each its own pooled connections
                    async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id, email="a@example.org"),
                                         headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200, await r.text()
                    stored += 1
                # Scans too: their batch is one call of write_scan_batch, whose array of the composite
                # type scan_row asyncpg must describe on every pooled connection (no statement cache).
                async with http.post(server.url + "/v1/agents", json={"name": f"agent-{start}"},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 201, await r.text()
                    agent_token = (await r.json())["token"]
                for _ in range(3):
                    scan = {"scan_id": str(uuid.uuid4()), "scanned_at": "2026-12-01T10:00:00Z"}
                    async with http.post(server.url + "/v1/scans", json=scan,
                                         headers={"Authorization": f"Bearer {agent_token}"}) as r:
                        assert r.status == 201, await r.text()
                        assert (await r.json())["scan_id"] == scan["scan_id"]
                    scans += 1
            await asyncio.sleep(1.5)  # a few sweeps behind the pooler
            stderr = server.stderr
        finally:
            code = server.stop()
        assert code == 0, stderr
        _clean(stderr)
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == stored == 20
    assert await db.fetchval("SELECT count(*) FROM scans") == scans == 12
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'enroll_secret.create'") == 4


async def test_every_command_behind_pgbouncer(pooled_env, db, db_dsn, service_free_install):
    # (the service role `audit` checks: one that cannot alter the audit log; tests/support.py)
    env = {**pooled_env, "TELEMETRY_SERVICE_DSN": await service_role_dsn(db_dsn)}
    install_id = service_free_install
    for round_ in range(3):  # repeated: a named prepared statement left on a server connection would collide
        secret = run_cli("enroll-secret", "create", env=env)
        admin = run_cli("admin-token", "create", env=env)
        listed = run_cli("tokens", "list", env=env)
        rows = [line.split("\t") for line in listed.stdout.splitlines()[1:]]
        token_id = next(r[0] for r in rows if r[1] == "enroll" and r[-1] == "-")
        revoked = run_cli("tokens", "revoke", token_id, env=env)
        assert f"revoked {token_id}" in revoked.stdout
        for proc in (secret, admin, listed, revoked,
                     run_cli("keys", "rotate", env=env),
                     run_cli("sweep", "--once", env=env),
                     run_cli("audit", env=env),
                     run_cli("export", str(install_id), env=env),
                     run_cli("policy", "show", env=env),
                     run_cli("keys", "generate", env=env),
                     run_cli("--version", env=env)):
            _clean(proc)
    erased = run_cli("erase", str(install_id), env=env)
    _clean(erased)
    assert await db.fetchval("SELECT count(*) FROM installations WHERE install_id = $1", install_id) == 0
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE role = 'admin'") == 3


@pytest.fixture
async def service_free_install(db, ks, master_key) -> uuid.UUID:
    """One enrolled installation with its key, written directly (the commands above export and erase it)."""
    from crypto.keyring import KeyRing
    from tests.support import enroll_direct

    install_id, _, _ = await enroll_direct(db, ks, KeyRing.from_setting(master_key))
    return install_id


async def test_one_sweeper_at_a_time_behind_pgbouncer(bouncer, db_dsn, db, ks):
    """Two sweeps through the pooler at once: one sweeps, the other sees the lease and skips; the
    lease is free again after, and no server connection is left with a lock timeout."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    a = await connect(bouncer.dsn(db_dsn), statement_cache_size=0)
    b = await connect(bouncer.dsn(db_dsn), statement_cache_size=0)
    blocker = await connect(db_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE installations IN ACCESS EXCLUSIVE MODE")  # keeps A sweeping
        first = asyncio.create_task(sweep(a, ks, now))
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM sweeper_lease WHERE expires_at > now()"):
                break
            await asyncio.sleep(0.02)
        second = await sweep(b, ks, now)
        assert not second.swept
        await tx.rollback()
        assert (await first).swept
        assert (await sweep(b, ks, now)).swept
        assert await db.fetchval("SELECT count(*) FROM sweeper_lease") == 0
        # Whichever server connections the sweeps ran on: none kept a lock timeout for the next client.
        clients = [await connect(bouncer.dsn(db_dsn), statement_cache_size=0) for _ in range(8)]
        try:
            async def three(c):
                return [await c.fetchval("SHOW lock_timeout") for _ in range(3)]

            timeouts = [t for ts in await asyncio.gather(*(three(c) for c in clients)) for t in ts]
        finally:
            for c in clients:
                await c.close()
        assert set(timeouts) == {"0"}
    finally:
        for c in (a, b, blocker):
            await c.close()
    lease = Lease(db)
    assert await lease.take()
    await lease.release()


async def test_two_nodes_migrating_at_once_behind_pgbouncer(bouncer, pg_server_dsn, master_key, tmp_path):
    """Two `serve` nodes start together on empty databases through the pooler: each migration is
    applied once, both nodes come up."""
    from storage.keystore_migrations import __name__ as ks_package
    from storage.migrate import available
    from tests.conftest import _with_database

    name = f"ti_pool_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')  # empty; the key store `<name>_keys` is made by a node
    nodes = []
    try:
        env = {"TELEMETRY_DSN": bouncer.dsn(_with_database(pg_server_dsn, name)), "TELEMETRY_DB_STATEMENT_CACHE": "0",
               "TELEMETRY_MASTER_KEY": master_key}
        for n in range(2):
            (tmp_path / f"node{n}").mkdir()
            nodes.append(ServeProcess({**env, "TELEMETRY_DATA_DIR": str(tmp_path / f"node{n}")}, "--workers", "2"))
        await asyncio.gather(*(node.wait_ready(90) for node in nodes))
        for node in nodes:
            _clean(node.stderr)
        conn = await asyncpg.connect(_with_database(pg_server_dsn, name))
        ks = await asyncpg.connect(_with_database(pg_server_dsn, name + "_keys"))
        try:
            data = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
            keys = [r["version"] for r in await ks.fetch("SELECT version FROM schema_migrations ORDER BY version")]
            for _ in range(100):  # /readyz answered by one worker; the others may still be starting
                live = await ks.fetchval("SELECT count(*) FROM nodes")
                if live == 4:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
            await ks.close()
        assert data == [v for v, _, _ in available()]
        assert keys == [v for v, _, _ in available(ks_package)]
        assert live == 4  # two nodes, two workers each, each reporting its keys
    finally:
        for node in nodes:
            assert node.stop() == 0
        for db in (name, name + "_keys"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


async def test_a_pooled_connection_handed_back_leaves_other_sessions_alone(db_dsn, db):
    """With the pooler setting the pool's reset does not run pg_advisory_unlock_all() and RESET ALL
    (behind PgBouncer they would hit another client's server connection); an open transaction is
    still rolled back."""
    from storage.pool import create_pool

    pool = await create_pool(db_dsn, min_size=1, max_size=1, statement_cache_size=0)
    try:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SELECT pg_advisory_lock(424242)")  # as another client's session lock on this server connection
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same server connection
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None  # rolled back
        assert await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND objid = 424242",
                                 pid) == 1  # not unlocked by the reset
    finally:
        await pool.close()
    default = await create_pool(db_dsn, min_size=1, max_size=1)  # the direct-connection setting resets as asyncpg does
    try:
        async with default.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SELECT pg_advisory_lock(424243)")
        assert await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid) == 0
    finally:
        await default.close()
