"""The reference servers, run as ``python -m benchmarks.apps {http,naive} --port P --workers N``.

- ``http``: the bare aiohttp app of the http ceiling. It reads the body (aiohttp
  decodes a gzip body while reading it) and answers 204. Nothing else.
- ``naive``: a first attempt at the heartbeat endpoint on the same stack:
  stdlib ``json``, one INSERT per request committed on its own (asyncpg
  autocommit) through a pool of 10 connections per worker, answer 200. No auth,
  no policy, no encryption: a generous baseline.

Both answer ``GET /healthz`` with their pid, so the caller can see that every
worker is up. Workers share the port with SO_REUSEPORT and run on uvloop when it
is installed, as the service does.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import json
import multiprocessing
import os
import signal
import uuid
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from .core import BENCH_SCHEMA

NAIVE_TABLE = "naive_heartbeats"  # in BENCH_SCHEMA
NAIVE_POOL_SIZE = 10
DSN_ENV = "TELEMETRY_BENCH_DSN"


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no server outlives a killed run."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text=str(os.getpid()))


async def read_and_204(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


def http_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", read_and_204)
    app.router.add_put("/{tail:.*}", read_and_204)
    return app


POOL = web.AppKey("pool", asyncpg.Pool)

NAIVE_INSERT = f"""
INSERT INTO {BENCH_SCHEMA}.{NAIVE_TABLE}
    (install_id, received_at, license_type, version, asset_count,
     db_server_type, web_server_type, email, ip)
VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8)
"""


async def naive_heartbeat(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        return web.json_response({"title": "invalid JSON"}, status=400)
    if not isinstance(doc, dict):
        return web.json_response({"title": "not an object"}, status=400)
    try:
        row = (
            uuid.UUID(doc["install_id"]),
            str(doc["license_type"]),
            str(doc["version"]),
            int(doc["asset_count"]),
            doc.get("db_server_type"),
            doc.get("web_server_type"),
            doc.get("email"),
            ipaddress.ip_address(request.remote or "127.0.0.1"),
        )
    except (KeyError, TypeError, ValueError):
        return web.json_response({"title": "invalid heartbeat"}, status=422)
    async with request.app[POOL].acquire() as conn:
        await conn.execute(NAIVE_INSERT, *row)
    return web.json_response({"stored": True, "dropped_fields": []})


def naive_app(dsn: str) -> web.Application:
    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=NAIVE_POOL_SIZE,
            max_size=NAIVE_POOL_SIZE,
            server_settings={"synchronous_commit": "on"},
        )
        app[POOL] = pool
        yield
        await pool.close()

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/heartbeats", naive_heartbeat)
    return app


def _serve(kind: str, port: int, dsn: str | None) -> None:
    _die_with_parent()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = http_app() if kind == "http" else naive_app(dsn or "")
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        reuse_port=True,
        access_log=None,
        print=None,
        loop=loop,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apps")
    parser.add_argument("kind", choices=("http", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    args.dsn = os.environ.get(DSN_ENV)  # not on the command line: a DSN may hold a password
    if args.kind == "naive" and not args.dsn:
        parser.error(f"naive needs {DSN_ENV}")
    if args.workers == 1:
        _serve(args.kind, args.port, args.dsn)
        return
    _die_with_parent()
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_serve, args=(args.kind, args.port, args.dsn), daemon=True) for _ in range(args.workers)
    ]
    for w in workers:
        w.start()
    # The caller signals the whole process group; the supervisor only waits.
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
