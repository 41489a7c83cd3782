"""Agents of an installation and their tokens."""

from __future__ import annotations

import uuid

from storage.errors import NotFound, QuotaReached
from storage.tokens import insert_token, revoke_agent


async def create(conn, install_id: uuid.UUID, agent_id: uuid.UUID, name: str, *, token_id: str, token_hash: bytes,
                 max_agents: int | None = None) -> None:
    """Register an agent and store its token's hash, in one transaction; NotFound if the installation is gone,
    QuotaReached if it already has max_agents agents (deleted ones do not count)."""
    async with conn.transaction():
        # FOR NO KEY UPDATE: two creations for one installation queue here, so the count below holds.
        alive = await conn.fetchval(
            "SELECT true FROM installations WHERE install_id = $1 AND NOT erasing FOR NO KEY UPDATE", install_id
        )
        if not alive:
            raise NotFound("no such installation")
        if max_agents is not None:
            active = await conn.fetchval(
                "SELECT count(*) FROM agents WHERE install_id = $1 AND revoked_at IS NULL", install_id
            )
            if active >= max_agents:
                raise QuotaReached("agents_per_installation", max_agents)
        await conn.execute("INSERT INTO agents (install_id, agent_id, name) VALUES ($1, $2, $3)", install_id, agent_id, name)
        await insert_token(conn, token_id, token_hash, "agent", install_id, agent_id)


async def revoke(conn, install_id: uuid.UUID, agent_id: uuid.UUID) -> None:
    """Mark the installation's agent revoked and revoke its tokens; NotFound if it has no such active agent."""
    async with conn.transaction():
        # The installation row first, as the batch writers lock it: a batch that commits after this
        # revocation waits for it and then sees the token revoked (storage.tokens.revoked_tokens).
        await conn.execute("SELECT 1 FROM installations WHERE install_id = $1 FOR NO KEY UPDATE", install_id)
        found = await conn.fetchval(
            "UPDATE agents SET revoked_at = now() WHERE install_id = $1 AND agent_id = $2 AND revoked_at IS NULL "
            "RETURNING true",
            install_id, agent_id,
        )
        if not found:
            raise NotFound("no such agent")
        await revoke_agent(conn, install_id, agent_id)
