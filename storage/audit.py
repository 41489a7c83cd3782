"""The append-only audit log of administrative actions."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

# Rows younger than this are never deleted, whatever the retention (the trigger of migration 0011 agrees).
MIN_RETENTION = dt.timedelta(days=30)


async def record(conn, actor: str, action: str, install_id: uuid.UUID | None = None, detail: dict[str, Any] | None = None) -> None:
    """Append one audit row (actor is a token id, 'cli' or 'sweeper'; never a secret)."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, install_id, detail) VALUES ($1, $2, $3, $4)",
        actor, action, install_id, detail or {},
    )


async def delete_older_than(conn, cutoff: dt.datetime, *, batch: int = 5000) -> int:
    """Delete audit rows written before cutoff (never younger than MIN_RETENTION), `batch` per
    transaction, each marked for the append-only trigger; returns how many."""
    total = 0
    while True:
        async with conn.transaction():
            await conn.execute("SET LOCAL telemetry.audit_sweep = 'on'")
            status = await conn.execute(
                "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < least($1, now() - $2::interval) "
                "ORDER BY at LIMIT $3)",
                cutoff, MIN_RETENTION, batch,
            )
        n = int(status.split()[-1])
        total += n
        if n < batch:
            return total


async def count_older_than(conn, cutoff: dt.datetime) -> int:
    """Audit rows kept although written before cutoff."""
    return await conn.fetchval("SELECT count(*) FROM audit_log WHERE at < $1", cutoff)
