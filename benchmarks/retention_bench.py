"""retention: expiring a full day of 1,000,000 scan rows, by partition drop and by DELETE, in one run.

Two daily partitions of a scan-shaped table (the service's columns and indexes, a ~100-byte
ciphertext per row) are loaded with COPY, 1,000,000 rows each. Then, with the sweeper's own
functions (storage.sweeper):

- ``retention.delete_day``: ``delete_in_batches`` empties one day, 5,000 rows per statement
  and transaction, as the sweeper deletes expired rows; ``.vacuum`` is the VACUUM that then
  makes the space reusable (a DELETE alone does not);
- ``retention.drop_day``: ``detach_and_drop`` removes the other day whole (DETACH PARTITION,
  count, DROP TABLE, in one transaction), as the sweeper drops a partition past the maximum retention.

Each figure is wall-clock seconds, with the WAL it wrote in the details; drop_day is reported
against delete_day, so its ratio is the fraction of the DELETE's time it takes.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid

import asyncpg

from storage.sweeper import BATCH_ROWS, delete_in_batches, detach_and_drop

from .core import BENCH_SCHEMA, Context, Result, benchmark

ROWS_PER_DAY = 1_000_000
COPY_CHUNK = 50_000
CIPHERTEXT_BYTES = 100
TABLE = f"{BENCH_SCHEMA}.ret_scans"
DAY_A = dt.date(2030, 1, 1)
DAY_B = dt.date(2030, 1, 2)
COLUMNS = ("install_id", "agent_id", "scan_id", "received_at", "expires_at", "key_id", "content_mac",
           "size_wire", "size_decoded", "size_plain", "ciphertext")

now = time.perf_counter


def _partition(day: dt.date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.timezone.utc)


async def _create(conn: asyncpg.Connection) -> None:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BENCH_SCHEMA}")
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"""
        CREATE TABLE {TABLE} (
            install_id uuid NOT NULL, agent_id uuid NOT NULL, scan_id uuid NOT NULL,
            received_at timestamptz NOT NULL, expires_at timestamptz NOT NULL, key_id integer NOT NULL,
            content_mac bytea NOT NULL, size_wire integer NOT NULL, size_decoded integer NOT NULL,
            size_plain integer NOT NULL, ciphertext bytea NOT NULL
        ) PARTITION BY RANGE (received_at)""")
    for day in (DAY_A, DAY_B):
        await conn.execute(f"CREATE TABLE {_partition(day)} PARTITION OF {TABLE} "
                           f"FOR VALUES FROM ('{_midnight(day).isoformat()}') TO ('{_midnight(day + dt.timedelta(days=1)).isoformat()}')")


async def _load_day(conn: asyncpg.Connection, day: dt.date) -> None:
    """ROWS_PER_DAY rows received evenly over the day, 720 h retention, by COPY in chunks."""
    start = _midnight(day)
    step = dt.timedelta(days=1) / ROWS_PER_DAY
    installs = [uuid.uuid4() for _ in range(1000)]
    blobs = [os.urandom(CIPHERTEXT_BYTES) for _ in range(256)]
    macs = [os.urandom(32) for _ in range(256)]
    retention = dt.timedelta(hours=720)
    for first in range(0, ROWS_PER_DAY, COPY_CHUNK):
        records = []
        for i in range(first, min(first + COPY_CHUNK, ROWS_PER_DAY)):
            received = start + i * step
            install = installs[i % len(installs)]
            records.append((install, install, uuid.uuid4(), received, received + retention, 1, macs[i & 255],
                            2000, 8000, 8000, blobs[i & 255]))
        await conn.copy_records_to_table(_partition(day).split(".")[1], schema_name=BENCH_SCHEMA, records=records,
                                         columns=COLUMNS)


async def _wal_lsn(conn: asyncpg.Connection) -> object:
    return await conn.fetchval("SELECT pg_current_wal_lsn()")


async def _wal_mb(conn: asyncpg.Connection, since: object) -> float:
    return round(float(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", since)) / 1e6, 1)


@benchmark("retention")
async def retention(ctx: Context) -> list[Result]:
    """Expire a day of 1,000,000 scan rows: sweeper's partition drop vs its batched DELETE, same run."""
    conn = await asyncpg.connect(ctx.dsn)
    try:
        await _create(conn)
        started = now()
        for day in (DAY_A, DAY_B):
            await _load_day(conn, day)
        # The indexes the service's scans table has (0002_scans.sql, 0004_retention.sql), built after
        # the load because that is faster; the DELETE and the drop maintain or remove them the same.
        for columns in ("install_id, scan_id", "expires_at", "received_at"):
            await conn.execute(f"CREATE INDEX ON {TABLE} ({columns})")
        load_s = now() - started
        await conn.execute(f"ANALYZE {TABLE}")
        day_mb = round(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", _partition(DAY_A)) / 1e6, 1)
        cutoff = _midnight(DAY_B + dt.timedelta(days=31))  # every row of both days has expired

        wal = await _wal_lsn(conn)
        started = now()
        deleted = 0
        statements = 0
        async for n in delete_in_batches(conn, _partition(DAY_A), "expires_at", cutoff, BATCH_ROWS):
            deleted += n
            statements += 1
        delete_s = now() - started
        delete_wal = await _wal_mb(conn, wal)
        started = now()
        await conn.execute(f"VACUUM {_partition(DAY_A)}")
        vacuum_s = now() - started
        if deleted != ROWS_PER_DAY:
            raise RuntimeError(f"DELETE removed {deleted} rows, expected {ROWS_PER_DAY}")

        wal = await _wal_lsn(conn)
        started = now()
        dropped = await detach_and_drop(conn, TABLE, _partition(DAY_B))
        drop_s = now() - started
        drop_wal = await _wal_mb(conn, wal)
        if dropped != ROWS_PER_DAY:
            raise RuntimeError(f"dropped partition held {dropped} rows, expected {ROWS_PER_DAY}")
    finally:
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        finally:
            await conn.close()

    common = {"rows": ROWS_PER_DAY, "partition_mb": day_mb, "load_s_two_days": round(load_s, 1)}
    delete = {**common, "statements": statements, "batch_rows": BATCH_ROWS, "wal_mb": delete_wal,
              "rows_per_s": round(ROWS_PER_DAY / delete_s),
              "note": f"{statements} x {BATCH_ROWS}-row DELETE, WAL {delete_wal} MB; then VACUUM {vacuum_s:.1f} s"}
    drop = {**common, "wal_mb": drop_wal, "note": f"DETACH + count + DROP (one transaction) of a {day_mb} MB day, WAL {drop_wal} MB"}
    vacuum = {**common, "note": "VACUUM of the emptied day (a DELETE leaves dead rows until then)"}
    return [
        Result("retention.delete_day", delete_s, "s", None, delete),
        Result("retention.delete_day.vacuum", vacuum_s, "s", None, vacuum),
        Result("retention.drop_day", drop_s, "s", "retention.delete_day", drop),
    ]
