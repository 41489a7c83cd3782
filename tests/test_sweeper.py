"""The retention sweeper against a real PostgreSQL, with an injected clock (nothing sleeps for retention)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import time
import uuid

import asyncpg
import pytest

from ingest.admin import rights

from crypto.datakeys import DataKeyCache, new_wrapped_key, wrap_context
from crypto.envelope import key_id_of, open_
from crypto.keyring import KeyRing
from ingest.keys import DATA_KEYS, SWEEPER
from ingest.pipeline.sealed import email_context
from storage import admin, keystore
from storage.partitions import PARTITION_INDEX_GRACE, ensure_partitions, partition_name, partitions_of
from storage.pool import connect
from storage.sweeper import Lease, Rules, sweep
from tests.support import enroll_direct, heartbeat_body, start_service

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
SECOND = dt.timedelta(seconds=1)


# ------------------------------------------------------------------ helpers


async def partitions_around(conn, at: dt.datetime, *, back: int, ahead: int = 1) -> None:
    await ensure_partitions(conn, at.date(), days_back=back, days_ahead=ahead)


async def add_installation(conn, ks, ring: KeyRing, *, enrolled_at: dt.datetime = T0 - 10 * DAY,
                           last_seen_at: dt.datetime | None = None, retention_hours: int = 720) -> uuid.UUID:
    """An enrolled installation (data key 1 in the key store, installation token) with the given times."""
    install_id, _, _ = await enroll_direct(conn, ks, ring)
    await conn.execute(
        "UPDATE installations SET enrolled_at = $2, last_seen_at = $3, scan_retention_hours = $4 WHERE install_id = $1",
        install_id, enrolled_at, last_seen_at, retention_hours,
    )
    return install_id


async def add_heartbeat(conn, install_id: uuid.UUID, at: dt.datetime) -> None:
    await conn.execute(
        "INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) VALUES ($1, $2, 'pro', '1.0', 1)",
        install_id, at,
    )


async def add_scan(conn, install_id: uuid.UUID, received_at: dt.datetime, hours: int | None = None) -> uuid.UUID:
    """A scan row as the writer stores it (the ciphertext is opaque to the sweeper)."""
    if hours is None:
        hours = await conn.fetchval("SELECT scan_retention_hours FROM installations WHERE install_id = $1", install_id)
    scan_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO scans (install_id, agent_id, scan_id, received_at, expires_at, key_id, content_mac, "
        "size_wire, size_decoded, size_plain, ciphertext) VALUES ($1, $2, $3, $4, $5, 1, $6, 10, 10, 10, $7)",
        install_id, uuid.uuid4(), scan_id, received_at, received_at + dt.timedelta(hours=hours), os.urandom(32), os.urandom(100),
    )
    return scan_id


async def scan_ids(conn) -> set[uuid.UUID]:
    return {r["scan_id"] for r in await conn.fetch("SELECT scan_id FROM scans")}


async def heartbeat_times(conn) -> list[dt.datetime]:
    return [r["received_at"] for r in await conn.fetch("SELECT received_at FROM heartbeats ORDER BY received_at")]


async def partition_days(conn, table: str) -> list[dt.date]:
    return [day for _, day in await partitions_of(conn, table)]


@pytest.fixture
def ring(master_key) -> KeyRing:
    return KeyRing.from_setting(master_key)


# ------------------------------------------------------------------ heartbeat history


async def test_heartbeat_history_past_retention_is_gone_and_one_second_short_survives(db, ring, ks):
    await partitions_around(db, T0, back=40)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    cutoff = T0 - 30 * DAY
    old_day = T0 - 35 * DAY  # in a partition that lies wholly past the retention
    for at in (old_day, cutoff - SECOND, cutoff, cutoff + SECOND, T0 - DAY):
        await add_heartbeat(db, install_id, at)

    result = await sweep(db, ks, T0, Rules(heartbeat_retention=30 * DAY))

    assert result.swept
    assert await heartbeat_times(db) == [cutoff + SECOND, T0 - DAY]
    assert result.rows_deleted["heartbeats"] == 3
    # Whole days past the retention are dropped, not deleted row by row; the boundary day stays.
    days = await partition_days(db, "heartbeats")
    assert min(days) == cutoff.date()
    assert result.partitions_dropped["heartbeats"] == (cutoff.date() - (T0 - 40 * DAY).date()).days
    audit = await db.fetchrow("SELECT actor, action, detail FROM audit_log WHERE action = 'sweep'")
    assert audit["actor"] == "sweeper" and audit["detail"]["heartbeats"] == 3 and audit["detail"]["partitions"] >= 1

    # The next sweep, a second later, takes the row that has now expired; nothing else.
    again = await sweep(db, ks, T0 + SECOND, Rules(heartbeat_retention=30 * DAY))
    assert again.rows_deleted["heartbeats"] == 1 and await heartbeat_times(db) == [T0 - DAY]


async def test_rows_are_deleted_in_bounded_batches(db, ring, ks):
    await partitions_around(db, T0, back=31)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    cutoff = T0 - 30 * DAY
    for i in range(11):
        await add_heartbeat(db, install_id, cutoff - i * SECOND)
    await add_heartbeat(db, install_id, cutoff + SECOND)
    statements = []
    db.add_query_logger(lambda q: statements.append(q.query) if q.query.startswith("DELETE") else None)

    result = await sweep(db, ks, T0, Rules(heartbeat_retention=30 * DAY, batch_rows=4))

    assert result.rows_deleted["heartbeats"] == 11
    assert await heartbeat_times(db) == [cutoff + SECOND]
    # 4 + 4 + 3: each statement (and transaction) touches at most batch_rows rows
    assert len([s for s in statements if "heartbeats_p" in s]) == 3


async def test_nothing_to_remove_writes_no_audit_row(db, ks):
    result = await sweep(db, ks, T0)
    assert result.swept and not result.removed_anything
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'sweep'") == 0


async def test_partitions_are_made_ahead(db, ks):
    result = await sweep(db, ks, T0)
    assert result.partitions_created == 10  # yesterday to 3 days ahead, heartbeats and scans
    assert (await sweep(db, ks, T0)).partitions_created == 0
    for table in ("heartbeats", "scans"):
        days = await partition_days(db, table)
        assert {(T0 + i * DAY).date() for i in range(4)} <= set(days)


# ------------------------------------------------------------------ scans


async def test_scans_expire_at_24_48_and_720_hours(db, ring, ks):
    await partitions_around(db, T0, back=1, ahead=32)
    ids = {h: await add_installation(db, ks, ring, last_seen_at=T0 + 40 * DAY, retention_hours=h) for h in (24, 48, 720)}
    received = T0 + HOUR
    at = {h: await add_scan(db, ids[h], received) for h in ids}
    # one second younger: one second short of expiry when its elders go
    later = {h: await add_scan(db, ids[h], received + SECOND) for h in ids}

    for hours in (24, 48, 720):
        t = received + dt.timedelta(hours=hours)
        result = await sweep(db, ks, t)
        left = await scan_ids(db)
        assert at[hours] not in left, f"{hours} h scan survived its expiry"
        assert later[hours] in left, f"{hours} h scan one second short of expiry was deleted"
        # this retention's scan, and the one-second-younger scan of the previous, shorter retention
        assert result.rows_deleted["scans"] == (1 if hours == 24 else 2)
        # nothing with expires_at <= t remains
        assert await db.fetchval("SELECT count(*) FROM scans WHERE expires_at <= $1", t) == 0
        assert {at[h] for h in ids if h > hours} | {later[h] for h in ids if h >= hours} <= left


async def test_scan_partition_past_maximum_retention_is_dropped(db, ring, ks):
    await partitions_around(db, T0, back=1, ahead=1)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0 + 40 * DAY)
    for i in range(3):
        await add_scan(db, install_id, T0 + i * HOUR)
    day = T0.date()
    # Killed sweeps aside, the rows are deleted within an interval of their expiry...
    result = await sweep(db, ks, T0 + 720 * HOUR + 3 * HOUR)
    assert result.rows_deleted["scans"] == 3 and await scan_ids(db) == set()
    assert day in await partition_days(db, "scans")
    # ...and once the whole day is past 720 h, its partition (and its dead space) goes at once.
    end_of_day = dt.datetime.combine(day + DAY, dt.time(), UTC)
    result = await sweep(db, ks, end_of_day + 720 * HOUR)
    assert result.partitions_dropped["scans"] >= 1
    assert day not in await partition_days(db, "scans")


async def test_a_whole_expired_day_goes_by_partition_drop(db, ring, ks):
    """After an outage: a day of scans all past 720 h is dropped whole, its rows counted."""
    await partitions_around(db, T0, back=1, ahead=1)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0 + 40 * DAY)
    for i in range(5):
        await add_scan(db, install_id, T0 + i * HOUR)
    statements = []
    db.add_query_logger(lambda q: statements.append(q.query))
    result = await sweep(db, ks, T0 + 40 * DAY)
    assert result.rows_deleted["scans"] == 5 and result.partitions_dropped["scans"] >= 1
    assert not [s for s in statements if s.startswith("DELETE FROM scans_p")  and "ctid" in s and T0.strftime("%Y%m%d") in s]
    assert await scan_ids(db) == set()


async def test_shortened_retention_applies_to_stored_scans_at_the_next_sweep(db, ring, ks):
    from storage.scans import set_retention

    await partitions_around(db, T0, back=1, ahead=2)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0 + 40 * DAY)
    scan_id = await add_scan(db, install_id, T0)
    assert (await sweep(db, ks, T0 + 25 * HOUR)).rows_deleted["scans"] == 0
    assert scan_id in await scan_ids(db)

    await set_retention(db, install_id, 24)

    result = await sweep(db, ks, T0 + 25 * HOUR)
    assert result.rows_deleted["scans"] == 1 and scan_id not in await scan_ids(db)


async def upload_scans(service, token: str, n: int) -> list[str]:
    status, body, _ = await service.request("POST", "/v1/agents", token=token, json={"name": "a"})
    assert status == 201, body
    agent = body["token"]
    ids = []
    for i in range(n):
        scan_id = str(uuid.uuid4())
        doc = {"scan_id": scan_id, "scanned_at": "2025-01-15T10:30:00Z", "asset": {"name": f"pc-{i}"}}
        status, body, _ = await service.request("POST", "/v1/scans", token=agent, json=doc)
        assert status == 201, body
        ids.append(scan_id)
    return ids


async def test_an_expired_scan_is_never_exported_even_before_the_sweep(service, db):
    install_id, token = await service.enroll()
    expired, live = await upload_scans(service, token, 2)
    await db.execute("UPDATE scans SET received_at = now() - interval '2 hours', expires_at = now() - interval '1 second' "
                     "WHERE scan_id = $1", uuid.UUID(expired))
    admin_token = service.create_secret("admin-token")
    status, doc, _ = await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200
    assert [s["scan"]["scan_id"] for s in doc["scans"]] == [live]
    assert await db.fetchval("SELECT count(*) FROM scans WHERE scan_id = $1", uuid.UUID(expired)) == 1  # not swept yet


async def test_shortening_retention_over_http_takes_effect_at_the_next_sweep(service, db):
    install_id, token = await service.enroll()
    await upload_scans(service, token, 3)
    now = dt.datetime.now(UTC)
    sweeper = service.app[SWEEPER]
    assert (await sweeper.run_once(now + 2 * HOUR)).rows_deleted["scans"] == 0

    status, body, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 1})
    assert status == 200, body

    result = await sweeper.run_once(now + HOUR + 5 * SECOND)
    assert result.rows_deleted["scans"] == 3
    assert await db.fetchval("SELECT count(*) FROM scans") == 0


# ------------------------------------------------------------------ inactive installations


async def test_inactive_installations_are_erased_keys_first(db, ring, ks):
    await partitions_around(db, T0, back=2)
    inactive = 400 * DAY
    gone_seen = await add_installation(db, ks, ring, enrolled_at=T0 - 900 * DAY, last_seen_at=T0 - inactive)
    gone_never = await add_installation(db, ks, ring, enrolled_at=T0 - inactive - SECOND)
    kept_seen = await add_installation(db, ks, ring, enrolled_at=T0 - 900 * DAY, last_seen_at=T0 - inactive + SECOND)
    kept_new = await add_installation(db, ks, ring, enrolled_at=T0 - DAY)
    for i in (gone_seen, kept_seen):
        await add_heartbeat(db, i, T0 - DAY)

    result = await sweep(db, ks, T0, Rules(inactive=inactive, erase_grace=0))

    assert result.installations_erased == 2
    left = {r["install_id"] for r in await db.fetch("SELECT install_id FROM installations")}
    assert left == {kept_seen, kept_new}
    for table in ("heartbeats", "scans", "agents"):
        assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE install_id = ANY($1::uuid[])", [gone_seen, gone_never]) == 0
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = ANY($1::uuid[])", [gone_seen, gone_never]) == 0
    assert set(await keystore.tombstones(ks)) == {gone_seen, gone_never}
    assert await db.fetchval("SELECT count(*) FROM tokens WHERE revoked_at IS NULL AND install_id IS NULL AND role = 'installation'") == 0
    # keys destroyed (first transaction) before the rows went (second); both audited, by the sweeper
    for install_id in (gone_seen, gone_never):
        actions = [(r["actor"], r["action"]) for r in await db.fetch(
            "SELECT actor, action FROM audit_log WHERE install_id = $1 ORDER BY id", install_id)]
        assert actions == [("sweeper", "installation.erase"), ("sweeper", "installation.erased")]
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = ANY($1::uuid[])", [kept_seen, kept_new]) == 2


async def test_an_erasure_cut_short_is_finished_by_a_later_sweep(db, ring, ks):
    """A process killed after the keys were destroyed: the installation stays marked, the sweeper finishes it."""

    await partitions_around(db, T0, back=2)
    cut = await add_installation(db, ks, ring, last_seen_at=T0)
    in_flight = await add_installation(db, ks, ring, last_seen_at=T0)
    for i in (cut, in_flight):
        await add_heartbeat(db, i, T0 - DAY)
        await rights.begin_erasure(db, ks, i, "tid_admin")
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = ANY($1::uuid[])", [cut, in_flight]) == 0
    # the first was revoked long ago (its process died); the second is an admin erasure running right now
    await db.execute("UPDATE tokens SET revoked_at = now() - interval '1 hour' WHERE install_id = $1", cut)

    await sweep(db, ks, T0)

    left = {r["install_id"] for r in await db.fetch("SELECT install_id FROM installations")}
    assert cut not in left and in_flight in left
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", cut) == 0


async def test_a_heartbeat_after_erasure_is_refused(service, db):
    install_id, token = await service.enroll()
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 200
    now = dt.datetime.now(UTC)
    result = await service.app[SWEEPER].run_once(now + 401 * DAY)
    assert result.installations_erased == 1
    await asyncio.sleep(0.6)  # the revocation follower polls every 0.25 s
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 401
    assert await db.fetchval("SELECT count(*) FROM installations WHERE install_id = $1", install_id) == 0


# ------------------------------------------------------------------ one sweeper, and killed sweeps


async def test_two_sweepers_at_once_only_one_works(db_dsn, db, ring, ks):
    await partitions_around(db, T0, back=40)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    await add_heartbeat(db, install_id, T0 - 31 * DAY)
    a, b, blocker = await connect(db_dsn), await connect(db_dsn), await connect(db_dsn)
    try:
        # Hold a table sweeper A needs, so A is certainly still sweeping when B starts.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE installations IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(sweep(a, ks, T0))
        for _ in range(100):
            if await db.fetchval("SELECT count(*) FROM sweeper_lease WHERE expires_at > now()"):
                break
            await asyncio.sleep(0.02)
        second = await sweep(b, ks, T0)
        assert not second.swept and not second.removed_anything
        await tx.rollback()
        done = await first
        assert done.swept and done.rows_deleted["heartbeats"] == 1
        # the lock is free again afterwards
        assert (await sweep(b, ks, T0)).swept
    finally:
        for c in (a, b, blocker):
            await c.close()


async def test_the_lease_of_a_sweeper_that_died_runs_out(db_dsn, db, ks):
    holder = await connect(db_dsn)
    assert await Lease(holder, seconds=1.5, holder="dead-node:1").take()
    holder.terminate()  # a killed process: nothing releases the lease, its expiry does
    assert not (await sweep(db, ks, T0)).swept
    started = time.monotonic()
    for _ in range(100):
        if (await sweep(db, ks, T0)).swept:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the lease of a dead sweeper did not run out")
    assert time.monotonic() - started < 3
    assert await db.fetchval("SELECT count(*) FROM sweeper_lease") == 0  # released at the end of the sweep


async def test_a_sweeper_that_outlived_its_lease_stops(db_dsn, db, ks):
    """A stalled sweeper whose lease was taken over must not go on as if it still held it."""
    mine = Lease(db, seconds=0.2, holder="stalled")
    assert await mine.take()
    await asyncio.sleep(0.3)
    other = await connect(db_dsn)
    try:
        assert await Lease(other, seconds=30, holder="other").take()  # expired: taken over
        with pytest.raises(Exception, match="expired and was taken"):
            await mine.renew(force=True)
        assert not await Lease(db, seconds=30, holder="third").take()  # the new holder keeps it
    finally:
        await other.close()


async def test_the_sweeper_keeps_no_session_state(db_dsn, db, ks):
    """No session advisory lock and no session setting outlive a sweep on its connection."""
    conn = await connect(db_dsn)
    try:
        seen: list[int] = []
        done = asyncio.Event()

        async def watch():  # session advisory locks of the sweeping connection, while it sweeps
            while not done.is_set():
                seen.append(await db.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", conn.get_server_pid()))
                await asyncio.sleep(0.005)
        watcher = asyncio.create_task(watch())
        result = await sweep(conn, ks, T0, Rules(lock_timeout=0.7))
        done.set()
        await watcher
        assert result.swept and seen and max(seen) == 0
        assert await conn.fetchval("SHOW lock_timeout") == "0"
        assert await conn.fetch("SELECT name FROM pg_settings WHERE source = 'session'") == []
    finally:
        await conn.close()


async def test_a_detach_cut_short_is_finished_by_the_next_sweep(db_dsn, db, ring, ks):
    """Killed between the two transactions of DETACH ... CONCURRENTLY: the partition is left pending."""
    await partitions_around(db, T0, back=40)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    old = T0 - 35 * DAY
    await add_heartbeat(db, install_id, old)
    name = partition_name("heartbeats", old.date())
    reader, detacher = await connect(db_dsn), await connect(db_dsn)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM heartbeats")  # a query that still sees the partition
        await detacher.execute("SET statement_timeout = '300ms'")
        with pytest.raises(asyncpg.QueryCanceledError):
            await detacher.execute(f"ALTER TABLE heartbeats DETACH PARTITION {name} CONCURRENTLY")
        await tx.rollback()
    finally:
        await reader.close()
        await detacher.close()
    assert await db.fetchval("SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass($1) AND inhdetachpending", name) == 1

    result = await sweep(db, ks, T0)

    assert await db.fetchval("SELECT to_regclass($1)", name) is None
    assert result.rows_deleted["heartbeats"] == 1
    assert await heartbeat_times(db) == []


async def test_a_long_transaction_delays_a_partition_drop_but_not_the_deletion(db_dsn, db, ring, ks):
    await partitions_around(db, T0, back=40, ahead=3)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    old = T0 - 35 * DAY
    await add_heartbeat(db, install_id, old)
    await add_heartbeat(db, install_id, T0 - HOUR)
    reader = await connect(db_dsn)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM heartbeats")  # e.g. a long report
        result = await sweep(db, ks, T0, Rules(lock_timeout=0.3))
        assert result.deferred == ["dropping partitions of heartbeats"]
        # The rows are gone all the same (row locks only); the partition goes when the reader is done.
        assert result.rows_deleted["heartbeats"] == 1 and await heartbeat_times(db) == [T0 - HOUR]
        await tx.rollback()
    finally:
        await reader.close()
    result = await sweep(db, ks, T0, Rules(lock_timeout=0.3))
    assert not result.deferred and result.partitions_dropped["heartbeats"] >= 1
    assert await db.fetchval("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == 0
    assert min(await partition_days(db, "heartbeats")) == (T0 - 30 * DAY).date()


async def history_indexes(conn, day: dt.date) -> list[str]:
    """The column lists of the valid indexes on the heartbeat history's partition of `day`."""
    rows = await conn.fetch(
        "SELECT pg_get_indexdef(x.indexrelid) AS d FROM pg_index x WHERE x.indrelid = $1::regclass AND x.indisvalid",
        partition_name("heartbeats", day))
    return sorted(r["d"].rpartition(" USING btree ")[2] for r in rows)


