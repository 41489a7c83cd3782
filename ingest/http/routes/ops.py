"""/healthz, /readyz and /metrics: unauthenticated, and saying nothing about anyone."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ingest.keys import KEYSTORE_POOL, METRICS, POOL
from storage.pool import acquire_within


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the data database and the key store both answer within a second, else 503."""
    for key, what in ((POOL, "database unavailable"), (KEYSTORE_POOL, "key store unavailable")):
        try:
            async with acquire_within(request.app[key], 1.0) as conn:
                await conn.fetchval("SELECT 1")
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return web.json_response({"status": what}, status=503, headers={"Retry-After": "1"})
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition for the whole service."""
    # The gauges of the pool and queues are sampled every second in every worker (ingest.http.app.gauges_ctx).
    m = request.app[METRICS]
    return web.Response(body=m.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    """Add the operational routes."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
