"""Daily range partitions on receive time, created ahead and dropped whole."""

from __future__ import annotations

import datetime as dt

import asyncpg

# Tables partitioned by day on received_at. Later migrations append to this tuple.
PARTITIONED_TABLES: tuple[str, ...] = ("heartbeats", "scans")
DAYS_AHEAD = 3


def partition_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


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
