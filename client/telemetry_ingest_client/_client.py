"""The synchronous Client: HTTP with urllib from the standard library, retries, the optional disk spool.

Retries: a request is tried up to `Backoff.attempts` times when the service answers
408, 429 or 5xx or cannot be reached, waiting `Backoff.delay` in between: exponential
backoff with full jitter, never earlier than the answer's Retry-After (a Retry-After
longer than `Backoff.max_retry_after` ends the attempts: a spooled record stays spooled).
Any other answer is final: 2xx is success; any other 4xx (or a 3xx: redirects are not
followed) raises `Rejected` and is never retried. A TLS certificate that does not verify
raises `CertificateError` at once: waiting does not make a certificate valid. Enrolling and
creating an agent are not idempotent, so those two are resent only when the service cannot
have acted on them (connection refused, 408, 429, 503).

Spool: with `spool_dir`, each heartbeat, scan or record is first written to
`<spool_dir>/<time_ns, 20 digits>-<8 hex>.json` as
`{"v": 1, "kind": "heartbeat"|"scan"|"record", "category": ..., "body": ...}` (mode 0600,
written to a dot-prefixed temporary name, fsynced, renamed, directory fsynced), then
`flush_spool()` sends every record in name order and deletes each only after a 2xx.
A 4xx other than 401, 408 and 429 deletes the record and keeps only the service's answer
in `rejected/<name>.answer.json` (kind, status, problem document, request id; never the
body): resending cannot help, and a refused body may hold exactly what the policy forbids
keeping (an undeclared field, an e-mail in a plaintext field), so it must not outlive the
refusal. Bodies an older client left in `rejected/` are deleted at the next flush. A 401, a
redirect or a certificate error stops the flush and keeps the records: the token, URL or
trust is wrong, not the data. An unreachable service stops the flush; the rest waits for
the next one. Delivery is at least once: a scan sent twice is stored once (same scan_id
and content: 200); a heartbeat may be recorded twice. One flush at a time per spool
directory (an advisory lock on `.lock`, and a lock within the process).

The spool holds payloads in plaintext on the sending machine until delivered. Tokens are
never written to it.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

log = logging.getLogger("telemetry_ingest_client")

SPOOL_VERSION = 1
REJECTED_DIR = "rejected"
ANSWER_SUFFIX = ".answer.json"
KINDS = ("heartbeat", "scan", "record")
GZIPPED = frozenset({"scan"})  # scans are large and compress well; the service takes gzip bodies


class ClientError(Exception):
    """The base of this package's errors."""


class Answer(dict[str, Any]):
    """The service's answer: its JSON body as a dict, plus `.status` and `.request_id`."""

    def __init__(self, status: int, body: Any = None, request_id: str | None = None) -> None:
        super().__init__(body if isinstance(body, dict) else {})
        self.status = status
        self.request_id = request_id
        self.raw = body  # the body as parsed: a dict, a str for a non-JSON body, None when empty

    def __repr__(self) -> str:
        return f"Answer({self.status}, {dict.__repr__(self)})"


class Rejected(ClientError):
    """A final error answer (4xx other than 408 and 429, or a 3xx): resending it cannot help."""

    def __init__(self, answer: Answer, path: Path | None = None) -> None:
        super().__init__(f"{answer.status} {answer.get('title', '')}: {answer.get('detail', '')}".strip(": "))
        self.answer = answer
        self.status = answer.status
        self.path = path  # for a spooled record: the answer file kept in rejected/ (the record is deleted)


class CertificateError(ClientError):
    """The service's TLS certificate did not verify (against `ca_bundle`, or the system's CAs). Never retried."""


class Unreachable(ClientError):
    """No final answer: the service could not be reached, or kept answering 429/5xx, through every attempt."""


