"""Versioned SQL migrations, each applied in its own transaction under a transaction-scoped lock.

Two schemas are migrated this way: the data database (`storage.migrations`) and the key store
(`storage.keystore_migrations`), each with its own `schema_migrations` table. The lock is
`pg_advisory_xact_lock`, released at commit or rollback: it holds under a pooler in transaction
mode and across nodes, and no connection keeps session state. Every process that starts runs
`migrate`; each migration is applied by exactly one of them, the others see it done.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources

import asyncpg

# Any constants work; they only have to be the same in every process of the deployment.
_MIGRATION_LOCKS = {"storage.migrations": 0x7E1E_0001, "storage.keystore_migrations": 0x7E1E_0011}
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# Work to do in the migrating transaction just before a migration's SQL: version -> hook(conn).
Hooks = Mapping[int, Callable[[asyncpg.Connection], Awaitable[None]]]


def available(package: str = "storage.migrations") -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration of package, in order."""
    found = []
    for entry in resources.files(package).iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, package: str = "storage.migrations", *, before: Hooks | None = None) -> list[str]:
    """Apply pending migrations; safe when several processes start at once. Returns names applied."""
    lock = _MIGRATION_LOCKS[package]
    applied_now = []
    for version, name, sql in available(package):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            if await conn.fetchval("SELECT true FROM schema_migrations WHERE version = $1", version):
                continue
            if before and version in before:
                await before[version](conn)
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
        applied_now.append(name)
    return applied_now


async def pending(conn: asyncpg.Connection, package: str = "storage.migrations") -> list[str]:
    """Names of the shipped migrations of package not yet applied (reads only)."""
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return [name for _, name, _ in available(package)]
    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [name for version, name, _ in available(package) if version not in done]
