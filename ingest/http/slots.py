"""A small per-worker bound on scans being prepared at once, with a per-token share of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import AsyncIterator

from ingest.errors import Unavailable


class PrepareSlots:
    """At most `slots` holders at once, at most `per_token` of them under one token; the rest wait up to `wait`
    seconds for their turn, then get 503 with Retry-After.

    The per-token share keeps one agent that sends many large scans at once from taking every
    slot of a worker: the others' scans still find one free.

    Waiters queue in arrival order. A slot that frees is handed to the first waiter whose token
    is under its share, and only that waiter is woken (a condition's notify_all woke every waiter
    to test whether it could go: under 64 concurrent uploads, dozens of task wake-ups per scan).
    """

    def __init__(self, slots: int, per_token: int, wait: float, retry_after: int) -> None:
        self.slots, self.per_token, self.wait = slots, per_token, wait
        self._retry_after = str(retry_after)
        self._held: Counter[str] = Counter()
        self._busy = 0
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()

    @property
    def busy(self) -> int:
        return self._busy

    def _free_for(self, token_id: str) -> bool:
        return self._busy < self.slots and self._held[token_id] < self.per_token

    @contextlib.asynccontextmanager
    async def hold(self, token_id: str) -> AsyncIterator[None]:
        """Hold a slot for the block (503 if none frees up in time)."""
        # A free slot with waiters still queued means none of them may take it (each is at its
        # token's share): a newcomer under its share takes it without queueing behind them.
        if self._free_for(token_id):
            self._take(token_id)
        else:
            await self._queue(token_id)
        try:
            yield
        finally:
            self._give_back(token_id)

    async def _queue(self, token_id: str) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (token_id, turn)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._give_back(token_id)  # handed a slot just as the wait ended: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise Unavailable("too many scans are being prepared; try again",
                                  headers={"Retry-After": self._retry_after}) from None
            raise

    def _take(self, token_id: str) -> None:
        self._busy += 1
        self._held[token_id] += 1

    def _give_back(self, token_id: str) -> None:
        self._busy -= 1
        self._held[token_id] -= 1
        if not self._held[token_id]:
            del self._held[token_id]
        waiting = self._waiting
        i = 0
        while self._busy < self.slots and i < len(waiting):
            waiter, turn = waiting[i]
            if turn.done() or not self._free_for(waiter):  # a wait that ended removes itself when it runs
                i += 1
                continue
            del waiting[i]
            self._take(waiter)
            turn.set_result(None)
