"""Prometheus metrics (names in docs/metrics.md). Labels come from small fixed sets only.

In `serve`, PROMETHEUS_MULTIPROC_DIR is set before prometheus_client is imported,
so every worker writes its values to files there and /metrics on any worker
reports the whole service. In-process (tests) each app has its own registry.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAMPLE_INTERVAL = 1.0  # seconds between samples of the pool and queue gauges, in every worker
ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


FLUSH_INTERVAL = 0.01  # seconds: a worker writes its summed per-request values at most this often


class Tally:
    """Per-request increments summed in memory and written at most every FLUSH_INTERVAL.

    In `serve` every increment of a metric value is a write to its memory-mapped file under a
    lock (and a getpid); a heartbeat makes about eight. Summed, a loaded worker writes each value
    once per 10 ms however many requests it answered meanwhile. The first increment after a quiet
    spell is written at the end of its event-loop turn (an idle service's counts are at once in
    the files); under load they wait at most FLUSH_INTERVAL. A /metrics answered by this worker
    writes its own sums first, so it counts every request this worker answered before it; another
    worker's last 10 ms may be missing from it, and a worker killed by SIGKILL loses at most that
    much. Outside a running loop, a value is written at once.

    Uses prometheus_client's value objects (`_value`; a histogram's `_sum`, `_buckets`,
    `_upper_bounds`) directly, as Counter.inc and Histogram.observe do.
    """

    __slots__ = ("_last", "_pending")

    def __init__(self) -> None:
        self._pending: dict[object, float] = {}
        self._last = 0.0  # time.monotonic() of the last write

    def add(self, value, amount: float) -> None:
        pending = self._pending
        if not pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                value.inc(amount)
                return
            wait = self._last + FLUSH_INTERVAL - time.monotonic()
            if wait > 0:
                loop.call_later(wait, self.flush)
            else:
                loop.call_soon(self.flush)
        pending[value] = pending.get(value, 0.0) + amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        self._last = time.monotonic()
        for value, amount in pending.items():
            value.inc(amount)


class DeferredCounter:
    """A counter's (or gauge's) child whose increments go through a Tally."""

    __slots__ = ("_tally", "_value")

    def __init__(self, tally: Tally, child) -> None:
        self._tally, self._value = tally, child._value

    def inc(self, amount: float = 1.0) -> None:
        self._tally.add(self._value, amount)

    def dec(self, amount: float = 1.0) -> None:  # gauges only
        self._tally.add(self._value, -amount)


class DeferredHistogram:
    """A histogram's child whose observations go through a Tally (bucket and sum, as Histogram.observe)."""

    __slots__ = ("_tally", "_sum", "_buckets", "_bounds")

    def __init__(self, tally: Tally, child) -> None:
        self._tally, self._sum, self._buckets, self._bounds = tally, child._sum, child._buckets, child._upper_bounds

    def observe(self, amount: float) -> None:
        add = self._tally.add
        add(self._sum, amount)
        add(self._buckets[bisect_left(self._bounds, amount)], 1.0)  # the last bound is +Inf


