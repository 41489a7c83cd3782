"""The service itself, measured against the ceilings of the same run (CONTRACT.md sections 1-4, 8, 9).

- e2e_heartbeats: ``telemetry-ingest serve --workers N`` for each worker count;
  heartbeats/s against http_ceiling.wN.
- e2e_scans: 50 KiB scans sent gzip-compressed at the largest worker count;
  scans/s against http_ceiling.scan50k.wN, MB/s (decoded JSON) against
  db_ceiling.scans.bytes.
- allowlist_filter: parse + filter of the 5,000-entry scan in-process;
  documents/s and MB/s against json_ceiling (parse alone).

Each service run uses the run's PostgreSQL (TELEMETRY_DSN), one master key for
the whole run (TELEMETRY_MASTER_KEY), enrolls fresh installations with a secret
from ``telemetry-ingest enroll-secret create`` (last line of stdout) and
``POST /v1/enroll``, then drives load. If the service is not there, these raise
``Unavailable`` naming what is missing.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from .ceilings import (
    INSTALLATIONS,
    STORED_NEEDLE,
    filter_scan_json,
    heartbeat_requests,
    http_ceiling_name,
    http_scan_ceiling_name,
    rate_of,
    scan_bytes_result,
    stored_answer,
)
from .core import Context, Result, Unavailable, benchmark
from .loadgen import Request, WrkScript, measure
from .payloads import SCAN_UNKNOWN_KEYS, fifty_kib_scans, json_headers
from .procs import Server, free_port, server_process

CLI_TIMEOUT = 60.0  # seconds for one `telemetry-ingest <command>`
STARTUP_TIMEOUT = 60.0  # seconds for `serve` to answer /readyz (migrations included)
AGENTS = 64  # installations that also get an agent, for the scan load
SETUP_CONCURRENCY = 16  # parallel enroll / agent requests

T = TypeVar("T")
R = TypeVar("R")


def service_cli() -> list[str]:
    """argv prefix of the ``telemetry-ingest`` command, or Unavailable if the service is not built."""
    try:
        found = importlib.util.find_spec("ingest.cli")
    except ImportError:
        found = None
    if found is None:
        raise Unavailable("service not found: module ingest.cli (entry point of `telemetry-ingest`) does not exist yet")
    script = Path(sys.executable).with_name("telemetry-ingest")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ingest.cli.main import main; sys.exit(main())"]


@functools.cache
def master_key() -> str:
    """One key-encryption key for the whole run: every service run shares the database."""
    return base64.b64encode(os.urandom(32)).decode()


def service_env(ctx: Context, **settings: str) -> dict[str, str]:
    """The service's environment: the run's database and key, defaults for every other setting."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    return {
        **inherited,
        "TELEMETRY_DSN": ctx.dsn,
        "TELEMETRY_MASTER_KEY": master_key(),
        "TELEMETRY_DATA_DIR": str(ctx.workdir / "service-data"),
        **{f"TELEMETRY_{name.upper()}": value for name, value in settings.items()},
    }


async def run_cli(ctx: Context, *args: str) -> str:
    """Run ``telemetry-ingest <args>`` against the run's database; return its stdout."""
    argv = [*service_cli(), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=service_env(ctx),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"`telemetry-ingest {' '.join(args)}` exited {proc.returncode}: {err.decode()[-1000:]}")
    return out.decode()


async def last_line_secret(ctx: Context, *args: str) -> str:
    """A secret from a command that prints it alone on its last line (CONTRACT.md section 8)."""
    lines = [line.strip() for line in (await run_cli(ctx, *args)).splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"`telemetry-ingest {' '.join(args)}` printed nothing")
    return lines[-1]


@asynccontextmanager
async def service(ctx: Context, workers: int) -> AsyncIterator[Server]:
    """``telemetry-ingest serve --workers N`` on a free port, ready once /readyz answers 200."""
    port = free_port()
    argv = [*service_cli(), "serve", "--workers", str(workers)]
    async with server_process(
        argv,
        name=f"serve-w{workers}",
        port=port,
        workdir=ctx.workdir,
        env=service_env(ctx, host="127.0.0.1", port=str(port), workers=str(workers)),
        ready_path="/readyz",
        timeout=STARTUP_TIMEOUT,
        cores=ctx.server_cores,
    ) as server:
        yield server


