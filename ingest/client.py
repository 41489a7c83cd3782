"""A reference client for installations and agents.

    async with TelemetryClient(url, enrollment_secret) as c:
        enrolled = await c.enroll(enrollment_secret)      # c now holds the installation token
        await c.heartbeat({...})
        agent = await c.create_agent("scanner-1")
    async with TelemetryClient(url, agent.token, spool_dir="/var/spool/ti") as a:
        await a.upload_scan({...})                       # gzip; scan_id added once, kept across retries

Retries: a request is tried up to `Backoff.attempts` times when the service answers
408, 429 or 5xx or cannot be reached, waiting `Backoff.delay` in between: exponential
backoff with full jitter, never earlier than the answer's Retry-After (a Retry-After
longer than `Backoff.max_retry_after` ends the attempts: the record stays spooled).
Any other answer is final: 2xx is success; any other 4xx raises `Rejected` and is never
retried. Enrolling and creating an agent are not idempotent, so those two are resent
only when the service cannot have acted on them (connection refused, 408, 429, 503).

Spool: with `spool_dir`, each heartbeat or scan is first written to
`<spool_dir>/<time_ns, 20 digits>-<8 hex>.json` as `{"v": 1, "kind": ..., "body": ...}`
(mode 0600, written to a dot-prefixed temporary name, fsynced, renamed, directory
fsynced), then `flush_spool()` sends every record in name order and deletes each only
after a 2xx. A 4xx other than 401, 408 and 429 deletes the record and keeps only the
service's answer in `rejected/<name>.answer.json` (its kind, status, problem document and
request id; never the body): resending cannot help, and a refused body may hold exactly
what the policy forbids keeping (an undeclared field, an e-mail in a plaintext field), so
it must not outlive the refusal. The answer tells an operator what was refused and why
(the request id finds it in the service's log). Bodies that an older client left in
`rejected/` are deleted at the next flush. A 401 (or a redirect) stops the flush and keeps the records: the token
or URL is wrong, not the data. An unreachable service stops the flush; the rest waits for the next one,
in this process or after a restart. Delivery is at least once: a record whose answer
was lost is sent again, which for a scan is harmless (same scan_id and content: 200,
stored once); a heartbeat may then be recorded twice in the history. Only one flush
runs at a time per spool directory (an advisory lock on `.lock`).

The spool holds scan payloads in plaintext on the sending machine; it lives there
only until delivered. Tokens are never written to it.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import io
import logging
import os
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

log = logging.getLogger("ingest.client")

ENDPOINTS = {"heartbeat": "/v1/heartbeats", "scan": "/v1/scans"}
GZIPPED = frozenset({"scan"})
SPOOL_VERSION = 1
REJECTED_DIR = "rejected"
_LARGE = 512 * 1024  # aiohttp warns about raw bytes bodies beyond about this size; stream them instead


class ClientError(Exception):
    """The base of this module's errors."""


class Rejected(ClientError):
    """The service answered with a final error (4xx other than 408 and 429, or a 3xx): resending it cannot help."""

    def __init__(self, answer: "Answer", path: Path | None = None) -> None:
        # path: for a spooled record, the answer file kept in rejected/ (the record itself is deleted)
        body = answer.body if isinstance(answer.body, dict) else {}
        super().__init__(f"{answer.status} {body.get('title', '')}: {body.get('detail', '')}".strip(": "))
        self.answer = answer
        self.status = answer.status
        self.path = path


class Unreachable(ClientError):
    """No final answer: the service could not be reached, or kept answering 429/5xx, through every attempt."""


class Spooled(Unreachable):
    """Not delivered yet, but safe in the spool: a later `flush_spool()` (here or after a restart) sends it."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class Answer:
    """The service's final answer: status, parsed JSON body (or text), and the request id it logged."""

    status: int
    body: Any
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Enrollment:
    install_id: uuid.UUID
    token: str


@dataclass(frozen=True, slots=True)
class AgentCredentials:
    agent_id: uuid.UUID
    token: str