BY_AGE, BY_INSTALLATION = "(received_at)", "(install_id, received_at)"


async def test_a_days_history_gets_its_index_by_installation_once_the_day_has_ended(db, ring, ks):
    await partitions_around(db, T0, back=3)
    mine = await add_installation(db, ks, ring, last_seen_at=T0)
    other = await add_installation(db, ks, ring, last_seen_at=T0)
    for days in (3, 2, 1, 0):
        for install_id in (mine, other):
            await add_heartbeat(db, install_id, T0 - days * DAY)
    midnight = dt.datetime.combine(T0.date(), dt.time(), UTC)  # the end of the day before T0's

    # Just short of the grace after yesterday's end: the two days before it are indexed, not yesterday.
    result = await sweep(db, ks, midnight + PARTITION_INDEX_GRACE - SECOND)
    assert result.partitions_indexed == 2
    for days, indexes in ((3, [BY_INSTALLATION, BY_AGE]), (2, [BY_INSTALLATION, BY_AGE]), (1, [BY_AGE]), (0, [BY_AGE])):
        assert await history_indexes(db, (T0 - days * DAY).date()) == indexes
    result = await sweep(db, ks, midnight + PARTITION_INDEX_GRACE)
    assert result.partitions_indexed == 1 and not result.deferred
    assert await history_indexes(db, (T0 - DAY).date()) == [BY_INSTALLATION, BY_AGE]
    # The day being written, and the days ahead, keep one index only; a later sweep builds nothing new.
    for days in (0, -1, -3):
        assert await history_indexes(db, (T0 - days * DAY).date()) == [BY_AGE]
    assert (await sweep(db, ks, T0)).partitions_indexed == 0

    # Lookups by installation read the ended days by their index (the planner made to prefer one
    # over reading these tiny tables), and find its rows of every day, indexed or not, and only its rows.
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN SELECT * FROM heartbeats WHERE install_id = '{mine}'"))
    for days in (3, 2, 1):
        assert f"{partition_name('heartbeats', (T0 - days * DAY).date())}_install" in plan
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", mine) == 4
    await db.execute("UPDATE installations SET erasing = true WHERE install_id = $1", mine)
    await admin.delete_rows(db, mine)
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", mine) == 0
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", other) == 4


