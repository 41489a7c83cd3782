"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test, the real app on loopback."""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import Service, start_service

ROOT = Path(__file__).resolve().parent.parent

# `pytest` with no path (the README's and .ci/run's command) runs on this many xdist workers,
# each with its own embedded PostgreSQL (pg_server_dsn is per process): the tests wait on timers,
# subprocesses and I/O much of the time, so three keep two cores busy. Naming test files runs them
# in this one process, as does `-n0` or `-p no:xdist`; `-n N` chooses.
TEST_WORKERS = 3


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Before xdist reads its options: `-n TEST_WORKERS` for the whole suite, unless told otherwise."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is not None or config.getoption("usepdb") or config.getoption("collectonly"):
        return
    if config.args_source is pytest.Config.ArgsSource.TESTPATHS:
        config.option.numprocesses = TEST_WORKERS
        if config.option.dist == "no":
            config.option.dist = "worksteal"  # durations differ a hundredfold: idle workers take queued tests


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slow tests first (stable otherwise), so that no long test starts last."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def pg_server_dsn() -> str:
    """DSN of the session's PostgreSQL server: TELEMETRY_TEST_DSN, or an embedded one started here."""
    given = os.environ.get("TELEMETRY_TEST_DSN")
    if given:
        yield given
        return
    from storage.embedded import EmbeddedPostgres

    # Not under pytest's basetemp: another pytest run on the machine may prune that while we run.
    base = Path(tempfile.mkdtemp(prefix="telemetry-test-pg-", dir=_memory_tmp()))
    server = EmbeddedPostgres(base)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _memory_tmp() -> str | None:
    """/dev/shm (a RAM file system) if this machine has one, else None (the default temp dir).

    The test server's fsync stays on (the service refuses a server without it), but on a RAM file
    system an fsync is free: every commit, CREATE DATABASE and the checkpoint each DROP DATABASE
    makes cost milliseconds instead of the tenths of a second they cost on this virtual disk.
    TELEMETRY_TEST_PG_TMP names another directory ("" for the default temp dir)."""
    chosen = os.environ.get("TELEMETRY_TEST_PG_TMP")
    if chosen is not None:
        return chosen or None
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@pytest.fixture
def own_data_dir() -> Path:
    """A data directory for a test that starts the embedded PostgreSQL (`serve` without TELEMETRY_DSN),
    outside pytest's basetemp: a pytest run starting elsewhere on the machine resets that tree to
    mode 0700 (and prunes old ones), which locks out the embedded PostgreSQL's own user. In /dev/shm
    when there is one, like the session's server (_memory_tmp)."""
    path = Path(tempfile.mkdtemp(prefix="telemetry-test-data-", dir=_memory_tmp()))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_db(pg_server_dsn) -> str:
    """A migrated template database, and its key store `<name>_keys`; each test clones both (fast)
    instead of migrating anew."""
    from storage.databases import migrate_both

    name = f"ti_template_{os.getpid()}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        if not os.environ.get("TELEMETRY_TEST_DSN"):
            # Our own server, perhaps in RAM (_memory_tmp): checkpoint at 128 MB of WAL, not 1 GB.
            await admin.execute("ALTER SYSTEM SET max_wal_size = '128MB'")
            await admin.execute("SELECT pg_reload_conf()")
        for db in (name, name + "_keys"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
            await admin.execute(f'CREATE DATABASE "{db}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(_with_database(pg_server_dsn, name))
    ks = await asyncpg.connect(_with_database(pg_server_dsn, name + "_keys"))
    try:
        await migrate_both(conn, ks)
    finally:
        await conn.close()
        await ks.close()
    yield name


def _with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
async def db_dsn(pg_server_dsn, template_db) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"ti_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        # The key store where the service looks by default: database <name>_keys on the same server.
        await admin.execute(f'CREATE DATABASE "{name}_keys" TEMPLATE "{template_db}_keys"')
    finally:
        await admin.close()
    yield _with_database(pg_server_dsn, name)
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        if not os.environ.get("TELEMETRY_TEST_DSN"):
            # Our own server, perhaps in RAM (_memory_tmp): checkpoint at 128 MB of WAL, not 1 GB.
            await admin.execute("ALTER SYSTEM SET max_wal_size = '128MB'")
            await admin.execute("SELECT pg_reload_conf()")
        for db in (name, name + "_keys"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def ks_dsn(db_dsn) -> str:
    """The test database's key store (the default: <name>_keys on the same server)."""
    from storage.keystore import default_dsn

    return default_dsn(db_dsn, embedded=False)


@pytest.fixture
async def ks(ks_dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's key store."""
    from storage.pool import connect

    conn = await connect(ks_dsn)
    yield conn
    await conn.close()


@pytest.fixture
def master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
async def db(db_dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, to check what was really stored."""
    from storage.pool import connect

    conn = await connect(db_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def service(db_dsn, master_key, tmp_path) -> AsyncIterator[Service]:
    """The real app (create_app) on a loopback port, with default settings."""
    async with start_service(db_dsn, master_key, tmp_path) as svc:
        yield svc
