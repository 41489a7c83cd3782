"""The retention sweeper: expired scans, old heartbeat history and inactive installations disappear.

One sweep, `sweep(conn, now, rules)`, in this order:

1. take the sweeper lease (a row of `sweeper_lease` with an expiry, `Lease`); if another process
   holds it, return at once with ``swept=False``: one sweeper works in the whole deployment;
2. make the coming days' partitions (`storage.partitions.ensure_partitions`);
3. finish what a killed sweep left half-way: a partition still pending a concurrent detach is
   finalized, an expired partition already detached but not dropped is dropped;
4. drop whole daily partitions whose every row is past retention: heartbeats whose upper bound
   is <= now - heartbeat retention, scans whose upper bound is <= now - 720 h (the maximum
   scan retention). Detach and drop are one transaction that waits at most
   PARTITION_LOCK_TIMEOUT_MS for the parent's lock (writers queue behind it only that long; a
   partition behind a long transaction is left for the next sweep, its rows go by step 5);
5. delete the remaining expired rows in batches of `batch_rows` (one statement and transaction
   each, by ctid within one partition): scans with expires_at <= now, heartbeat history with
   received_at <= now - retention, and the records of the policy file's categories (`records`,
   not partitioned) with expires_at <= now. This is the guarantee: every row is gone within one sweep
   interval of its expiry, whatever its retention. The partition drops are the cheap path for
   whole expired days (after an outage, or the dead space of a day deleted row by row) and
   return the space at once, without VACUUM;
6. replay the key store's erasures (storage.databases.replay_erasures): an installation the key
   store lists as erased but the data database holds (a restored backup) is erased again;
   erase installations without a heartbeat for `inactive_days` (from last_seen_at, or
   enrolled_at if none), keys destroyed first in the key store, as an admin erasure does; and
   finish erasures whose process died half-way;
7. destroy the epoch keys whose retention epoch has ended (storage.keystore.destroy_expired):
   every scan they sealed has expired, so no copy of the data database opens those scans any
   more; and, ahead of their epoch's end, those a shortened retention left without a scan
   (`retire_spare_epoch_keys`: retired first, destroyed once every worker's cache has let go
   of them); vacuum the key store's tables so the destroyed keys leave them now;
8. give installations whose newest record key is worn a new one (storage.keystore); delete
   audit log rows older than `audit_retention` (never younger than 30 days: storage.audit);
   last, so that a long build holds up nothing else, build the heartbeat history's index by
   installation on each partition whose day ended PARTITION_INDEX_GRACE (10 minutes) ago and is
   still within retention (storage.partitions.day_indexes_due, migration 0023; the day being
   written has no such index): one transaction each, waiting at most PARTITION_LOCK_TIMEOUT_MS
   for the partition's lock; one that fails or waits too long is left for the next sweep;
9. write an audit row if anything was removed; release the lease.

No session state, so all of this holds behind PgBouncer in transaction mode and across nodes:

- The lease is a row, not a session advisory lock. A sweep is many transactions (each batch
  commits on its own), so a transaction-scoped lock cannot cover it; a session lock stays on
  whichever server connection the pooler picked, is "not owned" when unlocked from another,
  and the pool's reset (pg_advisory_unlock_all()) can drop one another sweeper really holds.
  The row is taken only when free or expired, renewed while the sweep works (every
  LEASE_SECONDS / 4 at most, between steps and batches), and deleted at the end; a sweeper that
  dies holds it at most LEASE_SECONDS. A sweeper that finds its lease taken (it stalled past the
  expiry) stops. Every step is idempotent, so even two overlapping sweeps delete nothing twice.
- Lock timeouts are `SET LOCAL` inside the transaction they bound, never a session `SET`: behind
  a pooler a session setting lands on a server connection other clients then get.

Every step commits on its own and is idempotent, so a sweep killed at any point leaves nothing
inconsistent and the next one carries on. A step that waits longer than its lock timeout
(`Rules.lock_timeout` for row deletions; PARTITION_LOCK_TIMEOUT_MS for making, detaching and
dropping partitions, which need the parent table exclusively, and for indexing an ended day,
which needs that day's partition against writes) for a lock (a long transaction on
the table) is left for the next sweep and listed in `SweepResult.deferred`; the other steps go on. `now` is an argument (tests use a fixed clock).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import asyncpg

from policy.categories import MAX_SCAN_RETENTION_HOURS
from storage import admin, keystore, partitions
from storage import scans as scan_store
from storage.audit import delete_older_than, record

log = logging.getLogger(__name__)

# A sweeper that dies keeps the others out at most this long (seconds); renewed every quarter of it.
LEASE_SECONDS = 60.0
BATCH_ROWS = 5000
PARTITION_LOCK_TIMEOUT_MS = 100
# What a killed sweep may have left: a partition table of ours, detached, not yet dropped.
_PARTITION_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")


@dataclass(frozen=True)
class Rules:
    """What the sweeper enforces (from Settings)."""

    heartbeat_retention: dt.timedelta = dt.timedelta(days=30)
    inactive: dt.timedelta = dt.timedelta(days=400)
    audit_retention: dt.timedelta = dt.timedelta(days=730)
    scan_max_retention: dt.timedelta = dt.timedelta(hours=MAX_SCAN_RETENTION_HOURS)
    data_key_max_uses: int = 100_000_000
    data_key_max_age: dt.timedelta = dt.timedelta(days=90)
    batch_rows: int = BATCH_ROWS
    erase_grace: float = 1.0  # seconds between revoking an erased installation's tokens and unlinking them
    lock_timeout: float = 5.0  # seconds a sweep statement waits for a lock before its step is left for the next sweep
    # How long an epoch key retires before its early destruction: longer than a worker keeps data keys
    # (crypto.datakeys.DataKeyCache ttl, 300 s) and a retention (ingest.http.routes.scans.RETENTION_TTL,
    # 10 s) cached, plus a minute for requests in flight, so no worker still seals with it.
    retire_grace: dt.timedelta = dt.timedelta(seconds=370)
    lease_seconds: float = LEASE_SECONDS  # how long the sweeper lease holds without renewal

    def partition_cutoff(self, table: str, now: dt.datetime) -> dt.datetime | None:
        """Partitions of table whose upper bound is <= this hold nothing still within retention."""
        if table == "heartbeats":
            return now - self.heartbeat_retention
        if table == "scans":
            return now - self.scan_max_retention
        return None  # a table the sweeper does not know: never dropped


@dataclass
class SweepResult:
    """What one sweep did. `swept` is False when another process held the sweeper lease."""

    swept: bool
    rows_deleted: dict[str, int] = field(default_factory=dict)
    partitions_dropped: dict[str, int] = field(default_factory=dict)
    partitions_created: int = 0
    partitions_indexed: int = 0  # day-end indexes built (storage.partitions.build_day_index)
    installations_erased: int = 0
    data_keys_added: int = 0
    data_keys_destroyed: int = 0  # epoch keys whose epoch ended
    audit_rows_deleted: int = 0  # audit log rows past their retention
    seconds: float = 0.0
    deferred: list[str] = field(default_factory=list)  # steps left for the next sweep (a lock held too long)

    @property
    def removed_anything(self) -> bool:
        return (any(self.rows_deleted.values()) or any(self.partitions_dropped.values()) or self.installations_erased > 0
                or self.data_keys_destroyed > 0 or self.audit_rows_deleted > 0)

    def audit_detail(self) -> dict[str, int]:
        """Scalar counts only (storage.layout.AUDIT_DETAIL_KEYS): rows per table, installations, partitions."""
        return {**self.rows_deleted, "installations": self.installations_erased,
                "partitions": sum(self.partitions_dropped.values()), "keys_destroyed": self.data_keys_destroyed,
                "audit_log": self.audit_rows_deleted}

    def summary(self) -> dict:
        """The counts, for the audit log and the command line."""
        return {
            "rows_deleted": dict(self.rows_deleted),
            "partitions_dropped": dict(self.partitions_dropped),
            "partitions_created": self.partitions_created,
            "partitions_indexed": self.partitions_indexed,
            "installations_erased": self.installations_erased,
            "data_keys_added": self.data_keys_added,
            "data_keys_destroyed": self.data_keys_destroyed,
            "audit_rows_deleted": self.audit_rows_deleted,
            "deferred": list(self.deferred),
        }


async def sweep(conn: asyncpg.Connection, ks: asyncpg.Connection, now: dt.datetime, rules: Rules = Rules(), *,
                new_key: keystore.NewKey | None = None) -> SweepResult:
    """One sweep at time `now` on `conn` (not in a transaction) and the key store `ks`, if no other
    process is sweeping.

    `new_key` makes fresh wrapped data keys; without it worn keys are not replaced.
    """
    from storage.databases import replay_erasures
    started = time.perf_counter()
    lease = Lease(conn, seconds=rules.lease_seconds)
    if not await lease.take():
        return SweepResult(swept=False)
    result = SweepResult(swept=True)
    ms = int(rules.lock_timeout * 1000)
    try:
        # A step that waits longer than its lock timeout for a lock (a long transaction on the
        # table) is left for the next sweep; the sweep goes on with the others and says so.
        async with _unless_locked(result, "creating partitions"):
            # CREATE TABLE ... PARTITION OF takes an ACCESS EXCLUSIVE lock on the parent: while it
            # waits, inserts queue behind it. So it waits briefly; partitions are made days ahead,
            # and every sweep tries again.
            result.partitions_created = await partitions.ensure_partitions(
                conn, now.date(), lock_timeout_ms=PARTITION_LOCK_TIMEOUT_MS)
        for table in partitions.PARTITIONED_TABLES:
            result.rows_deleted[table] = 0
            result.partitions_dropped[table] = 0
            cutoff = rules.partition_cutoff(table, now)
            if cutoff is None:
                continue
            await lease.renew()
            async with _unless_locked(result, f"dropping partitions of {table}"):
                await _finish_detaches(conn, table, cutoff, result)
                await _drop_expired_partitions(conn, table, cutoff, result)
        if "heartbeats" in result.rows_deleted:
            async with _unless_locked(result, "deleting heartbeats"):
                await delete_expired_rows(conn, "heartbeats", "received_at", now - rules.heartbeat_retention, rules.batch_rows,
                                          result, lock_timeout_ms=ms, tick=lease.renew)
        if "scans" in result.rows_deleted:
            async with _unless_locked(result, "deleting scans"):
                await delete_expired_rows(conn, "scans", "expires_at", now, rules.batch_rows, result, lock_timeout_ms=ms,
                                          tick=lease.renew)
        result.rows_deleted["records"] = 0
        async with _unless_locked(result, "deleting records"):
            async for deleted in delete_in_batches(conn, "records", "expires_at", now, rules.batch_rows, lock_timeout_ms=ms,
                                                   tick=lease.renew):
                result.rows_deleted["records"] += deleted
        async with _unless_locked(result, "deleting audit rows"):
            result.audit_rows_deleted = await delete_older_than(conn, now - rules.audit_retention, batch=rules.batch_rows)
        await lease.renew()
        replayed = await replay_erasures(conn, ks, grace=rules.erase_grace)
        await finish_interrupted_erasures(conn, grace=rules.erase_grace)
        result.installations_erased = replayed + await erase_inactive(conn, ks, now - rules.inactive, grace=rules.erase_grace)
        await lease.renew()
        result.data_keys_destroyed = await keystore.destroy_expired(ks, now)
        result.data_keys_destroyed += await retire_spare_epoch_keys(conn, ks, now, rules.retire_grace)
        # Every sweep, whoever deleted keys since (this sweep, an admin erasure, a rotation): the
        # destroyed keys leave the tables now. Cheap when there is nothing to vacuum.
        await keystore.vacuum(ks)
        if new_key is not None:
            result.data_keys_added = await keystore.replace_worn_keys(
                ks, now, new_key, max_uses=rules.data_key_max_uses, max_age=rules.data_key_max_age)
        await _index_ended_days(conn, now, rules, lease, result)
        result.seconds = time.perf_counter() - started
        if result.removed_anything:
            await record(conn, "sweeper", "sweep", detail=result.audit_detail())
        return result
    except LeaseLost as exc:
        # This sweep stalled past its lease and another sweeper carries on: stop here.
        log.warning("sweeper: %s; stopping this sweep", exc)
        result.deferred.append("the rest of the sweep (lease lost)")
        result.seconds = time.perf_counter() - started
        return result
    finally:
        # A dead connection cannot release: the lease then runs out by itself.
        with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await lease.release()


class LeaseLost(Exception):
    """The sweeper lease expired and another process took it: this sweep stops."""


def _holder_name() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The sweeper lease: one row of `sweeper_lease`, held until its expiry (the database's clock)."""

    def __init__(self, conn: asyncpg.Connection, *, seconds: float = LEASE_SECONDS, holder: str | None = None) -> None:
        self.conn = conn
        self.seconds = seconds
        self.holder = holder or _holder_name()
        self._renewed = 0.0

    async def take(self) -> bool:
        """Take the lease if it is free or expired; True if this holder has it now."""
        taken = await self.conn.fetchval(
            "INSERT INTO sweeper_lease (holder, expires_at) VALUES ($1, now() + make_interval(secs => $2)) "
            "ON CONFLICT (singleton) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE sweeper_lease.expires_at <= now() OR sweeper_lease.holder = excluded.holder RETURNING true",
            self.holder, self.seconds,
        )
        if taken:
            self._renewed = time.monotonic()
        return bool(taken)

    async def renew(self, *, force: bool = False) -> None:
        """Push the expiry out again (at most every quarter of the lease); LeaseLost if another holder has it."""
        if not force and time.monotonic() - self._renewed < self.seconds / 4:
            return
        if not await self.conn.fetchval(
            "UPDATE sweeper_lease SET expires_at = now() + make_interval(secs => $2) WHERE holder = $1 RETURNING true",
            self.holder, self.seconds,
        ):
            raise LeaseLost(f"the sweeper lease of {self.holder} expired and was taken")
        self._renewed = time.monotonic()

    async def release(self) -> None:
        """Give the lease back at once (the next sweeper need not wait for the expiry)."""
        await self.conn.execute("DELETE FROM sweeper_lease WHERE holder = $1", self.holder)


