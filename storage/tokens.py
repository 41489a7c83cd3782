"""Token rows: hashes only, revocable, with a revocation sequence every worker can follow."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: str
    token_hash: bytes
    role: str
    install_id: uuid.UUID | None
    agent_id: uuid.UUID | None


async def insert_token(conn, token_id: str, token_hash: bytes, role: str, install_id=None, agent_id=None) -> None:
    """Store a new token's hash."""
    await conn.execute(
        "INSERT INTO tokens (token_id, token_hash, role, install_id, agent_id) VALUES ($1, $2, $3, $4, $5)",
        token_id, token_hash, role, install_id, agent_id,
    )


async def find_active(conn, token_hash: bytes) -> TokenRow | None:
    """The unrevoked token with this hash, if any."""
    r = await conn.fetchrow(
        "SELECT token_id, token_hash, role, install_id, agent_id FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL",
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


async def revoked_since(conn, position: int) -> list[asyncpg.Record]:
    """Revocations after position, oldest first: (revoke_seq, token_id, install_id)."""
    return await conn.fetch(
        "SELECT revoke_seq, token_id, install_id FROM tokens WHERE revoke_seq > $1 ORDER BY revoke_seq", position
    )
