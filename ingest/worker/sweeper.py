"""The sweeper inside `serve`: every worker runs the loop; only the holder of the sweeper lease sweeps.

Each tick (at start, then every `sweep_interval` seconds) a worker:

- adds the seals its data-key cache counted to the key store's `data_keys.uses` (storage.keystore.add_uses);
- tries one sweep (storage.sweeper.sweep); if another process holds the lease it skips, so one
  sweeper works in the whole deployment, however many nodes and workers;
- sets the oldest-scan and oldest-heartbeat age gauges. Every worker does this (two min() on
  an index), so the figure an operator alerts on is never older than one interval whichever
  worker swept; the gauges are `livemax`, so a dead worker's last value does not linger.

The first tick runs as the worker starts, not one interval later: a fresh start reports a
completed sweep (telemetry_sweep_last_success_timestamp_seconds) within seconds, like a healthy
service, and what expired while the service was down goes at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import Counter

import asyncpg
from aiohttp import web

from crypto.datakeys import DataKeyCache, new_wrapped_key
from crypto.errors import CryptoError
from crypto.keyring import KeyRing
from ingest.keys import (
    DATA_KEYS,
    KEYRING,
    KEYSTORE_POOL,
    METRICS,
    POOL,
    SETTINGS,
    SWEEPER,
)
from ingest.metrics import Metrics
from ingest.settings import Settings
from ingest.worker.background import background
from storage import keystore, sweeper
from storage.sweeper import Rules, SweepResult

log = logging.getLogger("ingest.sweeper")


def rules_from(settings: Settings) -> Rules:
    """The sweeper's rules from the settings."""
    return Rules(
        heartbeat_retention=dt.timedelta(days=settings.heartbeat_retention_days),
        inactive=dt.timedelta(days=settings.inactive_days),
        audit_retention=dt.timedelta(days=settings.audit_retention_days),
        data_key_max_uses=settings.data_key_max_uses,
        data_key_max_age=dt.timedelta(days=settings.data_key_max_age_days),
    )


def key_maker(ring: KeyRing) -> keystore.NewKey:
    """New data keys for the sweeper, wrapped by the ring's primary KEK."""
    return lambda install_id, key_id: new_wrapped_key(ring, install_id, key_id)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Sweeper:
    """One worker's part: flush seal counts, sweep if it gets the lock, report ages."""

    def __init__(self, pool: asyncpg.Pool, ks_pool: asyncpg.Pool, ring: KeyRing, cache: DataKeyCache, metrics: Metrics,
                 settings: Settings) -> None:
        self.pool = pool
        self.ks_pool = ks_pool
        self.cache = cache
        self.metrics = metrics
        self.rules = rules_from(settings)
        self.interval = settings.sweep_interval
        self.new_key = key_maker(ring)
        self._unflushed: Counter[tuple[uuid.UUID, int]] = Counter()
        self._expiries: dict[tuple[uuid.UUID, int], dt.datetime] = {}
        self.first_tick_done = asyncio.Event()  # set once the tick at start is over, swept or not

    async def run_once(self, now: dt.datetime | None = None) -> SweepResult:
        """One tick at `now` (default: the current time); the result says whether this worker swept."""
        now = now or utcnow()
        self._unflushed.update(self.cache.drain_uses())
        for k, at in self.cache.drain_expiries().items():
            self._expiries[k] = max(at, self._expiries.get(k, at))
        async with self.pool.acquire() as conn, self.ks_pool.acquire() as ks:
            if self._unflushed or self._expiries:
                await keystore.add_uses(ks, self._unflushed, self._expiries)
                self._unflushed.clear()
                self._expiries.clear()
            result = await sweeper.sweep(conn, ks, now, self.rules, new_key=self.new_key)
            oldest = await sweeper.oldest(conn)
        if result.swept:
            self._count(result)
        self._ages(now, oldest)
        return result

    def _count(self, result: SweepResult) -> None:
        m = self.metrics
        for table, n in result.rows_deleted.items():
            m.sweeper_rows.labels(table).inc(n)
        for table, n in result.partitions_dropped.items():
            m.sweeper_partitions.labels(table).inc(n)
        m.sweep_duration.observe(result.seconds)
        if not result.deferred:  # a sweep that had to leave a step for later is not a success
            m.sweep_last_success.set(time.time())
        if result.removed_anything or result.data_keys_added or result.deferred:
            log.info("sweep", extra={"sweep": result.summary(), "seconds": round(result.seconds, 3)})

    def _ages(self, now: dt.datetime, oldest: dict[str, dt.datetime | None]) -> None:
        for table, gauge in (("scans", self.metrics.oldest_scan_age), ("heartbeats", self.metrics.oldest_heartbeat_age)):
            at = oldest.get(table)
            gauge.set(max(0.0, (now - at).total_seconds()) if at is not None else 0.0)

    async def loop(self) -> None:
        """Tick now, then every interval until cancelled; a failed tick is logged and the next one tries again."""
        while True:
            try:
                await self.run_once()
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    CryptoError) as exc:
                log.warning("sweep failed: %s %s", type(exc).__name__, getattr(exc, "sqlstate", "") or "")
            except Exception:  # a bug must not stop retention for good: say so loudly, try again next time
                log.exception("sweep failed")
            finally:
                self.first_tick_done.set()
            await asyncio.sleep(self.interval)


async def sweeper_ctx(app: web.Application):
    """cleanup_ctx: the sweeper loop; cancelled on shutdown (a cut sweep is finished by the next one)."""
    s = Sweeper(app[POOL], app[KEYSTORE_POOL], app[KEYRING], app[DATA_KEYS], app[METRICS], app[SETTINGS])
    app[SWEEPER] = s
    async with background(s.loop()):
        yield
