"""This worker in the key store's list of nodes, and in embedded mode the key file it watches.

Each worker says, at start and every `keystore.NODE_REPORT_INTERVAL` seconds, which KEK ids it
holds (`storage.keystore.report_node`), and takes itself off the list when it stops. `keys rotate`
reads the list: it re-wraps the data keys under a new primary only once every live worker holds
that key, so rotation never strands a running node (CONTRACT.md section 10).

In embedded mode the KEKs come from `<data dir>/master.key`: every `KEY_FILE_CHECK` seconds a
worker looks at the file, and when it has changed (`keys rotate --generate` put a new primary
in front) loads it into its ring in place and reports the new key ids at once. A file that does
not parse is logged and ignored: the worker goes on with the keys it has.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from contextlib import suppress
from pathlib import Path

import asyncpg
from aiohttp import web

from crypto.errors import KeyError_
from crypto.keyring import KeyRing
from ingest.keys import KEY_FILE, KEYRING, KEYSTORE_POOL, NODES
from ingest.worker.background import background
from storage import keystore

log = logging.getLogger("ingest.nodes")

KEY_FILE_CHECK = 2.0  # seconds between looks at the key file (a stat)
REPORT_TIMEOUT = 5.0  # a report that takes longer is given up (the next one tries again)
FORGET_TIMEOUT = 1.0  # shutdown does not wait longer for the goodbye (the row then ages out)

_active: set[str] = set()  # node ids of this process's running apps (one, except in tests)


def node_id() -> str:
    """This worker's name in the list: host:pid (host:pid/n for a second app in one process)."""
    base = f"{socket.gethostname()[:200]}:{os.getpid()}"
    n = 1
    while (name := base if n == 1 else f"{base}/{n}") in _active:
        n += 1
    return name


class NodeReporter:
    """Reports the ring's key ids to the key store; reloads the ring from the key file when it changes."""

    def __init__(self, ks_pool: asyncpg.Pool, ring: KeyRing, key_file: Path | None, *,
                 interval: float = keystore.NODE_REPORT_INTERVAL) -> None:
        self.ks_pool = ks_pool
        self.ring = ring
        self.key_file = key_file
        self.interval = interval
        self.node_id = node_id()
        _active.add(self.node_id)
        self._file_state = self._stat()
        self._reported = 0.0

    def _stat(self) -> tuple[int, int] | None:
        if self.key_file is None:
            return None
        try:
            st = os.stat(self.key_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload_if_changed(self) -> bool:
        """Load the key file into the ring if it changed since last looked at; True if the ring changed."""
        state = self._stat()
        if state is None or state == self._file_state:
            return False
        self._file_state = state
        try:
            ring = KeyRing.from_setting(Path(self.key_file).read_text())
        except (OSError, KeyError_, ValueError) as exc:
            log.warning("key file %s changed but cannot be used (%s); keeping the keys held", self.key_file, exc)
            return False
        if ring.key_ids == self.ring.key_ids:
            return False
        self.ring.adopt(ring)
        log.info("key file reloaded", extra={"kek_ids": ring.key_ids, "primary": ring.primary_id})
        return True

    async def report(self) -> None:
        """Tell the key store which key ids this worker holds, now."""
        async with asyncio.timeout(REPORT_TIMEOUT), self.ks_pool.acquire() as ks:
            await keystore.report_node(ks, self.node_id, self.ring.key_ids)
        self._reported = time.monotonic()

    async def forget(self) -> None:
        _active.discard(self.node_id)
        async with asyncio.timeout(FORGET_TIMEOUT), self.ks_pool.acquire() as ks:
            await keystore.forget_node(ks, self.node_id)

    async def loop(self) -> None:
        """Watch the key file and report, until cancelled; a failed report is logged and retried."""
        while True:
            await asyncio.sleep(min(KEY_FILE_CHECK, self.interval))
            changed = self.reload_if_changed()
            if changed or time.monotonic() - self._reported >= self.interval:
                try:
                    await self.report()
                except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("could not report this node's key ids: %s %s", type(exc).__name__,
                                getattr(exc, "sqlstate", "") or "")


async def nodes_ctx(app: web.Application):
    """cleanup_ctx: report at start, then keep reporting (and watching the key file); leave the list on shutdown."""
    reporter = NodeReporter(app[KEYSTORE_POOL], app[KEYRING], app.get(KEY_FILE))
    app[NODES] = reporter
    try:
        await reporter.report()
    except BaseException:
        _active.discard(reporter.node_id)
        raise
    async with background(reporter.loop()):
        yield
    with suppress(OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        await reporter.forget()
