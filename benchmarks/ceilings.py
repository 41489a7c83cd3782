"""The ceilings the service runs under, and the naive baseline it should beat.

- http_ceiling: the bare aiohttp app (benchmarks.apps http) with the service's
  worker counts, driven by the same load generator with heartbeat bodies, and
  with 50 KiB gzip scan bodies at the largest worker count.
- db_ceiling: copy_records_to_table into a logged table, synchronous_commit on,
  one commit per batch: heartbeat-shaped rows and scan-shaped rows (50 KiB of
  ciphertext each).
- crypto_ceiling: AES-256-GCM seal of 1 KiB and 64 KiB, one core.
- json_ceiling: orjson.loads of the 5,000-entry scan, one core (the allowlist
  filter parses and walks the same document).
- scan_floor: the library calls one 50 KiB scan of the scan figures makes
  whatever code surrounds them (inflate, parse, canonical form, digest, zstd,
  AES-GCM), CPU per scan on one core: what `e2e_scans.wN.cpu` is a multiple of.
- naive_baseline: benchmarks.apps naive (stdlib json, one INSERT and commit per
  request, pool of 10 per worker) under the same load as the service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import apps
from .core import BENCH_SCHEMA, Context, Result, benchmark
from .loadgen import Request, measure
from .payloads import (
    FILTER_SCAN_ENTRIES,
    SCAN_SIZE_BYTES,
    GzipScanBodies,
    fifty_kib_scans,
    heartbeat_body,
    json_headers,
    scan_document,
)
from .procs import Server, free_port, server_process

FAKE_INSTALLATION_TOKEN = "tii_" + "A" * 43  # same header size as a real token
FAKE_AGENT_TOKEN = "tia_" + "A" * 43
INSTALLATIONS = 256  # distinct install_ids the heartbeat load cycles through
HEARTBEAT_BATCH = 256
SCAN_BATCH = 32

now = time.perf_counter


def http_ceiling_name(workers: int) -> str:
    return f"http_ceiling.w{workers}"


def http_scan_ceiling_name(workers: int) -> str:
    return f"http_ceiling.scan50k.w{workers}"


# --- reference servers -----------------------------------------------------------------------


@asynccontextmanager
async def reference_app(ctx: Context, kind: str, workers: int) -> AsyncIterator[Server]:
    """Run ``benchmarks.apps <kind>`` with ``workers`` processes; wait until each one answers."""
    port = free_port()
    env = {**os.environ, apps.DSN_ENV: ctx.dsn}
    argv = [sys.executable, "-m", "benchmarks.apps", kind, "--port", str(port), "--workers", str(workers)]
    async with server_process(
        argv, name=f"{kind}-w{workers}", port=port, workdir=ctx.workdir, env=env, distinct_pids=workers,
        cores=ctx.server_cores,
    ) as server:
        yield server


def fake_installations() -> list[tuple[str, str]]:
    """(install_id, token) pairs for the reference apps, which check neither."""
    return [(str(uuid.UUID(int=i + 1)), FAKE_INSTALLATION_TOKEN) for i in range(INSTALLATIONS)]


def heartbeat_requests(url: str, installations: Sequence[tuple[str, str]], expect: int,
                       check: Callable[[bytes], bool] | None = None) -> Callable[[int], Request]:
    """Factory of heartbeat POSTs cycling through (install_id, token) pairs."""
    requests = [
        Request("POST", url, heartbeat_body(install_id), json_headers(token), frozenset({expect}), check)
        for install_id, token in installations
    ]
    return lambda i: requests[i % len(requests)]


STORED_NEEDLE = b'"stored":true'  # what wrk looks for in a heartbeat answer (stored_answer's test)
NAIVE_STORED_NEEDLE = b'"stored": true'  # the naive app answers with stdlib json's separators


def stored_answer(body: bytes) -> bool:
    """A heartbeat answer says it was stored."""
    try:
        return orjson.loads(body).get("stored") is True
    except (orjson.JSONDecodeError, AttributeError):
        return False


@benchmark("http_ceiling")
async def http_ceiling(ctx: Context) -> list[Result]:
    """Bare aiohttp app (read body, answer 204): heartbeat bodies per worker count, 50 KiB gzip scans."""
    results: list[Result] = []
    for workers in ctx.workers:
        async with reference_app(ctx, "http", workers) as srv:
            factory = heartbeat_requests(srv.url + "/v1/heartbeats", fake_installations(), 204)
            found, _ = await measure(ctx, http_ceiling_name(workers), factory, server_pid=srv.pid,
                                     cycle=INSTALLATIONS)
            results += found
            if workers == max(ctx.workers):  # the scan figures are taken at the largest worker count
                results += await _http_scan_ceiling(ctx, srv, workers)
    return results


async def _http_scan_ceiling(ctx: Context, srv: Server, workers: int) -> list[Result]:
    scans = fifty_kib_scans()
    headers = json_headers(FAKE_AGENT_TOKEN, encoding="gzip")
    url = srv.url + "/v1/scans"
    name = http_scan_ceiling_name(workers)
    found, closed = await measure(
        ctx,
        name,
        lambda i: Request("POST", url, scans.body(str(uuid.uuid4())), headers, frozenset({204})),
        server_pid=srv.pid,
    )
    return [*found, scan_bytes_result(name, closed.rps, scans, None)]


def scan_bytes_result(name: str, rps: float, scans: GzipScanBodies, ceiling: str | None) -> Result:
    """MB/s of decoded scan JSON for ``rps`` scans/s (named ``<name>.bytes``)."""
    details = {
        "decoded_bytes": scans.decoded_size,
        "wire_bytes": scans.wire_size,
        "scans_per_s": round(rps, 1),
        "note": f"{scans.decoded_size} B JSON sent as {scans.wire_size} B gzip",
    }
    return Result(f"{name}.bytes", rps * scans.decoded_size / 1e6, "MB/s", ceiling, details)


# --- database ---------------------------------------------------------------------------------


@asynccontextmanager
async def bench_table(dsn: str, table: str, columns_ddl: str) -> AsyncIterator[str]:
    """Create ``telemetry_bench.<table>`` afresh for the block and drop it afterwards."""
    qualified = f"{BENCH_SCHEMA}.{table}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BENCH_SCHEMA}")
        await conn.execute(f"DROP TABLE IF EXISTS {qualified}")
        await conn.execute(f"CREATE TABLE {qualified} ({columns_ddl})")
        yield qualified
    finally:
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {qualified}")
        finally:
            await conn.close()


async def _copy_for(conns: Sequence[asyncpg.Connection], table: str, columns: Sequence[str],
                    make_batch: Callable[[], list[tuple[Any, ...]]], seconds: float) -> tuple[int, float]:
    """Each connection COPYs batches back to back for ``seconds``; return (rows, elapsed)."""
    rows = 0
    start = now()
    end = start + seconds

    async def copier(conn: asyncpg.Connection) -> None:
        nonlocal rows
        while now() < end:
            batch = make_batch()
            await conn.copy_records_to_table(table, schema_name=BENCH_SCHEMA, records=batch, columns=columns)
            rows += len(batch)

    await asyncio.gather(*(copier(c) for c in conns))
    return rows, now() - start


async def _copy_ceiling(ctx: Context, name: str, table: str, ddl: str, columns: Sequence[str],
                        make_batch: Callable[[], list[tuple[Any, ...]]], row_bytes: int) -> list[Result]:
    writers = max(ctx.workers)  # one writer connection per service worker
    async with bench_table(ctx.dsn, table, ddl) as qualified:
        conns = [
            await asyncpg.connect(ctx.dsn, server_settings={"synchronous_commit": "on"}) for _ in range(writers)
        ]
        try:
            probe = conns[0]
            settings = {k: await probe.fetchval(f"SHOW {k}") for k in ("synchronous_commit", "fsync", "wal_level")}
            if settings["synchronous_commit"] != "on":
                raise RuntimeError(f"synchronous_commit is {settings['synchronous_commit']!r}, not on")
            await _copy_for(conns, table, columns, make_batch, ctx.warmup)
            size0 = await probe.fetchval("SELECT pg_total_relation_size($1::regclass)", qualified)
            wal0 = await probe.fetchval("SELECT pg_current_wal_lsn()")
            rows, elapsed = await _copy_for(conns, table, columns, make_batch, ctx.duration)
            size1 = await probe.fetchval("SELECT pg_total_relation_size($1::regclass)", qualified)
            wal_bytes = await probe.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal0)
        finally:
            for c in conns:
                await c.close()
    batch = len(make_batch())
    details = {
        **settings,
        "writers": writers,
        "batch_rows": batch,
        "rows": rows,
        "seconds": round(elapsed, 3),
        "commits_per_s": round(rows / batch / elapsed, 1),
        "row_input_bytes": row_bytes,
        "table_mb_per_s": round((size1 - size0) / elapsed / 1e6, 2),
        "wal_mb_per_s": round(float(wal_bytes) / elapsed / 1e6, 2),
    }
    details["note"] = (
        f"{writers} conn x {batch}-row COPY, {details['commits_per_s']:.0f} commits/s, "
        f"WAL {details['wal_mb_per_s']} MB/s, fsync {settings['fsync']}"
    )
    return [
        Result(name, rows / elapsed, "rows/s", None, details),
        Result(f"{name}.bytes", (size1 - size0) / elapsed / 1e6, "MB/s", None, details),
    ]


HEARTBEAT_DDL = """
    install_id uuid NOT NULL, received_at timestamptz NOT NULL, license_type text NOT NULL,
    version text NOT NULL, asset_count integer NOT NULL, db_server_type text, web_server_type text,
    email_ciphertext bytea, ip_prefix cidr
