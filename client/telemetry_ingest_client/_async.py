"""The AsyncClient: the same methods as Client, awaitable.

Each call runs the synchronous client in a worker thread (`asyncio.to_thread`), so the
package needs no third-party HTTP library and both clients behave exactly alike (the
same retries, spool and errors). A call blocks one thread of the default executor while
it waits out a backoff; that is the price of having no dependency.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from telemetry_ingest_client._client import Answer, Backoff, Client, FlushReport


class AsyncClient:
    """An asyncio client of the telemetry service for one token; `async with` or `await close()`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        backoff: Backoff = Backoff(),
        timeout: float = 60.0,
        sleep: Callable[[float], Any] = time.sleep,  # runs in the worker thread
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sync = Client(url, token, spool_dir=spool_dir, ca_bundle=ca_bundle, backoff=backoff, timeout=timeout,
                           sleep=sleep, uniform=uniform, clock=clock)

    @property
    def token(self) -> str | None:
        return self.sync.token

    @token.setter
    def token(self, value: str | None) -> None:
        self.sync.token = value

    @property
    def backoff(self) -> Backoff:
        return self.sync.backoff

    @backoff.setter
    def backoff(self, value: Backoff) -> None:
        self.sync.backoff = value

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release (a connection per request); here so both clients read alike."""
        self.sync.close()

    async def enroll(self, secret: str, install_id: uuid.UUID | str | None = None) -> str:
        """Enroll an installation with an enrollment secret; returns the installation token."""
        return await asyncio.to_thread(self.sync.enroll, secret, install_id)

    async def heartbeat(self, body: Mapping[str, Any]) -> Answer:
        """Send a heartbeat (through the spool, if there is one); the service's answer."""
        return await asyncio.to_thread(self.sync.heartbeat, body)

    async def create_agent(self, name: str) -> Answer:
        """Create an agent of this installation: `{"agent_id", "token"}`."""
        return await asyncio.to_thread(self.sync.create_agent, name)

    async def delete_agent(self, agent_id: uuid.UUID | str) -> None:
        """Delete an agent of this installation; its token stops working at once."""
        await asyncio.to_thread(self.sync.delete_agent, agent_id)

    async def settings(self, scan_retention_hours: int) -> Answer:
        """Set this installation's scan retention (1..720 hours); the settings now in force."""
        return await asyncio.to_thread(self.sync.settings, scan_retention_hours)

    async def scan(self, body: Mapping[str, Any]) -> Answer:
        """Upload a scan, gzipped; a scan_id is added if missing, once."""
        return await asyncio.to_thread(self.sync.scan, body)

    async def record(self, category: str, body: Mapping[str, Any]) -> Answer:
        """Send a record of a policy category: `POST /v1/records/{category}`."""
        return await asyncio.to_thread(self.sync.record, category, body)

    def spool(self, kind: str, body: Mapping[str, Any], category: str | None = None) -> Path:
        """Write one record durably to the spool (quick: one small file); returns its path."""
        return self.sync.spool(kind, body, category)

    def pending(self) -> list[Path]:
        """The spooled records, oldest first."""
        return self.sync.pending()

    async def flush_spool(self) -> FlushReport:
        """Send every spooled record in order (see Client.flush_spool)."""
        return await asyncio.to_thread(self.sync.flush_spool)

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      gzipped: bool = False, idempotent: bool = True) -> Answer:
        """One request with retries (see Client.request)."""
        return await asyncio.to_thread(self.sync.request, method, path, body, token=token, gzipped=gzipped,
                                       idempotent=idempotent)
