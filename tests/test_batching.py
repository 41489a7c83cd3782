"""The group-commit writer's linger (ingest.pipeline.batching): records that arrive while a flusher waits
after a batch's first record join that batch; a full batch already queued is not kept waiting."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from ingest.metrics import Metrics
from ingest.pipeline.batching import GroupCommitWriter
from storage.pool import create_pool


@asynccontextmanager
async def lingering_writer(db_dsn, *, linger: float, max_rows: int = 100, max_bytes: int = 1 << 20):
    """A one-flusher writer whose batches each run one statement on a real connection; yields (writer, batch sizes)."""
    batches: list[int] = []

    async def write(conn, records):
        assert await conn.fetchval("SELECT cardinality($1::text[])", list(records)) == len(records)
        batches.append(len(records))
        return ["stored"] * len(records)

    pool = await create_pool(db_dsn, max_size=2)
    writer = GroupCommitWriter("test", pool, write, Metrics(), max_queue=100, max_rows=max_rows, max_bytes=max_bytes,
                               timeout=120, flushers=1, linger=linger)
    writer.start()
    try:
        yield writer, batches
    finally:
        await writer.close()
        await pool.close()


async def test_records_arriving_while_the_flusher_lingers_join_the_first_ones_batch(db_dsn):
    async with lingering_writer(db_dsn, linger=2.0) as (writer, batches):
        first = asyncio.create_task(writer.submit("a"))
        await asyncio.sleep(0.1)  # the flusher has taken "a" and lingers
        assert not first.done() and batches == []
        answers = await asyncio.gather(first, writer.submit("b"), writer.submit("c"))
    assert answers == ["stored"] * 3
    assert batches == [3]


async def test_without_linger_the_first_record_is_written_alone(db_dsn):
    """The premise of the test above: the same arrivals, no linger, make two batches."""
    async with lingering_writer(db_dsn, linger=0.0) as (writer, batches):
        first = asyncio.create_task(writer.submit("a"))
        await asyncio.sleep(0.1)
        assert await first == "stored"
        assert await asyncio.gather(writer.submit("b"), writer.submit("c")) == ["stored", "stored"]
    assert batches == [1, 2]


async def test_a_full_batch_already_queued_is_not_kept_waiting(db_dsn):
    """A linger of a minute would hold these records far past the wait below: rows or bytes enough for a
    batch are written at once."""
    async with lingering_writer(db_dsn, linger=60.0, max_rows=3, max_bytes=1000) as (writer, batches):
        by_rows = asyncio.gather(*(writer.submit(v) for v in "abc"))
        assert await asyncio.wait_for(by_rows, 30) == ["stored"] * 3
        by_bytes = writer.submit("d", size=1000)
        assert await asyncio.wait_for(by_bytes, 30) == "stored"
    assert batches == [3, 1]
