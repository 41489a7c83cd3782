"""Group commit: concurrent requests' records written in batches, one transaction each.

A request submits its record and waits; a flusher takes everything queued (up to
a row and a byte bound), writes it in one transaction, and only then resolves
each waiting request with its outcome. The queue is bounded: when full, the
request is refused at once with 503 instead of waiting without limit. A writer
may linger: wait a few milliseconds after a batch's first record for others to
join it, when fewer than a batch's worth are queued.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, Generic, TypeVar

import asyncpg

from ingest import deadline as request_deadline
from ingest.errors import Invalid, Unavailable
from ingest.metrics import Metrics
from storage.partitions import ensure_partitions

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = tuple[Any, int, asyncio.Future, float | None]  # record, size, its future, deadline (loop time)
WriteBatch = Callable[[asyncpg.Connection, Sequence[T]], Awaitable[Sequence[Any]]]

_BYTES_PER_SECOND = 10_000_000  # commit time allowed for a record's size, on top of the timeout
HOLD_IDLE = 1.0  # seconds a flusher keeps its connection while its queue is empty

# Errors that mean "the database is not there or not taking work": answer 503 and carry on.
DATABASE_TROUBLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class _Expired(Exception):
    """A record's deadline passed before its batch answered."""


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class _Deadlines:
    """The deadlines of the records waiting for their batch, in the order they were queued, under one timer.

    A timer per record (loop.call_at, then cancel) cost 2.5 us of the worker's CPU per heartbeat under
    uvloop. Records are queued nearly in deadline order (each deadline is its request's start plus the
    same timeout), so they wait in a deque and one timer, armed for the first, fails every record whose
    deadline has passed when it fires, then is armed for the next. A record whose deadline is more than
    SLACK earlier than the latest deadline waiting (its request spent longer before queuing) gets a
    timer of its own instead. So every record in the deque has a deadline at most SLACK before any
    queued ahead of it, and none fails more than SLACK (plus LATE) after its deadline. uvloop rounds
    a timer to the millisecond, so it may fire up to half a millisecond early: timers are armed LATE
    after the deadline, so none fails before it (and the first one does not spin on call_soon until
    its deadline comes). Answered records leave from the front as new ones come: the deque holds what
    arrived since the oldest record still waiting, under load about what is in flight, during an
    outage up to TELEMETRY_DB_TIMEOUT + SLACK of arrivals.
    """

    SLACK = 0.05
    LATE = 0.001

    __slots__ = ("_loop", "_waiting", "_timer", "_armed", "_latest")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: deque[tuple[float, asyncio.Future]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # when the timer fires
        self._latest = 0.0  # the latest deadline in the deque (while it holds any)

    def add(self, deadline: float, fut: asyncio.Future) -> asyncio.TimerHandle | None:
        """Fail fut at its deadline unless answered by then; a timer of its own (for the caller to cancel) or None."""
        waiting = self._waiting
        while waiting and waiting[0][1].done():
            waiting.popleft()
        if not waiting:
            self._latest = deadline
        elif deadline < self._latest - self.SLACK:
            return self._loop.call_at(deadline + self.LATE, _expire, fut)
        elif deadline > self._latest:
            self._latest = deadline
        waiting.append((deadline, fut))
        # Armed anew when there is no timer, or when the deque started again (all answered) with a
        # deadline well before the one the timer was armed for.
        if self._timer is None or deadline < self._armed - self.SLACK:
            self._arm(deadline)
        return None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when + self.LATE, self._fire)
        self._armed = when

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        waiting = self._waiting
        while waiting:
            deadline, fut = waiting[0]
            if not fut.done() and deadline > now:
                self._arm(deadline)
                return
            waiting.popleft()
            _expire(fut)