@asynccontextmanager
async def _unless_locked(result: SweepResult, step: str) -> AsyncIterator[None]:
    try:
        yield
    except asyncpg.LockNotAvailableError:
        log.warning("sweeper: %s waited too long for a lock; the next sweep tries again", step)
        result.deferred.append(step)


async def _index_ended_days(conn: asyncpg.Connection, now: dt.datetime, rules: Rules, lease: Lease, result: SweepResult) -> None:
    """Build the day-end indexes (migration 0023) due now, one at a time; one that fails is left for the next sweep.

    Last in the sweep, so that a long build holds up no deletion; a build that waits too long for
    its partition's lock, or fails otherwise (a timeout, the disk), is logged and listed in
    `result.deferred`, and the others go on.
    """
    for index in await partitions.day_indexes_due(conn, now, kept_after=lambda table: rules.partition_cutoff(table, now)):
        await lease.renew(force=True)  # a build may take longer than a quarter of the lease
        try:
            result.partitions_indexed += await partitions.build_day_index(conn, index, lock_timeout_ms=PARTITION_LOCK_TIMEOUT_MS)
        except (asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("sweeper: building %s failed (%s); the next sweep tries again", index.name,
                        getattr(exc, "sqlstate", None) or type(exc).__name__)
            result.deferred.append(f"indexing {index.partition}")


async def _finish_detaches(conn: asyncpg.Connection, table: str, cutoff: dt.datetime, result: SweepResult) -> None:
    """Complete what a killed sweep left: a pending concurrent detach, an expired detached table."""
    pending = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass($1) AND i.inhdetachpending",
        table,
    )
    for r in pending:  # left by a concurrent detach (an older version, or an operator)
        async with _transaction(conn, PARTITION_LOCK_TIMEOUT_MS):
            await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {r['relname']} FINALIZE")
    leftovers = await conn.fetch(
        "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' AND NOT c.relispartition "
        "AND c.relnamespace = current_schema()::regnamespace AND starts_with(c.relname, $1)",
        table + "_p",
    )
    for r in leftovers:
        m = _PARTITION_NAME.match(r["relname"])
        if not m or m["table"] != table:
            continue
        day = dt.datetime.strptime(m["day"], "%Y%m%d").date()
        if partitions.day_end(day) <= cutoff:  # only what the sweeper itself would have dropped
            result.rows_deleted[table] += await _count_and_drop(conn, r["relname"])
            result.partitions_dropped[table] += 1