"""
HEARTBEAT_COLUMNS = ("install_id", "received_at", "license_type", "version", "asset_count",
                     "db_server_type", "web_server_type", "email_ciphertext", "ip_prefix")
SCAN_DDL = """
    scan_id uuid PRIMARY KEY, install_id uuid NOT NULL, agent_id uuid NOT NULL,
    received_at timestamptz NOT NULL, expires_at timestamptz NOT NULL, key_version integer NOT NULL,
    plaintext_bytes integer NOT NULL, ciphertext bytea NOT NULL
"""
SCAN_COLUMNS = ("scan_id", "install_id", "agent_id", "received_at", "expires_at", "key_version",
                "plaintext_bytes", "ciphertext")


@benchmark("db_ceiling")
async def db_ceiling(ctx: Context) -> list[Result]:
    """copy_records_to_table, synchronous_commit on, one commit per batch, one connection per worker."""
    received = dt.datetime.now(dt.UTC)
    # Encrypted e-mail: 15 bytes + version, key id, nonce and tag.
    heartbeat_rows = [
        (uuid.UUID(int=i % INSTALLATIONS + 1), received, "pro", "4.2.1", 120, "postgresql", "nginx",
         os.urandom(15 + 1 + 4 + 12 + 16), ipaddress.ip_network("127.0.0.0/24"))
        for i in range(HEARTBEAT_BATCH)
    ]
    results = await _copy_ceiling(
        ctx, "db_ceiling.heartbeats", "copy_heartbeats", HEARTBEAT_DDL, HEARTBEAT_COLUMNS,
        lambda: heartbeat_rows, row_bytes=16 + 8 + 3 + 5 + 4 + 10 + 5 + 48 + 7,
    )

    # Ciphertext is incompressible, so TOAST stores it as it is, like the service's sealed scans.
    ciphertext = os.urandom(SCAN_SIZE_BYTES + 33)
    expires = received + dt.timedelta(hours=720)
    install, agent = uuid.UUID(int=1), uuid.UUID(int=2)

    def scan_batch() -> list[tuple[Any, ...]]:
        return [(uuid.uuid4(), install, agent, received, expires, 1, SCAN_SIZE_BYTES, ciphertext)
                for _ in range(SCAN_BATCH)]

    results += await _copy_ceiling(
        ctx, "db_ceiling.scans", "copy_scans", SCAN_DDL, SCAN_COLUMNS, scan_batch, row_bytes=len(ciphertext) + 80
    )
    return results


# --- in-process micro-measurements ------------------------------------------------------------


def rate_of(op: Callable[[], object], seconds: float, chunk: int) -> tuple[int, float]:
    """Call ``op`` in chunks of ``chunk`` calls for about ``seconds``; return (calls, elapsed)."""
    calls = 0
    start = now()
    end = start + seconds
    while now() < end:
        for _ in range(chunk):
            op()
        calls += chunk
    return calls, now() - start


@benchmark("crypto_ceiling")
async def crypto_ceiling(ctx: Context) -> list[Result]:
    """AES-256-GCM seal (fresh 96-bit nonce, 48-byte associated data) on one core."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    aad = uuid.UUID(int=1).bytes + uuid.UUID(int=2).bytes + b"telemetry-scan-v1"
    results = []
    for label, size in (("1KiB", 1024), ("64KiB", 64 * 1024)):
        data = os.urandom(size)
        calls, elapsed = rate_of(
            lambda: aead.encrypt(os.urandom(12), data, aad), ctx.micro_duration, 256 if size <= 1024 else 8
        )
        details = {"payload_bytes": size, "seals_per_s": round(calls / elapsed, 1), "cores": 1,
                   "seconds": round(elapsed, 3), "note": f"{calls / elapsed:,.0f} seals/s, 1 core"}
        results.append(Result(f"crypto_ceiling.{label}", calls * size / elapsed / 1e6, "MB/s", None, details))
    return results


