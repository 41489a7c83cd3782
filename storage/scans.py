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

from storage.installations import GONE, RESTRICTED, REVOKED
from storage.pool import cursor
from storage.tokens import revoked_tokens

# Outcomes of a scan in a batch, besides RESTRICTED, GONE and REVOKED (from storage.installations);
# OVER_QUOTA: storing it would take its installation past its stored scan bytes.
STORED, EXISTS, OVER_QUOTA = "stored", "exists", "over_quota"

_COLUMNS = (
    "install_id", "agent_id", "scan_id", "received_at", "expires_at", "key_id", "content_mac",
    "size_wire", "size_decoded", "size_plain", "ciphertext",
)


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
    """
    ids = sorted({r.install_id for r in rows})
    async with conn.transaction():
        # FOR SHARE: batches of scans do not wait for each other, but a restriction, erasure or
        # retention change (which update the row) is ordered before or after this whole batch.
        state = {
            r["install_id"]: r
            for r in await conn.fetch(
                "SELECT install_id, restricted, erasing, scan_retention_hours FROM installations "
                "WHERE install_id = ANY($1::uuid[]) ORDER BY install_id FOR SHARE",
                ids,
            )
        }
        revoked = await revoked_tokens(conn, [r.token_id for r in rows])
        candidates = [r for r in rows if (s := state.get(r.install_id)) is not None and not s["erasing"] and not s["restricted"]
                      and r.token_id not in revoked]
        existing: dict[tuple[uuid.UUID, uuid.UUID], ScanOutcome] = {}
        if candidates:
            keys = sorted({(r.install_id, r.scan_id) for r in candidates})
            # Sorted, so two batches never wait for each other's locks in a cycle. Held until commit:
            # a concurrent writer of the same scan_id sees this batch's row after it.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k",
                sorted({lock_key(i, s) for i, s in keys}),
            )
            for r in await conn.fetch(
                "SELECT DISTINCT ON (s.install_id, s.scan_id) s.install_id, s.scan_id, s.key_id, s.content_mac, s.expires_at "
                "FROM scans s JOIN unnest($1::uuid[], $2::uuid[]) AS u(install_id, scan_id) "
                "ON s.install_id = u.install_id AND s.scan_id = u.scan_id "
                "WHERE s.expires_at > now() ORDER BY s.install_id, s.scan_id, s.received_at",
                [k[0] for k in keys], [k[1] for k in keys],
            ):
                existing[(r["install_id"], r["scan_id"])] = ScanOutcome(EXISTS, r["expires_at"], r["key_id"], bytes(r["content_mac"]))
        usage: dict[uuid.UUID, int] = {}
        if candidates and max_bytes is not None:
            # Days already past count no more: their rows are deleted here (same snapshot, disjoint rows).
            usage = dict(await conn.fetch(
                "WITH past AS (DELETE FROM scan_usage WHERE install_id = ANY($1::uuid[]) "
                "AND expires_on < (now() AT TIME ZONE 'UTC')::date) "
                "SELECT install_id, sum(bytes)::bigint FROM scan_usage WHERE install_id = ANY($1::uuid[]) "
                "AND expires_on >= (now() AT TIME ZONE 'UTC')::date GROUP BY install_id",
                sorted({r.install_id for r in candidates}),
            ))
        added: dict[tuple[uuid.UUID, dt.date], int] = {}
        outcomes: list[ScanOutcome] = []
        records = []
        for r in rows:
            s = state.get(r.install_id)
            if s is None or s["erasing"]:
                outcomes.append(ScanOutcome(GONE))
                continue
            if s["restricted"]:
                outcomes.append(ScanOutcome(RESTRICTED))
                continue
            if r.token_id in revoked:
                outcomes.append(ScanOutcome(REVOKED))
                continue
            key = (r.install_id, r.scan_id)
            found = existing.get(key)
            if found is not None:
                outcomes.append(found)
                continue
            size = len(r.ciphertext)
            if max_bytes is not None and usage.get(r.install_id, 0) + size > max_bytes:
                outcomes.append(ScanOutcome(OVER_QUOTA))
                continue
            usage[r.install_id] = usage.get(r.install_id, 0) + size
            # The key was chosen for the retention the handler knew; if it has since grown, the scan
            # still expires with its key (a shorter one only makes the key outlive it).
            expires_at = min(r.received_at + dt.timedelta(hours=s["scan_retention_hours"]), r.key_expires_at)
            day = (r.install_id, expires_at.astimezone(dt.timezone.utc).date())
            added[day] = added.get(day, 0) + size
            existing[key] = ScanOutcome(EXISTS, expires_at, r.key_id, r.content_mac)  # a repeat later in this batch
            outcomes.append(ScanOutcome(STORED, expires_at))
            records.append((r.install_id, r.agent_id, r.scan_id, r.received_at, expires_at, r.key_id, r.content_mac,
                            r.size_wire, r.size_decoded, r.size_plain, r.ciphertext))
        if records:
            await conn.copy_records_to_table("scans", records=records, columns=_COLUMNS)
            days = sorted(added)  # one order for every batch: concurrent upserts cannot deadlock
            await conn.execute(
                "INSERT INTO scan_usage AS u (install_id, expires_on, bytes) "
                "SELECT * FROM unnest($1::uuid[], $2::date[], $3::bigint[]) "
                "ON CONFLICT (install_id, expires_on) DO UPDATE SET bytes = u.bytes + excluded.bytes",
                [d[0] for d in days], [d[1] for d in days], [added[d] for d in days],
            )
    return outcomes


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