WORKER_RSS_TARGET_MIB = 200


class PeakWorkerRss:
    """Samples the resident size of every worker (child) of a serve process on a thread."""

    def __init__(self, pid: int) -> None:
        import threading

        self._pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                for child in psutil.Process(self._pid).children(recursive=True):
                    try:
                        self.peak = max(self.peak, child.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakWorkerRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self, name: str) -> Result:
        return Result(f"{name}.worker_rss_max", self.peak / 2**20, "MiB",
                      details={"note": f"largest worker resident size during the load; target < {WORKER_RSS_TARGET_MIB} MiB"})


@dataclass(frozen=True)
class Installation:
    install_id: str
    token: str


async def _post_json(session: aiohttp.ClientSession, url: str, token: str, doc: dict[str, Any],
                     expect: int) -> dict[str, Any]:
    async with session.post(url, data=orjson.dumps(doc), headers=json_headers(token)) as resp:
        body = await resp.read()
        if resp.status == 404:
            raise Unavailable(f"the service does not have POST {resp.url.path} yet (404)")
        if resp.status != expect:
            raise RuntimeError(f"POST {url} -> {resp.status} (expected {expect}): {body[:300]!r}")
    answer = orjson.loads(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
        raise RuntimeError(f"POST {url} -> {expect} without a token: {body[:300]!r}")
    return answer


async def _for_each(items: list[T], call: Callable[[aiohttp.ClientSession, int, T], Awaitable[R]]) -> list[R]:
    """``call(session, index, item)`` for every item, SETUP_CONCURRENCY at a time."""
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(i: int, item: T) -> R:
            async with gate:
                return await call(session, i, item)

        return await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))


async def enroll(ctx: Context, server: Server, count: int) -> list[Installation]:
    """Enroll ``count`` new installations with one enrollment secret."""
    secret = await last_line_secret(ctx, "enroll-secret", "create")
    if not secret.startswith("tie_"):
        raise RuntimeError(f"`enroll-secret create` last line is not a tie_ secret: {secret[:8]}...")

    async def one(session: aiohttp.ClientSession, i: int, install_id: str) -> Installation:
        answer = await _post_json(session, server.url + "/v1/enroll", secret, {"install_id": install_id}, 201)
        if answer.get("install_id") != install_id:
            raise RuntimeError(f"/v1/enroll answered install_id {answer.get('install_id')!r} for {install_id}")
        return Installation(install_id, answer["token"])

    return await _for_each([str(uuid.uuid4()) for _ in range(count)], one)


async def add_agents(server: Server, installations: list[Installation]) -> list[str]:
    """One agent per installation; return the agent tokens."""

    async def one(session: aiohttp.ClientSession, i: int, inst: Installation) -> str:
        answer = await _post_json(session, server.url + "/v1/agents", inst.token, {"name": f"bench-agent-{i}"}, 201)
        return answer["token"]

    return await _for_each(installations, one)


@benchmark("e2e_heartbeats", needs=("http_ceiling",))
async def e2e_heartbeats(ctx: Context) -> list[Result]:
    """Heartbeats/s through `telemetry-ingest serve` for each worker count."""
    service_cli()  # fail before anything starts when the service is missing
    results: list[Result] = []
    for workers in ctx.workers:
        async with service(ctx, workers) as srv:
            installations = await enroll(ctx, srv, INSTALLATIONS)
            factory = heartbeat_requests(
                srv.url + "/v1/heartbeats",
                [(inst.install_id, inst.token) for inst in installations],
                200,
                stored_answer,
            )
            with PeakWorkerRss(srv.pid) as rss:
                found, _ = await measure(
                    ctx,
                    f"e2e_heartbeats.w{workers}",
                    factory,
                    ceiling=http_ceiling_name(workers),
                    server_pid=srv.pid,
                    cycle=len(installations),
                    needle=STORED_NEEDLE,
                )
            results += [*found, rss.result(f"e2e_heartbeats.w{workers}")]
    return results


