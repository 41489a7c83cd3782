"""The key store: data keys (wrapped) and erasure tombstones, in a database apart from the data.

No cryptography here: keys arrive wrapped and leave wrapped (crypto.datakeys wraps and unwraps).
The data database holds ciphertexts and key serials only; this database holds the keys. So:

- erasure destroys an installation's keys here first (`destroy_installation`), which makes its
  ciphertexts unreadable in every copy of the data database, and leaves a tombstone (install_id
  and time) that every start and every sweep replays against the data database;
- scan keys are scoped to a retention epoch (`expires_at`, the epoch's end) and destroyed by the
  first sweep after it (`destroy_expired`), so no copy of the data database opens an expired scan
  once this database has moved on;
- what is deleted here is vacuumed at once (`vacuum`), so a destroyed key leaves the live tables.

Writers of one installation's keys (enrollment, a new epoch key, a worn key's replacement) and
its erasure serialise on a transaction-scoped advisory lock per installation: no session state,
so it holds behind a pooler in transaction mode. A key is only ever added to an installation that
still has a key: after `destroy_installation`, nothing but a new enrollment gives it one again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage.pool import cursor

EPOCH_KEY_BASE = 1 << 30  # key ids from here on are epoch keys (crypto.datakeys.epoch_key_id)
EPOCH = dt.timedelta(days=1)  # the length of a retention epoch (crypto.datakeys.EPOCH)
KEYS_PACKAGE = "storage.keystore_migrations"

# (install_id, key_id, kek_id, wrapped) -> (primary kek id, wrapped anew)
Rewrap = Callable[[uuid.UUID, int, str, bytes], tuple[str, bytes]]
# (install_id, key_id) -> (kek id, wrapped) of a fresh data key with that id
NewKey = Callable[[uuid.UUID, int], tuple[str, bytes]]


# ---------------------------------------------------------------- where it is


def default_dsn(data_dsn: str, *, embedded: bool) -> str:
    """The key store's DSN (a postgresql:// URI, as the settings require) when TELEMETRY_KEYSTORE_DSN
    is unset: the data server, database `<name>_keys` (embedded mode: `telemetry_keys`)."""
    split = urlsplit(data_dsn)
    name = "telemetry" if embedded else split.path.lstrip("/") or split.username or "postgres"
    return urlunsplit(split._replace(path="/" + name + "_keys"))


def database_name(dsn: str) -> str | None:
    """The database a postgresql:// URI names, if it names one."""
    return urlsplit(dsn).path.lstrip("/") or None


async def create_database(server: asyncpg.Connection, name: str) -> bool:
    """CREATE DATABASE name on the server of `server` unless it exists; True if made now."""
    if await server.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
        return False
    try:
        await server.execute('CREATE DATABASE "' + name.replace('"', '""') + '"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another process made it meanwhile (two at once collide on pg_database's unique index).
        return False
    return True


# ---------------------------------------------------------------- keys of one installation


def _lock_key(install_id: uuid.UUID) -> int:
    return int.from_bytes(hashlib.blake2b(install_id.bytes, digest_size=8, person=b"ti-keystore").digest(), "big", signed=True)


async def _lock(conn, install_id: uuid.UUID) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(install_id))


async def keys_of(conn, install_id: uuid.UUID) -> list[asyncpg.Record]:
    """(key_id, kek_id, wrapped, retiring) of every data key of an installation that still has its
    material, newest first; a retiring key opens what it sealed but seals nothing new."""
    return await conn.fetch(
        "SELECT key_id, kek_id, wrapped, retiring_at IS NOT NULL AS retiring FROM data_keys "
        "WHERE install_id = $1 AND wrapped IS NOT NULL ORDER BY key_id DESC",
        install_id,
    )


async def add_first_key(conn, install_id: uuid.UUID, kek_id: str, wrapped: bytes) -> None:
    """An enrolling installation's record key 1 (kept if it is there already: a retried enrollment)."""
    async with conn.transaction():
        await _lock(conn, install_id)
        await conn.execute(
            "INSERT INTO data_keys (install_id, key_id, kek_id, wrapped) VALUES ($1, 1, $2, $3) ON CONFLICT DO NOTHING",
            install_id, kek_id, wrapped,
        )


