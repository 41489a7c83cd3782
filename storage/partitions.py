"""Daily range partitions on receive time, created ahead, some indexes built once their day ends, dropped whole."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import NamedTuple

import asyncpg

# Tables partitioned by day on received_at. Later migrations append to this tuple.
PARTITIONED_TABLES: tuple[str, ...] = ("heartbeats", "scans")
DAYS_AHEAD = 3

# Indexes built on a table's daily partition only once its day has ended (migration 0023), not kept
# up row by row while the day is written: table -> {name suffix: columns}. Each serves reads that are
# rare next to the day's inserts (an installation's export and erasure); until its day ends, they
# read the partition in full.
DAY_END_INDEXES: dict[str, dict[str, str]] = {"heartbeats": {"install": "install_id, received_at"}}
# How long after its day ends a partition gets them: longer than a request may take between its
# receipt and its batch's commit (at the default TELEMETRY_DB_TIMEOUT), and than the nodes' clocks
# should differ, so that no write into the partition is left to wait behind the build (CREATE
# INDEX holds the partition's SHARE lock while it reads the day). A later write is stored all the
# same: it waits for the build, then goes into the index.
PARTITION_INDEX_GRACE = dt.timedelta(minutes=10)


def partition_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def day_end(day: dt.date) -> dt.datetime:
    """The upper bound of day's partition: the next midnight, UTC."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)


async def ensure_partitions(conn: asyncpg.Connection, today: dt.date, *, days_back: int = 1, days_ahead: int = DAYS_AHEAD,
                            lock_timeout_ms: int | None = None) -> int:
    """Create any missing daily partition from today-days_back to today+days_ahead; returns how many were made.

    With lock_timeout_ms each CREATE waits at most that long for the parent's lock (SET LOCAL in
    its own transaction: no session state) and raises asyncpg.LockNotAvailableError past it.
    """
    made = 0
    for table in PARTITIONED_TABLES:
        for offset in range(-days_back, days_ahead + 1):
            day = today + dt.timedelta(days=offset)
            name = partition_name(table, day)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                continue  # (CREATE TABLE IF NOT EXISTS would report "CREATE TABLE" for it too)
            start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
            end = start + dt.timedelta(days=1)
            # Concurrent creators race on the catalog; the loser's duplicate_table is harmless.
            try:
                async with conn.transaction():
                    if lock_timeout_ms is not None:
                        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                    status = await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                    )
                    # A partition belongs to its parent's owner (storage.roles: telemetry_owner), whoever
                    # made it (the command line as the admin role, a worker as the service role), so
                    # that the service's sweeper can drop it when its day is past.
                    owner = await conn.fetchval(
                        "SELECT quote_ident(pg_get_userbyid(relowner)) FROM pg_class WHERE oid = $1::regclass "
                        "AND relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)", table)
                    if owner is not None and status == "CREATE TABLE":
                        await conn.execute(f"ALTER TABLE {name} OWNER TO {owner}")
            except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                continue
            made += status == "CREATE TABLE"
    return made


class DayIndex(NamedTuple):
    """One of DAY_END_INDEXES, on one partition."""

    partition: str
    name: str
    columns: str


async def day_indexes_due(conn: asyncpg.Connection, now: dt.datetime, *,
                          kept_after: Callable[[str], dt.datetime | None] = lambda table: None) -> list[DayIndex]:
    """The DAY_END_INDEXES missing on partitions whose day ended PARTITION_INDEX_GRACE before now, oldest first.

    A partition whose day ended at or before kept_after(table) is past retention, left to be dropped.
    An index counts as there whatever its name if one of the same columns is (after a rollback of
    migration 0023 the parent's index names its partitions' copies itself).
    """
    due = []
    for table, indexes in DAY_END_INDEXES.items():
        cutoff = kept_after(table)
        have: dict[str, set[str]] = {}  # partition -> the column lists of its btree indexes, in one query
        for r in await conn.fetch(
                "SELECT c.relname, pg_get_indexdef(x.indexrelid) AS d FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_index x ON x.indrelid = c.oid WHERE i.inhparent = $1::regclass", table):
            have.setdefault(r["relname"], set()).add(r["d"].rpartition(" USING btree (")[2].rstrip(")"))
        for name, day in await partitions_of(conn, table):
            end = day_end(day)
            if end + PARTITION_INDEX_GRACE > now:
                break  # oldest first: this day and the later ones are still written
            if cutoff is not None and end <= cutoff:
                continue
            due += [DayIndex(name, f"{name}_{suffix}", columns) for suffix, columns in indexes.items()
                    if columns not in have.get(name, ())]
    return due


# A day's index is built in one statement, longer than a pool's command timeout may allow.
INDEX_BUILD_TIMEOUT = 3600.0


async def build_day_index(conn: asyncpg.Connection, index: DayIndex, *, lock_timeout_ms: int | None = None) -> bool:
    """Build one day-end index; False if another process built it first.

    One transaction (a plain CREATE INDEX: it commits whole or not at all, no invalid index is
    ever left behind). With lock_timeout_ms it waits at most that long for the partition's lock (a
    write into it not yet committed) and raises asyncpg.LockNotAvailableError past it.
    """
    try:
        async with conn.transaction():
            if lock_timeout_ms is not None:
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            await conn.execute(f"CREATE INDEX {index.name} ON {index.partition} ({index.columns})", timeout=INDEX_BUILD_TIMEOUT)
    except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
        return False
    return True


async def partitions_of(conn: asyncpg.Connection, table: str) -> list[tuple[str, dt.date]]:
    """(name, day) of each daily partition of table, oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
        table,
    )
    out = []
    prefix = f"{table}_p"
    for r in rows:
        name = r["relname"]
        if name.startswith(prefix):
            out.append((name, dt.datetime.strptime(name[len(prefix):], "%Y%m%d").date()))
    return sorted(out, key=lambda x: x[1])