@dataclass(frozen=True, slots=True)
class Backoff:
    """How often and how long to retry."""

    attempts: int = 6  # tries per request, the first included
    base: float = 0.5  # seconds; the jitter ceiling doubles from here on each retry...
    cap: float = 30.0  # ...up to this
    max_retry_after: float = 300.0  # a longer Retry-After ends the attempts (the record stays spooled)

    def delay(self, retry: int, retry_after: float | None = None, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): full jitter, added to Retry-After if given.

        Full jitter (uniform between 0 and the exponential ceiling) spreads clients that
        failed together; adding it to Retry-After keeps them spread when the service asks
        them all to wait the same time, and never has one come back earlier than asked.
        """
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


# 408: the service gave up waiting for the body; 429: too fast; 5xx: overloaded, or a proxy without its upstream.
def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


_NOT_APPLIED = (408, 429, 503)  # answers that say the request was not acted on: safe to resend even if not idempotent


@dataclass
class FlushReport:
    """What one `flush_spool()` did."""

    delivered: list[tuple[str, Answer]] = field(default_factory=list)  # (record name, answer), in order
    rejected: list[tuple[str, Answer]] = field(default_factory=list)
    remaining: int = 0  # records still spooled
    stopped_by: ClientError | None = None  # why the flush ended before the spool was empty
    busy: bool = False  # another flush holds this spool; nothing was sent


class TelemetryClient:
    """An async client of the telemetry service for one token (installation or agent)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        spool_dir: str | os.PathLike | None = None,
        *,
        backoff: Backoff = Backoff(),
        timeout: float = 60.0,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        self._sleep = sleep
        self._uniform = uniform
        self._clock = clock
        self._flush_lock = asyncio.Lock()
        self._last_ns = 0
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.spool_dir / REJECTED_DIR).mkdir(exist_ok=True, mode=0o700)

    async def __aenter__(self) -> "TelemetryClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client made it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ the API

    async def enroll(self, secret: str, install_id: uuid.UUID | None = None) -> Enrollment:
        """Enroll an installation with an enrollment secret; this client then uses its installation token."""
        install_id = install_id or uuid.uuid4()
        answer = await self.request("POST", "/v1/enroll", {"install_id": str(install_id)}, token=secret, idempotent=False)
        self.token = answer.body["token"]
        return Enrollment(uuid.UUID(answer.body["install_id"]), answer.body["token"])

    async def create_agent(self, name: str) -> AgentCredentials:
        """Create an agent of this installation; its token is for a separate client."""
        answer = await self.request("POST", "/v1/agents", {"name": name}, idempotent=False)
        return AgentCredentials(uuid.UUID(answer.body["agent_id"]), answer.body["token"])

    async def heartbeat(self, body: dict[str, Any]) -> Answer:
        """Send a heartbeat (through the spool, if there is one)."""
        return await self._deliver("heartbeat", body)

    async def upload_scan(self, scan: dict[str, Any]) -> Answer:
        """Upload a scan, gzipped; a scan_id is added if missing, once, so every retry is the same upload."""
        if "scan_id" not in scan:
            scan = {"scan_id": str(uuid.uuid4()), **scan}
        return await self._deliver("scan", scan)

    def spool(self, kind: str, body: dict[str, Any]) -> Path:
        """Write one record durably to the spool; returns its path. Safe to call from synchronous code."""
        if self.spool_dir is None:
            raise ValueError("this client has no spool_dir")
        if kind not in ENDPOINTS:
            raise ValueError(f"unknown record kind {kind!r}")
        data = orjson.dumps({"v": SPOOL_VERSION, "kind": kind, "body": body})
        # Names sort in the order records were spooled: time first, strictly increasing in this process.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        name = f"{self._last_ns:020d}-{secrets.token_hex(4)}.json"
        tmp = self.spool_dir / f".tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.spool_dir / name
        os.rename(tmp, final)
        _fsync_dir(self.spool_dir)
        return final

    def pending(self) -> list[Path]:
        """The spooled records, oldest first."""
        if self.spool_dir is None:
            return []
        return sorted(p for p in self.spool_dir.glob("*.json") if not p.name.startswith("."))

    async def flush_spool(self) -> FlushReport:
        """Send every spooled record in order; delete each after a 2xx; set aside the ones refused for good."""
        report = FlushReport()
        if self.spool_dir is None:
            return report
        async with self._flush_lock:
            with _DirLock(self.spool_dir / ".lock") as held:
                if not held:
                    report.busy = True
                    report.remaining = len(self.pending())
                    return report
                await asyncio.to_thread(_purge_rejected_bodies, self.spool_dir / REJECTED_DIR)
                queue = self.pending()
                for i, path in enumerate(queue):
                    try:
                        kind, body = _read_record(path)
                    except ValueError as exc:
                        answer = Answer(0, {"title": "unreadable spool record", "detail": str(exc)})
                        await asyncio.to_thread(_set_aside, path, answer, "unknown")
                        report.rejected.append((path.name, answer))
                        continue
                    try:
                        answer = await self.request("POST", ENDPOINTS[kind], body, gzipped=kind in GZIPPED)
                    except Rejected as exc:
                        if exc.status == 401 or not 400 <= exc.status < 500:
                            # This client's token or URL is wrong, not the record: keep it for a good one.
                            report.stopped_by = exc
                            report.remaining = len(queue) - i
                            break
                        await asyncio.to_thread(_set_aside, path, exc.answer, kind)
                        report.rejected.append((path.name, exc.answer))
                        continue
                    except Unreachable as exc:
                        report.stopped_by = exc
                        report.remaining = len(queue) - i
                        break
                    await asyncio.to_thread(_remove, path)
                    report.delivered.append((path.name, answer))
        return report

    # ------------------------------------------------------------ sending

    async def _deliver(self, kind: str, body: dict[str, Any]) -> Answer:
        if self.spool_dir is None:
            return await self.request("POST", ENDPOINTS[kind], body, gzipped=kind in GZIPPED)
        path = await asyncio.to_thread(self.spool, kind, body)
        report = await self.flush_spool()
        for name, answer in report.delivered:
            if name == path.name:
                return answer
        for name, answer in report.rejected:
            if name == path.name:
                raise Rejected(answer, _answer_path(path))
        reason = "another flush of this spool is running" if report.busy else str(report.stopped_by)
        raise Spooled(f"not delivered yet ({reason}); kept in the spool", path)

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      gzipped: bool = False, idempotent: bool = True) -> Answer:
        """One request with retries; returns the final 2xx answer, or raises Rejected or Unreachable."""
        data = orjson.dumps(body) if body is not None else None
        headers = {"Authorization": f"Bearer {token or self.token}", "X-Request-ID": secrets.token_hex(8)}
        if data is not None:
            headers["Content-Type"] = "application/json"
            if gzipped:
                data = gzip.compress(data, mtime=0)
                headers["Content-Encoding"] = "gzip"
        session = self._get_session()
        url = self.base_url + path
        retry = 0
        while True:
            retry_after = None
            try:
                payload = io.BytesIO(data) if data is not None and len(data) > _LARGE else data
                async with session.request(method, url, data=payload, headers=headers, allow_redirects=False) as resp:
                    raw = await resp.read()
                    answer = Answer(resp.status, _parse(raw), resp.headers.get("X-Request-ID"))
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._clock())
                reason = f"{answer.status} from the service"
            except aiohttp.ClientConnectorError as exc:  # never reached the service: always safe to resend
                answer, reason = None, f"cannot connect ({type(exc).__name__})"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if not idempotent:  # the service may have acted on it; resending could act twice
                    raise Unreachable(f"{method} {path}: no answer ({type(exc).__name__}); it may or may not have been applied") from exc
                answer, reason = None, f"no answer ({type(exc).__name__})"
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
            await self._sleep(delay)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session


