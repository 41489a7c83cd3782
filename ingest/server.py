"""`serve`: one listening socket, N forked worker processes, dead and hung workers replaced.

The command line has prepared the database by then (durability check, migrations,
partitions, key coverage: ingest.cli); the parent binds the port and forks the
workers, which share the socket and each repeat the durability check, migrations
and partitions as they open their pools. SIGTERM or SIGINT to the parent is passed on; each worker stops
accepting, finishes its requests, commits its queued batches, and exits. A worker that stops
answering for WATCHDOG_TIMEOUT (10 s) is killed and replaced; SIGHUP replaces the workers one at
a time without refusing a request (Supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ingest.settings import Settings, SettingsError

log = logging.getLogger("ingest.server")

SHUTDOWN_TIMEOUT = 8.0  # in-flight requests get this long; the whole stop stays under 10 s
RESPAWN_BACKOFF = (0.1, 5.0)
# The watchdog: a worker beats every BEAT_INTERVAL s; one silent for WATCHDOG_TIMEOUT s is killed and
# replaced (before its first beat, while it imports and starts: START_GRACE s).
BEAT_INTERVAL = 1.0
WATCHDOG_TIMEOUT = 10.0
START_GRACE = 30.0
BEAT, READY = b".", b"R"
# A stopping worker keeps connections it has just accepted this long for their request to arrive.
ACCEPT_DRAIN = 0.3
GC_THRESHOLD = 50_000  # allocations between young-generation collections in a worker (Python: 700)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for every worker to accept on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_worker(settings: Settings, sock: socket.socket, beat_fd: int, key_file: Path | None, policy=None) -> None:
    """Body of a worker process: serve on the inherited socket until told to stop, beating on beat_fd."""
    from aiohttp import web

    from ingest.http.app import create_app

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def say(what: bytes) -> bool:
        try:
            os.write(beat_fd, what)
        except BlockingIOError:  # the supervisor is behind on reading: it has beats enough
            pass
        except OSError:  # the supervisor is gone
            return False
        return True

    def beat() -> None:
        # From the event loop itself: a loop blocked by anything stops the beats, like a stopped process.
        if say(BEAT):
            loop.call_later(BEAT_INTERVAL, beat)

    async def ready(app: web.Application) -> None:
        # What start-up made (modules, the app, pools) lives as long as the worker: frozen, the
        # cyclic collector no longer walks it. And it runs a seventieth as often: requests make
        # many short-lived containers, freed by reference counting long before a collection, and
        # each young collection walks what the requests in flight hold, a few thousand objects,
        # however rarely it runs (an in-process measurement: 50-53 µs of CPU per heartbeat at
        # 50,000 against 64-75 µs at Python's 700). Cyclic garbage waits at most that many allocations.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        say(READY)

    async def serve_until_stopped() -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, handle_signals=False)
        await runner.setup()
        try:
            site = web.SockSite(runner, sock, backlog=2048)
            await site.start()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            # Stop accepting first, then give the connections accepted just before a moment to send
            # their request: aiohttp's shutdown closes a connection that has not sent one yet, and
            # a reload (SIGHUP) must refuse nothing. Requests in progress are then waited for.
            await site.stop()
            await asyncio.sleep(ACCEPT_DRAIN)
        finally:
            await runner.cleanup()

    loop.call_soon(beat)
    app = create_app(settings, key_file=key_file, policy=policy)
    app.on_startup.append(ready)  # after the cleanup contexts' start: pools open, migrations done
    try:
        loop.run_until_complete(serve_until_stopped())
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class Supervisor:
    """Forks workers and keeps N of them alive and answering until asked to stop.

    Each worker writes a beat to its pipe every BEAT_INTERVAL seconds from its event loop, and
    READY once its app has started. A worker silent for WATCHDOG_TIMEOUT seconds (START_GRACE
    before its first beat) is killed (SIGKILL) and replaced: a stopped process and a blocked event
    loop look the same. SIGHUP replaces the workers one at a time: a new worker is started (with
    settings from `reload`, e.g. the key file read again), and only once it is READY is one old
    worker asked to stop (SIGTERM: it finishes its requests); the listening socket stays open in
    this process throughout, so no connection is refused.
    """

    def __init__(self, settings: Settings, sock: socket.socket, metrics_dir: Path, *,
                 key_file: Path | None = None, reload: Callable[[Settings], Settings] | None = None, policy=None) -> None:
        self.settings = settings
        self.policy = policy  # the policy checked at start: every worker enforces it, reloads too
        self.sock = sock
        self.metrics_dir = metrics_dir
        self.key_file = key_file
        self.reload = reload
        self.children: dict[int, float] = {}  # pid -> when started
        self.pipes: dict[int, int] = {}  # pid -> read end of its beat pipe
        self.beats: dict[int, float] = {}  # pid -> last beat heard
        self.ready: set[int] = set()
        self.killed: set[int] = set()  # killed by the watchdog, not yet reaped
        self.retiring: dict[int, float] = {}  # old workers asked to stop by a reload -> when
        self.stopping = False
        self._backoff = RESPAWN_BACKOFF[0]
        self._reload_requested = False
        self._to_replace: list[int] = []
        self._incoming: int | None = None

    def spawn(self) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(r)
                for fd in self.pipes.values():
                    os.close(fd)
                os.set_blocking(w, False)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's (a HUP to the group too)
                _run_worker(self.settings, self.sock, w, self.key_file, self.policy)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                # Skip the parent's atexit handlers (they own the embedded database).
                os._exit(code)
        os.close(w)
        os.set_blocking(r, False)
        self.children[pid] = time.monotonic()
        self.pipes[pid] = r
        log.info("worker started", extra={"worker_pid": pid})
        return pid

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _hup(self, signum, frame) -> None:
        self._reload_requested = True

    def _listen(self, timeout: float) -> None:
        """Read the beats that arrive within timeout."""
        fds = {fd: pid for pid, fd in self.pipes.items()}
        if not fds:
            time.sleep(timeout)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; a signal handler ran
            return
        now = time.monotonic()
        for fd in readable:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if data:
                pid = fds[fd]
                self.beats[pid] = now
                if READY in data:
                    self.ready.add(pid)

    def _watchdog(self) -> None:
        now = time.monotonic()
        for pid, started in list(self.children.items()):
            if pid in self.killed or pid in self.retiring:
                continue
            last = self.beats.get(pid)
            silent = now - (last if last is not None else started)
            if silent > (WATCHDOG_TIMEOUT if last is not None else START_GRACE):
                log.warning("worker stopped answering; killing and replacing it",
                            extra={"worker_pid": pid, "silent_seconds": round(silent, 1)})
                self.killed.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _step_reload(self) -> None:
        """Advance a rolling reload by at most one step."""
        if self._reload_requested and not self._to_replace and self._incoming is None:
            self._reload_requested = False
            if self.reload is not None:
                try:
                    self.settings = self.reload(self.settings)
                except Exception as exc:  # a key file that does not parse (the message names no key): keep the workers
                    log.warning("reload refused: %s", exc)
                    return
            self._to_replace = [pid for pid in self.children if pid not in self.retiring]
            log.info("reloading workers one at a time", extra={"workers": len(self._to_replace)})
        if self._incoming is None and self._to_replace:
            if self.retiring:
                return  # one at a time: the previous old worker has not finished yet
            self._to_replace = [pid for pid in self._to_replace if pid in self.children]
            if self._to_replace:
                self._incoming = self.spawn()
            return
        if self._incoming is not None and self._incoming in self.ready:
            self._incoming = None
            old = self._to_replace.pop(0)
            self.retiring[old] = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGTERM)
            if not self._to_replace:
                log.info("workers reloaded")

    def _retire_overdue(self) -> None:
        for pid, since in self.retiring.items():
            if time.monotonic() - since > SHUTDOWN_TIMEOUT + 1.5:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _forget(self, pid: int) -> None:
        fd = self.pipes.pop(pid, None)
        if fd is not None:
            os.close(fd)
        self.beats.pop(pid, None)
        self.ready.discard(pid)
        self.killed.discard(pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
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
                self._listen(0.05)
                if not self.stopping:
                    self._watchdog()
                    self._step_reload()
                    self._retire_overdue()
                continue
            started = self.children.pop(pid, None)
            if started is None:
                continue
            hung = pid in self.killed
            self._forget(pid)
            _mark_dead(pid)
            if self.retiring.pop(pid, None) is not None or self.stopping:
                continue  # an old worker a reload replaced, or the service is stopping
            log.warning("worker exited; replacing it", extra={"worker_pid": pid, "exit_status": status, "hung": hung})
            lived = time.monotonic() - started
            self._backoff = RESPAWN_BACKOFF[0] if lived > 10 else min(self._backoff * 2, RESPAWN_BACKOFF[1])
            time.sleep(self._backoff)
            if pid == self._incoming:
                self._incoming = None  # the reload's new worker died: the reload's next step starts another
                continue
            if pid in self._to_replace:
                self._to_replace.remove(pid)  # it was to be replaced anyway: this replacement counts
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


def serve(settings: Settings, *, key_file: Path | None = None,
          reload: Callable[[Settings], Settings] | None = None, policy=None) -> int:
    """Bind, fork the workers, supervise. Returns the exit code. key_file: embedded mode's, watched by
    the workers; reload: the settings for the workers a SIGHUP starts; policy: the policy `serve`
    checked at start, which every worker enforces (None: each worker loads TELEMETRY_POLICY)."""
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
    return Supervisor(settings, sock, metrics_dir, key_file=key_file, reload=reload, policy=policy).run()
