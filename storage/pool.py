"""The asyncpg connection pool and the start-up checks on the server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson

from storage.errors import UnsafeDatabase


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog")


async def connect(dsn: str, *, timeout: float = 10, statement_cache_size: int = 100) -> asyncpg.Connection:
    """One connection with the same codecs as the pool's (for the command line and tests).

    statement_cache_size=0 (TELEMETRY_DB_STATEMENT_CACHE) behind PgBouncer in transaction mode: a
    named prepared statement lives on one server connection and the next transaction may get another.
    """
    conn = await asyncpg.connect(dsn, timeout=timeout, statement_cache_size=statement_cache_size)
    await _init_connection(conn)
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection's reset behind a pooler: nothing beyond asyncpg's rollback of an open transaction."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, statement_cache_size: int = 100) -> asyncpg.Pool:
    """Open a pool; statement_cache_size=0 suits PgBouncer in transaction mode.

    With statement_cache_size=0 (a pooler) a connection handed back is not reset with asyncpg's
    `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`: behind PgBouncer in transaction
    mode that runs on whichever server connection comes next and can drop a session lock or setting
    another client holds there. This service keeps no session state to reset; an open transaction
    is still rolled back (asyncpg does that before any reset). One setting may move: the first use
    of a composite type (`heartbeat_row`, `scan_row`) on a connection makes asyncpg look the type up with
    `jit` switched off for the lookup and restored after, three statements that a pooler may send
    to different server connections, leaving one with `jit = off` (a planner setting only; this
    service's short statements gain nothing from JIT compilation).
    """
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        statement_cache_size=statement_cache_size,
        reset=_keep_session if statement_cache_size == 0 else None,
        init=_init_connection,
        command_timeout=30,
        # A dead server must not hang a request forever: fail over to 503 fast.
        timeout=5,
    )


@contextlib.asynccontextmanager
async def acquire_until(pool: asyncpg.Pool, deadline: float | None) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for work to be done by deadline (event-loop time; None: no bound), acquiring
    included (TimeoutError if not).

    A connection whose work is cut off by the deadline is closed at once: handed back as usual, it
    would first be reset, which waits for a hung server up to the command timeout.
    """
    async with asyncio.timeout_at(deadline), pool.acquire() as conn:
        try:
            yield conn
        except (asyncio.CancelledError, TimeoutError):
            conn.terminate()
            raise


async def cursor(conn: asyncpg.Connection, query: str, *args, prefetch: int = 1000) -> AsyncIterator[asyncpg.Record]:
    """The rows of query through a server-side cursor (use inside a transaction), safe behind a pooler.

    asyncpg's conn.cursor() prepares a statement named __asyncpg_stmt_N__ (N counts from 1 on every
    connection) and closes it only at some later query. Behind PgBouncer in transaction mode that
    later query may run on another server connection: the statement stays behind on this one, and
    the next client's first cursor there fails with DuplicatePreparedStatementError. So the
    statement gets a name no other client uses and is deallocated before the transaction ends.
    """
    name = f"ti_cursor_{uuid.uuid4().hex}"
    stmt = await conn.prepare(query, name=name)
    try:
        async for row in stmt.cursor(*args, prefetch=prefetch):
            yield row
    finally:
        # In a failed transaction this fails too: the name is unique, so what stays behind is harmless.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.execute(f'DEALLOCATE "{name}"')


def acquire_within(pool: asyncpg.Pool, timeout: float | None) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
    """acquire_until, timeout seconds from now."""
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    return acquire_until(pool, deadline)


async def check_durability(conn: asyncpg.Connection) -> None:
    """Refuse a server where a commit could be acknowledged before it is on disk."""
    value = await conn.fetchval("SHOW synchronous_commit")
    if value == "off":
        raise UnsafeDatabase("synchronous_commit is off: acknowledged writes could be lost; turn it on")
    fsync = await conn.fetchval("SHOW fsync")
    if fsync == "off":
        raise UnsafeDatabase("fsync is off: acknowledged writes could be lost; turn it on")