class Metrics:
    """All metric objects of one app, with children bound once where labels are known in advance."""

    def __init__(self) -> None:
        multi = multiprocess_mode()
        self.registry = None if multi else CollectorRegistry()
        reg = {"registry": self.registry} if not multi else {"registry": None}

        def gauge(name, doc, labels=(), mode="livesum"):
            return Gauge(name, doc, labels, multiprocess_mode=mode, **reg)

        self.requests = Counter("telemetry_requests_total", "Requests answered.", ("route", "method", "status"), **reg)
        self.latency = Histogram("telemetry_request_duration_seconds", "Request latency.", ("route",), buckets=LATENCY_BUCKETS, **reg)
        self.request_bytes = Counter("telemetry_request_bytes_total", "Body bytes received.", ("route", "stage"), **reg)
        self.fields_dropped = Counter("telemetry_fields_dropped_total", "Fields removed by the allowlist.", ("category",), **reg)
        self.rejected = Counter("telemetry_rejected_total", "Requests refused, by reason.", ("reason",), **reg)
        self.batch_rows = Histogram("telemetry_batch_rows", "Rows per committed batch.", ("writer",), buckets=ROWS_BUCKETS, **reg)
        self.flush_latency = Histogram("telemetry_flush_duration_seconds", "Time to write and commit one batch.", ("writer",), buckets=LATENCY_BUCKETS, **reg)
        self.queue_depth = gauge("telemetry_queue_depth", "Records waiting for the group-commit writer.", ("writer",))
        self.scans_received = Counter("telemetry_scans_received_total", "Scans accepted.", **reg)
        self.encrypt_latency = Histogram("telemetry_encrypt_duration_seconds", "Time to seal one document.", ("category",), buckets=LATENCY_BUCKETS, **reg)
        self.pool = gauge("telemetry_db_pool_connections", "Database pool connections.", ("state",))
        # Sampled every SAMPLE_INTERVAL in every worker (ingest.http.app.gauges_ctx), not only by the worker a scrape reaches.
        self._pool_children = {state: self.pool.labels(state) for state in ("size", "in_use", "max")}
        self.queue_fill = gauge("telemetry_queue_fill_ratio", "Fullest worker's group-commit queue, as a fraction of its capacity.",
                                ("writer",), mode="livemax")
        self.sweeper_rows = Counter("telemetry_sweeper_rows_deleted_total", "Rows removed by the sweeper.", ("table",), **reg)
        self.sweeper_partitions = Counter("telemetry_sweeper_partitions_dropped_total", "Partitions dropped by the sweeper.", ("table",), **reg)
        self.sweep_duration = Histogram("telemetry_sweep_duration_seconds", "Duration of one sweep.", buckets=LATENCY_BUCKETS + (30.0, 60.0, 300.0), **reg)
        self.sweep_last_success = gauge("telemetry_sweep_last_success_timestamp_seconds", "Unix time of the last completed sweep.", mode="max")
        self.oldest_scan_age = gauge("telemetry_oldest_scan_age_seconds", "Age of the oldest stored scan.", mode="livemax")
        self.oldest_heartbeat_age = gauge("telemetry_oldest_heartbeat_age_seconds", "Age of the oldest heartbeat history row.", mode="livemax")
        # 1, labelled with what runs: the service's version, Python's, and the PostgreSQL server's (set at start).
        self.build_info = gauge("telemetry_build_info", "Versions of the running service, its Python and its PostgreSQL (value 1).",
                                ("version", "python", "postgresql"), mode="max")
        self.tally = Tally()
        self._request_children: dict[tuple[str, str, int], DeferredCounter] = {}
        self._latency_children: dict[str, DeferredHistogram] = {}
        self._rejected_children: dict[str, DeferredCounter] = {}

    def deferred(self, child) -> DeferredCounter | DeferredHistogram:
        """The child (of a counter, gauge or histogram) with its writes summed per event-loop turn (Tally)."""
        if isinstance(child, Histogram):
            return DeferredHistogram(self.tally, child)
        return DeferredCounter(self.tally, child)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; children are created once per (route, method, status)."""
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.deferred(self.requests.labels(route, method, str(status)))
        child.inc()
        lat = self._latency_children.get(route)
        if lat is None:
            lat = self._latency_children[route] = self.deferred(self.latency.labels(route))
        lat.observe(seconds)

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self.deferred(self.rejected.labels(reason))
        child.inc()

    def set_build_info(self, postgresql: str) -> None:
        """telemetry_build_info{version, python, postgresql} = 1 (postgresql: the server's version, as it reports it)."""
        import platform

        from ingest import version

        self.build_info.labels(version(), platform.python_version(), postgresql).set(1)

    def sample(self, pool, writers) -> None:
        """Set the pool gauges (connections open, in use, the pool's maximum) and each writer's queue fill."""
        size = pool.get_size()
        self._pool_children["size"].set(size)
        self._pool_children["in_use"].set(size - pool.get_idle_size())
        self._pool_children["max"].set(pool.get_max_size())
        for writer in writers:
            self.queue_fill.labels(writer.name).set(writer.fill())

    def exposition(self) -> bytes:
        """The text exposition of the whole service (this worker's pending sums written first)."""
        self.tally.flush()
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
