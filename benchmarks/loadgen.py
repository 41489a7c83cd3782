"""HTTP load drivers: closed loop (fixed concurrency) and open loop (fixed arrival rate).

Both take a request factory, ``factory(i) -> Request``, so the same driver hits
the ceiling apps and the real service. Every response is read and checked: a
status outside ``Request.expect``, a body that ``Request.check`` refuses, a
client-side exception or a timeout is an error, and every outcome is counted
by status.

Closed loop: ``concurrency`` users each send, wait for the answer, send again,
until the time is up. It measures capacity; its latencies are those of a
saturated server.

Open loop: arrivals are scheduled at a fixed rate whether or not earlier
requests came back; each latency runs from the *scheduled* send time, so a
stalled server is charged for the requests it kept waiting (no coordinated
omission). Arrivals that find ``max_outstanding`` requests in flight are not
sent and are counted as errors (``missed``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp

from .core import Context, Result
from .procs import CpuMeter

REQUEST_TIMEOUT = 10.0  # seconds; a request that takes longer is an error
ERROR_SAMPLES = 5  # first few error responses kept verbatim, to say what went wrong

now = time.perf_counter


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    expect: frozenset[int] = frozenset({200})
    check: Callable[[bytes], bool] | None = None  # judges the body of an expected status


RequestFactory = Callable[[int], Request]


@dataclass
class LoadStats:
    """What one load run saw; latencies in seconds."""

    mode: str
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    target_rate: float | None = None
    last_done: float = 0.0
    fixed_percentiles: dict[int, float] | None = None  # ms by percentile, when only those are known (wrk)
    answered: int | None = None  # requests answered, when latencies are not kept one by one (wrk)
    unanswered: int = 0  # open loop: scheduled requests never sent or never answered (slower than any answer)

    def add(self, latency: float, outcome: str, ok: bool, sample: str | None) -> None:
        self.latencies.append(latency)
        self.statuses[outcome] += 1
        self.last_done = max(self.last_done, now())
        if ok:
            self.ok += 1
            return
        self.errors += 1
        if sample is not None and len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(sample)

    def add_unsent(self, outcome: str) -> None:
        self.statuses[outcome] += 1
        self.errors += 1
        if self.mode == "open":
            self.unanswered += 1

    @property
    def rps(self) -> float:
        """Successful responses per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of all answered requests, in milliseconds."""
        if self.fixed_percentiles is not None:
            return self.fixed_percentiles.get(round(q), float("nan"))
        total = len(self.latencies) + self.unanswered
        if not total:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(0, min(total - 1, round(q / 100 * total) - 1))
        # An open loop's unanswered requests rank above every answer: a run that left 2 % of its
        # schedule unanswered has no p99 (infinite), not the p99 of the rest.
        return ordered[rank] * 1000 if rank < len(ordered) else float("inf")

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mode": self.mode,
            "seconds": round(self.elapsed, 3),
            "requests": self.answered if self.answered is not None else len(self.latencies),
            "ok": self.ok,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(self.percentile_ms(100) if self.fixed_percentiles is not None
                            else max(self.latencies, default=float("nan")) * 1000, 3),
        }
        if self.target_rate is not None:
            out["target_rate"] = round(self.target_rate, 1)
        if self.error_samples:
            out["error_samples"] = self.error_samples
        return out


def make_session(concurrency: int) -> aiohttp.ClientSession:
    """The one client session of a measurement: at most ``concurrency`` connections."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def _send(session: aiohttp.ClientSession, req: Request) -> tuple[str, bool, str | None]:
    """Send one request; return (outcome, ok, error sample or None)."""
    try:
        async with session.request(req.method, req.url, data=req.body, headers=req.headers) as resp:
            body = await resp.read()
            status = resp.status
    except asyncio.TimeoutError:
        return "timeout", False, f"{req.method} {req.url}: timeout"
    except aiohttp.ClientError as exc:
        name = type(exc).__name__
        return name, False, f"{req.method} {req.url}: {name}: {exc}"
    if status not in req.expect:
        return str(status), False, f"{req.method} {req.url} -> {status}: {body[:300]!r}"
    if req.check is not None and not req.check(body):
        return f"{status}:bad_body", False, f"{req.method} {req.url} -> {status} refused body: {body[:300]!r}"
    return str(status), True, None


async def closed_loop(
    session: aiohttp.ClientSession,
    factory: RequestFactory,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.0,
) -> LoadStats:
    """``concurrency`` users send back to back for ``warmup + duration`` seconds."""
    stats = LoadStats("closed")
    seq = itertools.count()
    t_measure = now() + warmup
    t_end = t_measure + duration

    async def user() -> None:
        while (t0 := now()) < t_end:
            outcome, ok, sample = await _send(session, factory(next(seq)))
            if t0 >= t_measure:
                stats.add(now() - t0, outcome, ok, sample)

    async with asyncio.timeout(warmup + duration + REQUEST_TIMEOUT + 5):
        await asyncio.gather(*(user() for _ in range(concurrency)))
    stats.elapsed = max(stats.last_done, t_end) - t_measure
    return stats