async def _drop_expired_partitions(conn: asyncpg.Connection, table: str, cutoff: dt.datetime, result: SweepResult) -> None:
    for name, day in await partitions.partitions_of(conn, table):
        if partitions.day_end(day) > cutoff:
            break  # oldest first: the rest are newer
        try:
            rows = await detach_and_drop(conn, table, name)
        except asyncpg.LockNotAvailableError:
            # A transaction on the table outlasted the lock timeout: the partition stays (dropped
            # next sweep) and its rows go by DELETE meanwhile.
            log.warning("sweeper: detaching %s waited too long; dropping it next sweep", name)
            result.deferred.append(f"dropping partitions of {table}")
            break
        result.rows_deleted[table] += rows
        result.partitions_dropped[table] += 1


async def detach_and_drop(conn: asyncpg.Connection, table: str, name: str,
                          lock_timeout_ms: int = PARTITION_LOCK_TIMEOUT_MS) -> int:
    """Remove partition `name` of `table` whole; returns its rows. One transaction, waiting at most
    lock_timeout_ms for the parent's lock (asyncpg.LockNotAvailableError past it)."""
    # Not DETACH ... CONCURRENTLY: it cannot run inside a transaction, so its lock timeout would be
    # a session SET, which a pooler in transaction mode hands on to other clients.
    async with _transaction(conn, lock_timeout_ms):
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {name}")
        rows = await conn.fetchval(f"SELECT count(*) FROM {name}")
        await conn.execute(f"DROP TABLE {name}")
    return rows


