"""The append-only audit log of administrative actions."""

from __future__ import annotations

import uuid
from typing import Any


async def record(conn, actor: str, action: str, install_id: uuid.UUID | None = None, detail: dict[str, Any] | None = None) -> None:
    """Append one audit row (actor is a token id, 'cli' or 'sweeper'; never a secret)."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, install_id, detail) VALUES ($1, $2, $3, $4)",
        actor, action, install_id, detail or {},
    )
