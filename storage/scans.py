"""Scans: the group-commit batch write (idempotent per scan_id), retention settings, reads.

Every read filters ``expires_at > now()``: an expired scan is gone whether or not
the sweeper has deleted it yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg

from storage.pool import cursor

# Outcomes of a scan in a batch, besides "restricted", "gone" and "revoked" (storage.installations);
# OVER_QUOTA: storing it would take its installation past its stored scan bytes.
STORED, EXISTS, OVER_QUOTA = "stored", "exists", "over_quota"


class ScanRow(NamedTuple):
    """One filtered, sealed scan, ready to store (its expires_at is decided in the transaction:
    received_at + the installation's retention, but never after key_expires_at, the end of the
    epoch of the key that sealed it)."""

    install_id: uuid.UUID
    agent_id: uuid.UUID
    scan_id: uuid.UUID
    received_at: dt.datetime
    key_id: int
    key_expires_at: dt.datetime
    content_mac: bytes
    size_wire: int
    size_decoded: int
    size_plain: int
    ciphertext: bytes
    token_id: str | None = None  # the agent token it came with: refused if revoked before the batch commits


class ScanOutcome(NamedTuple):
    """What became of one submitted scan: STORED, EXISTS (then key_id and content_mac are the stored
    scan's, to compare with), RESTRICTED or GONE; expires_at of the stored scan when there is one."""

    status: str
    expires_at: dt.datetime | None = None
    key_id: int | None = None
    content_mac: bytes | None = None


class StoredScan(NamedTuple):
    """A stored, unexpired scan (ciphertext still sealed)."""

    install_id: uuid.UUID
    agent_id: uuid.UUID
    scan_id: uuid.UUID
    received_at: dt.datetime
    expires_at: dt.datetime
    key_id: int
    ciphertext: bytes


def lock_key(install_id: uuid.UUID, scan_id: uuid.UUID) -> int:
    """The advisory lock (bigint) that serialises writers of one (installation, scan_id)."""
    return int.from_bytes(hashlib.blake2b(install_id.bytes + scan_id.bytes, digest_size=8, person=b"ti-scan-lock").digest(), "big", signed=True)


async def write_scans(conn, rows: Sequence[ScanRow], *, max_bytes: int | None = None) -> list[ScanOutcome]:
    """Store a batch in one transaction; one outcome per row, in order.

    A scan_id already stored (unexpired) for the installation, or earlier in this batch,
    is not stored again: its outcome is EXISTS with the stored scan's key id, content MAC
    and expiry, for the caller to tell a replay from a conflict. A scan whose token was
    revoked before this commit is REVOKED; one that would take its installation's unexpired
    sealed bytes past max_bytes is OVER_QUOTA (batches of one installation committing at
    the same moment may each pass, so the quota can be exceeded by about one batch each).

    One call of write_scan_batch (data migration 0024, where its steps are listed), the rows sent
    as one array of scan_row: alone, one implicit transaction and one round trip; inside the
    caller's transaction, part of it.
    """
    if not rows:
        return []
    batch = [(*r, lock_key(r.install_id, r.scan_id)) for r in rows]
    return [ScanOutcome(*r) for r in await conn.fetch(_WRITE_BATCH, batch, max_bytes)]


_WRITE_BATCH = "SELECT status, expires_at, key_id, content_mac FROM write_scan_batch($1::scan_row[], $2::bigint)"


async def retention_of(conn, install_id: uuid.UUID) -> int | None:
    """The installation's scan retention in hours (None if it is gone or being erased)."""
    return await conn.fetchval(
        "SELECT scan_retention_hours FROM installations WHERE install_id = $1 AND NOT erasing", install_id
    )


async def set_retention(conn, install_id: uuid.UUID, hours: int) -> int | None:
    """Set an installation's scan retention and bring stored scans' expiry forward to it (never later).

    Returns the retention now in force, or None if the installation is gone.
    """
    async with conn.transaction():
        hours_now = await conn.fetchval(
            "UPDATE installations SET scan_retention_hours = $2, retention_shortened_at = CASE "
            "WHEN $2 < scan_retention_hours THEN now() ELSE retention_shortened_at END "
            "WHERE install_id = $1 AND NOT erasing RETURNING scan_retention_hours",
            install_id, hours,
        )
        if hours_now is None:
            return None
        # Only rows that change are rewritten; the sealed column is not copied (unchanged TOAST is shared).
        await conn.execute(
            "UPDATE scans SET expires_at = received_at + make_interval(hours => $2) "
            "WHERE install_id = $1 AND expires_at > received_at + make_interval(hours => $2)",
            install_id, hours,
        )
    return hours_now


async def shortened_retentions(conn, *, limit: int = 1000) -> list[asyncpg.Record]:
    """Installations marked as having shortened their retention: install_id, retention_shortened_at, scan_retention_hours."""
    return await conn.fetch(
        "SELECT install_id, retention_shortened_at, scan_retention_hours FROM installations "
        "WHERE retention_shortened_at IS NOT NULL AND NOT erasing ORDER BY install_id LIMIT $1",
        limit,
    )


async def clear_shortened(conn, install_id: uuid.UUID, marked_at: dt.datetime) -> None:
    """Drop the mark, unless the installation shortened its retention again since marked_at."""
    await conn.execute(
        "UPDATE installations SET retention_shortened_at = NULL WHERE install_id = $1 AND retention_shortened_at = $2",
        install_id, marked_at,
    )


# The tables whose rows are sealed under epoch keys: scans, and the records of policy-file categories.
SEALED_TABLES = ("scans", "records")


async def referenced_keys(conn, install_id: uuid.UUID, now: dt.datetime, *, from_key_id: int) -> set[int]:
    """Key ids (from from_key_id up) that scans or records of the installation unexpired at `now` are sealed under."""
    rows = await conn.fetch(
        " UNION ".join(f"SELECT key_id FROM {t} WHERE install_id = $1 AND expires_at > $2 AND key_id >= $3" for t in SEALED_TABLES),
        install_id, now, from_key_id,
    )
    return {r[0] for r in rows}


async def referenced_pairs(conn, pairs: Sequence[tuple[uuid.UUID, int]], now: dt.datetime) -> set[tuple[uuid.UUID, int]]:
    """Those (install_id, key_id) among pairs that some scan or record unexpired at `now` is sealed under."""
    if not pairs:
        return set()
    rows = await conn.fetch(
        " UNION ".join(
            f"SELECT s.install_id, s.key_id FROM {t} s "
            "JOIN unnest($1::uuid[], $2::int[]) AS u(install_id, key_id) ON s.install_id = u.install_id AND s.key_id = u.key_id "
            "WHERE s.expires_at > $3" for t in SEALED_TABLES),
        [p[0] for p in pairs], [p[1] for p in pairs], now,
    )
    return {(r[0], r[1]) for r in rows}


async def find_scan(conn, install_id: uuid.UUID, scan_id: uuid.UUID) -> StoredScan | None:
    """The unexpired scan with this scan_id of the installation, if any."""
    r = await conn.fetchrow(
        "SELECT install_id, agent_id, scan_id, received_at, expires_at, key_id, ciphertext FROM scans "
        "WHERE install_id = $1 AND scan_id = $2 AND expires_at > now() ORDER BY received_at LIMIT 1",
        install_id, scan_id,
    )
    return None if r is None else StoredScan(*r.values())


def scan_history(conn, install_id: uuid.UUID, *, prefetch: int = 50):
    """A server-side cursor over the installation's unexpired scans, oldest first (use inside a transaction).

    Rows: install_id, agent_id, scan_id, received_at, expires_at, key_id, ciphertext.
    """
    return cursor(
        conn,
        "SELECT install_id, agent_id, scan_id, received_at, expires_at, key_id, ciphertext FROM scans "
        "WHERE install_id = $1 AND expires_at > now() ORDER BY received_at, scan_id",
        install_id,
        prefetch=prefetch,
    )


def stored_scan(record: asyncpg.Record) -> StoredScan:
    """A StoredScan from a row of scan_history."""
    return StoredScan(*record.values())