USABLE, SPENT, ERASED = "usable", "spent", "erased"


async def add_epoch_key(conn, install_id: uuid.UUID, key_id: int, expires_at: dt.datetime, kek_id: str, wrapped: bytes) -> str:
    """Add an epoch key unless one with that id exists. USABLE: a key with that id can seal now
    (this one or a concurrent worker's); SPENT: that id is retiring or destroyed early, and is never
    made again; ERASED: the installation has no key at all."""
    async with conn.transaction():
        await _lock(conn, install_id)
        if not await conn.fetchval("SELECT true FROM data_keys WHERE install_id = $1 AND key_id < $2 LIMIT 1", install_id, EPOCH_KEY_BASE):
            return ERASED
        await conn.execute(
            "INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, expires_at) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT DO NOTHING",
            install_id, key_id, kek_id, wrapped, expires_at,
        )
        usable = await conn.fetchval(
            "SELECT wrapped IS NOT NULL AND retiring_at IS NULL FROM data_keys WHERE install_id = $1 AND key_id = $2",
            install_id, key_id,
        )
    return USABLE if usable else SPENT


async def destroy_installation(conn, install_id: uuid.UUID) -> int:
    """Erasure's first step: delete every key of the installation and write its tombstone; returns keys destroyed."""
    async with conn.transaction():
        await _lock(conn, install_id)
        n = int((await conn.execute("DELETE FROM data_keys WHERE install_id = $1", install_id)).split()[-1])
        await conn.execute(
            "INSERT INTO erasures (install_id, erased_at) VALUES ($1, now()) "
            "ON CONFLICT (install_id) DO UPDATE SET erased_at = excluded.erased_at",
            install_id,
        )
    return n


async def holds_keys_of(conn, install_id: uuid.UUID) -> bool:
    """Whether the store holds any data key of the installation."""
    return bool(await conn.fetchval("SELECT true FROM data_keys WHERE install_id = $1 LIMIT 1", install_id))


async def tombstones(conn) -> dict[uuid.UUID, dt.datetime]:
    """install_id -> erased_at of every tombstone."""
    return {r[0]: r[1] for r in await conn.fetch("SELECT install_id, erased_at FROM erasures")}


async def erased_since(conn, since: dt.datetime | None) -> list[tuple[uuid.UUID, dt.datetime]]:
    """Tombstones written at or after `since` (all if None), oldest first."""
    rows = await conn.fetch(
        "SELECT install_id, erased_at FROM erasures WHERE $1::timestamptz IS NULL OR erased_at >= $1 ORDER BY erased_at",
        since,
    )
    return [(r[0], r[1]) for r in rows]


# ---------------------------------------------------------------- retention and wear


async def destroy_expired(conn, now: dt.datetime, *, limit: int = 5000) -> int:
    """Delete epoch keys whose epoch has ended by `now`, `limit` per transaction; returns how many."""
    total = 0
    while True:
        status = await conn.execute(
            "DELETE FROM data_keys WHERE (install_id, key_id) IN "
            "(SELECT install_id, key_id FROM data_keys WHERE expires_at <= $1 LIMIT $2) AND expires_at <= $1",
            now, limit,
        )
        n = int(status.split()[-1])
        total += n
        if n < limit:
            return total


async def epoch_keys_starting_after(conn, install_id: uuid.UUID, at: dt.datetime) -> list[asyncpg.Record]:
    """The installation's epoch keys, still with their material and not retiring, whose epoch begins
    after `at`: key_id, created_at."""
    return await conn.fetch(
        "SELECT key_id, created_at FROM data_keys WHERE install_id = $1 AND expires_at - $3::interval > $2 "
        "AND wrapped IS NOT NULL AND retiring_at IS NULL ORDER BY key_id",
        install_id, at, EPOCH,
    )


async def retire(conn, install_id: uuid.UUID, key_ids: Sequence[int], now: dt.datetime) -> int:
    """Mark epoch keys retiring at `now`: no worker seals with them once its cache reloads."""
    status = await conn.execute(
        "UPDATE data_keys SET retiring_at = $3 WHERE install_id = $1 AND key_id = ANY($2::int[]) "
        "AND key_id >= $4 AND retiring_at IS NULL AND wrapped IS NOT NULL",
        install_id, list(key_ids), now, EPOCH_KEY_BASE,
    )
    return int(status.split()[-1])


