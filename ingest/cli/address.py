"""Where the running `serve` listens: `<data dir>/serve.json`, written at start and removed at exit.

    {"url": "http://127.0.0.1:8080", "host": "127.0.0.1", "port": 8080, "pid": 4242}

`demo` and `send` without `--url` read it (CONTRACT 8). A file whose pid is no longer a
running process (serve was killed) counts as absent. With `--port 0` (an ephemeral port,
tests only) no file is written: the port is known only to the supervisor, after binding.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path

from ingest.settings import Settings

FILE = "serve.json"


def path(settings: Settings) -> Path:
    return settings.data_dir / FILE


def url_of(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a service listening on host:port."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def write(settings: Settings) -> bool:
    """Record the listen address (atomically); False when the port is not known yet (port 0)."""
    if not settings.port:
        return False
    target = path(settings)
    tmp = target.with_name(f".{FILE}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"url": url_of(settings.host, settings.port), "host": settings.host,
                                   "port": settings.port, "pid": os.getpid()}) + "\n")
        os.replace(tmp, target)
    except OSError:
        return False  # an unusable data directory: serve itself stops on it next, with one line naming it
    return True


def remove(settings: Settings) -> None:
    """Remove the file if it is still this process's."""
    try:
        if json.loads(path(settings).read_text()).get("pid") == os.getpid():
            path(settings).unlink()
    except (OSError, ValueError):
        pass


def running_url(settings: Settings) -> str:
    """The running serve's URL from the data directory; CliError naming the file when there is none."""
    from ingest.cli.context import CliError

    target = path(settings).resolve()
    try:
        info = json.loads(target.read_text())
        url, pid = str(info["url"]), int(info["pid"])
    except FileNotFoundError:
        raise CliError(f"no running serve found: {target} does not exist (start `telemetry-ingest serve`, or give --url)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"{target} is not a serve address file (delete it, or give --url)") from None
    if not _alive(pid):
        raise CliError(f"no running serve found: {target} names process {pid}, which has exited (start serve, or give --url)")
    return url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def listening(url: str, timeout: float = 3.0) -> bool:
    """Whether anything accepts a TCP connection at the URL's host and port (no retry)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
