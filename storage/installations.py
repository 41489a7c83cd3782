"""Installations: enrollment, their data keys, and the heartbeat batch write."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import asyncpg

from storage.errors import AlreadyExists
from storage.tokens import insert_token, revoked_tokens


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
    ip_prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    token_id: str | None = None  # the token it came with: refused if revoked before the batch commits


# Outcome of each heartbeat in a batch (REVOKED: its token was revoked before the commit).
STORED, RESTRICTED, GONE, REVOKED = "stored", "restricted", "gone", "revoked"
_STORED_COLUMNS = 9  # HeartbeatRow fields written to installations (all but token_id)

_HISTORY_COLUMNS = ("install_id", "received_at", "license_type", "version", "asset_count", "db_server_type", "web_server_type", "ip_prefix")


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
    """Store a batch in one transaction: update each current record, append history. Outcome per row."""
    ids = sorted({r.install_id for r in rows})
    async with conn.transaction():
        # Row locks in a fixed order: concurrent batches cannot deadlock, and an erasure or
        # restriction that commits first is seen here.
        state = {
            r["install_id"]: r
            for r in await conn.fetch(
                "SELECT install_id, restricted, erasing FROM installations WHERE install_id = ANY($1::uuid[]) "
                "ORDER BY install_id FOR UPDATE",
                ids,
            )
        }
        revoked = await revoked_tokens(conn, [r.token_id for r in rows])
        outcomes = []
        accepted: list[HeartbeatRow] = []
        for r in rows:
            s = state.get(r.install_id)
            if s is None or s["erasing"]:
                outcomes.append(GONE)
            elif r.token_id in revoked:
                outcomes.append(REVOKED)
            elif s["restricted"]:
                outcomes.append(RESTRICTED)
            else:
                outcomes.append(STORED)
                accepted.append(r)
        if not accepted:
            return outcomes
        latest: dict[uuid.UUID, HeartbeatRow] = {}
        for r in accepted:
            latest[r.install_id] = r  # batch order is arrival order: the last one wins
        cur = sorted(latest.values(), key=lambda r: r.install_id)
        await conn.execute(
            """
            UPDATE installations i SET
                last_seen_at = u.received_at, license_type = u.license_type, version = u.version,
                asset_count = u.asset_count, db_server_type = u.db_server_type,
                web_server_type = u.web_server_type, email_ct = u.email_ct, ip_prefix = u.ip_prefix
            FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::bytea[], $9::cidr[])
                AS u(install_id, received_at, license_type, version, asset_count, db_server_type, web_server_type, email_ct, ip_prefix)
            WHERE i.install_id = u.install_id
            """,
            *(list(col) for col in zip(*(r[:_STORED_COLUMNS] for r in cur))),
        )
        await conn.copy_records_to_table(
            "heartbeats",
            records=[(r.install_id, r.received_at, r.license_type, r.version, r.asset_count, r.db_server_type, r.web_server_type, r.ip_prefix) for r in accepted],
            columns=_HISTORY_COLUMNS,
        )
    return outcomes
