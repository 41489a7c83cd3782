"""`serve`: one listening socket, N forked worker processes, dead workers replaced.

The command line has prepared the database by then (durability check, migrations,
partitions, key coverage: ingest.cli); the parent binds the port and forks the
workers, which share the socket and each repeat the durability check, migrations
and partitions as they open their pools. SIGTERM or SIGINT to the parent is passed on; each worker stops
accepting, finishes its requests, commits its queued batches, and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from ingest.settings import Settings, SettingsError

log = logging.getLogger("ingest.server")

SHUTDOWN_TIMEOUT = 8.0  # in-flight requests get this long; the whole stop stays under 10 s
RESPAWN_BACKOFF = (0.1, 5.0)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for every worker to accept on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_worker(settings: Settings, sock: socket.socket) -> None:
    """Body of a worker process: serve on the inherited socket until told to stop."""
    from aiohttp import web

    from ingest.app import create_app

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        create_app(settings), sock=sock, access_log=None, print=None, loop=loop,
        shutdown_timeout=SHUTDOWN_TIMEOUT, handle_signals=True, backlog=2048,
    )


class Supervisor:
    """Forks workers and keeps N of them alive until asked to stop."""

    def __init__(self, settings: Settings, sock: socket.socket, metrics_dir: Path) -> None:
        self.settings = settings
        self.sock = sock
        self.metrics_dir = metrics_dir
        self.children: dict[int, float] = {}
        self.stopping = False
        self._backoff = RESPAWN_BACKOFF[0]

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _run_worker(self.settings, self.sock)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                # Skip the parent's atexit handlers (they own the embedded database).
                os._exit(code)
        self.children[pid] = time.monotonic()
        log.info("worker started", extra={"worker_pid": pid})

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self.settings.workers):
            self.spawn()
        deadline = None
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if self.stopping and deadline is None:
                    deadline = time.monotonic() + SHUTDOWN_TIMEOUT + 1.5
                if deadline is not None and time.monotonic() > deadline:
                    for child in self.children:
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.05)
                continue
            started = self.children.pop(pid, None)
            if started is None:
                continue
            _mark_dead(pid)
            if self.stopping:
                continue
            log.warning("worker exited; replacing it", extra={"worker_pid": pid, "exit_status": status})
            lived = time.monotonic() - started
            self._backoff = RESPAWN_BACKOFF[0] if lived > 10 else min(self._backoff * 2, RESPAWN_BACKOFF[1])
            time.sleep(self._backoff)
            if not self.stopping:
                self.spawn()
        return 0


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def prepare_metrics_dir(data_dir: Path) -> Path:
    """An empty directory for prometheus-client's multiprocess files, exported before it is imported."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or (data_dir / "metrics")).resolve()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    if "prometheus_client" in sys.modules:  # pragma: no cover - a programming error
        raise RuntimeError("prometheus_client imported before the multiprocess directory was set")
    return path


def serve(settings: Settings) -> int:
    """Bind, fork the workers, supervise. Returns the exit code."""
    # A setting the operating system refuses ends in one line naming it, like any bad value.
    try:
        metrics_dir = prepare_metrics_dir(settings.data_dir)
    except OSError as exc:
        raise SettingsError(f"TELEMETRY_DATA_DIR: cannot make the metrics directory in {settings.data_dir}: {exc.strerror}") from None
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        raise SettingsError(f"TELEMETRY_HOST / TELEMETRY_PORT: cannot listen on {settings.host} port {settings.port}: "
                            f"{exc.strerror or type(exc).__name__}") from None
    log.info("listening", extra={"host": settings.host, "port": sock.getsockname()[1], "workers": settings.workers})
    print(f"telemetry-ingest listening on http://{settings.host}:{sock.getsockname()[1]} with {settings.workers} worker(s)", file=sys.stderr, flush=True)
    return Supervisor(settings, sock, metrics_dir).run()
