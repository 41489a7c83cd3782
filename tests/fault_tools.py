"""Helpers of the fault, hostile-input, isolation and secrets tests: raw HTTP, bodies, a database proxy, dumps."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import zstandard

from tests.support import Service

JSON = {"Content-Type": "application/json"}


# ------------------------------------------------------------------ bodies


def scan_body(scan_id: uuid.UUID | str | None = None, marker: str = "plain", **extra: Any) -> dict[str, Any]:
    """A scan with every declared section; `marker` is written into declared fields of each."""
    body = {
        "scan_id": str(scan_id or uuid.uuid4()),
        "scanned_at": "2025-01-15T10:30:00Z",
        "agent_version": "7.1.0",
        "asset": {"name": f"WS-{marker}", "domain": "corp.example.com", "serial_number": f"SN-{marker}", "last_user": f"user-{marker}"},
        "os": {"name": "Windows 11 Pro", "version": "23H2", "build": "22631.3007", "architecture": "x64"},
        "hardware": {"processor": "i7-11700", "cores": 8, "memory_mb": 32768, "bios_version": "1.14.0"},
        "disks": [{"name": "C:", "size_gb": 512, "free_gb": 100.5, "filesystem": "NTFS"}],
        "software": [{"name": f"App-{marker}", "version": "1.0", "publisher": "Example", "install_date": "2024-01-01"}],
        "network": [{"adapter": "Ethernet", "ip_address": "10.1.2.3", "mac_address": "00:1A:2B:3C:4D:5E", "dhcp": True}],
        "hotfixes": [{"id": "KB5034441", "installed_on": "2024-12-10"}],
        "services": [{"name": f"svc-{marker}", "state": "Running", "start_mode": "Auto"}],
    }
    body.update(extra)
    return body


def gzip_bomb(total: int) -> bytes:
    """A gzip member inflating to `total` zero bytes (a multiple of 1 MiB), built without holding them."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(c.compress(chunk) for _ in range(total >> 20)) + c.flush()


def zstd_bomb(total: int) -> bytes:
    """A zstd stream (no content size in its header) inflating to `total` zero bytes."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    chunk = bytes(1 << 20)
    return b"".join(c.compress(chunk) for _ in range(total >> 20)) + c.flush()


# ------------------------------------------------------------------ HTTP below the client library


async def raw_http(port: int, request: bytes, *, timeout: float = 15) -> tuple[int | None, dict[str, str], bytes]:
    """Send bytes as they are on a fresh connection; (status, headers, body) of the answer (None if closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, timeout: float = 15) -> tuple[int | None, dict[str, str], bytes]:
    """One HTTP/1.1 response from reader (None status if the connection closes first)."""
    async with asyncio.timeout(timeout):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, {}, b""
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                body = await reader.readexactly(int(headers["content-length"]))
        return status, headers, body


def http_request(method: str, path: str, *, token: str | None = None, body: bytes = b"",
                 headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    """The bytes of an HTTP/1.1 request (Connection: close); Content-Length unless told not to."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 65536) -> bytes:
    """body in chunked transfer encoding."""
    out = bytearray()
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


# ------------------------------------------------------------------ tokens of every role


async def agent_of(service: Service, installation_token: str, name: str = "agent") -> tuple[uuid.UUID, str]:
    """Create an agent with an installation token; (agent_id, agent token)."""
    status, body, _ = await service.request("POST", "/v1/agents", token=installation_token, json={"name": name})
    assert status == 201, body
    return uuid.UUID(body["agent_id"]), body["token"]


# ------------------------------------------------------------------ the database, as text


async def database_as_text(conn) -> str:
    """Every row of every table in the database (partitions included), every column, as text."""
    tables = [r[0] for r in await conn.fetch(
        "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')")]
    assert tables
    parts = []
    for t in tables:
        parts.append(await conn.fetchval(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {t} t"))
    return "\n".join(parts)


# ------------------------------------------------------------------ a proxy in front of PostgreSQL


class PgProxy:
    """TCP on 127.0.0.1 in front of a PostgreSQL unix socket, that can add latency, cut or black-hole connections.

    Modes: "pass" forwards; "cut" closes every connection and refuses new ones (a stopped server);
    "blackhole" forwards nothing more on open connections and holds new ones unanswered (a hung server
    or a partitioned network); what was held flows again when restored.
    """

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or ""])[0]
        port = query.get("port", [str(parts.port or 5432)])[0]
        self._target_dsn = dsn
        self._socket = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._tcp = None if self._socket else (host, int(port))
        self.mode = "pass"
        self.latency = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        """The target DSN, pointed at the proxy."""
        parts = urlsplit(self._target_dsn)
        query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(parts.query).items() if k not in ("host", "port"))
        user = parts.username or "postgres"
        auth = f"{user}:{parts.password}@" if parts.password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}{parts.path}" + (f"?{query}" if query else "")

    async def start(self) -> "PgProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def cut(self) -> None:
        """Close every connection now (a crash of the server, or the network), and refuse new ones."""
        self.mode = "cut"
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def blackhole(self) -> None:
        """Stop forwarding: open connections go silent, new ones are accepted but never answered."""
        self.mode = "blackhole"

    def restore(self) -> None:
        self.mode = "pass"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            if self.mode == "cut":
                writer.transport.abort()
                return
            self._writers.add(writer)
            if self.mode == "blackhole":
                await reader.read()  # hold until the client gives up, or the proxy cuts
                return
            if self._socket:
                up_reader, up_writer = await asyncio.open_unix_connection(self._socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                while self.mode == "blackhole":
                    await asyncio.sleep(0.05)
                if self.mode != "pass":
                    break
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


# ------------------------------------------------------------------ timing


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