@benchmark("e2e_scans", needs=("http_ceiling", "db_ceiling", "scan_floor"))
async def e2e_scans(ctx: Context) -> list[Result]:
    """50 KiB scans (gzip) through `telemetry-ingest serve` at the largest worker count."""
    service_cli()
    workers = max(ctx.workers)
    scans = fifty_kib_scans()
    name = f"e2e_scans.w{workers}"
    async with service(ctx, workers) as srv:
        installations = await enroll(ctx, srv, AGENTS)
        headers = [json_headers(token, encoding="gzip") for token in await add_agents(srv, installations)]
        url = srv.url + "/v1/scans"

        def factory(i: int) -> Request:
            scan_id = str(uuid.uuid4())
            return Request(
                "POST",
                url,
                scans.body(scan_id),
                headers[i % len(headers)],
                frozenset({201}),
                lambda body: _answers_scan(body, scan_id),
            )

        with PeakWorkerRss(srv.pid) as rss:
            found, closed = await measure(
                ctx, name, factory, ceiling=http_scan_ceiling_name(workers), server_pid=srv.pid
            )
    return [*found, scan_bytes_result(name, closed.rps, scans, "db_ceiling.scans.bytes"), *scan_cpu_result(found[0]),
            rss.result(name)]


def scan_cpu_result(closed: Result) -> list[Result]:
    """The service's CPU per scan (its process tree), whose ratio is the multiple of the scan's library calls
    (``scan_floor.us``): a figure that moves with the code, not with the disk as the MB/s ratio does."""
    if "server_us_per_req" not in closed.details:  # the server's CPU was not read: no figure
        return []
    details = {"pg_us_per_req": closed.details.get("pg_us_per_req"),
               "note": "CPU per scan of the service's process tree; ratio: the multiple of scan_floor.us"}
    return [Result(f"{closed.name}.cpu", closed.details["server_us_per_req"], "µs", "scan_floor.us", details)]


def _answers_scan(body: bytes, scan_id: str) -> bool:
    try:
        return orjson.loads(body).get("scan_id") == scan_id
    except (orjson.JSONDecodeError, AttributeError):
        return False


def scan_filter() -> Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]:
    """The service's compiled allowlist for scan documents (ingest.pipeline.filter, policy.categories)."""
    try:
        from ingest.pipeline.filter import Allowlist
        from policy.categories import SCAN
    except ImportError as exc:
        raise Unavailable(f"allowlist filter not found: {exc}") from None
    return Allowlist(SCAN.root).filter_document


@benchmark("allowlist_filter", needs=("json_ceiling",))
async def allowlist_filter(ctx: Context) -> list[Result]:
    """Parse + allowlist-filter the 5,000-entry scan on one core (a fresh parse each time)."""
    filter_document = scan_filter()
    raw = filter_scan_json()
    _, dropped = filter_document(orjson.loads(raw))
    if not dropped:
        raise RuntimeError(f"the filter dropped nothing from a scan with undeclared keys ({', '.join(SCAN_UNKNOWN_KEYS)})")
    calls, elapsed = rate_of(lambda: filter_document(orjson.loads(raw)), ctx.micro_duration, 4)
    details = {"document_bytes": len(raw), "cores": 1, "seconds": round(elapsed, 3),
               "note": f"{len(raw):,} B document, parse + filter, 1 core"}
    return [
        Result("allowlist_filter.scan5000", calls / elapsed, "docs/s", "json_ceiling.scan5000", details),
        Result("allowlist_filter.scan5000.bytes", calls * len(raw) / elapsed / 1e6, "MB/s",
               "json_ceiling.scan5000.bytes", details),
    ]


PAIRED_ROUNDS = 5
PAIRED_ORDERS = (("bare", "naive", "service"), ("service", "naive", "bare"))


