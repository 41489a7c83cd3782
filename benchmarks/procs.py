"""Server subprocesses: start in their own process group, wait until ready, always terminate."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process and its reaped children), from /proc/<pid>/stat."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = raw[raw.rindex(b")") + 2:].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        out[int(entry.name)] = (ppid, (utime + stime + cutime + cstime) / _CLK_TCK)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every descendant, live or reaped, read from /proc.

    Reaped children count through their parent's cutime/cstime, so a PostgreSQL
    backend that exited or a worker that was replaced is not lost.
    """
    stats = _proc_stats()
    if pid not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats[current][1]
        todo += children.get(current, [])
    return total


def core_split() -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(server cores, load-generator cores) when this process may use at least two cores, else None.

    The server gets the first allowed core, the load generator the second;
    PostgreSQL is left floating (on a 2-core machine it shares both).
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(allowed) < 2:
        return None
    return (allowed[0],), (allowed[1],)


class CpuMeter:
    """CPU used since creation, by this process (the client), a server's process tree and PostgreSQL's."""

    def __init__(self, server_pid: int | None = None, pg_pid: int | None = None) -> None:
        self._server_pid = server_pid
        self._pg_pid = pg_pid
        self._wall = time.perf_counter()
        self._client = time.process_time()
        self._server = tree_cpu_seconds(server_pid) if server_pid else 0.0
        self._pg = tree_cpu_seconds(pg_pid) if pg_pid else 0.0

    def seconds(self) -> dict[str, float]:
        """CPU seconds since creation: wall, client, server tree, PostgreSQL tree."""
        out = {"wall": time.perf_counter() - self._wall, "client": time.process_time() - self._client}
        if self._server_pid:
            out["server"] = tree_cpu_seconds(self._server_pid) - self._server
        if self._pg_pid:
            out["pg"] = tree_cpu_seconds(self._pg_pid) - self._pg
        return out

    def read(self, requests: int | None = None, client_seconds: float | None = None) -> dict[str, float]:
        """Cores used (and, given the number of requests answered, CPU microseconds per request)."""
        used = self.seconds()
        if client_seconds is not None:
            used["client"] = client_seconds
        wall = used.pop("wall")
        out: dict[str, float] = {}
        for who, secs in used.items():
            out[f"{who}_cpu"] = round(secs / wall, 2)
            if requests:
                out[f"{who}_us_per_req"] = round(secs / requests * 1e6, 1)
        return out


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:port
    pid: int  # process group leader
    log: Path


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM the process group, give it STOP_GRACE seconds to drain, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(pgid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        print(f"{name} still running {STOP_GRACE:.0f}s after SIGTERM: killed", file=sys.stderr)
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)


async def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float, distinct_pids: int
) -> None:
    """Poll ``url`` until it answers 200 (and, when asked, from ``distinct_pids`` worker pids)."""
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    # A fresh connection per probe, so SO_REUSEPORT spreads the probes over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before it was ready:\n{log_tail(log)}")
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        seen.add(body.strip())
                        if len(seen) >= distinct_pids:
                            return
                        continue
                    last_error = f"status {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
    raise RuntimeError(
        f"{url} not ready after {timeout:.0f}s ({last_error}; {len(seen)}/{distinct_pids} workers seen):\n{log_tail(log)}"
    )


@asynccontextmanager
async def server_process(
    argv: Sequence[str],
    *,
    name: str,
    port: int,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/healthz",
    distinct_pids: int = 1,
    timeout: float = 60.0,
    cores: Sequence[int] | None = None,
) -> AsyncIterator[Server]:
    """Run ``argv`` as a server on ``port`` for the duration of the block; output goes to a log file.

    ``distinct_pids > 1`` waits until that many different bodies (the bare apps
    answer their pid) came back from ``ready_path``. ``cores`` pins the server
    (and every process it starts) to those cores.
    """
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(proc, url + ready_path, log, timeout, distinct_pids)
        yield Server(url, proc.pid, log)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during the measurement:\n{log_tail(log)}")
    finally:
        _stop(proc, name)
