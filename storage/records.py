"""Records of the categories a policy file declares (migration 0012): the batch write, retention, reads.

One shared table, `records`, keyed (category, install_id, record_id). No category is known
here by name: the caller says which category a row is of, how long it is kept and whether it
keeps one record per installation. Every read filters ``expires_at > now()``: an expired record
is gone whether or not the sweeper has deleted it yet.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg

from storage.installations import GONE, RESTRICTED, REVOKED
from storage.pool import cursor
from storage.tokens import revoked_tokens

STORED, EXISTS = "stored", "exists"


class RecordRow(NamedTuple):
    """One filtered record, its storage forms applied, ready to store.

    expires_at is decided in the transaction: received_at + the installation's retention for the
    category (record_settings) or `retention_hours`, but never after key_expires_at (the end of the
    epoch of the key that sealed it, for a category sealed whole).
    """

    category: str
    install_id: uuid.UUID
    record_id: str
    received_at: dt.datetime
    retention_hours: int
    fields: bytes  # JSON text of the clear fields
    sealed: bytes | None
    key_id: int | None
    key_expires_at: dt.datetime | None
    content_mac: bytes | None
    current: bool  # the category keeps one record per installation: this one replaces it
    token_id: str | None = None


class RecordOutcome(NamedTuple):
    """STORED or EXISTS (then content_mac is the stored record's), RESTRICTED, GONE or REVOKED."""

    status: str
    expires_at: dt.datetime | None = None
    content_mac: bytes | None = None


_UPSERT = """
INSERT INTO records AS r (category, install_id, record_id, received_at, expires_at, fields, sealed, key_id, content_mac)
SELECT u.category, u.install_id, u.record_id, u.received_at, u.expires_at, u.fields::jsonb, u.sealed, u.key_id, u.content_mac
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::bytea[], $8::int[],
            $9::bytea[]) AS u(category, install_id, record_id, received_at, expires_at, fields, sealed, key_id, content_mac)
ON CONFLICT (category, install_id, record_id) DO UPDATE SET
    received_at = excluded.received_at, expires_at = excluded.expires_at, fields = excluded.fields,
    sealed = excluded.sealed, key_id = excluded.key_id, content_mac = excluded.content_mac
{where}
RETURNING r.category, r.install_id, r.record_id
"""
# Events: a stored, unexpired record is kept (a resend stores nothing); an expired one not yet swept is replaced.
_INSERT_EVENTS = _UPSERT.format(where="WHERE r.expires_at <= now()")
# Current: the installation's one record is replaced by the newer one.
_UPSERT_CURRENT = _UPSERT.format(where="")

# The record_id of the one record a `state = "current"` category keeps per installation.
CURRENT = "current"


async def write_records(conn, rows: Sequence[RecordRow]) -> list[RecordOutcome]:
    """Store a batch in one transaction; one outcome per row, in order.

    A record whose key (category, installation, record_id) is stored and unexpired, or earlier in
    this batch, is not stored again (EXISTS, with the stored content MAC to compare); a current
    record replaces the installation's previous one. The installations' rows are locked (in one
    order): a restriction or erasure is ordered before or after the whole batch, and wins. A stored
    record counts as the installation being seen (last_seen_at), as a heartbeat does: an
    installation that sends only records is not erased as inactive.
    """
    ids = sorted({r.install_id for r in rows})
    async with conn.transaction():
        state = {
            r["install_id"]: r
            for r in await conn.fetch(
                "SELECT install_id, restricted, erasing FROM installations WHERE install_id = ANY($1::uuid[]) "
                "ORDER BY install_id FOR NO KEY UPDATE",
                ids,
            )
        }
        revoked = await revoked_tokens(conn, [r.token_id for r in rows])
        hours = {
            (r["install_id"], r["category"]): r["retention_hours"]
            for r in await conn.fetch(
                "SELECT install_id, category, retention_hours FROM record_settings WHERE install_id = ANY($1::uuid[])", ids)
        }
        outcomes: list[RecordOutcome | None] = [None] * len(rows)
        chosen: dict[tuple[str, uuid.UUID, str], int] = {}  # key -> index of the row written for it
        expires: dict[int, dt.datetime] = {}
        for i, r in enumerate(rows):
            s = state.get(r.install_id)
            if s is None or s["erasing"]:
                outcomes[i] = RecordOutcome(GONE)
                continue
            if s["restricted"]:
                outcomes[i] = RecordOutcome(RESTRICTED)
                continue
            if r.token_id in revoked:
                outcomes[i] = RecordOutcome(REVOKED)
                continue
            h = min(hours.get((r.install_id, r.category), r.retention_hours), r.retention_hours)
            expires_at = r.received_at + dt.timedelta(hours=h)
            if r.key_expires_at is not None:
                expires_at = min(expires_at, r.key_expires_at)  # a record never outlives the key that sealed it
            expires[i] = expires_at
            key = (r.category, r.install_id, r.record_id)
            if key in chosen and not r.current:
                continue  # a repeat later in this batch: answered like the first (below)
            chosen[key] = i  # a current record: the last of the batch wins
        order = sorted(chosen.items())  # one order for every batch: concurrent upserts cannot deadlock
        written: set[tuple[str, uuid.UUID, str]] = set()
        for current, sql in ((False, _INSERT_EVENTS), (True, _UPSERT_CURRENT)):
            part = [i for _, i in order if rows[i].current == current]
            if not part:
                continue
            picked = [rows[i] for i in part]
            returned = await conn.fetch(
                sql,
                [r.category for r in picked], [r.install_id for r in picked], [r.record_id for r in picked],
                [r.received_at for r in picked], [expires[i] for i in part], [r.fields.decode() for r in picked],
                [r.sealed for r in picked], [r.key_id for r in picked], [r.content_mac for r in picked],
            )
            written |= {(r[0], r[1], r[2]) for r in returned}
        seen = sorted({k[1] for k in written})
        if seen:
            await conn.execute(
                "UPDATE installations SET last_seen_at = greatest(last_seen_at, now()) WHERE install_id = ANY($1::uuid[])", seen)
        missing = sorted(k for k, _ in order if k not in written)
        existing: dict[tuple[str, uuid.UUID, str], RecordOutcome] = {}
        if missing:
            for r in await conn.fetch(
                "SELECT r.category, r.install_id, r.record_id, r.expires_at, r.content_mac FROM records r "
                "JOIN unnest($1::text[], $2::uuid[], $3::text[]) AS u(category, install_id, record_id) "
                "ON r.category = u.category AND r.install_id = u.install_id AND r.record_id = u.record_id",
                [k[0] for k in missing], [k[1] for k in missing], [k[2] for k in missing],
            ):
                mac = None if r["content_mac"] is None else bytes(r["content_mac"])
                existing[(r[0], r[1], r[2])] = RecordOutcome(EXISTS, r["expires_at"], mac)
        for i, r in enumerate(rows):
            if outcomes[i] is not None:
                continue
            key = (r.category, r.install_id, r.record_id)
            first = chosen[key]
            if key in written:
                if first == i or r.current:
                    outcomes[i] = RecordOutcome(STORED, expires[first])
                else:
                    outcomes[i] = RecordOutcome(EXISTS, expires[first], rows[first].content_mac)
            else:
                # Stored before this batch (unexpired): not written again. (Never for a current record.)
                outcomes[i] = existing.get(key, RecordOutcome(EXISTS, None, None))
    return outcomes  # type: ignore[return-value]


async def retention_hours(conn, install_id: uuid.UUID, category: str) -> int | None:
    """The installation's shortened retention of a category, if it chose one."""
    return await conn.fetchval(
        "SELECT retention_hours FROM record_settings WHERE install_id = $1 AND category = $2", install_id, category)


async def retentions_of(conn, install_id: uuid.UUID) -> dict[str, int]:
    """Every category retention the installation chose: {category: hours}."""
    return dict(await conn.fetch("SELECT category, retention_hours FROM record_settings WHERE install_id = $1", install_id))


async def set_retention(conn, install_id: uuid.UUID, category: str, hours: int) -> bool:
    """Set the installation's retention of a category and bring its stored records' expiry forward to it
    (never later); in the caller's transaction. False if the installation is gone."""
    live = await conn.fetchval("SELECT true FROM installations WHERE install_id = $1 AND NOT erasing FOR SHARE", install_id)
    if not live:
        return False
    await conn.execute(
        "INSERT INTO record_settings (install_id, category, retention_hours) VALUES ($1, $2, $3) "
        "ON CONFLICT (install_id, category) DO UPDATE SET retention_hours = excluded.retention_hours",
        install_id, category, hours,
    )
    await conn.execute(
        "UPDATE records SET expires_at = received_at + make_interval(hours => $3) "
        "WHERE install_id = $1 AND category = $2 AND expires_at > received_at + make_interval(hours => $3)",
        install_id, category, hours,
    )
    return True


def records_of(conn, install_id: uuid.UUID, *, prefetch: int = 8):
    """A server-side cursor over the installation's unexpired records, by category then receipt (inside a
    transaction). Rows: category, record_id, received_at, expires_at, fields (JSON text), sealed, key_id."""
    return cursor(
        conn,
        "SELECT category, record_id, received_at, expires_at, fields::text AS fields, sealed, key_id FROM records "
        "WHERE install_id = $1 AND expires_at > now() ORDER BY category, received_at, record_id",
        install_id,
        prefetch=prefetch,
    )


async def find(conn, category: str, install_id: uuid.UUID, record_id: str) -> asyncpg.Record | None:
    """The unexpired record, if any (fields as JSON text)."""
    return await conn.fetchrow(
        "SELECT category, record_id, received_at, expires_at, fields::text AS fields, sealed, key_id FROM records "
        "WHERE category = $1 AND install_id = $2 AND record_id = $3 AND expires_at > now()",
        category, install_id, record_id,
    )


async def count_overdue(conn, grace_seconds: float) -> int:
    """Records kept past their expires_at by more than grace_seconds (the sweeper's slack)."""
    return await conn.fetchval(
        "SELECT count(*) FROM records WHERE expires_at <= now() - make_interval(secs => $1)", grace_seconds)
