"""Helpers for tests: run the real app over real HTTP, run the real CLI, make tokens and bodies."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ingest.http.app import create_app
from ingest.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    """A running app: its URL, an HTTP session, its settings and its aiohttp app."""

    url: str
    http: aiohttp.ClientSession
    settings: Settings
    app: web.Application
    env: dict[str, str] = field(default_factory=dict)

    async def request(self, method: str, path: str, *, token: str | None = None, json: Any = None,
                      data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        """(status, parsed body or raw text, headers)."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if json is not None:
            data = orjson.dumps(json)
            h.setdefault("Content-Type", "application/json")
        if isinstance(data, bytes) and len(data) > 512 * 1024:
            data = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
        async with self.http.request(method, self.url + path, data=data, headers=h) as resp:
            raw = await resp.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            return resp.status, body, resp.headers

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the real `telemetry-ingest` CLI against this service's database (input: its standard input)."""
        return run_cli(*args, env=self.env, check=check, input=input)

    def create_secret(self, kind: str = "enroll-secret") -> str:
        """Create an enrollment secret (or admin token) as `telemetry-ingest enroll-secret create`
        (`admin-token create`) does: the CLI's own statements (ingest.cli.tokens.store_new_token), in this
        process, which saves each test a Python start of the CLI. The commands themselves, as
        processes, are tested where they are the subject (tests/test_commands.py, test_hostile_auth,
        test_faults, test_client, test_secrets, test_docs)."""
        return create_secret(self.settings.dsn, kind, statement_cache_size=self.settings.db_statement_cache)

    async def enroll(self, install_id: uuid.UUID | None = None, secret: str | None = None) -> tuple[uuid.UUID, str]:
        """Enroll an installation; returns (install_id, installation token)."""
        install_id = install_id or uuid.uuid4()
        secret = secret or self.create_secret()
        status, body, _ = await self.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
        assert status == 201, body
        return install_id, body["token"]


_SECRET_KINDS = {"enroll-secret": ("enroll", "enroll_secret.create"), "admin-token": ("admin", "admin_token.create")}


def create_secret(dsn: str, kind: str = "enroll-secret", *, statement_cache_size: int = 100) -> str:
    """A new enrollment secret or admin token in the database at dsn, stored and audited as the CLI does.

    Synchronous like the CLI call it replaces (tests call it from coroutines): its own connection,
    on its own event loop in a helper thread."""
    from concurrent.futures import ThreadPoolExecutor

    from ingest.cli.tokens import store_new_token
    from storage.pool import connect

    role, action = _SECRET_KINDS[kind]

    async def make() -> str:
        conn = await connect(dsn, statement_cache_size=statement_cache_size)
        try:
            return (await store_new_token(conn, role, action))[1]
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


def run_cli(*args: str, env: dict[str, str], check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "ingest", *args], env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, input=input if input is not None else "")
    if check and proc.returncode != 0:
        raise AssertionError(f"telemetry-ingest {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


async def enroll_direct(db, ks, ring, install_id: uuid.UUID | None = None) -> tuple[uuid.UUID, str, bytes]:
    """Enroll an installation without the service, as POST /v1/enroll does (installation row and token
    in the data database, its record key 1 in the key store): (install_id, kek id, wrapped key)."""
    from crypto.datakeys import new_wrapped_key
    from crypto.tokens import new_token
    from storage import installations, keystore

    install_id = install_id or uuid.uuid4()
    kek_id, wrapped = new_wrapped_key(ring, install_id, 1)
    token_id, _, token_hash = new_token("installation")

    async def store_key():
        await keystore.add_first_key(ks, install_id, kek_id, wrapped)

    await installations.enroll(db, install_id, token_id=token_id, token_hash=token_hash, store_key=store_key)
    return install_id, kek_id, wrapped


def heartbeat_body(install_id: uuid.UUID, **extra: Any) -> dict[str, Any]:
    body = {
        "install_id": str(install_id),
        "license_type": "enterprise",
        "version": "4.2.1",
        "asset_count": 120,
        "db_server_type": "postgresql",
        "web_server_type": "nginx",
    }
    body.update(extra)
    return body


SERVICE_ROLE = "ti_test_service"


async def service_role_dsn(dsn: str) -> str:
    """dsn logging in as SERVICE_ROLE, a role that cannot alter the audit log (no superuser, owns
    nothing), made on the server if missing. It is the TELEMETRY_SERVICE_DSN of the test services'
    command lines, so that `audit` checks a role fit to serve; the in-process app itself connects as
    TELEMETRY_DSN (tests/test_roles.py serves as such a role, end to end)."""
    import asyncpg

    from storage.roles import with_login

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", SERVICE_ROLE):
            with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                await conn.execute(f"CREATE ROLE {SERVICE_ROLE} LOGIN")
    finally:
        await conn.close()
    return with_login(dsn, SERVICE_ROLE, None)


@contextlib.asynccontextmanager
async def start_service(dsn: str, master_key: str, data_dir: Path, port: int = 0, **settings: Any):
    """Start create_app(settings) on 127.0.0.1 (an ephemeral port unless port is given); stop it (gracefully) afterwards.

    db_timeout is 10 s unless given (the setting's default is 1.5 s): on a machine whose two cores
    run several test workers and other jobs, an enrollment may wait longer than 1.5 s for its
    database work, and a 503 from that is not what a test asserts. Tests of the deadline set theirs."""
    settings.setdefault("db_timeout", 10.0)
    s = Settings(dsn=dsn, master_key=master_key, data_dir=data_dir, port=port, workers=1, **settings)
    app = create_app(s)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    from ingest.keys import SWEEPER
    # The sweeper's first tick runs at start: let it finish, so that a test's own sweeps and data
    # do not race with it.
    with contextlib.suppress(TimeoutError):  # a test whose database is made to hang goes on regardless
        await asyncio.wait_for(app[SWEEPER].first_tick_done.wait(), 30)
    env = {"TELEMETRY_DSN": dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(data_dir),
           "TELEMETRY_SERVICE_DSN": await service_role_dsn(dsn)}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        try:
            yield Service(f"http://127.0.0.1:{port}", http, s, app, env)
        finally:
            await runner.cleanup()