def filter_scan_json() -> bytes:
    """The 5,000-entry scan document of the allowlist figures, as sent."""
    return orjson.dumps(scan_document(FILTER_SCAN_ENTRIES, scan_id=str(uuid.UUID(int=3))))


@benchmark("json_ceiling")
async def json_ceiling(ctx: Context) -> list[Result]:
    """orjson.loads of the 5,000-entry scan on one core: what any filter of it must at least pay."""
    raw = filter_scan_json()
    calls, elapsed = rate_of(lambda: orjson.loads(raw), ctx.micro_duration, 4)
    details = {"document_bytes": len(raw), "cores": 1, "seconds": round(elapsed, 3),
               "note": f"{len(raw):,} B document, 1 core"}
    return [
        Result("json_ceiling.scan5000", calls / elapsed, "docs/s", None, details),
        Result("json_ceiling.scan5000.bytes", calls * len(raw) / elapsed / 1e6, "MB/s", None, details),
    ]


@benchmark("scan_floor")
async def scan_floor(ctx: Context) -> list[Result]:
    """The library calls of one 50 KiB scan (inflate, parse, canonical form, digest, zstd, AES-GCM), one core."""
    from crypto.documents import canonical, content_digest, seal_document
    from crypto.envelope import DataKey
    from ingest.pipeline.filter import Allowlist
    from ingest.pipeline.sealed import scan_context
    from policy.categories import SCAN

    body = fifty_kib_scans().body(str(uuid.UUID(int=4)))
    data = zlib.decompress(body, wbits=31)
    kept, _ = Allowlist(SCAN.root).filter_document(orjson.loads(data))
    plain = canonical(kept)
    key = DataKey.from_bytes(1, os.urandom(32))
    context = scan_context(uuid.UUID(int=1), uuid.UUID(int=4))
    compressed = seal_document(key, plain, context)
    parts: dict[str, Callable[[], object]] = {
        "inflate": lambda: zlib.decompress(body, wbits=31),
        "parse": lambda: orjson.loads(data),
        "canonical": lambda: canonical(kept),
        "digest": lambda: content_digest(plain),
        "compress_seal": lambda: seal_document(key, plain, context),
    }
    seconds = max(0.2, ctx.micro_duration / len(parts))
    us = {}
    for part, op in parts.items():
        started = time.process_time()
        calls, _ = rate_of(op, seconds, 16)
        us[part] = (time.process_time() - started) / calls * 1e6
    total = sum(us.values())
    details = {**{f"{k}_us": round(v, 1) for k, v in us.items()}, "decoded_bytes": len(data), "plain_bytes": len(plain),
               "sealed_bytes": len(compressed), "cores": 1,
               "note": "µs: " + ", ".join(f"{k} {v:.0f}" for k, v in us.items()) + "; no HTTP, no filter, no database"}
    return [Result("scan_floor.us", total, "µs", None, details)]