async def retired_before(conn, cutoff: dt.datetime, *, limit: int = 1000) -> dict[uuid.UUID, list[int]]:
    """Keys retiring since before cutoff that still have their material, by installation."""
    out: dict[uuid.UUID, list[int]] = {}
    for r in await conn.fetch(
        "SELECT install_id, key_id FROM data_keys WHERE retiring_at <= $1 AND wrapped IS NOT NULL "
        "ORDER BY install_id, key_id LIMIT $2",
        cutoff, limit,
    ):
        out.setdefault(r[0], []).append(r[1])
    return out


async def spend(conn, install_id: uuid.UUID, key_ids: Sequence[int]) -> int:
    """Destroy the material of retiring keys now (the row stays until its epoch ends, so the id is
    never made again); returns how many."""
    status = await conn.execute(
        "UPDATE data_keys SET wrapped = NULL, kek_id = NULL WHERE install_id = $1 AND key_id = ANY($2::int[]) "
        "AND retiring_at IS NOT NULL AND wrapped IS NOT NULL",
        install_id, list(key_ids),
    )
    return int(status.split()[-1])


async def unretire(conn, install_id: uuid.UUID, key_ids: Sequence[int]) -> None:
    """Keys found to seal an unexpired scan after all: keep them."""
    await conn.execute(
        "UPDATE data_keys SET retiring_at = NULL WHERE install_id = $1 AND key_id = ANY($2::int[]) AND wrapped IS NOT NULL",
        install_id, list(key_ids),
    )


async def vacuum(conn) -> None:
    """Remove deleted keys from the live tables now (not at autovacuum's leisure); a table another
    vacuum holds is left for the next call."""
    await conn.execute("VACUUM (SKIP_LOCKED) data_keys, erasures")


async def count_expired(conn, now: dt.datetime) -> int:
    """Epoch keys still held although their epoch ended before `now`."""
    return await conn.fetchval("SELECT count(*) FROM data_keys WHERE expires_at <= $1", now)


async def add_uses(conn, uses: Mapping[tuple[uuid.UUID, int], int],
                   expiries: Mapping[tuple[uuid.UUID, int], dt.datetime] | None = None) -> None:
    """Add seal counts per (install_id, key_id) to data_keys.uses, and raise last_expiry to the
    latest expiry seen of a scan sealed under the key (one statement)."""
    expiries = expiries or {}
    items = sorted(set(uses) | set(expiries))  # fixed row order: concurrent flushes cannot deadlock
    if not items:
        return
    await conn.execute(
        "UPDATE data_keys d SET uses = d.uses + u.n, last_expiry = greatest(d.last_expiry, u.expiry) "
        "FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::timestamptz[]) AS u(install_id, key_id, n, expiry) "
        "WHERE d.install_id = u.install_id AND d.key_id = u.key_id",
        [i for i, _ in items], [k for _, k in items], [uses.get(x, 0) for x in items], [expiries.get(x) for x in items],
    )


async def spent_by_expiry(conn, now: dt.datetime, made_before: dt.datetime, *, limit: int = 5000) -> list[tuple[uuid.UUID, int]]:
    """Epoch keys whose reported scans have all expired by `now` (last_expiry), made before
    made_before, not retiring: candidates for early destruction, to be checked against the data."""
    rows = await conn.fetch(
        "SELECT install_id, key_id FROM data_keys WHERE last_expiry <= $1 AND retiring_at IS NULL "
        "AND wrapped IS NOT NULL AND expires_at > $1 AND created_at <= $2 ORDER BY last_expiry LIMIT $3",
        now, made_before, limit,
    )
    return [(r[0], r[1]) for r in rows]