async def _count_and_drop(conn: asyncpg.Connection, name: str) -> int:
    async with _transaction(conn, PARTITION_LOCK_TIMEOUT_MS):
        rows = await conn.fetchval(f"SELECT count(*) FROM {name}")
        await conn.execute(f"DROP TABLE {name}")
    return rows


@asynccontextmanager
async def _transaction(conn: asyncpg.Connection, lock_timeout_ms: int | None) -> AsyncIterator[None]:
    """A transaction whose statements wait at most lock_timeout_ms for a lock (SET LOCAL: it ends with it)."""
    async with conn.transaction():
        if lock_timeout_ms is not None:
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        yield


async def delete_expired_rows(conn: asyncpg.Connection, table: str, column: str, cutoff: dt.datetime, batch: int,
                              result: SweepResult, *, lock_timeout_ms: int | None = None,
                              tick: Callable[[], Awaitable[None]] | None = None) -> None:
    """Delete rows of table with column <= cutoff, at most `batch` rows per statement, counted in result.

    Per partition (oldest first), by ctid: each statement is a short transaction that locks only
    the rows it deletes. The outer condition is checked again on the row as the DELETE finds it.
    `tick` runs before each batch (the sweeper renews its lease there).
    """
    for name, day in await partitions.partitions_of(conn, table):
        if column == "received_at" and dt.datetime.combine(day, dt.time(), dt.timezone.utc) > cutoff:
            break  # received later than the cutoff: nothing to delete here or after
        async for deleted in delete_in_batches(conn, name, column, cutoff, batch, lock_timeout_ms=lock_timeout_ms, tick=tick):
            result.rows_deleted[table] += deleted


