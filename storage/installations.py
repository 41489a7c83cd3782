"""Installations: enrollment, their data keys, and the heartbeat batch write."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

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


async def write_heartbeats(conn, rows: Sequence[HeartbeatRow]) -> list[str]:
    """Store a batch: update each current record that changed, append history; the outcome of each row, in order.

    One call of write_heartbeat_batch (migrations 0014, 0016 to 0022), the rows sent as one array of
    heartbeat_row: alone, one implicit transaction and one round trip; inside the caller's
    transaction, part of it. Inside, two statements: row locks on the installations in a fixed
    order (concurrent batches cannot deadlock; an erasure, restriction or revocation, each of which
    locks the installation row first, either commits before them or waits), then, in a fresh
    snapshot, judge and write everything.
    """
    # ip_prefix as text (cast to cidr in SQL); the request path already gives text
    rows = [r if r.ip_prefix is None or type(r.ip_prefix) is str else r._replace(ip_prefix=str(r.ip_prefix))
            for r in rows]
    return await conn.fetchval(_WRITE_BATCH, rows)


_WRITE_BATCH = "SELECT write_heartbeat_batch($1::heartbeat_row[])"