async def test_indexing_an_ended_day_waits_briefly_behind_a_writer_and_the_other_days_go_on(db_dsn, db, ring, ks):
    await partitions_around(db, T0, back=3, ahead=3)  # nothing to create: that would wait for the writer too
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    busy = (T0 - 2 * DAY).date()
    writer = await connect(db_dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await add_heartbeat(writer, install_id, T0 - 2 * DAY)  # a late write into an ended day, not committed
        # Rules.lock_timeout is 30 s here: a build that waited that long (or for ever) fails the wait_for.
        result = await asyncio.wait_for(sweep(db, ks, T0, Rules(lock_timeout=30)), 20)
        assert result.deferred == [f"indexing {partition_name('heartbeats', busy)}"]
        assert result.partitions_indexed == 2  # the day before it and the day after it
        await tx.commit()
    finally:
        await writer.close()
    assert await history_indexes(db, busy) == [BY_AGE]
    assert await history_indexes(db, (T0 - 3 * DAY).date()) == await history_indexes(db, (T0 - DAY).date()) == [BY_INSTALLATION, BY_AGE]
    result = await sweep(db, ks, T0)
    assert not result.deferred and result.partitions_indexed == 1
    assert await history_indexes(db, busy) == [BY_INSTALLATION, BY_AGE]


async def test_an_index_of_the_same_columns_under_another_name_counts_as_built(db, ks):
    """After a rollback of migration 0023 the parent's index names its partitions' copies itself."""
    await partitions_around(db, T0, back=2, ahead=3)
    await db.execute("CREATE INDEX heartbeats_install ON heartbeats (install_id, received_at)")
    assert (await sweep(db, ks, T0)).partitions_indexed == 0
    assert await history_indexes(db, (T0 - DAY).date()) == [BY_INSTALLATION, BY_AGE]


async def test_making_a_partition_never_keeps_writers_waiting_long(db_dsn, db, ring, ks):
    """CREATE TABLE ... PARTITION OF needs the parent exclusively; behind a long reader it gives up fast."""
    await partitions_around(db, T0, back=1, ahead=0)
    reader, writer = await connect(db_dsn), await connect(db_dsn)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM heartbeats")
        started = time.perf_counter()
        result = await sweep(db, ks, T0, Rules(lock_timeout=5))
        assert "creating partitions" in result.deferred
        assert time.perf_counter() - started < 3
        install_id = await add_installation(writer, ks, ring, last_seen_at=T0)
        await add_heartbeat(writer, install_id, T0)  # nothing left queued in front of writers
        await tx.rollback()
    finally:
        await reader.close()
        await writer.close()
    result = await sweep(db, ks, T0)
    assert not result.deferred and result.partitions_created == 6  # 3 days ahead, heartbeats and scans
    assert {(T0 + i * DAY).date() for i in range(4)} <= set(await partition_days(db, "heartbeats"))


async def test_a_partition_detached_but_not_dropped_is_dropped_by_the_next_sweep(db, ring, ks):
    await partitions_around(db, T0, back=40)
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    old = T0 - 35 * DAY
    await add_heartbeat(db, install_id, old)
    name = partition_name("heartbeats", old.date())
    await db.execute(f"ALTER TABLE heartbeats DETACH PARTITION {name}")  # killed right after this

    result = await sweep(db, ks, T0)

    assert await db.fetchval("SELECT to_regclass($1)", name) is None
    assert result.rows_deleted["heartbeats"] == 1 and result.partitions_dropped["heartbeats"] >= 1


@pytest.mark.fault
async def test_a_sweep_killed_at_any_point_is_finished_by_the_next(db_dsn, db, ring, ks):
    """Kill the sweeper's session after its n-th statement, for n across a whole sweep; the next sweep (once an
    erasure the kill interrupted is STALE_ERASURE old) always ends in the same state, and the state in between
    is never inconsistent."""
    rules = Rules(batch_rows=3, erase_grace=0, lease_seconds=0.5)  # a killed sweeper's lease runs out fast
    cutoff = T0 - 30 * DAY

    async def setup():
        await partitions_around(db, T0, back=40)
        keep = await add_installation(db, ks, ring, last_seen_at=T0)
        for d in range(35, 25, -1):
            for h in (0, 6, 12, 18):
                await add_heartbeat(db, keep, T0 - d * DAY + h * HOUR)
        gone = await add_installation(db, ks, ring, enrolled_at=T0 - 500 * DAY, last_seen_at=T0 - 401 * DAY)
        return gone, sorted(t for t in await heartbeat_times(db) if t > cutoff)

    async def consistent(gone, *, swept=False):
        state = await db.fetchrow("SELECT erasing FROM installations WHERE install_id = $1", gone)
        keys = await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", gone)
        tombstone = await ks.fetchval("SELECT count(*) FROM erasures WHERE install_id = $1", gone)
        if swept:  # the sweep that finished the killed one erased it
            assert state is None and keys == 0 and tombstone == 1, (state, keys, tombstone)
            return
        # never half-erased the wrong way round: keys are destroyed first, with the tombstone, so an
        # installation marked erasing has none; one not marked may have lost them only if the kill came
        # between the key store and the data database (its tombstone then says so, and the next sweep
        # erases it: docs/guarantees.md)
        assert (state is None and keys == 0 and tombstone == 1) or (state["erasing"] and keys == 0 and tombstone == 1) \
            or (not state["erasing"] and keys == 1 and tombstone == 0) or (not state["erasing"] and keys == 0 and tombstone == 1), \
            (state, keys, tombstone)

    statements: list[str] = []
    gone, expected = await setup()
    probe = await connect(db_dsn)
    probe.add_query_logger(lambda q: statements.append(q.query))
    await sweep(probe, ks, T0, rules)
    await probe.close()
    total = len(statements)
    assert total > 20 and await heartbeat_times(db) == expected
    await db.execute("DELETE FROM heartbeats")

    for cut in range(1, total, max(1, total // 8)):
        gone, expected = await setup()
        victim = await connect(db_dsn)
        pid = victim.get_server_pid()
        seen = 0
        kills = []

        def kill_after(q, pid=pid):
            nonlocal seen
            seen += 1
            if seen == cut:
                kills.append(asyncio.get_running_loop().create_task(db.execute("SELECT pg_terminate_backend($1)", pid)))

        victim.add_query_logger(kill_after)
        try:
            await sweep(victim, ks, T0, rules)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
            pass  # the session died under it
        for k in kills:
            await k
        victim.terminate()
        await consistent(gone)
        # An erasure the kill interrupted is finished by the first sweep once it is STALE_ERASURE
        # old (a live eraser is not raced): the next sweep here comes that much later.
        await db.execute("UPDATE tokens SET revoked_at = revoked_at - interval '1 hour' WHERE install_id = $1", gone)
        for _ in range(100):  # the killed sweeper's lease runs out
            result = await sweep(db, ks, T0, rules)
            if result.swept:
                break
            await asyncio.sleep(0.05)
        assert result.swept
        await consistent(gone, swept=True)
        assert await heartbeat_times(db) == expected, f"cut after statement {cut}"
        assert await db.fetchval("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == 0
        assert await db.fetchval("SELECT count(*) FROM pg_class WHERE relname LIKE 'heartbeats\\_p%' AND relkind = 'r' "
                                 "AND NOT relispartition") == 0
        await db.execute("DELETE FROM heartbeats")


# ------------------------------------------------------------------ in serve, metrics, command line


async def test_the_sweeper_runs_inside_serve_every_interval(db_dsn, master_key, tmp_path, db, ks):
    now = dt.datetime.now(UTC)
    await partitions_around(db, now, back=32)
    ring = KeyRing.from_setting(master_key)
    install_id = await add_installation(db, ks, ring, last_seen_at=now)
    await add_heartbeat(db, install_id, now - 31 * DAY)
    await add_heartbeat(db, install_id, now - HOUR)
    async with start_service(db_dsn, master_key, tmp_path, sweep_interval=0.2) as svc:
        for _ in range(100):
            status, text, _ = await svc.request("GET", "/metrics")
            if 'telemetry_sweeper_rows_deleted_total{table="heartbeats"}' in text:
                break
            await asyncio.sleep(0.05)
        assert len(await heartbeat_times(db)) == 1
    assert status == 200
    assert metric(text, 'telemetry_sweeper_rows_deleted_total{table="heartbeats"}') >= 1
    assert metric(text, "telemetry_sweep_last_success_timestamp_seconds") >= time.time() - 60
    assert metric(text, "telemetry_sweep_duration_seconds_count") >= 1


def metric(text: str, name: str) -> float:
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_metrics_show_what_a_sweep_removed_and_the_oldest_ages(service, db, ring, ks):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    await partitions_around(db, now, back=35)
    ring = KeyRing.from_setting(service.settings.master_key)
    install_id = await add_installation(db, ks, ring, last_seen_at=now, retention_hours=24)
    await add_heartbeat(db, install_id, now - 33 * DAY)
    await add_heartbeat(db, install_id, now - 10 * DAY)
    await add_scan(db, install_id, now - 2 * DAY)  # expired (24 h)
    await add_scan(db, install_id, now - 5 * HOUR)

    result = await service.app[SWEEPER].run_once(now)

    assert result.swept
    _, text, _ = await service.request("GET", "/metrics")
    assert metric(text, 'telemetry_sweeper_rows_deleted_total{table="heartbeats"}') == 1
    assert metric(text, 'telemetry_sweeper_rows_deleted_total{table="scans"}') == 1
    assert metric(text, 'telemetry_sweeper_partitions_dropped_total{table="heartbeats"}') >= 1
    assert metric(text, "telemetry_oldest_heartbeat_age_seconds") == (10 * DAY).total_seconds()
    assert metric(text, "telemetry_oldest_scan_age_seconds") == (5 * HOUR).total_seconds()
    assert metric(text, "telemetry_sweep_last_success_timestamp_seconds") > 0


async def test_a_worker_that_does_not_get_the_lock_still_reports_the_ages(service, db, ks):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    ring = KeyRing.from_setting(service.settings.master_key)
    install_id = await add_installation(db, ks, ring, last_seen_at=now)
    await add_heartbeat(db, install_id, now - 2 * HOUR)
    _, text, _ = await service.request("GET", "/metrics")
    last_success = metric(text, "telemetry_sweep_last_success_timestamp_seconds")  # the sweep at start
    other = Lease(db, holder="another node")
    assert await other.take()
    try:
        result = await service.app[SWEEPER].run_once(now)
    finally:
        await other.release()
    assert not result.swept
    _, text, _ = await service.request("GET", "/metrics")
    assert metric(text, "telemetry_oldest_heartbeat_age_seconds") == (2 * HOUR).total_seconds()
    assert metric(text, "telemetry_oldest_scan_age_seconds") == 0
    assert metric(text, "telemetry_sweep_last_success_timestamp_seconds") == last_success  # a skipped tick is no success


async def test_the_first_sweep_runs_at_start(db_dsn, master_key, tmp_path, db, ks):
    """Not one interval later: what expired while the service was down goes at once, and the
    last-success gauge an alert watches is set within seconds of a start."""
    now = dt.datetime.now(UTC)
    await partitions_around(db, now, back=32)
    ring = KeyRing.from_setting(master_key)
    install_id = await add_installation(db, ks, ring, last_seen_at=now)
    await add_heartbeat(db, install_id, now - 31 * DAY)
    started = time.time()
    async with start_service(db_dsn, master_key, tmp_path, sweep_interval=3600) as svc:
        assert await heartbeat_times(db) == []
        _, text, _ = await svc.request("GET", "/metrics")
    assert started <= metric(text, "telemetry_sweep_last_success_timestamp_seconds") <= time.time()


async def test_sweep_once_from_the_command_line(service, db, ks):
    now = dt.datetime.now(UTC)
    await partitions_around(db, now, back=32)
    ring = KeyRing.from_setting(service.settings.master_key)
    install_id = await add_installation(db, ks, ring, last_seen_at=now)
    await add_heartbeat(db, install_id, now - 31 * DAY)

    out = service.cli("sweep", "--once").stdout
    assert "heartbeats: 1 row(s) deleted" in out and await heartbeat_times(db) == []

    other = Lease(db, holder="another node")
    assert await other.take()
    try:
        proc = service.cli("sweep", "--once")
    finally:
        await other.release()
    assert proc.returncode == 0 and "skipped" in proc.stdout


# ------------------------------------------------------------------ data keys: counted, replaced, picked up


async def test_seals_are_counted_and_a_worn_key_is_replaced(service, db, ks):
    install_id, token = await service.enroll()
    # three seals; the repeated e-mail's ciphertext is handed out again (RepeatedSeals): no seal, not counted
    for email in ("a0@example.com", "a1@example.com", "a2@example.com", "a2@example.com"):
        status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
        assert status == 200
    sweeper = service.app[SWEEPER]
    sweeper.rules = Rules(data_key_max_uses=4)
    now = dt.datetime.now(UTC)
    result = await sweeper.run_once(now)
    assert await ks.fetchval("SELECT uses FROM data_keys WHERE install_id = $1 AND key_id = 1", install_id) == 3
    assert result.data_keys_added == 0

    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email="b@example.com"))
    assert status == 200
    result = await sweeper.run_once(now)
    assert result.data_keys_added == 1
    row = await ks.fetchrow("SELECT kek_id, uses FROM data_keys WHERE install_id = $1 AND key_id = 2", install_id)
    assert row["kek_id"] == service.app[DATA_KEYS]._ring.primary_id and row["uses"] == 0

    # Workers pick the new key up when their cache entry expires (here: at once).
    service.app[DATA_KEYS].evict(install_id)
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email="c@example.com"))
    assert status == 200
    email_ct = bytes(await db.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id))
    assert key_id_of(email_ct) == 2
    ring = KeyRing.from_setting(service.settings.master_key)
    key = await DataKeyCache(ring, _loader(ks)).get(install_id, 2)
    assert open_(key, email_ct, email_context(install_id)) == b"c@example.com"