class Spooled(Unreachable):
    """Not delivered yet, but safe in the spool: a later `flush_spool()` (here or after a restart) sends it."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class Backoff:
    """How often and how long to retry."""

    attempts: int = 6  # tries per request, the first included
    base: float = 0.5  # seconds; the jitter ceiling doubles from here on each retry...
    cap: float = 30.0  # ...up to this
    max_retry_after: float = 300.0  # a longer Retry-After ends the attempts (a spooled record stays spooled)

    def delay(self, retry: int, retry_after: float | None = None,
              uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): full jitter, added to Retry-After if given."""
        ceiling = min(self.cap, self.base * 2 ** (retry - 1))
        return (retry_after or 0.0) + uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None if absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _retryable(status: int) -> bool:
    # 408: the service gave up waiting for the body; 429: too fast; 5xx: overloaded, or a proxy without its upstream.
    return status in (408, 429) or status >= 500


_NOT_APPLIED = (408, 429, 503)  # answers saying the request was not acted on: safe to resend even if not idempotent


@dataclass
class FlushReport:
    """What one `flush_spool()` did."""

    delivered: list[tuple[str, Answer]] = field(default_factory=list)  # (record name, answer), in order
    rejected: list[tuple[str, Answer]] = field(default_factory=list)
    remaining: int = 0  # records still spooled
    stopped_by: ClientError | None = None  # why the flush ended before the spool was empty
    busy: bool = False  # another flush holds this spool; nothing was sent


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx becomes the final answer: the URL is wrong, and a token must not follow a redirect


def _endpoint(kind: str, category: str | None) -> str:
    if kind == "heartbeat":
        return "/v1/heartbeats"
    if kind == "scan":
        return "/v1/scans"
    return "/v1/records/" + urllib.parse.quote(category or "", safe="")


