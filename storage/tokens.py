"""Token rows: hashes only, revocable, with a revocation sequence every worker can follow."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from storage.pool import cursor


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: str
    token_hash: bytes
    role: str
    install_id: uuid.UUID | None
    agent_id: uuid.UUID | None


async def insert_token(conn, token_id: str, token_hash: bytes, role: str, install_id=None, agent_id=None, *,
                       max_uses: int | None = None, expires_at: dt.datetime | None = None) -> None:
    """Store a new token's hash (optionally with a use limit and an expiry: enrollment secrets)."""
    await conn.execute(
        "INSERT INTO tokens (token_id, token_hash, role, install_id, agent_id, max_uses, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        token_id, token_hash, role, install_id, agent_id, max_uses, expires_at,
    )


async def use_enrollment(conn, token_id: str) -> bool:
    """Count one use of an enrollment secret, in the enrollment's transaction; False if it is used up, expired
    or revoked. The row lock makes concurrent enrollments with one secret queue here, so max_uses holds."""
    return bool(await conn.fetchval(
        "UPDATE tokens SET uses = uses + 1 WHERE token_id = $1 AND role = 'enroll' AND revoked_at IS NULL "
        "AND (max_uses IS NULL OR uses < max_uses) AND (expires_at IS NULL OR expires_at > now()) RETURNING true",
        token_id,
    ))


def token_list(conn, *, prefetch: int = 500):
    """A cursor over every token's public facts, oldest first (use inside a transaction); never a hash."""
    return cursor(
        conn,
        "SELECT token_id, role, install_id, agent_id, uses, max_uses, expires_at, created_at, revoked_at "
        "FROM tokens ORDER BY created_at, token_id",
        prefetch=prefetch,
    )


async def find_active(conn, token_hash: bytes) -> TokenRow | None:
    """The active token with this hash, if any: not revoked, not expired, not used up."""
    r = await conn.fetchrow(
        "SELECT token_id, token_hash, role, install_id, agent_id FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > now()) AND (max_uses IS NULL OR uses < max_uses)",
        token_hash,
    )
    return TokenRow(**dict(r)) if r else None


async def revoked_tokens(conn, token_ids: Sequence[str | None]) -> set[str]:
    """Which of these token ids are revoked (or gone), in one statement: a batch writer calls it after locking
    the installation rows, so a revocation that committed before the batch's lock is seen."""
    wanted = sorted({t for t in token_ids if t is not None})
    if not wanted:
        return set()
    live = {r["token_id"] for r in await conn.fetch(
        "SELECT token_id FROM tokens WHERE token_id = ANY($1::text[]) AND revoked_at IS NULL", wanted)}
    return set(wanted) - live


async def revoke(conn, *, token_id: str | None = None, token_hash: bytes | None = None) -> str | None:
    """Revoke one token by id or hash; returns its id, or None if no such active token.

    Inside a transaction, the token's installation row is locked first, as the batch writers lock it:
    a batch committing after this revocation is sure to see it (and refuses the token's records).
    """
    await conn.execute(
        "SELECT 1 FROM installations i JOIN tokens t ON t.install_id = i.install_id "
        "WHERE (t.token_id = $1 OR t.token_hash = $2) AND t.revoked_at IS NULL FOR NO KEY UPDATE OF i",
        token_id, token_hash,
    )
    return await conn.fetchval(
        "UPDATE tokens SET revoked_at = now(), revoke_seq = nextval('token_revocations') "
        "WHERE (token_id = $1 OR token_hash = $2) AND revoked_at IS NULL RETURNING token_id",
        token_id, token_hash,
    )


async def revoke_installation(conn, install_id: uuid.UUID) -> int:
    """Revoke every token bound to an installation (its own and its agents')."""
    status = await conn.execute(
        "UPDATE tokens SET revoked_at = now(), revoke_seq = nextval('token_revocations') "
        "WHERE install_id = $1 AND revoked_at IS NULL",
        install_id,
    )
    return int(status.split()[-1])


async def revoke_agent(conn, install_id: uuid.UUID, agent_id: uuid.UUID) -> int:
    """Revoke the tokens of one agent."""
    status = await conn.execute(
        "UPDATE tokens SET revoked_at = now(), revoke_seq = nextval('token_revocations') "
        "WHERE install_id = $1 AND agent_id = $2 AND revoked_at IS NULL",
        install_id, agent_id,
    )
    return int(status.split()[-1])


async def revocation_position(conn) -> int:
    """The highest revocation sequence number handed out so far (0 if none)."""
    return await conn.fetchval("SELECT coalesce(max(revoke_seq), 0) FROM tokens")


async def newest_created(conn):
    """When the newest token was created (None if there is none): an index-only scan."""
    return await conn.fetchval("SELECT max(created_at) FROM tokens")


async def revoked_since(conn, position: int) -> list[asyncpg.Record]:
    """Revocations after position, oldest first: (revoke_seq, token_id, install_id)."""
    return await conn.fetch(
        "SELECT revoke_seq, token_id, install_id FROM tokens WHERE revoke_seq > $1 ORDER BY revoke_seq", position
    )
