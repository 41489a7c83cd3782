"""Installations: enrollment, their data keys, and the heartbeat batch write."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import asyncpg

from storage.errors import AlreadyExists
from storage.tokens import insert_token


class HeartbeatRow(NamedTuple):
    """One validated heartbeat, ready to store (email already sealed)."""

    install_id: uuid.UUID
    received_at: dt.datetime
    license_type: str
    version: str
    asset_count: int
    db_server_type: str | None
    web_server_type: str | None
    email_ct: bytes | None
    ip_prefix: str | ipaddress.IPv4Network | ipaddress.IPv6Network | None  # text ("192.0.2.0/24") on the hot path
    token_id: str | None = None  # the token it came with: refused if revoked before the batch commits


# Outcome of each heartbeat in a batch (REVOKED: its token was revoked before the commit).
STORED, RESTRICTED, GONE, REVOKED = "stored", "restricted", "gone", "revoked"


async def enroll(conn, install_id: uuid.UUID, *, token_id: str, token_hash: bytes,
                 store_key: Callable[[], Awaitable[None]]) -> None:
    """Create the installation and its token in one transaction; `store_key()` puts its first data
    key in the key store before that transaction commits (if it fails, nothing is enrolled)."""
    async with conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO installations (install_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", install_id
        )
        if not inserted:
            raise AlreadyExists("install_id already enrolled")
        await insert_token(conn, token_id, token_hash, "installation", install_id)
        await store_key()


# The batch after its rows are locked, in one statement: judge each heartbeat against the
# installation and its token as they are now (a fresh snapshot, taken after the locks, so an
# erasure, restriction or revocation that committed first is seen), update each current
# record to its latest heartbeat, append the history, answer the outcome of each in order.
_WRITE_BATCH = """
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::int[], $6::text[],
                         $7::text[], $8::bytea[], $9::text[], $10::text[])
        WITH ORDINALITY AS u(install_id, received_at, license_type, version, asset_count, db_server_type,
                             web_server_type, email_ct, ip_prefix, token_id, ord)
), judged AS (
    SELECT u.*, CASE
        WHEN i.install_id IS NULL OR i.erasing THEN 'gone'
        WHEN u.token_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM tokens t WHERE t.token_id = u.token_id AND t.revoked_at IS NULL) THEN 'revoked'
        WHEN i.restricted THEN 'restricted'
        ELSE 'stored' END AS outcome
    FROM u LEFT JOIN installations i ON i.install_id = u.install_id
), latest AS (
    SELECT DISTINCT ON (install_id) * FROM judged WHERE outcome = 'stored' ORDER BY install_id, ord DESC
), current_record AS (
    UPDATE installations i SET
        last_seen_at = l.received_at, license_type = l.license_type, version = l.version,
        asset_count = l.asset_count, db_server_type = l.db_server_type,
        web_server_type = l.web_server_type, email_ct = l.email_ct, ip_prefix = l.ip_prefix::cidr
    FROM latest l WHERE i.install_id = l.install_id
), history AS (
    INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count, db_server_type,
                            web_server_type, ip_prefix)
    SELECT install_id, received_at, license_type, version, asset_count, db_server_type, web_server_type,
           ip_prefix::cidr
    FROM judged WHERE outcome = 'stored'
)
SELECT outcome FROM judged ORDER BY ord
"""


def _prefix_text(prefix: object) -> str | None:
    return prefix if prefix is None or isinstance(prefix, str) else str(prefix)


async def write_heartbeats(conn, rows: Sequence[HeartbeatRow]) -> list[str]:
    """Store a batch in one transaction: update each current record, append history. Outcome per row.

    Two statements: lock the installations, then judge and write everything (_WRITE_BATCH).
    """
    ids = sorted({r.install_id for r in rows})
    columns = [list(col) for col in zip(*rows)]
    columns[8] = [_prefix_text(p) for p in columns[8]]  # ip_prefix as text (cast to cidr in SQL)
    async with conn.transaction():
        # Row locks in a fixed order: concurrent batches cannot deadlock, and an erasure,
        # restriction or revocation (each locks the installation row first) that commits
        # first is seen by the next statement's snapshot.
        await conn.execute(
            "SELECT 1 FROM installations WHERE install_id = ANY($1::uuid[]) ORDER BY install_id FOR UPDATE", ids
        )
        return [r[0] for r in await conn.fetch(_WRITE_BATCH, *columns)]
