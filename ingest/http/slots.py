"""A small per-worker bound on scans being prepared at once, with a per-token share of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from ingest.errors import Unavailable


class PrepareSlots:
    """At most `slots` holders at once, at most `per_token` of them under one token; the rest wait up to `wait`
    seconds for their turn, then get 503 with Retry-After.

    The per-token share keeps one agent that sends many large scans at once from taking every
    slot of a worker: the others' scans still find one free.
    """

    def __init__(self, slots: int, per_token: int, wait: float, retry_after: int) -> None:
        self.slots, self.per_token, self.wait = slots, per_token, wait
        self._retry_after = str(retry_after)
        self._held: Counter[str] = Counter()
        self._busy = 0
        self._changed = asyncio.Condition()

    @property
    def busy(self) -> int:
        return self._busy

    def _free_for(self, token_id: str) -> bool:
        return self._busy < self.slots and self._held[token_id] < self.per_token

    @contextlib.asynccontextmanager
    async def hold(self, token_id: str) -> AsyncIterator[None]:
        """Hold a slot for the block (503 if none frees up in time)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._free_for(token_id)), self.wait)
            except TimeoutError:
                raise Unavailable("too many scans are being prepared; try again", headers={"Retry-After": self._retry_after}) from None
            self._busy += 1
            self._held[token_id] += 1
        try:
            yield
        finally:
            async with self._changed:
                self._busy -= 1
                self._held[token_id] -= 1
                if not self._held[token_id]:
                    del self._held[token_id]
                self._changed.notify_all()