# ---------------------------------------------------------------- spool files


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


def _read_record(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        record = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(record, dict) or record.get("v") != SPOOL_VERSION or record.get("kind") not in ENDPOINTS or not isinstance(record.get("body"), dict):
        raise ValueError(f"{path.name} is not a version {SPOOL_VERSION} spool record")
    return record["kind"], record["body"]


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


ANSWER_SUFFIX = ".answer.json"


def _answer_path(record: Path) -> Path:
    """Where the answer to a refused spooled record is kept."""
    return record.parent / REJECTED_DIR / (record.stem + ANSWER_SUFFIX)


def _set_aside(path: Path, answer: Answer, kind: str) -> None:
    """Keep only the answer to a record the service refused for good (in rejected/), and delete the record."""
    target = _answer_path(path)
    note = orjson.dumps({"kind": kind, "status": answer.status, "answer": answer.body, "request_id": answer.request_id,
                         "refused_at": int(time.time())}, default=str)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, note)
        os.fsync(fd)
    finally:
        os.close(fd)
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
        except ImportError:  # pragma: no cover - no flock on this platform: one process per spool, then
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


# ---------------------------------------------------------------- `telemetry-ingest send`


async def send_once(url: str, token: str, kind: str, body: dict[str, Any] | None, spool_dir: str | None,
                    attempts: int = Backoff.attempts) -> tuple[int, Any]:
    """What `telemetry-ingest send` does: (exit status, JSON to print). kind "flush" sends only the spool."""
    async with TelemetryClient(url, token, spool_dir, backoff=Backoff(attempts=attempts)) as client:
        if kind == "flush":
            report = await client.flush_spool()
            summary = {
                "delivered": len(report.delivered), "rejected": len(report.rejected), "remaining": report.remaining,
                "stopped_by": str(report.stopped_by) if report.stopped_by else None, "busy": report.busy,
            }
            # 1 when anything was refused (set aside, or a 401 that stopped the flush), even if nothing
            # remains spooled; 75 when records wait for a service that was not reached; 0 otherwise.
            if report.rejected or isinstance(report.stopped_by, Rejected):
                return 1, summary
            return (0 if report.remaining == 0 else 75), summary
        try:
            answer = await (client.heartbeat(body) if kind == "heartbeat" else client.upload_scan(body))
        except Rejected as exc:
            return 1, exc.answer.body
        except Spooled as exc:
            return 75, {"spooled": str(exc.path), "detail": str(exc)}  # 75: EX_TEMPFAIL, try again later
        except Unreachable as exc:
            return 1, {"error": "unreachable", "detail": str(exc)}
        return 0, answer.body
