"""One database deadline per request (TELEMETRY_DB_TIMEOUT), shared by everything it waits for.

The middleware (ingest.http.middleware) sets it when a request arrives; every wait of that request for the
database reads it (token lookup, data-key load, the commit of a heartbeat or scan, the statements
of every other route), so together they take at most TELEMETRY_DB_TIMEOUT, not that much each.
Time the request spends receiving its body, or preparing it on the CPU (`not_counted`), is the
client's and the worker's, not the database's: it moves the deadline back by as much, so a large
scan on a slow link is not refused for its size. Outside a request (the sweeper, the command line,
the revocation follower) there is no deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar, Token

from aiohttp import web

from ingest.keys import POOL, SETTINGS
from storage.pool import acquire_until


class _Deadline:
    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at  # event-loop time


_current: ContextVar[_Deadline | None] = ContextVar("db_deadline", default=None)


def begin(timeout: float) -> Token:
    """Start the current request's deadline, timeout seconds from now; hand the token to `end`."""
    return _current.set(_Deadline(asyncio.get_running_loop().time() + timeout))


def end(token: Token) -> None:
    """Forget the request's deadline (the next request on this connection gets its own)."""
    _current.reset(token)


def current(fallback: float | None = None) -> float | None:
    """The current request's deadline (event-loop time); outside a request, fallback seconds from now (None: no bound)."""
    d = _current.get()
    if d is not None:
        return d.at
    return None if fallback is None else asyncio.get_running_loop().time() + fallback


class not_counted:
    """A block (receiving or preparing a body) whose time does not count against the request's deadline.

    A class rather than a generator context manager: it is entered on every request's hot path."""

    __slots__ = ("_d", "_started")

    def __enter__(self) -> None:
        self._d = d = _current.get()
        if d is not None:
            self._started = time.monotonic()  # the loop's clock is monotonic too; only the difference is used

    def __exit__(self, *exc: object) -> None:
        d = self._d
        if d is not None:
            d.at += time.monotonic() - self._started


def connection(app: web.Application, extra: float = 0.0, *, pool: web.AppKey = POOL) -> contextlib.AbstractAsyncContextManager:
    """A connection of the app's `pool` (the data database's, or KEYSTORE_POOL) for the request's
    database work, acquiring included, done by its deadline (plus extra seconds); TimeoutError
    (answered 503) otherwise."""
    at = current(app[SETTINGS].db_timeout)
    return acquire_until(app[pool], None if at is None else at + extra)