class _Held:
    """The connection one flusher holds between batches (None: none)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: asyncpg.Connection | None = None


class GroupCommitWriter(Generic[T]):
    """A bounded queue of records and the flushers that commit them in batches."""

    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        write: WriteBatch[T],
        metrics: Metrics,
        *,
        max_queue: int,
        max_rows: int,
        max_bytes: int,
        retry_after: int = 1,
        flushers: int = 2,
        max_queue_bytes: int | None = None,
        timeout: float | None = None,
        linger: float = 0.0,
    ) -> None:
        self.name = name
        # Seconds a flusher waits after taking a batch's first record, so that records arriving
        # meanwhile join that batch (one commit, one wake-up, instead of one each); skipped when the
        # queue already holds a full batch. Every record it delays waits at most this much longer.
        self._linger = linger
        self._pool = pool
        self._write = write
        self._queue: asyncio.Queue[Item] = asyncio.Queue(max_queue)
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        # Optional bound on the bytes waiting (large records): beyond it, 503 like a full queue.
        # A record alone in the queue is always taken, however large.
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        # How long a request waits for its commit (plus 1 s per 10 MB of record): a database that does
        # not answer (hung, cut off, or holding locks) gives 503 in bounded time, not a hanging client.
        self._timeout = timeout
        self._flush_estimate = 0.0  # seconds a flush takes, recently (moving average)
        self._retry_after = retry_after
        self._flushers = flushers
        self._tasks: list[asyncio.Task] = []
        self._deadlines: _Deadlines | None = None  # made in the running loop, at the first record
        self._closing = False
        self._depth = metrics.deferred(metrics.queue_depth.labels(name))
        self._rows = metrics.deferred(metrics.batch_rows.labels(name))
        self._latency = metrics.deferred(metrics.flush_latency.labels(name))
        self._overload = metrics.deferred(metrics.rejected.labels("overload"))

    def fill(self) -> float:
        """How full the queue is, 0..1: of its records bound or its bytes bound, whichever is fuller."""
        fill = self._queue.qsize() / self._queue.maxsize
        if self._max_queue_bytes:
            fill = max(fill, self._queued_bytes / self._max_queue_bytes)
        return min(fill, 1.0)

    def start(self) -> None:
        """Start the flushers."""
        self._tasks = [asyncio.create_task(self._run(), name=f"{self.name}-flusher-{i}") for i in range(self._flushers)]

    async def submit(self, record: T, size: int = 0) -> Any:
        """Queue a record and wait until its batch is committed; returns its outcome. 503 when full or closing."""
        if self._closing:
            raise Unavailable("shutting down", headers={"Retry-After": str(self._retry_after)})
        if self._max_queue_bytes is not None and self._queued_bytes and self._queued_bytes + size > self._max_queue_bytes:
            raise Unavailable("ingest queue is full", headers={"Retry-After": str(self._retry_after)})
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        # The request's own deadline (ingest.deadline), so the commit shares it with the token lookup
        # and the data key; outside a request (tests of the writer alone), timeout from now.
        base = request_deadline.current(self._timeout)
        deadline = None if base is None else base + size / _BYTES_PER_SECOND
        try:
            self._queue.put_nowait((record, size, fut, deadline))
        except asyncio.QueueFull:
            raise Unavailable("ingest queue is full", headers={"Retry-After": str(self._retry_after)}) from None
        self._queued_bytes += size
        self._depth.inc()
        # At the deadline the future itself fails (_Deadlines: one timer for the waiting records), unless
        # its batch has answered by then. A failed future is withdrawn: a flusher that has not taken it
        # skips it (nothing is stored); one that has may still commit it, unacknowledged, like a commit
        # whose answer a cut connection lost.
        timer = None
        if deadline is not None:
            deadlines = self._deadlines
            if deadlines is None:
                deadlines = self._deadlines = _Deadlines(loop)
            timer = deadlines.add(deadline, fut)
        try:
            return await fut
        except _Expired:
            raise Unavailable("the database did not commit in time", headers={"Retry-After": str(self._retry_after)}) from None
        finally:
            if timer is not None:
                timer.cancel()

    def _take_batch(self, first: Item) -> tuple[list[Item], bool]:
        """The batch starting with first, and whether a stop sentinel was met while taking it."""
        batch = [first]
        size = first[1]
        stop = False
        while len(batch) < self._max_rows and size < self._max_bytes:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
            size += item[1]
        self._queued_bytes -= size
        self._depth.dec(len(batch))
        return batch, stop

    async def _run(self) -> None:
        # A flusher keeps its connection while batches keep coming and hands it back once the queue
        # has stayed empty for HOLD_IDLE seconds (or a batch fails): the pool's reset of a connection
        # handed back (a round trip and four statements) then runs once per busy spell, not once per
        # batch (under load the queue runs dry between batches all the time).
        held = _Held()
        try:
            while True:
                first = await self._next_record(held)
                if first is None:  # stop sentinel from close(): everything before it is flushed
                    return
                if self._linger and self._queue.qsize() + 1 < self._max_rows and self._queued_bytes < self._max_bytes:
                    await asyncio.sleep(self._linger)
                batch, stop = self._take_batch(first)
                batch = self._in_time(batch)
                if batch:
                    try:
                        await self._flush(batch, held)
                    except Exception:  # a fault of ours must not stop the flusher (its records would wait forever)
                        log.exception("%s flush failed", self.name)
                        for _, _, fut, _ in batch:
                            if not fut.done():
                                fut.set_exception(Unavailable("batch failed", headers={"Retry-After": str(self._retry_after)}))
                if stop:
                    return
        finally:
            await self._release(held)

    async def _next_record(self, held: _Held) -> Item | None:
        """The next queued record; a held connection is handed back if none comes within HOLD_IDLE,
        and at once when the pool has no idle connection and no room for another (a small pool's
        other users, token lookups among them, must not wait for flushers that keep theirs)."""
        if held.conn is not None and self._queue.empty():
            pool = self._pool
            if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
                await self._release(held)
                return await self._queue.get()
            try:
                async with asyncio.timeout(HOLD_IDLE):
                    return await self._queue.get()
            except TimeoutError:
                await self._release(held)
        return await self._queue.get()

    async def _release(self, held: _Held) -> None:
        conn, held.conn = held.conn, None
        if conn is not None:
            with suppress(*DATABASE_TROUBLE):  # asyncpg closes a connection whose reset fails
                await self._pool.release(conn)

    def _in_time(self, batch: list[Item]) -> list[Item]:
        """The batch without withdrawn records, and without those that would reach their deadline before
        a usual flush ends: these are refused now (503, nothing stored), not written for a client that
        has gone, which under overload would leave the database busy with work nobody waits for."""
        finish = asyncio.get_running_loop().time() + self._flush_estimate
        kept = []
        for item in batch:
            fut, deadline = item[2], item[3]
            if fut.done():
                continue
            if deadline is not None and finish > deadline:
                fut.set_exception(Unavailable("the database could not commit in time", headers={"Retry-After": str(self._retry_after)}))
                continue
            kept.append(item)
        return kept

    async def _flush(self, batch: list[Item], held: _Held) -> None:
        records = [item[0] for item in batch]
        started = time.perf_counter()
        try:
            outcomes = await self._write_with_partitions(records, held)
        except asyncpg.DataError as exc:
            # A value the database refuses (SQLSTATE class 22) that validation let through: commit
            # the others one by one, so only the records at fault fail, and with 422, not 503.
            if len(batch) > 1:
                for item in batch:
                    await self._flush([item], held)
                return
            log.warning("%s record refused by the database: %s", self.name, type(exc).__name__)
            if not batch[0][2].done():
                batch[0][2].set_exception(Invalid("a value was refused by the database"))
            return
        except DATABASE_TROUBLE as exc:
            log.warning("%s batch of %d not committed: %s", self.name, len(batch), type(exc).__name__)
            error = Unavailable("database unavailable", headers={"Retry-After": str(self._retry_after)})
            for _, _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        except BaseException as exc:
            for _, _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(Unavailable("batch failed", headers={"Retry-After": str(self._retry_after)}))
            if isinstance(exc, Exception):
                log.exception("%s batch failed", self.name)
                return
            raise
        elapsed = time.perf_counter() - started
        # Capped: one flush held up (a lock, an outage) must not make every record look too late to write.
        sample = elapsed if self._timeout is None else min(elapsed, self._timeout / 4)
        self._flush_estimate = 0.8 * self._flush_estimate + 0.2 * sample
        self._latency.observe(elapsed)
        self._rows.observe(len(batch))
        for (_, _, fut, _), outcome in zip(batch, outcomes):
            if not fut.done():
                fut.set_result(outcome)

    async def _write_with_partitions(self, records: list[T], held: _Held) -> Sequence[Any]:
        if held.conn is None:
            held.conn = await self._pool.acquire()
        conn = held.conn
        try:
            try:
                return await self._write(conn, records)
            except asyncpg.CheckViolationError as exc:
                # "no partition of relation ... found for row": the day's partition is missing
                # (clock jump, or the sweeper has not run for days). Make it and retry once.
                if "partition" not in (exc.message or ""):  # only SQLSTATE would be nicer; 23514 is shared
                    raise
                await ensure_partitions(conn, dt.datetime.now(dt.timezone.utc).date())
                return await self._write(conn, records)
        except BaseException:
            await self._release(held)  # reset (an open transaction rolled back) or closed by the pool; the next batch takes another
            raise

    async def close(self) -> None:
        """Refuse new records, commit everything already queued, stop the flushers."""
        self._closing = True
        for _ in self._tasks:
            await self._queue.put(None)  # waits for room: the flushers are draining meanwhile
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
