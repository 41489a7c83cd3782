"""What a benchmark is: a named coroutine taking a Context and returning Results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_SCHEMA = "telemetry_bench"  # scratch tables of the benchmarks; dropped at the end of a run


@dataclass(frozen=True)
class Result:
    """One figure. ``ceiling_name`` names another Result of the same run (same unit)."""

    name: str
    value: float
    unit: str
    ceiling_name: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class Unavailable(Exception):
    """The thing to measure is not there (yet); the message says what is missing."""


@dataclass(frozen=True)
class Context:
    """Everything a benchmark may use; built once per run by the runner."""

    dsn: str
    duration: float  # seconds per load measurement
    warmup: float  # seconds of load before each measurement, not counted
    concurrency: int  # closed-loop in-flight requests and client connection limit
    workers: tuple[int, ...]  # server worker counts to measure
    workdir: Path  # scratch directory, deleted after the run
    open_fraction: float | None = None  # open-loop rate as a fraction of closed-loop rps
    open_rate: float | None = None  # open-loop rate in requests/s
    pg_pid: int | None = None  # PostgreSQL's postmaster, when it runs on this machine (CPU read from /proc)
    server_cores: tuple[int, ...] = ()  # servers are pinned here (empty: not pinned)
    client_cores: tuple[int, ...] = ()  # the load generator is pinned here
    wrk: str | None = None  # path of wrk; None: the aiohttp driver does the closed loop
    driver: str = "aiohttp driver"  # how the closed loop was driven, for the notes

    @property
    def micro_duration(self) -> float:
        """Seconds per in-process micro-measurement: they converge much faster than load."""
        return max(0.5, min(self.duration, 3.0))


BenchmarkFn = Callable[[Context], Awaitable[list[Result]]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: BenchmarkFn
    needs: tuple[str, ...]  # benchmarks whose results this one's ceilings come from
    doc: str


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, needs: tuple[str, ...] = ()) -> Callable[[BenchmarkFn], BenchmarkFn]:
    """Register ``fn`` under ``name``; the runner runs ``needs`` first, in the same run."""

    def register(fn: BenchmarkFn) -> BenchmarkFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Benchmark(name, fn, tuple(needs), doc[0] if doc else "")
        return fn

    return register
