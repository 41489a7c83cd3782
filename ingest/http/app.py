"""The application factory: every part adds itself and hands on what the next one needs."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from aiohttp import web

from crypto.datakeys import DataKeyCache
from crypto.keyring import KeyRing
from ingest import deadline
from ingest.http import openapi
from ingest.http.auth import auth_ctx
from ingest.http.middleware import middleware
from ingest.http.routes import admin as routes_admin
from ingest.http.routes import core as routes_core
from ingest.http.routes import ops as routes_ops
from ingest.http.routes import records as routes_records
from ingest.http.routes import scans as routes_scans
from ingest.keys import (
    ACCESS_LOG,
    DATA_KEYS,
    EMAIL_SEALS,
    HEARTBEAT_WRITER,
    KEY_FILE,
    KEYRING,
    KEYSTORE_POOL,
    METRICS,
    POLICY,
    POOL,
    RECORD_WRITER,
    SCAN_WRITER,
    SETTINGS,
)
from ingest.logs import AccessSampler
from ingest.metrics import SAMPLE_INTERVAL, Metrics
from ingest.pipeline.batching import GroupCommitWriter
from ingest.pipeline.sealed import RepeatedSeals
from ingest.settings import Settings
from ingest.worker.background import background
from ingest.worker.nodes import nodes_ctx
from ingest.worker.restrictions import restrictions_ctx
from ingest.worker.sweeper import sweeper_ctx
from policy import Policy, load_in_force
from storage import installations, keystore, roles
from storage.databases import check_migrated, ensure_keystore_database, migrate_both, replay_erasures
from storage.partitions import ensure_partitions
from storage.pool import check_durability, create_pool

# Connections per worker to the key store: it serves cache misses only (ingest.keys.DATA_KEYS).
KEYSTORE_POOL_SIZE = 2


async def storage_ctx(app: web.Application):
    """The pools of the data database and the key store; on the way in, refuse an unsafe server,
    make the key store's database if it is the default and missing, migrate both, make the coming
    days' partitions, and replay the key store's erasures (a restored backup stays erased)."""
    s = app[SETTINGS]
    ks_dsn = s.keystore_dsn or keystore.default_dsn(s.dsn, embedded=False)
    # With a service role (storage.roles) the pools log in as it; `serve` has migrated as TELEMETRY_DSN.
    pool = await create_pool(s.service_dsn or s.dsn, max_size=s.db_pool_size, statement_cache_size=s.db_statement_cache)
    ks_pool = None
    try:
        async with pool.acquire() as conn:
            await check_durability(conn)
            app[METRICS].set_build_info(await conn.fetchval("SHOW server_version"))
            if s.keystore_dsn is None:
                await ensure_keystore_database(conn, ks_dsn)
            ks_pool = await create_pool(roles.keystore_login(ks_dsn, s.dsn, s.service_dsn), max_size=KEYSTORE_POOL_SIZE,
                                        statement_cache_size=s.db_statement_cache)
            async with ks_pool.acquire() as ks:
                await check_durability(ks)
                if s.service_dsn is None:
                    await migrate_both(conn, ks)
                else:  # the service role may not migrate: it only checks that `serve` did
                    await check_migrated(conn, ks)
                await ensure_partitions(conn, dt.datetime.now(dt.timezone.utc).date())
                await replay_erasures(conn, ks)
    except BaseException:
        await pool.close()
        if ks_pool is not None:
            await ks_pool.close()
        raise
    app[POOL] = pool
    app[KEYSTORE_POOL] = ks_pool
    yield
    await pool.close()
    await ks_pool.close()


async def keys_ctx(app: web.Application):
    """The key ring (checked here, so a bad key fails start-up) and the data-key cache over the key store."""
    ring = KeyRing.from_setting(app[SETTINGS].master_key)

    async def load(install_id):
        async with deadline.connection(app, pool=KEYSTORE_POOL) as conn:  # within the request's deadline, if a request loads it
            return [(r["key_id"], r["kek_id"], r["wrapped"], r["retiring"]) for r in await keystore.keys_of(conn, install_id)]

    async def create(install_id, key_id, expires_at, kek_id, wrapped):
        async with deadline.connection(app, pool=KEYSTORE_POOL) as conn:
            return await keystore.add_epoch_key(conn, install_id, key_id, expires_at, kek_id, wrapped)

    app[KEYRING] = ring
    app[DATA_KEYS] = DataKeyCache(ring, load, create=create)
    app[EMAIL_SEALS] = RepeatedSeals()
    yield


# One batch of heartbeats at a time per worker: what arrives while one is written makes the next.
# A second flusher would start at once with the first heartbeat to arrive, a batch of one or two,
# and each batch has a fixed cost (a round trip, the function's two statements, the commit's WAL
# flush: about 0.25 ms of PostgreSQL CPU, several heartbeats' worth); with one, batches are about
# half again as large under load and PostgreSQL's CPU per heartbeat a tenth to a fifth lower (issue 16).
HEARTBEAT_FLUSHERS = 1


async def writers_ctx(app: web.Application):
    """The group-commit writers; on shutdown every queued record is committed before the pool closes."""
    s = app[SETTINGS]
    writer = GroupCommitWriter(
        "heartbeat", app[POOL], installations.write_heartbeats, app[METRICS],
        max_queue=s.queue_size, max_rows=s.batch_max_rows, max_bytes=s.batch_max_bytes, retry_after=s.retry_after,
        timeout=s.db_timeout, flushers=HEARTBEAT_FLUSHERS,
    )
    writer.start()
    app[HEARTBEAT_WRITER] = writer
    yield
    await writer.close()


async def gauges_ctx(app: web.Application):
    """cleanup_ctx: the pool and queue gauges, sampled every second in every worker, so that the sum
    (or maximum) over workers a scrape reports is at most a second old whichever worker answers it."""

    async def sample_forever() -> None:
        writers = [app[key] for key in (HEARTBEAT_WRITER, SCAN_WRITER, RECORD_WRITER) if key in app]
        while True:
            app[METRICS].sample(app[POOL], writers)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async with background(sample_forever()):
        yield


def create_app(settings: Settings, *, key_file: Path | None = None, policy: Policy | None = None) -> web.Application:
    """Build the service for resolved settings (dsn and master_key set); key_file: the embedded
    mode's key file, watched for new keys (ingest.worker.nodes)."""
    # auto_decompress off: bodies are inflated by ingest.http.body, within limits, never by the parser.
    # keepalive_timeout: aiohttp closes a connection that has not completed a request's headers
    # this long after it opened or after its last answer; read_timeout then bounds a client that
    # sends its headers a byte at a time as well as its body (ingest.http.body.read_raw), and idle ones.
    handler_args = {"auto_decompress": False, "keepalive_timeout": settings.read_timeout}
    app = web.Application(middlewares=[middleware], handler_args=handler_args)
    app[SETTINGS] = settings
    # The policy in force: the one serve read and checked before forking (or, without serve, read here).
    app[POLICY] = policy if policy is not None else load_in_force(settings.policy)
    app[METRICS] = Metrics()
    app[ACCESS_LOG] = AccessSampler(settings.access_log)
    app[KEY_FILE] = key_file
    app.cleanup_ctx.extend([storage_ctx, keys_ctx, nodes_ctx, auth_ctx, restrictions_ctx, writers_ctx, sweeper_ctx])
    routes_ops.setup(app)
    openapi.setup(app)
    routes_core.setup(app)
    routes_admin.setup(app)
    routes_scans.setup(app)
    routes_records.setup(app)
    app.cleanup_ctx.append(gauges_ctx)  # after the writers' contexts: it samples them
    app.on_cleanup.append(_write_metrics)  # after the contexts' ends: the writers' last batches are counted
    return app


async def _write_metrics(app: web.Application) -> None:
    """on_cleanup: the tally's last sums written, so a worker that stops gracefully loses no count."""
    app[METRICS].tally.flush()
