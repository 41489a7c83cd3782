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


def _tree_cpu_seconds(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class CpuMeter:
    """CPU cores used since creation, by this process (the client) and a server's process tree."""

    def __init__(self, server_pid: int | None = None) -> None:
        self._server_pid = server_pid
        self._wall = time.perf_counter()
        self._client = time.process_time()
        self._server = _tree_cpu_seconds(server_pid) if server_pid else 0.0

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        out = {"client_cpu": round((time.process_time() - self._client) / wall, 2)}
        if self._server_pid:
            out["server_cpu"] = round((_tree_cpu_seconds(self._server_pid) - self._server) / wall, 2)
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
) -> AsyncIterator[Server]:
    """Run ``argv`` as a server on ``port`` for the duration of the block; output goes to a log file.

    ``distinct_pids > 1`` waits until that many different bodies (the bare apps
    answer their pid) came back from ``ready_path``.
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
        )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(proc, url + ready_path, log, timeout, distinct_pids)
        yield Server(url, proc.pid, log)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during the measurement:\n{log_tail(log)}")
    finally:
        _stop(proc, name)