async def delete_in_batches(conn: asyncpg.Connection, name: str, column: str, cutoff: dt.datetime,
                            batch: int, *, lock_timeout_ms: int | None = None,
                            tick: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[int]:
    """Delete the rows of one partition (or table) with column <= cutoff, `batch` per statement; yields each count."""
    while True:
        if tick is not None:
            await tick()
        async with _transaction(conn, lock_timeout_ms):
            status = await conn.execute(
                f"DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {name} WHERE {column} <= $1 LIMIT $2)) "
                f"AND {column} <= $1",
                cutoff, batch,
            )
        deleted = int(status.split()[-1])
        if deleted:
            yield deleted
        if deleted < batch:
            return


# ---------------------------------------------------------------- epoch keys a shortened retention left


async def retire_spare_epoch_keys(conn: asyncpg.Connection, ks: asyncpg.Connection, now: dt.datetime,
                                  grace: dt.timedelta) -> int:
    """Destroy early the epoch keys that no unexpired scan needs any more; returns how many.

    The workers report, with the seal counts, the latest expiry of the scans they sealed under
    each key (data_keys.last_expiry): once that has passed, the key is a candidate, and it is
    retired if the data database holds no unexpired scan sealed under it. A hint that is too
    early (a worker's report not yet flushed, or lost with the worker) only costs a look; one that
    is missing leaves the key to its epoch's end. So a key dies within `grace` and two sweeps of
    its last scan's expiry, at the latest one sweep after its epoch ends.

    A shortened retention brings stored scans' expiry forward, but they stay sealed under the key
    of the later epoch they were made for. For each installation marked by the shortening
    (installations.retention_shortened_at): its epoch keys whose epoch begins after a scan received
    now would expire, made at least `grace` ago, sealing no unexpired scan, are retired; once none
    such is left waiting, the mark goes. A key retiring for `grace` is destroyed unless a scan
    sealed under it after all (a worker that had not heard of the retirement), which keeps it.
    Its row stays until its epoch ends, so the id is never made again.
    """
    candidates = await keystore.spent_by_expiry(ks, now, now - grace)
    # Epoch keys seal scans and the records of sealed categories (storage.records): a key either still needs stays.
    used_pairs = await scan_store.referenced_pairs(conn, candidates, now)
    by_install: dict[uuid.UUID, list[int]] = {}
    for install_id, key_id in candidates:
        if (install_id, key_id) not in used_pairs:
            by_install.setdefault(install_id, []).append(key_id)
    for install_id, key_ids in by_install.items():
        await keystore.retire(ks, install_id, key_ids, now)
    for r in await scan_store.shortened_retentions(conn):
        install_id = r["install_id"]
        landing = now + dt.timedelta(hours=r["scan_retention_hours"])
        spare = await keystore.epoch_keys_starting_after(ks, install_id, landing)
        used = await scan_store.referenced_keys(conn, install_id, now, from_key_id=keystore.EPOCH_KEY_BASE)
        ready = [k["key_id"] for k in spare if k["key_id"] not in used and k["created_at"] <= now - grace]
        if ready:
            await keystore.retire(ks, install_id, ready, now)
        if len(ready) == len(spare):  # nothing left that a later sweep must look at again
            await scan_store.clear_shortened(conn, install_id, r["retention_shortened_at"])
    destroyed = 0
    for install_id, key_ids in (await keystore.retired_before(ks, now - grace)).items():
        used = await scan_store.referenced_keys(conn, install_id, now, from_key_id=min(key_ids))
        if keep := [k for k in key_ids if k in used]:
            await keystore.unretire(ks, install_id, keep)
        destroyed += await keystore.spend(ks, install_id, [k for k in key_ids if k not in used])
    return destroyed


# ---------------------------------------------------------------- erasure
#
# The same erasure as DELETE /v1/admin/installations/{id}: the key store destroys the keys and
# writes the tombstone (storage.keystore.destroy_installation); then begin_erasure revokes the
# tokens and marks the installation `erasing` in one transaction; delete_rows and unlink remove
# the rest. unlink waits
# until the revocation is Rules.erase_grace old, so every worker's revocation follower has
# dropped the installation's cached data keys (as ingest.admin.rights.UNLINK_GRACE does).

# An erasure marked this long ago and not finished was interrupted (its process died): finish it.
STALE_ERASURE = 300.0


async def erase_inactive(conn: asyncpg.Connection, ks: asyncpg.Connection, cutoff: dt.datetime, *, limit: int = 100,
                         grace: float = 1.0) -> int:
    """Erase installations with no heartbeat since cutoff (never seen: enrolled before it); returns how many.

    A sequential scan of installations (once per sweep): last_seen_at has no index, so that a
    heartbeat updates its current record in place (HOT, migration 0014). last_seen_at trails the
    latest heartbeat or record by under a second (migrations 0017, 0019): nothing at the scale of days.
    """
    erased = 0
    while True:
        async with conn.transaction():
            # FOR UPDATE re-evaluates the condition on the newest row version: an installation whose
            # heartbeat commits while we wait for its lock is no longer selected. The locks are held
            # until its keys are destroyed (begin_erasure runs inside, as a savepoint).
            ids = [
                r["install_id"]
                for r in await conn.fetch(
                    "SELECT install_id FROM installations "
                    "WHERE (last_seen_at <= $1 OR (last_seen_at IS NULL AND enrolled_at <= $1)) AND NOT erasing "
                    "ORDER BY install_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    cutoff, limit,
                )
            ]
            for install_id in ids:
                # Keys first: once they are gone every copy is unreadable; if this transaction
                # then fails, the tombstone makes the next sweep erase the installation anyway.
                destroyed = await keystore.destroy_installation(ks, install_id)
                await admin.begin_erasure(conn, install_id, "sweeper", keys_destroyed=destroyed)
        erased += await finish_erasures(conn, ids, grace)
        if len(ids) < limit:
            return erased


async def finish_interrupted_erasures(conn: asyncpg.Connection, *, stale_after: float = STALE_ERASURE, grace: float = 1.0) -> int:
    """Complete erasures begun at least stale_after seconds ago whose process died; returns how many."""
    stale = []
    for install_id in await admin.unfinished_erasures(conn):
        since = await admin.seconds_since_revocation(conn, install_id)
        if since is None or since >= stale_after:
            stale.append(install_id)
    return await finish_erasures(conn, stale, grace)


async def finish_erasures(conn: asyncpg.Connection, ids: list[uuid.UUID], grace: float) -> int:
    """Delete the rows of installations marked erasing, wait out the revocation grace once, unlink them."""
    rows = {install_id: await admin.delete_rows(conn, install_id) for install_id in ids}
    # One wait per batch, not per installation: they were all revoked in the same transaction.
    since = [await admin.seconds_since_revocation(conn, i) for i in ids]
    youngest = min((s for s in since if s is not None), default=grace)
    if youngest < grace:
        await asyncio.sleep(grace - youngest)
    done = 0
    for install_id in ids:
        done += await admin.unlink(conn, install_id, "sweeper", rows[install_id])
    return done


# ---------------------------------------------------------------- what operators alert on


async def oldest(conn: asyncpg.Connection) -> dict[str, dt.datetime | None]:
    """received_at of the oldest stored row of each partitioned table (None when empty); index-only."""
    return {t: await conn.fetchval(f"SELECT min(received_at) FROM {t}") for t in partitions.PARTITIONED_TABLES}