async def test_an_old_key_is_replaced_by_age(db, ring, ks):
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    await ks.execute("UPDATE data_keys SET created_at = $2 WHERE install_id = $1", install_id, T0 - 91 * DAY)
    made = lambda i, k: new_wrapped_key(ring, i, k)  # noqa: E731
    assert (await sweep(db, ks, T0, Rules(data_key_max_age=90 * DAY), new_key=made)).data_keys_added == 1
    assert (await sweep(db, ks, T0, Rules(data_key_max_age=90 * DAY), new_key=made)).data_keys_added == 0
    rows = await ks.fetch("SELECT key_id, kek_id, wrapped FROM data_keys WHERE install_id = $1 ORDER BY key_id", install_id)
    assert [r["key_id"] for r in rows] == [1, 2]
    assert len(ring.unwrap(rows[1]["kek_id"], rows[1]["wrapped"], wrap_context(install_id, 2))) == 32


def _loader(conn):
    async def load(install_id):
        return [(r["key_id"], r["kek_id"], r["wrapped"]) for r in await keystore.keys_of(conn, install_id)]

    return load


async def test_the_data_key_cache_picks_up_a_new_key_after_its_ttl(db, ring, ks):
    install_id = await add_installation(db, ks, ring, last_seen_at=T0)
    clock = [0.0]
    cache = DataKeyCache(ring, _loader(ks), ttl=300, clock=lambda: clock[0])
    assert (await cache.current(install_id)).key_id == 1
    kek_id, wrapped = new_wrapped_key(ring, install_id, 2)
    await ks.execute("INSERT INTO data_keys (install_id, key_id, kek_id, wrapped) VALUES ($1, 2, $2, $3)", install_id, kek_id, wrapped)
    clock[0] = 299
    assert (await cache.current(install_id)).key_id == 1  # still valid: sealing with it is fine
    assert (await cache.get(install_id, 2)).key_id == 2  # an unknown id reloads at once
    clock[0] = 1000
    assert (await cache.current(install_id)).key_id == 2
    assert cache.drain_uses() == {(install_id, 1): 2, (install_id, 2): 1}
    assert cache.drain_uses() == {}