class Client:
    """A synchronous client of the telemetry service for one token (installation or agent); thread-safe."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        backoff: Backoff = Backoff(),
        timeout: float = 60.0,
        sleep: Callable[[float], Any] = time.sleep,
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must be an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.token = token
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.backoff = backoff
        self.timeout = timeout
        self._sleep = sleep
        self._uniform = uniform
        self._clock = clock
        context = ssl.create_default_context(cafile=os.fspath(ca_bundle) if ca_bundle is not None else None)
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
        self._flush_lock = threading.Lock()
        self._name_lock = threading.Lock()
        self._last_ns = 0
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.spool_dir / REJECTED_DIR).mkdir(exist_ok=True, mode=0o700)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (a connection per request); here so both clients read alike."""

    # ------------------------------------------------------------ the API

    def enroll(self, secret: str, install_id: uuid.UUID | str | None = None) -> str:
        """Enroll an installation with an enrollment secret; returns the installation token."""
        install_id = str(install_id or uuid.uuid4())
        answer = self.request("POST", "/v1/enroll", {"install_id": install_id}, token=secret, idempotent=False)
        return str(answer["token"])

    def heartbeat(self, body: Mapping[str, Any]) -> Answer:
        """Send a heartbeat (through the spool, if there is one); the service's answer."""
        return self._deliver("heartbeat", None, dict(body))

    def create_agent(self, name: str) -> Answer:
        """Create an agent of this installation: `{"agent_id", "token"}` (its token is for another Client)."""
        return self.request("POST", "/v1/agents", {"name": name}, idempotent=False)

    def delete_agent(self, agent_id: uuid.UUID | str) -> None:
        """Delete an agent of this installation; its token stops working at once."""
        self.request("DELETE", f"/v1/agents/{urllib.parse.quote(str(agent_id), safe='')}")

    def settings(self, scan_retention_hours: int) -> Answer:
        """Set this installation's scan retention (1..720 hours); the settings now in force."""
        return self.request("PUT", "/v1/installation/settings", {"scan_retention_hours": scan_retention_hours})

    def scan(self, body: Mapping[str, Any]) -> Answer:
        """Upload a scan, gzipped; a scan_id is added if missing, once, so every retry is the same upload."""
        body = dict(body)
        if "scan_id" not in body:
            body = {"scan_id": str(uuid.uuid4()), **body}
        return self._deliver("scan", None, body)

    def record(self, category: str, body: Mapping[str, Any]) -> Answer:
        """Send a record of a policy category: `POST /v1/records/{category}`."""
        return self._deliver("record", category, dict(body))

    # ------------------------------------------------------------ the spool

    def spool(self, kind: str, body: Mapping[str, Any], category: str | None = None) -> Path:
        """Write one record durably to the spool; returns its path."""
        if self.spool_dir is None:
            raise ValueError("this client has no spool_dir")
        if kind not in KINDS or (kind == "record") != (category is not None):
            raise ValueError(f"unknown record kind {kind!r} (a record needs its category, the others none)")
        record: dict[str, Any] = {"v": SPOOL_VERSION, "kind": kind, "body": dict(body)}
        if category is not None:
            record["category"] = category
        data = json.dumps(record, separators=(",", ":")).encode()
        with self._name_lock:  # names sort in the order records were spooled, strictly increasing here
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            name = f"{self._last_ns:020d}-{secrets.token_hex(4)}.json"
        tmp = self.spool_dir / f".tmp-{name}"
        _write_file(tmp, data, exclusive=True)
        final = self.spool_dir / name
        os.rename(tmp, final)
        _fsync_dir(self.spool_dir)
        return final

    def pending(self) -> list[Path]:
        """The spooled records, oldest first."""
        if self.spool_dir is None:
            return []
        return sorted(p for p in self.spool_dir.glob("*.json") if not p.name.startswith("."))

    def flush_spool(self) -> FlushReport:
        """Send every spooled record in order; delete each after a 2xx; keep only the answer to one refused for good."""
        report = FlushReport()
        if self.spool_dir is None:
            return report
        if not self._flush_lock.acquire(blocking=False):
            report.busy, report.remaining = True, len(self.pending())
            return report
        try:
            with _DirLock(self.spool_dir / ".lock") as held:
                if not held:
                    report.busy, report.remaining = True, len(self.pending())
                    return report
                _purge_rejected_bodies(self.spool_dir / REJECTED_DIR)
                queue = self.pending()
                for i, path in enumerate(queue):
                    try:
                        kind, category, body = _read_record(path)
                    except ValueError as exc:
                        answer = Answer(0, {"title": "unreadable spool record", "detail": str(exc)})
                        _set_aside(path, answer, "unknown", None)
                        report.rejected.append((path.name, answer))
                        continue
                    try:
                        answer = self.request("POST", _endpoint(kind, category), body, gzipped=kind in GZIPPED)
                    except Rejected as exc:
                        if exc.status == 401 or not 400 <= exc.status < 500:
                            # This client's token or URL is wrong, not the record: keep it for a good one.
                            report.stopped_by, report.remaining = exc, len(queue) - i
                            break
                        _set_aside(path, exc.answer, kind, category)
                        report.rejected.append((path.name, exc.answer))
                        continue
                    except (Unreachable, CertificateError) as exc:
                        report.stopped_by, report.remaining = exc, len(queue) - i
                        break
                    _remove(path)
                    report.delivered.append((path.name, answer))
        finally:
            self._flush_lock.release()
        return report

    # ------------------------------------------------------------ sending

    def _deliver(self, kind: str, category: str | None, body: dict[str, Any]) -> Answer:
        if self.spool_dir is None:
            return self.request("POST", _endpoint(kind, category), body, gzipped=kind in GZIPPED)
        path = self.spool(kind, body, category)
        report = self.flush_spool()
        for name, answer in report.delivered:
            if name == path.name:
                return answer
        for name, answer in report.rejected:
            if name == path.name:
                raise Rejected(answer, _answer_path(path))
        if isinstance(report.stopped_by, CertificateError):
            raise report.stopped_by
        reason = "another flush of this spool is running" if report.busy else str(report.stopped_by)
        raise Spooled(f"not delivered yet ({reason}); kept in the spool", path)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                gzipped: bool = False, idempotent: bool = True) -> Answer:
        """One request with retries: the final 2xx answer, or Rejected, Unreachable or CertificateError."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = {"X-Request-ID": secrets.token_hex(8), "User-Agent": f"telemetry-ingest-client/{__version__}",
                   "Accept": "application/json"}
        bearer = token or self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if data is not None:
            headers["Content-Type"] = "application/json"
            if gzipped:
                data = gzip.compress(data, mtime=0)
                headers["Content-Encoding"] = "gzip"
        url = self.url + path
        retry = 0
        while True:
            answer, retry_after, reason = self._once(method, url, data, headers, idempotent)
            if answer is not None:
                if 200 <= answer.status < 300:
                    return answer
                if not _retryable(answer.status):
                    raise Rejected(answer)
                if not idempotent and answer.status not in _NOT_APPLIED:
                    raise Unreachable(f"{method} {path}: {answer.status}; it may or may not have been applied")
            retry += 1
            if retry >= self.backoff.attempts:
                raise Unreachable(f"{method} {path}: {reason}, after {retry} attempts")
            if retry_after is not None and retry_after > self.backoff.max_retry_after:
                raise Unreachable(f"{method} {path}: {reason}; asked to wait {retry_after:.0f} s")
            delay = self.backoff.delay(retry, retry_after, self._uniform)
            log.warning("%s %s: %s; retry %d in %.2f s", method, path, reason, retry, delay)
            self._sleep(delay)

    def _once(self, method: str, url: str, data: bytes | None, headers: dict[str, str],
              idempotent: bool) -> tuple[Answer | None, float | None, str]:
        """One attempt: (answer or None, Retry-After seconds, why it would be retried)."""
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return self._answer(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:  # any non-2xx answer: a complete answer all the same
            with exc:
                return self._answer(exc.code, exc.headers, exc.read())
        except urllib.error.URLError as exc:
            cause = exc.reason
            if isinstance(cause, ssl.SSLCertVerificationError) or isinstance(exc, ssl.CertificateError):
                raise CertificateError(f"{url}: the TLS certificate does not verify: {cause}") from None
            if isinstance(cause, (ConnectionRefusedError, socket.gaierror)):  # never reached it: always safe to resend
                return None, None, f"cannot connect ({type(cause).__name__})"
            return self._no_answer(method, url, cause, idempotent)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(f"{url}: the TLS certificate does not verify: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            return self._no_answer(method, url, exc, idempotent)

    def _answer(self, status: int, headers: Any, raw: bytes) -> tuple[Answer, float | None, str]:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        retry_after = parse_retry_after(headers.get("Retry-After"), self._clock())
        return Answer(status, body, headers.get("X-Request-ID")), retry_after, f"{status} from the service"

    @staticmethod
    def _no_answer(method: str, url: str, exc: object, idempotent: bool) -> tuple[None, None, str]:
        if not idempotent:  # the service may have acted on it; resending could act twice
            raise Unreachable(f"{method} {url}: no answer ({type(exc).__name__}); it may or may not have been applied")
        return None, None, f"no answer ({type(exc).__name__})"


# ---------------------------------------------------------------- spool files


def _write_file(path: Path, data: bytes, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_record(path: Path) -> tuple[str, str | None, dict[str, Any]]:
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path.name}: {exc}") from None
    if (not isinstance(record, dict) or record.get("v") != SPOOL_VERSION or record.get("kind") not in KINDS
            or not isinstance(record.get("body"), dict)
            or (record["kind"] == "record") != isinstance(record.get("category"), str)):
        raise ValueError(f"{path.name} is not a version {SPOOL_VERSION} spool record")
    return record["kind"], record.get("category"), record["body"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a delivered record, durably (so a crash cannot bring it back to be sent again)."""
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _answer_path(record: Path) -> Path:
    return record.parent / REJECTED_DIR / (record.stem + ANSWER_SUFFIX)


def _set_aside(path: Path, answer: Answer, kind: str, category: str | None) -> None:
    """Keep only the answer to a record the service refused for good (in rejected/), and delete the record."""
    target = _answer_path(path)
    note = {"kind": kind, "status": answer.status, "answer": answer.raw, "request_id": answer.request_id,
            "refused_at": int(time.time())}
    if category is not None:
        note["category"] = category
    _write_file(target, json.dumps(note, default=str).encode(), exclusive=False)
    _fsync_dir(target.parent)
    _remove(path)


def _purge_rejected_bodies(rejected: Path) -> None:
    """Delete refused record bodies that an older client moved into rejected/ (only answers are kept there)."""
    removed = False
    for p in rejected.glob("*.json"):
        if not p.name.endswith(ANSWER_SUFFIX):
            p.unlink(missing_ok=True)
            removed = True
    if removed:
        _fsync_dir(rejected)


class _DirLock:
    """A non-blocking advisory lock on a file: one flusher per spool, across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock here (Windows): one process per spool, then
            return True
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None
