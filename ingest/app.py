"""The application factory: every part adds itself and hands on what the next one needs."""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from crypto.datakeys import DataKeyCache
from crypto.keyring import KeyRing
from ingest import openapi, routes_admin, routes_core, routes_ops, routes_scans
from ingest.auth import auth_ctx
from ingest.batching import GroupCommitWriter
from ingest.keys import DATA_KEYS, HEARTBEAT_WRITER, KEYRING, METRICS, POOL, SETTINGS
from ingest.metrics import Metrics
from ingest.middleware import errors_middleware, metrics_middleware
from ingest.restrictions import restrictions_ctx
from ingest.settings import Settings
from ingest.sweeper_ctx import sweeper_ctx
from storage import installations
from storage.migrate import migrate
from storage.partitions import ensure_partitions
from storage.pool import acquire_within, check_durability, create_pool


async def storage_ctx(app: web.Application):
    """The pool; on the way in, refuse an unsafe server, migrate, and make the coming days' partitions."""
    s = app[SETTINGS]
    pool = await create_pool(s.dsn, max_size=s.db_pool_size, statement_cache_size=s.db_statement_cache)
    try:
        async with pool.acquire() as conn:
            await check_durability(conn)
            await migrate(conn)
            await ensure_partitions(conn, dt.datetime.now(dt.timezone.utc).date())
    except BaseException:
        await pool.close()
        raise
    app[POOL] = pool
    yield
    await pool.close()


async def keys_ctx(app: web.Application):
    """The key ring (checked here, so a bad key fails start-up) and the data-key cache."""
    ring = KeyRing.from_setting(app[SETTINGS].master_key)
    pool = app[POOL]

    async def load(install_id):
        async with acquire_within(pool, app[SETTINGS].db_timeout) as conn:
            return [(r["key_id"], r["kek_id"], r["wrapped"]) for r in await installations.data_keys(conn, install_id)]

    app[KEYRING] = ring
    app[DATA_KEYS] = DataKeyCache(ring, load)
    yield


async def writers_ctx(app: web.Application):
    """The group-commit writers; on shutdown every queued record is committed before the pool closes."""
    s = app[SETTINGS]
    writer = GroupCommitWriter(
        "heartbeat", app[POOL], installations.write_heartbeats, app[METRICS],
        max_queue=s.queue_size, max_rows=s.batch_max_rows, max_bytes=s.batch_max_bytes, retry_after=s.retry_after,
        timeout=s.db_timeout,
    )
    writer.start()
    app[HEARTBEAT_WRITER] = writer
    yield
    await writer.close()


def create_app(settings: Settings) -> web.Application:
    """Build the service for resolved settings (dsn and master_key set)."""
    # auto_decompress off: bodies are inflated by ingest.body, within limits, never by the parser.
    # keepalive_timeout: aiohttp closes a connection that has not completed a request's headers
    # this long after it opened or after its last answer; read_timeout then bounds a client that
    # sends its headers a byte at a time as well as its body (ingest.body.read_raw), and idle ones.
    handler_args = {"auto_decompress": False, "keepalive_timeout": settings.read_timeout}
    app = web.Application(middlewares=[metrics_middleware, errors_middleware], handler_args=handler_args)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([storage_ctx, keys_ctx, auth_ctx, restrictions_ctx, writers_ctx, sweeper_ctx])
    routes_ops.setup(app)
    openapi.setup(app)
    routes_core.setup(app)
    routes_admin.setup(app)
    routes_scans.setup(app)
    return app