async def test_erase_destroys_keys_a_restored_key_store_brought_back(service, db, ks):
    """docs/operations.md, restoring an older key store: the installation is gone from the data
    database, its keys (and no tombstone) are back in the store; `erase ID` destroys them again."""
    install_id, _ = await service.enroll()
    saved = await ks.fetch("SELECT * FROM data_keys WHERE install_id = $1", install_id)
    assert saved
    service.cli("erase", str(install_id))
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 0
    # the older key store: the keys as they were, the tombstone not yet written
    await ks.execute("DELETE FROM erasures WHERE install_id = $1", install_id)
    for r in saved:
        await ks.execute("INSERT INTO data_keys SELECT (r).* FROM (SELECT $1::data_keys AS r) s", tuple(r.values()))
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == len(saved)

    out = service.cli("erase", str(install_id)).stdout
    assert f"destroyed its {len(saved)} key(s)" in out
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1", install_id) == 0
    assert await ks.fetchval("SELECT count(*) FROM erasures WHERE install_id = $1", install_id) == 1
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'installation.erase' AND install_id = $1",
                             install_id) == 2
    # an id the store holds nothing of is still "no installation"
    proc = service.cli("erase", str(uuid.uuid4()), check=False)
    assert proc.returncode == 1 and "no installation" in proc.stderr
