"""The open-loop load generator: requests sent on a fixed schedule over raw keep-alive connections.

An open loop must send on time whatever the server does, so the generator has to be much
cheaper than the server. The aiohttp client is not (about a core for 6,000 requests/s on
these machines: past that it falls behind its own schedule, and its own lag shows up as the
server's latency). Here each request is encoded to bytes once (the factory repeats with
``cycle``), written on one of ``connections`` asyncio connections (HTTP/1.1 keep-alive,
pipelined when an answer is still outstanding), and each answer is read with no more parsing
than its status line, its Content-Length and, for an expected status, the request's
``check`` of the body. Latency runs from the scheduled send time, so a server that falls
behind is charged for the wait it causes (no coordinated omission); the scheduler wakes at
most once a millisecond, so a latency may hold up to 1 ms of the generator's own lateness.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from .loadgen import REQUEST_TIMEOUT, LoadStats, Request, now

TICK = 0.001  # seconds: the scheduler sends what fell due at most this late (counted in the latency)
Pending = tuple[float, bool, Request]  # scheduled time, counted in the measurement, the request


def encode(request: Request) -> bytes:
    """The request as HTTP/1.1 bytes (keep-alive)."""
    parts = urlsplit(request.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = request.body or b""
    lines = [f"{request.method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (request.headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: answers are matched to requests in order."""

    def __init__(self, stats: LoadStats, outstanding: list[int]) -> None:
        self.stats = stats
        self.outstanding = outstanding  # shared by all connections: [requests sent and not answered]
        self.pending: deque[Pending] = deque()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, pending: Pending) -> None:
        self.pending.append(pending)
        self.outstanding[0] += 1
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                length = 0  # a 204, or an answer without a body
            else:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:stop if stop >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            status = int(head[9:12])
            t_sched, measured, request = self.pending.popleft()
            self.outstanding[0] -= 1
            if measured:
                ok = status in request.expect and (request.check is None or request.check(body))
                self.stats.add(now() - t_sched, str(status), ok, None if ok else f"{status} {body[:200]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.outstanding[0] -= len(self.pending)
        for _, measured, _ in self.pending:
            if measured:
                self.stats.add_unsent("socket_closed")
        self.pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)


async def open_loop(
    factory: Callable[[int], Request],
    *,
    cycle: int,
    rate: float,
    duration: float,
    warmup: float = 0.0,
    connections: int = 64,
    max_outstanding: int = 1000,
) -> LoadStats:
    """Send factory(i) at ``rate`` requests/s for ``warmup + duration`` seconds; latency from the scheduled time."""
    if rate <= 0:
        raise ValueError("open-loop rate must be positive")
    requests = [factory(i) for i in range(cycle)]
    wire = [encode(r) for r in requests]
    parts = urlsplit(requests[0].url)
    loop = asyncio.get_running_loop()
    stats = LoadStats("open", target_rate=rate)
    conns: list[_Connection] = []
    outstanding = [0]
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _Connection(stats, outstanding), parts.hostname, parts.port)
        conns.append(proto)
    interval = 1.0 / rate
    start = now()
    t_measure = start + warmup
    t_end = t_measure + duration
    i = 0
    try:
        while True:
            t = now()
            while i * interval + start <= min(t, t_end):
                t_sched = start + i * interval
                measured = t_sched >= t_measure
                conn = conns[i % connections]
                if outstanding[0] >= max_outstanding or conn.transport.is_closing():
                    if measured:
                        stats.add_unsent("missed")
                else:
                    conn.send(wire[i % cycle], (t_sched, measured, requests[i % cycle]))
                i += 1
            if start + i * interval >= t_end:
                break
            # Sleep to the next send, at least TICK: everything that fell due meanwhile goes out at once
            # (a sub-millisecond sleep would spin the loop, and take the core PostgreSQL may need).
            await asyncio.sleep(max(TICK, start + i * interval - now()))
        deadline = now() + REQUEST_TIMEOUT
        while any(c.pending for c in conns) and now() < deadline:
            await asyncio.sleep(0.01)
        for c in conns:
            for _, measured, _ in c.pending:
                if measured:
                    stats.add_unsent("unfinished")
            c.pending.clear()
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    stats.elapsed = max(stats.last_done, t_end) - t_measure
    return stats
