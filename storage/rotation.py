"""Data keys over time: re-wrapping them under a new key-encryption key, and replacing worn ones.

No cryptography here: the caller passes functions that do it (built from its key ring), so
this module only chooses rows, locks them and writes the results.

Re-wrapping (``keys rotate``) takes a bounded batch of data keys not wrapped by the primary KEK,
``FOR UPDATE SKIP LOCKED`` so several runs, or a run and the service, never wait on each other,
and commits each batch on its own: it can be stopped at any point and run again. Payloads are
not touched: a data key keeps its key id and key material, so every ciphertext still opens.

Replacement: a data key is worn when it is older than a maximum age or has sealed more than a
maximum number of records (the workers count seals in memory and add them to ``data_keys.uses``
every sweep interval). The sweeper then adds key ``key_id + 1`` for that installation; workers
seal with it once their cache entry expires. Older keys stay, to open what they sealed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping

import asyncpg

from storage.audit import record

# (install_id, key_id, kek_id, wrapped) -> (primary kek id, wrapped anew)
Rewrap = Callable[[uuid.UUID, int, str, bytes], tuple[str, bytes]]
# (install_id, key_id) -> (kek id, wrapped) of a fresh data key with that id
NewKey = Callable[[uuid.UUID, int], tuple[str, bytes]]


async def kek_ids_in_use(conn: asyncpg.Connection) -> list[str]:
    """Every key-encryption key id some data key is wrapped by."""
    return [r["kek_id"] for r in await conn.fetch("SELECT DISTINCT kek_id FROM data_keys ORDER BY kek_id")]


async def count_not_wrapped_by(conn: asyncpg.Connection, primary_id: str) -> int:
    """Data keys still wrapped by another KEK than primary_id."""
    return await conn.fetchval("SELECT count(*) FROM data_keys WHERE kek_id <> $1", primary_id)


async def rewrap_batch(conn: asyncpg.Connection, primary_id: str, rewrap: Rewrap, *, limit: int = 1000,
                       actor: str = "cli") -> int:
    """Re-wrap up to `limit` data keys not wrapped by primary_id, in one transaction; returns how many.

    Rows another transaction holds are skipped (a later batch takes them). The batch and its
    audit row commit together. Errors of `rewrap` (a KEK not in the ring) abort the batch.
    """
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT install_id, key_id, kek_id, wrapped FROM data_keys WHERE kek_id <> $1 "
            "ORDER BY install_id, key_id LIMIT $2 FOR UPDATE SKIP LOCKED",
            primary_id, limit,
        )
        if not rows:
            return 0
        new = [rewrap(r["install_id"], r["key_id"], r["kek_id"], bytes(r["wrapped"])) for r in rows]
        if any(kek != primary_id for kek, _ in new):
            raise ValueError("rewrap must wrap with the primary key-encryption key")
        await conn.execute(
            "UPDATE data_keys d SET kek_id = $1, wrapped = u.wrapped "
            "FROM unnest($2::uuid[], $3::int[], $4::bytea[]) AS u(install_id, key_id, wrapped) "
            "WHERE d.install_id = u.install_id AND d.key_id = u.key_id",
            primary_id, [r["install_id"] for r in rows], [r["key_id"] for r in rows], [w for _, w in new],
        )
        await record(conn, actor, "key.rotate", detail={"kek_id": primary_id, "rewrapped": len(rows)})
    return len(rows)


async def add_uses(conn: asyncpg.Connection, uses: Mapping[tuple[uuid.UUID, int], int]) -> None:
    """Add seal counts per (install_id, key_id) to data_keys.uses (one statement)."""
    if not uses:
        return
    items = sorted(uses.items())  # fixed row order: concurrent flushes cannot deadlock
    await conn.execute(
        "UPDATE data_keys d SET uses = d.uses + u.n "
        "FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS u(install_id, key_id, n) "
        "WHERE d.install_id = u.install_id AND d.key_id = u.key_id",
        [i for (i, _), _ in items], [k for (_, k), _ in items], [n for _, n in items],
    )


async def replace_worn_keys(conn: asyncpg.Connection, now: dt.datetime, new_key: NewKey, *, max_uses: int,
                            max_age: dt.timedelta, limit: int = 1000) -> int:
    """Give each installation whose newest data key is worn a new one (key_id + 1); returns how many."""
    async with conn.transaction():
        # Lock the installations (not erasing) so an erasure cannot delete keys around our insert.
        due = await conn.fetch(
            """
            SELECT k.install_id, k.key_id FROM (
                SELECT DISTINCT ON (install_id) install_id, key_id, created_at, uses
                FROM data_keys ORDER BY install_id, key_id DESC
            ) k JOIN installations i USING (install_id)
            WHERE NOT i.erasing AND (k.uses >= $1 OR k.created_at <= $2)
            ORDER BY k.install_id LIMIT $3
            FOR SHARE OF i SKIP LOCKED
            """,
            max_uses, now - max_age, limit,
        )
        if not due:
            return 0
        made = [(r["install_id"], r["key_id"] + 1, *new_key(r["install_id"], r["key_id"] + 1)) for r in due]
        status = await conn.execute(
            "INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, created_at) "
            "SELECT u.install_id, u.key_id, u.kek_id, u.wrapped, $5 "
            "FROM unnest($1::uuid[], $2::int[], $3::text[], $4::bytea[]) AS u(install_id, key_id, kek_id, wrapped) "
            "ON CONFLICT DO NOTHING",
            [m[0] for m in made], [m[1] for m in made], [m[2] for m in made], [m[3] for m in made], now,
        )
    return int(status.split()[-1])
