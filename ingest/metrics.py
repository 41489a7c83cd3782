"""Prometheus metrics (names in docs/metrics.md). Labels come from small fixed sets only.

In `serve`, PROMETHEUS_MULTIPROC_DIR is set before prometheus_client is imported,
so every worker writes its values to files there and /metrics on any worker
reports the whole service. In-process (tests) each app has its own registry.
"""

from __future__ import annotations

import os

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
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._rejected_children: dict[str, Counter] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; children are created once per (route, method, status)."""
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, method, str(status))
        child.inc()
        lat = self._latency_children.get(route)
        if lat is None:
            lat = self._latency_children[route] = self.latency.labels(route)
        lat.observe(seconds)

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self.rejected.labels(reason)
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
        """The text exposition of the whole service."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