async def open_loop(
    session: aiohttp.ClientSession,
    factory: RequestFactory,
    *,
    rate: float,
    duration: float,
    warmup: float = 0.0,
    max_outstanding: int = 1000,
) -> LoadStats:
    """Send at ``rate`` requests/s for ``warmup + duration`` seconds; latency from the scheduled time."""
    if rate <= 0:
        raise ValueError("open-loop rate must be positive")
    stats = LoadStats("open", target_rate=rate)
    interval = 1.0 / rate
    start = now()
    t_measure = start + warmup
    t_end = t_measure + duration
    in_flight: dict[asyncio.Task[None], bool] = {}  # task -> counted in the measurement

    async def one(i: int, t_sched: float, measured: bool) -> None:
        outcome, ok, sample = await _send(session, factory(i))
        if measured:
            stats.add(now() - t_sched, outcome, ok, sample)

    try:
        for i in itertools.count():
            t_sched = start + i * interval
            if t_sched >= t_end:
                break
            delay = t_sched - now()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses in
            measured = t_sched >= t_measure
            if len(in_flight) >= max_outstanding:
                if measured:
                    stats.add_unsent("missed")
                continue
            task = asyncio.create_task(one(i, t_sched, measured))
            in_flight[task] = measured
            task.add_done_callback(in_flight.pop)
        if in_flight:
            await asyncio.wait(list(in_flight), timeout=REQUEST_TIMEOUT + 1)
    finally:
        unfinished = [task for task in in_flight if not task.done()]
        for task in unfinished:
            task.cancel()
            if in_flight[task]:
                stats.add_unsent("unfinished")
        if unfinished:
            await asyncio.wait(unfinished, timeout=5)
    stats.elapsed = max(stats.last_done, t_end) - t_measure
    return stats


@contextmanager
def _pinned(cores: Sequence[int]) -> Iterator[None]:
    """Pin this thread (the aiohttp driver's event loop) to ``cores`` for the block."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class WrkScript:
    """A fixed cycle of requests written once as a wrk script (benchmarks/wrk.py), run as often as wanted."""

    def __init__(self, ctx: Context, name: str, factory: RequestFactory, cycle: int, needle: bytes | None) -> None:
        from . import wrk

        requests = [factory(i) for i in range(cycle)]
        self.ctx = ctx
        self.path = ctx.workdir / f"{name}.lua"
        self.url = "/".join(requests[0].url.split("/", 3)[:3])
        self.expect = requests[0].expect
        wrk.write_script(self.path, requests, needle)

    async def measure(self, server_pid: int | None, *, duration: float, warmup: float) -> tuple[LoadStats, dict[str, float]]:
        """warmup seconds of uncounted load, then duration seconds measured: the run's stats and the
        CPU it cost (CpuMeter.read: cores and µs per answered request of client, server tree, PostgreSQL)."""
        from . import wrk

        ctx = self.ctx
        if warmup > 0:
            await wrk.run(ctx.wrk, self.path, self.url, concurrency=ctx.concurrency, duration=warmup,
                          cores=ctx.client_cores, expect=self.expect)
        meter = CpuMeter(server_pid, ctx.pg_pid)
        stats, client_cpu = await wrk.run(ctx.wrk, self.path, self.url, concurrency=ctx.concurrency,
                                          duration=duration, cores=ctx.client_cores, expect=self.expect)
        return stats, meter.read(stats.ok, client_seconds=client_cpu)


async def measure(
    ctx: Context,
    name: str,
    factory: RequestFactory,
    *,
    ceiling: str | None = None,
    server_pid: int | None = None,
    cycle: int | None = None,
    needle: bytes | None = None,
) -> tuple[list[Result], LoadStats]:
    """Closed-loop rps as ``name`` (plus ``name.open`` p99 when the run asks for open loop).

    ``cycle``: the factory repeats with this period, so wrk can send the same
    requests from a script (``needle``: a substring every expected answer holds,
    wrk's stand-in for ``Request.check``). Without it, or without wrk, the
    aiohttp driver runs the closed loop. The open loop is always the aiohttp
    driver (wrk has no fixed arrival rate).
    """
    driver = "aiohttp driver"
    if ctx.wrk and cycle:
        script = WrkScript(ctx, name, factory, cycle, needle)
        closed, usage = await script.measure(server_pid, duration=ctx.duration, warmup=ctx.warmup)
        driver = ctx.driver
    else:
        async with make_session(ctx.concurrency) as session:
            with _pinned(ctx.client_cores):
                meter = CpuMeter(server_pid, ctx.pg_pid)
                closed = await closed_loop(
                    session, factory, concurrency=ctx.concurrency, duration=ctx.duration, warmup=ctx.warmup
                )
                usage = meter.read(closed.ok)
        if ctx.wrk is None and cycle:
            driver = ctx.driver
    pinned = f"server on cpu {','.join(map(str, ctx.server_cores))}, load on cpu " \
             f"{','.join(map(str, ctx.client_cores))}" if ctx.server_cores else "not pinned"
    details = {**closed.summary(), "concurrency": ctx.concurrency, **usage, "driver": driver, "pinning": pinned}
    results = [Result(name, closed.rps, "req/s", ceiling, details)]

    rate = ctx.open_rate or (ctx.open_fraction * closed.rps if ctx.open_fraction else None)
    if rate:
        with _pinned(ctx.client_cores):
            meter = CpuMeter(server_pid, ctx.pg_pid)
            if cycle:  # the requests repeat: the raw driver sends them (rawload), cheap enough to keep its schedule
                from . import rawload

                opened = await rawload.open_loop(factory, cycle=cycle, rate=rate, duration=ctx.duration,
                                                 warmup=ctx.warmup, connections=ctx.concurrency,
                                                 max_outstanding=max(1000, 10 * ctx.concurrency))
                open_driver = "raw asyncio driver (open loop)"
            else:
                async with make_session(ctx.concurrency) as session:
                    opened = await open_loop(session, factory, rate=rate, duration=ctx.duration, warmup=ctx.warmup,
                                             max_outstanding=max(1000, 10 * ctx.concurrency))
                open_driver = "aiohttp driver (open loop)"
            usage = meter.read(opened.ok)
        details = {**opened.summary(), **usage, "driver": open_driver, "pinning": pinned}
        results.append(Result(f"{name}.open", opened.percentile_ms(99), "ms p99", None, details))
    return results, closed
