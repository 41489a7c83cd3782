"""The restriction log: which installations are restricted, and the changes since a position."""

from __future__ import annotations

import uuid

import asyncpg


async def restricted_now(conn) -> tuple[set[uuid.UUID], int]:
    """(the log's position, then the install_ids restricted now): a change between the two is past the position,
    so the next poll sees it again."""
    position = await conn.fetchval("SELECT coalesce(max(restriction_seq), 0) FROM installations")
    rows = await conn.fetch("SELECT install_id FROM installations WHERE restricted")
    return {r["install_id"] for r in rows}, position


async def changed_since(conn, position: int) -> list[asyncpg.Record]:
    """Restriction changes (and enrollments) after position, oldest first: (restriction_seq, install_id, restricted)."""
    return await conn.fetch(
        "SELECT restriction_seq, install_id, restricted FROM installations WHERE restriction_seq > $1 ORDER BY restriction_seq",
        position,
    )
