"""Which installations are restricted, known in every worker without a query per request.

Loaded at start and followed like the revocation log (ingest.http.auth): every POLL_INTERVAL one
index range scan reads the changes since the last position. A restricted installation's
scans and heartbeats are refused with 403 before their bodies are read. This is the early
check only: the batch writer checks the row again, locked, in the transaction that would
store the record, so a restriction that this cache has not seen yet still stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
from aiohttp import web

from ingest.errors import RestrictedProblem
from ingest.worker.background import POLL_INTERVAL, background
from storage import restrictions as store

log = logging.getLogger(__name__)

# Sequence numbers are handed out before commit; re-read a short overlap (as the revocation follower does).
_OVERLAP = 100


class Restrictions:
    """The set of restricted installations, following the database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._restricted: set[uuid.UUID] = set()
        self._position = 0
        # One poll at a time: a poll whose read began before a change committed must not apply its
        # older rows after a poll that read the change (the handler's own poll after a PUT, say).
        self._polling = asyncio.Lock()

    def check(self, install_id: uuid.UUID) -> None:
        """403 if the installation is restricted (as last seen)."""
        if install_id in self._restricted:
            raise RestrictedProblem("processing of this installation is restricted; nothing was stored")

    async def load(self) -> None:
        """Read the whole set (at start)."""
        async with self._pool.acquire() as conn:
            self._restricted, self._position = await store.restricted_now(conn)

    async def poll(self) -> int:
        """Apply the changes since the last poll; returns how many rows were read."""
        async with self._polling:
            async with self._pool.acquire() as conn:
                rows = await store.changed_since(conn, max(0, self._position - _OVERLAP))
            for r in rows:
                if r["restricted"]:
                    self._restricted.add(r["install_id"])
                else:
                    self._restricted.discard(r["install_id"])
                self._position = max(self._position, r["restriction_seq"])
            return len(rows)

    async def follow(self) -> None:
        """Poll forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.poll()
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("restriction poll failed: %s", type(exc).__name__)


async def restrictions_ctx(app: web.Application):
    """cleanup_ctx: the restriction set and its follower."""
    from ingest.keys import POOL, RESTRICTIONS

    restrictions = Restrictions(app[POOL])
    await restrictions.load()
    app[RESTRICTIONS] = restrictions
    async with background(restrictions.follow()):
        yield