# --- naive baseline ---------------------------------------------------------------------------

NAIVE_DDL = """
    install_id uuid NOT NULL, received_at timestamptz NOT NULL, license_type text NOT NULL,
    version text NOT NULL, asset_count integer NOT NULL, db_server_type text, web_server_type text,
    email text, ip inet
"""


@benchmark("naive_baseline", needs=("http_ceiling",))
async def naive_baseline(ctx: Context) -> list[Result]:
    """A first attempt: stdlib json, one INSERT and commit per heartbeat, pool of 10 per worker."""
    results: list[Result] = []
    async with bench_table(ctx.dsn, apps.NAIVE_TABLE, NAIVE_DDL) as qualified:
        for workers in ctx.workers:
            async with reference_app(ctx, "naive", workers) as srv:
                conn = await asyncpg.connect(ctx.dsn)
                try:
                    before = await conn.fetchval(f"SELECT count(*) FROM {qualified}")
                    factory = heartbeat_requests(
                        srv.url + "/v1/heartbeats", fake_installations(), 200, stored_answer
                    )
                    found, closed = await measure(
                        ctx, f"naive_baseline.w{workers}", factory,
                        ceiling=http_ceiling_name(workers), server_pid=srv.pid,
                        cycle=INSTALLATIONS, needle=NAIVE_STORED_NEEDLE,
                    )
                    committed = await conn.fetchval(f"SELECT count(*) FROM {qualified}") - before
                finally:
                    await conn.close()
            # Every 200 must be a committed row (warm-up rows are committed too, hence >=).
            if committed < closed.ok:
                raise RuntimeError(f"naive app answered {closed.ok} x 200 but committed {committed} rows")
            results += found
    return results
