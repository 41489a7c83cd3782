"""The two databases together: the data database and the key store (storage.keystore).

At start (`prepare`): make the key store's database if it is the default one and missing,
migrate both (the data database's migration 0005 moves its old data_keys into the key store
first), and replay the key store's erasures against the data database (`replay_erasures`,
also run by every sweep). `serve` then checks, once, that the key store holds every key the
data database needs and nothing the key ring cannot unwrap (`check_keys`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from contextlib import aclosing

import asyncpg

from storage import admin, keystore
from storage.errors import UnsafeDatabase
from storage.migrate import migrate, pending
from storage.pool import cursor

# Tombstones are written with the key store's clock at the start of their transaction and may
# commit a little later: replay re-reads this much before the last position.
REPLAY_OVERLAP = dt.timedelta(minutes=10)


class KeysMissing(Exception):
    """The key store cannot open what the data database needs (the message names key ids, never a key)."""


async def ensure_keystore_database(data: asyncpg.Connection, keystore_dsn: str) -> bool:
    """Create the key store's database on the data database's server if missing; True if made now."""
    name = keystore.database_name(keystore_dsn)
    if name is None:
        return False
    return await keystore.create_database(data, name)


async def migrate_both(data: asyncpg.Connection, ks: asyncpg.Connection) -> list[str]:
    """Migrate the key store, then the data database (moving legacy keys to the store on the way)."""
    applied = [f"keystore:{n}" for n in await migrate(ks, keystore.KEYS_PACKAGE)]

    async def move_keys(conn: asyncpg.Connection) -> None:
        await keystore.adopt_legacy_keys(conn, ks)

    applied += await migrate(data, before={5: move_keys})
    return applied


async def check_migrated(data: asyncpg.Connection, ks: asyncpg.Connection) -> None:
    """UnsafeDatabase unless both databases have every shipped migration (a connection that may not
    migrate, the service role's, checks instead)."""
    missing = await pending(data) + [f"keystore:{n}" for n in await pending(ks, keystore.KEYS_PACKAGE)]
    if missing:
        raise UnsafeDatabase(f"migrations not applied: {', '.join(missing)}; `serve` applies them as TELEMETRY_DSN's role")


async def replay_erasures(data: asyncpg.Connection, ks: asyncpg.Connection, *, grace: float = 1.0,
                          full: bool = False) -> int:
    """Erase again every installation of the data database that the key store lists as erased
    (enrolled before its tombstone); returns how many. Only tombstones since this database's
    replay position are read, unless `full`."""
    from storage.sweeper import (
        finish_erasures,  # the same finishing steps as every erasure
    )

    position = None if full else await data.fetchval("SELECT erased_through FROM erasure_replay")
    stones = await keystore.erased_since(ks, None if position is None else position - REPLAY_OVERLAP)
    if not stones:
        return 0
    again: list[uuid.UUID] = []
    for chunk in _chunks(stones, 10_000):
        erased_at = dict(chunk)
        rows = await data.fetch(
            "SELECT install_id, enrolled_at FROM installations WHERE install_id = ANY($1::uuid[])", list(erased_at)
        )
        again += [r["install_id"] for r in rows if r["enrolled_at"] <= erased_at[r["install_id"]]]
    for install_id in again:
        await admin.begin_erasure(data, install_id, "keystore-replay")
    done = await finish_erasures(data, again, grace)
    await data.execute(
        "INSERT INTO erasure_replay (erased_through) VALUES ($1) "
        "ON CONFLICT (singleton) DO UPDATE SET erased_through = greatest(erasure_replay.erased_through, excluded.erased_through)",
        stones[-1][1],
    )
    return done


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# The key serial inside a sealed value: bytes 1..4 of the crypto.envelope format, big-endian.
_KEY_ID_OF = "(get_byte({c}, 1) << 24 | get_byte({c}, 2) << 16 | get_byte({c}, 3) << 8 | get_byte({c}, 4))"

_NEEDED_SQL = f"""
SELECT install_id, key_id FROM (
    SELECT s.install_id, s.key_id FROM scans s
    WHERE s.expires_at > now()
    UNION
    SELECT r.install_id, r.key_id FROM records r
    WHERE r.expires_at > now() AND r.key_id IS NOT NULL
    UNION
    SELECT i.install_id, {_KEY_ID_OF.format(c='i.email_ct')} FROM installations i
    WHERE i.email_ct IS NOT NULL AND length(i.email_ct) >= 5
) needed
WHERE NOT EXISTS (SELECT 1 FROM installations e WHERE e.install_id = needed.install_id AND e.erasing)
ORDER BY install_id, key_id
"""


async def check_keys(data: asyncpg.Connection, ks: asyncpg.Connection, kek_ids: Iterable[str]) -> None:
    """KeysMissing unless the key store holds every key an unexpired row of a live installation
    names, and every key in the store is wrapped by one of kek_ids."""
    configured = set(kek_ids)
    unknown = sorted(k for k in await keystore.kek_ids(ks) if k not in configured)
    if unknown:
        raise KeysMissing(f"the key store holds data keys wrapped by key id(s) {', '.join(unknown)}, which are not configured")
    missing: list[tuple[uuid.UUID, int]] = []
    async with data.transaction(isolation="repeatable_read", readonly=True), ks.transaction(readonly=True), \
            aclosing(keystore.all_keys(ks)) as held, aclosing(cursor(data, _NEEDED_SQL, prefetch=10_000)) as needed:
        # (aclosing: each cursor is closed inside its transaction even when the loop stops early)
        have = await anext(held, None)
        async for r in needed:
            need = (r[0], r[1])
            while have is not None and have < need:
                have = await anext(held, None)
            if have != need:
                missing.append(need)
                if len(missing) > 5:
                    break
    if missing:
        shown = ", ".join(f"key {k} of installation {i}" for i, k in missing[:5])
        more = " and more" if len(missing) > 5 else ""
        raise KeysMissing(f"the key store lacks data keys that stored rows need: {shown}{more}")
