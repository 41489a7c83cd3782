"""The one middleware: deadline, errors rendered as RFC 9457 problems, request metrics and the access line."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import secrets
import time

import asyncpg
import orjson
from aiohttp import web

from crypto.errors import CryptoError, KeyError_
from crypto.tokens import role_of
from ingest import deadline
from ingest.errors import (
    Invalid,
    MethodNotAllowed,
    NotFoundProblem,
    Problem,
    TooLarge,
    Unavailable,
)
from ingest.keys import ACCESS_LOG, METRICS, SETTINGS, TOKEN_ID
from ingest.logs import ACCESS
from storage.errors import DatabaseUnavailable

errlog = logging.getLogger("ingest.errors")

PROBLEM_TYPE_BASE = "https://telemetry-ingest.dev/problems/"


def problem_response(p: Problem) -> web.Response:
    """Render a problem document."""
    body = {"type": PROBLEM_TYPE_BASE + p.slug, "title": p.title, "status": p.status, "detail": p.detail}
    if p.extra:
        body.update({k: v for k, v in p.extra.items() if k not in body})
    return web.Response(body=orjson.dumps(body), status=p.status, content_type="application/problem+json", headers=p.headers)


def route_of(request: web.Request) -> str:
    """The matched route template (never the raw path, which may hold ids)."""
    info = request.match_info
    if getattr(info, "http_exception", None) is not None:
        return "other"
    resource = getattr(getattr(info, "route", None), "resource", None)
    return "other" if resource is None else resource.canonical


def error_response(request: web.Request, exc: Exception) -> web.Response:
    """The problem document for a failure: database trouble is 503, never a stack trace. Re-raises
    what is not ours to answer (a 5xx HTTPException, anything unexpected: aiohttp answers 500)."""
    if isinstance(exc, Problem):
        if exc.reason:
            request.app[METRICS].reject(exc.reason)
        return problem_response(exc)
    if isinstance(exc, web.HTTPNotFound):
        return problem_response(NotFoundProblem("no such resource"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = {"Allow": ", ".join(sorted(exc.allowed_methods))}  # RFC 9110: a 405 names the methods the resource allows
        return problem_response(MethodNotAllowed("method not allowed on this resource", headers=allow))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        request.app[METRICS].reject("size")
        return problem_response(TooLarge("body over the limit"))
    if isinstance(exc, asyncpg.DataError):  # a value the database refuses (SQLSTATE class 22): the request's fault
        errlog.warning("value refused by the database on %s: %s", route_of(request), type(exc).__name__)
        request.app[METRICS].reject("validation")
        return problem_response(Invalid("a value was refused by the database"))
    if isinstance(exc, (DatabaseUnavailable, OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        sqlstate = getattr(exc, "sqlstate", None)
        errlog.warning("database trouble on %s: %s %s", route_of(request), type(exc).__name__, sqlstate or "")
        request.app[METRICS].reject("overload")
        retry = str(request.app[SETTINGS].retry_after)
        return problem_response(Unavailable("database unavailable", headers={"Retry-After": retry}))
    if isinstance(exc, KeyError_):  # a key-encryption key this node lacks: the message names its id, never key bytes
        errlog.error("crypto failure on %s: %s", route_of(request), exc)
        retry = str(request.app[SETTINGS].retry_after)
        return problem_response(Unavailable("key material unavailable", headers={"Retry-After": retry}))
    if isinstance(exc, CryptoError):
        errlog.error("crypto failure on %s", route_of(request))
        retry = str(request.app[SETTINGS].retry_after)
        return problem_response(Unavailable("key material unavailable", headers={"Retry-After": retry}))
    if isinstance(exc, web.HTTPException) and exc.status < 500:
        return problem_response(_generic(exc.status, exc.reason))
    raise exc


def _generic(status: int, title: str) -> Problem:
    p = Problem(title)
    p.status, p.slug, p.title = status, "http-" + str(status), title
    return p


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
REQUEST_ID_HEADER = "X-Request-ID"


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID if it is a short plain token, else a fresh random one.

    The id goes into the access log, which holds no identifiers or secrets, so a value
    shaped like one (a UUID such as an install_id, a bearer token, an IP address) is
    replaced too; the id actually used is echoed in the response header.
    """
    given = request.headers.get(REQUEST_ID_HEADER)
    if given and _REQUEST_ID.fullmatch(given) and not _looks_identifying(given):
        return given
    return _fresh_id()


class _RequestIds:
    """Fresh request ids: 16 hex digits of the kernel's random source, as secrets.token_hex(8)
    gives, read for 512 ids at a time instead of one system call per request.

    Random, not counted: an id echoed to a client tells it nothing of other requests (a counter
    would show a worker's request volume and let a client send the id another will get). A
    forked worker starts with an empty buffer, so no two processes hand out the same ids."""

    _BATCH = 512

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._hex = ""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = secrets.token_hex(8 * self._BATCH), 0
        self._at = at + 16
        return self._hex[at:at + 16]


_fresh_id = _RequestIds()


# The form every install_id, agent_id and scan_id travels in. 32 bare hex digits are allowed:
# that is nginx's $request_id, which deploy/ passes on.
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def _looks_identifying(value: str) -> bool:
    if role_of(value) is not None or _UUID.fullmatch(value):
        return True
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_of(request: web.Request) -> str:
    """The method, or OTHER: a client-chosen token never becomes a label or a log value."""
    return request.method if request.method in _METHODS else "OTHER"


@web.middleware
async def middleware(request: web.Request, handler) -> web.StreamResponse:
    """The one middleware: the request's database deadline, every failure answered as a problem
    document (error_response), every request counted and timed by route template and status, and
    its access line (TELEMETRY_ACCESS_LOG)."""
    started = time.perf_counter()
    status = 500
    request_id = request_id_of(request)
    app = request.app
    # From here every wait of this request for the database shares one deadline (ingest.deadline).
    token = deadline.begin(app[SETTINGS].db_timeout)
    try:
        try:
            response = await handler(request)
        except Exception as exc:
            response = error_response(request, exc)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        deadline.end(token)
        elapsed = time.perf_counter() - started
        route = route_of(request)
        method = method_of(request)
        app[METRICS].observe_request(route, method, status, elapsed)
        if app[ACCESS_LOG].wanted(status):
            extra = {"route": route, "method": method, "status": status, "latency_ms": round(elapsed * 1000, 2),
                     "request_id": request_id}
            token_id = request.get(TOKEN_ID)
            if token_id is not None:  # set by ingest.http.auth once a token is known: its id (tid_...), never the token
                extra["token_id"] = token_id
            ACCESS.write(extra)