async def replace_worn_keys(conn, now: dt.datetime, new_key: NewKey, *, max_uses: int, max_age: dt.timedelta,
                            limit: int = 1000) -> int:
    """Give each installation whose newest record key is worn a new one (key_id + 1); returns how many."""
    due = await conn.fetch(
        """
        SELECT install_id, key_id FROM (
            SELECT DISTINCT ON (install_id) install_id, key_id, created_at, uses
            FROM data_keys WHERE key_id < $4 ORDER BY install_id, key_id DESC
        ) k WHERE uses >= $1 OR created_at <= $2
        ORDER BY install_id LIMIT $3
        """,
        max_uses, now - max_age, limit, EPOCH_KEY_BASE,
    )
    added = 0
    for r in due:
        install_id, key_id = r["install_id"], r["key_id"] + 1
        kek_id, wrapped = new_key(install_id, key_id)
        async with conn.transaction():
            await _lock(conn, install_id)  # an erasure that won the lock has left no key: add none
            status = await conn.execute(
                "INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, created_at) "
                "SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM data_keys WHERE install_id = $1 AND key_id = $2 - 1) "
                "ON CONFLICT DO NOTHING",
                install_id, key_id, kek_id, wrapped, now,
            )
        added += int(status.split()[-1])
    return added


# ---------------------------------------------------------------- key-encryption keys


async def kek_ids(conn) -> dict[str, int]:
    """Data keys and hash keys per wrapping key id."""
    return {r[0]: r[1] for r in await conn.fetch(
        "SELECT kek_id, count(*) FROM (SELECT kek_id FROM data_keys WHERE kek_id IS NOT NULL "
        "UNION ALL SELECT kek_id FROM hash_keys) k GROUP BY kek_id ORDER BY kek_id")}


async def count_not_wrapped_by(conn, primary_id: str) -> int:
    """Data keys and hash keys still wrapped by another KEK than primary_id."""
    return await conn.fetchval(
        "SELECT (SELECT count(*) FROM data_keys WHERE kek_id <> $1) + (SELECT count(*) FROM hash_keys WHERE kek_id <> $1)",
        primary_id)


async def rewrap_batch(conn, primary_id: str, rewrap: Rewrap, *, limit: int = 1000) -> int:
    """Re-wrap up to `limit` data keys not wrapped by primary_id, in one transaction; returns how many.

    Rows another transaction holds are skipped (a later batch takes them). Errors of `rewrap`
    (a KEK not in the ring) abort the batch.
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
    return len(rows)


# ---------------------------------------------------------------- keys of keyed hashes (per category)

# (category, kek_id, wrapped) -> (primary kek id, wrapped anew)
RewrapHash = Callable[[str, str, bytes], tuple[str, bytes]]


async def hash_key(conn, category: str, kek_id: str, wrapped: bytes) -> tuple[str, bytes]:
    """The category's hash key as stored (kek_id, wrapped): the one given, if the category had none yet
    (made on first use), else the one another worker made first."""
    await conn.execute("INSERT INTO hash_keys (category, kek_id, wrapped) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                       category, kek_id, wrapped)
    r = await conn.fetchrow("SELECT kek_id, wrapped FROM hash_keys WHERE category = $1", category)
    return r["kek_id"], bytes(r["wrapped"])


async def stored_hash_key(conn, category: str) -> tuple[str, bytes] | None:
    """The category's hash key (kek_id, wrapped), if it has one."""
    r = await conn.fetchrow("SELECT kek_id, wrapped FROM hash_keys WHERE category = $1", category)
    return None if r is None else (r["kek_id"], bytes(r["wrapped"]))


async def rewrap_hash_keys(conn, primary_id: str, rewrap: RewrapHash) -> int:
    """Re-wrap every hash key not wrapped by primary_id (few: one per category), in one transaction."""
    async with conn.transaction():
        rows = await conn.fetch("SELECT category, kek_id, wrapped FROM hash_keys WHERE kek_id <> $1 FOR UPDATE", primary_id)
        for r in rows:
            kek, wrapped = rewrap(r["category"], r["kek_id"], bytes(r["wrapped"]))
            if kek != primary_id:
                raise ValueError("rewrap must wrap with the primary key-encryption key")
            await conn.execute("UPDATE hash_keys SET kek_id = $2, wrapped = $3 WHERE category = $1", r["category"], kek, wrapped)
    return len(rows)


async def badly_wrapped(conn, size: int, version: int) -> int:
    """Data keys whose wrapped form is not `size` bytes starting with `version` (e.g. a raw key)."""
    return await conn.fetchval(
        "SELECT count(*) FROM data_keys WHERE length(wrapped) <> $1 OR get_byte(wrapped, 0) <> $2", size, version
    )


