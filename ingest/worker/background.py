"""A task that lives as long as the app: started on the way in, cancelled on the way out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

# How often every worker follows the revocation and restriction logs: changes reach every
# worker within about this long.
POLL_INTERVAL = 0.25


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task]:
    """Run coro as a task for the duration of the block; cancel it and wait for it afterwards."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