@benchmark("e2e_paired")
async def e2e_paired(ctx: Context) -> list[Result]:
    """Heartbeats against the bare ceiling and the naive peer, measured in turns (bare, naive, service) x 5.

    The machine's speed drifts on a shared host (the bare ceiling has read from 18,000 to 32,000
    req/s within minutes here), so ratios of measurements a minute apart carry that drift. Here the
    three servers run side by side (idle while another is loaded) and each round loads them one
    after another (bare, naive, service, then the other way round), half of --duration each (at least 3 s, after 1 s of uncounted load); every
    figure is the median of the five rounds' ratios, each taken from measurements seconds apart.
    One worker each (the issue's --workers 1), whatever --workers says.
    Needs wrk (the aiohttp driver cannot load the bare app hard enough to be its ceiling).
    """
    from . import apps
    from .ceilings import (
        NAIVE_DDL,
        NAIVE_STORED_NEEDLE,
        bench_table,
        fake_installations,
        reference_app,
    )

    service_cli()
    if ctx.wrk is None:
        raise Unavailable("e2e_paired needs wrk")
    if ctx.pg_pid is None:
        raise Unavailable("e2e_paired needs PostgreSQL on this machine (its CPU is read from /proc)")
    slice_s = max(3.0, ctx.duration / 2)
    async with bench_table(ctx.dsn, apps.NAIVE_TABLE, NAIVE_DDL), \
            reference_app(ctx, "http", 1) as bare, reference_app(ctx, "naive", 1) as naive, service(ctx, 1) as srv:
        installations = await enroll(ctx, srv, INSTALLATIONS)
        targets = {
            "bare": (bare, heartbeat_requests(bare.url + "/v1/heartbeats", fake_installations(), 204), None),
            "naive": (naive, heartbeat_requests(naive.url + "/v1/heartbeats", fake_installations(), 200), NAIVE_STORED_NEEDLE),
            "service": (srv, heartbeat_requests(srv.url + "/v1/heartbeats",
                                                [(i.install_id, i.token) for i in installations], 200), STORED_NEEDLE),
        }
        scripts = {who: WrkScript(ctx, f"paired-{who}", factory, INSTALLATIONS, needle)
                   for who, (_, factory, needle) in targets.items()}
        rounds: list[dict[str, dict[str, float]]] = []
        for n in range(PAIRED_ROUNDS):
            row = {}
            # What one server leaves PostgreSQL (WAL, autovacuum) lands in the next one's slice, so the
            # server after the naive peer alternates: bare, naive, service, then service, naive, bare.
            # (Turning one order round by round would not do: it keeps who follows whom.)
            for who in PAIRED_ORDERS[n % 2]:
                stats, usage = await scripts[who].measure(targets[who][0].pid, duration=slice_s, warmup=1.0)
                if stats.errors:
                    raise RuntimeError(f"e2e_paired: {who} answered {dict(stats.statuses)}")
                row[who] = {"rps": stats.rps, "server_us": usage.get("server_us_per_req", 0.0),
                            "pg_us": usage.get("pg_us_per_req", 0.0), "p99_ms": stats.percentile_ms(99)}
            rounds.append(row)

    def median_of(f: Callable[[dict[str, dict[str, float]]], float]) -> float:
        values = sorted(f(r) for r in rounds)
        return values[len(values) // 2]

    def total(r: dict[str, float]) -> float:
        return r["server_us"] + r["pg_us"]

    details = {"rounds": rounds, "seconds_per_measurement": slice_s, "driver": ctx.driver,
               "note": f"median of {PAIRED_ROUNDS} rounds (bare, naive, service in turn, each {slice_s:g} s)"}
    figures = [
        ("vs_bare", lambda r: r["service"]["rps"] / r["bare"]["rps"], "x", ">= 0.4"),
        ("vs_naive", lambda r: r["service"]["rps"] / r["naive"]["rps"], "x", ">= 1.5"),
        ("pg_cpu_vs_naive", lambda r: r["service"]["pg_us"] / r["naive"]["pg_us"], "x", "<= 0.25"),
        ("total_cpu_vs_naive", lambda r: total(r["service"]) / total(r["naive"]), "x", "<= 0.5"),
        ("rps", lambda r: r["service"]["rps"], "req/s", ""),
        ("server_us", lambda r: r["service"]["server_us"], "µs/req", ""),
        ("bare_server_us", lambda r: r["bare"]["server_us"], "µs/req", ""),
    ]
    return [Result(f"e2e_paired.w1.{name}", median_of(f), unit, None,
                   {**details, "note": f"{details['note']}; target {target}" if target else details["note"]})
            for name, f, unit, target in figures]