# ---------------------------------------------------------------- every key, for the start-up check


async def all_keys(conn, *, prefetch: int = 10_000) -> AsyncIterator[tuple[uuid.UUID, int]]:
    """(install_id, key_id) of every key that still has its material, sorted (inside a transaction)."""
    async for r in cursor(conn, "SELECT install_id, key_id FROM data_keys WHERE wrapped IS NOT NULL ORDER BY install_id, key_id",
                          prefetch=prefetch):
        yield r[0], r[1]


# ---------------------------------------------------------------- upgrade from a data database that held the keys


async def adopt_legacy_keys(data: asyncpg.Connection, keystore: asyncpg.Connection) -> int:
    """Copy every row of the data database's old data_keys table into the key store, then empty
    the old table (inside the caller's transaction on `data`); returns rows copied.

    Idempotent (a row already in the store is kept). Raises RuntimeError if afterwards a key of
    the old table is missing from the store, so the caller's migration, which drops the old
    table, does not commit.
    """
    rows = await data.fetch("SELECT install_id, key_id, kek_id, wrapped, created_at, uses FROM data_keys ORDER BY install_id, key_id")
    if rows:
        cols = list(zip(*[tuple(r) for r in rows]))
        await keystore.execute(
            "INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, created_at, uses) "
            "SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::bytea[], $5::timestamptz[], $6::bigint[]) "
            "ON CONFLICT DO NOTHING",
            *[list(c) for c in cols],
        )
    missing = await keystore.fetchval(
        "SELECT count(*) FROM unnest($1::uuid[], $2::int[], $3::bytea[]) AS u(install_id, key_id, wrapped) "
        "WHERE NOT EXISTS (SELECT 1 FROM data_keys d WHERE d.install_id = u.install_id AND d.key_id = u.key_id "
        "AND d.wrapped = u.wrapped)",
        [r["install_id"] for r in rows], [r["key_id"] for r in rows], [r["wrapped"] for r in rows],
    )
    if missing:
        raise RuntimeError(f"{missing} data key(s) did not reach the key store; the data database keeps them")
    # Emptied in the caller's (migrating) transaction: should it roll back, the keys are back too.
    await data.execute("DELETE FROM data_keys")
    return len(rows)


# ---------------------------------------------------------------- the nodes and the keys they hold
#
# Each worker of `serve` says every NODE_REPORT_INTERVAL which KEK ids it holds (ingest.worker.nodes);
# one that has not said so for NODE_LIVE_SECONDS is taken for gone (killed without a goodbye).

NODE_REPORT_INTERVAL = 10.0
NODE_LIVE_SECONDS = 30.0


@dataclass(frozen=True)
class Node:
    """A live worker: its id (host:pid), the KEK ids it holds (primary first), when it last said so."""

    node_id: str
    kek_ids: tuple[str, ...]
    seen_at: dt.datetime

    @property
    def primary(self) -> str:
        return self.kek_ids[0]


async def report_node(conn, node_id: str, kek_ids: Sequence[str]) -> None:
    """Record that node_id holds kek_ids (primary first), now."""
    await conn.execute(
        "INSERT INTO nodes (node_id, kek_ids) VALUES ($1, $2::text[]) "
        "ON CONFLICT (node_id) DO UPDATE SET kek_ids = excluded.kek_ids, seen_at = now()",
        node_id, list(kek_ids),
    )


async def forget_node(conn, node_id: str) -> None:
    """A worker stopping cleanly takes itself off the list."""
    await conn.execute("DELETE FROM nodes WHERE node_id = $1", node_id)


async def live_nodes(conn, live_seconds: float = NODE_LIVE_SECONDS) -> list[Node]:
    """Workers that reported within live_seconds (the others' rows are deleted on the way)."""
    await conn.execute("DELETE FROM nodes WHERE seen_at < now() - make_interval(secs => $1) * 10", live_seconds)
    rows = await conn.fetch(
        "SELECT node_id, kek_ids, seen_at FROM nodes WHERE seen_at >= now() - make_interval(secs => $1) ORDER BY node_id",
        live_seconds,
    )
    return [Node(r["node_id"], tuple(r["kek_ids"]), r["seen_at"]) for r in rows]
