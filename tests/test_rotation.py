"""Key rotation: re-wrapping every data key under a new primary KEK while the service runs."""

from __future__ import annotations

import asyncio
import base64
import uuid

import pytest

from crypto.datakeys import rewrap, wrap_context
from crypto.envelope import DataKey, open_, seal
from crypto.keyring import KeyRing, generate_key, kek_id, load_or_create_key_file
from ingest.pipeline.sealed import email_context
from storage import keystore
from storage.databases import ensure_keystore_database, migrate_both
from storage.keystore import count_not_wrapped_by, rewrap_batch
from storage.pool import connect
from ingest.keys import DATA_KEYS, NODES
from tests.support import enroll_direct, heartbeat_body, run_cli, start_service


def key_id_of_setting(value: str) -> str:
    return kek_id(base64.b64decode(value))


async def export(svc, admin_token: str, install_id: uuid.UUID) -> dict:
    status, body, _ = await svc.request("GET", f"/v1/admin/installations/{install_id}/export", token=admin_token)
    assert status == 200, body
    return body


async def populate(svc, n: int) -> dict[uuid.UUID, tuple[str, str, str]]:
    """n installations, each with an e-mail and one scan: install_id -> (token, e-mail, scan_id)."""
    made = {}
    secret = svc.create_secret()
    for i in range(n):
        install_id, token = await svc.enroll(secret=secret)
        email = f"admin{i}@example.org"
        status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
        assert status == 200
        status, body, _ = await svc.request("POST", "/v1/agents", token=token, json={"name": "a"})
        assert status == 201, body
        scan_id = str(uuid.uuid4())
        doc = {"scan_id": scan_id, "scanned_at": "2025-01-15T10:30:00Z", "asset": {"name": f"pc-{i}"}}
        status, body, _ = await svc.request("POST", "/v1/scans", token=body["token"], json=doc)
        assert status == 201, body
        made[install_id] = (token, email, scan_id)
    return made


async def kek_ids(ks) -> dict[str, int]:
    return {r["kek_id"]: r["n"] for r in await ks.fetch("SELECT kek_id, count(*) AS n FROM data_keys GROUP BY kek_id")}


async def test_rotation_rewraps_every_data_key_and_old_data_still_decrypts(db_dsn, master_key, tmp_path, db, ks):
    old, new = master_key, generate_key()
    old_id, new_id = key_id_of_setting(old), key_id_of_setting(new)
    async with start_service(db_dsn, old, tmp_path) as svc:
        made = await populate(svc, 12)
    assert await kek_ids(ks) == {old_id: 24}  # a record key and a scan epoch key each

    # The operator puts the new key first, restarts, and rotates while the service runs and takes traffic.
    both = f"{new},{old}"
    async with start_service(db_dsn, both, tmp_path) as svc:
        env = {**svc.env, "TELEMETRY_MASTER_KEY": both}
        rotation = asyncio.create_task(asyncio.to_thread(run_cli, "keys", "rotate", "--batch", "5", env=env))
        while not rotation.done():
            for install_id, (token, email, _) in list(made.items())[:4]:
                status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id, email=email))
                assert status == 200
            await asyncio.sleep(0.01)
        out = (await rotation).stdout
        assert f"re-wrapped 24 data key(s); every data key is now wrapped by {new_id}" in out
        assert old_id in out.splitlines()[-1]  # ...which may now be removed
    assert await kek_ids(ks) == {new_id: 24}
    audit = await db.fetch("SELECT actor, detail FROM audit_log WHERE action = 'key.rotate' ORDER BY id")
    assert [r["detail"]["rewrapped"] for r in audit] == [5, 5, 5, 5, 4]
    assert {r["actor"] for r in audit} == {"cli"} and {r["detail"]["kek_id"] for r in audit} == {new_id}

    # The old key can go: everything written before the rotation still decrypts with the new one alone.
    async with start_service(db_dsn, new, tmp_path) as svc:
        admin_token = svc.create_secret("admin-token")
        for install_id, (_, email, scan_id) in made.items():
            doc = await export(svc, admin_token, install_id)
            assert doc["installation"]["email"] == email
            assert [s["scan"]["scan_id"] for s in doc["scans"]] == [scan_id]
            assert not any(s.get("unreadable") for s in doc["scans"])

    # ...and with only the old key the service refuses to start, naming the key it lacks.
    proc = run_cli("serve", "--port", "0", env={**svc.env, "TELEMETRY_MASTER_KEY": old}, check=False, timeout=60)
    assert proc.returncode == 1 and new_id in proc.stderr and "TELEMETRY_MASTER_KEY" in proc.stderr


async def test_rotation_refuses_when_a_data_key_needs_a_key_it_lacks(service, db, ks):
    await service.enroll()
    old_id = key_id_of_setting(service.settings.master_key)
    other = generate_key()
    proc = run_cli("keys", "rotate", env={**service.env, "TELEMETRY_MASTER_KEY": other}, check=False)
    assert proc.returncode == 1 and old_id in proc.stderr
    assert await kek_ids(ks) == {old_id: 1}


async def test_serve_refuses_to_start_without_a_key_some_data_key_needs(service, db):
    await service.enroll()
    old_id = key_id_of_setting(service.settings.master_key)
    proc = run_cli("serve", "--port", "0", env={**service.env, "TELEMETRY_MASTER_KEY": generate_key()}, check=False, timeout=60)
    assert proc.returncode == 1
    assert f"key id(s) {old_id}" in proc.stderr and "not configured" in proc.stderr


async def test_rotation_with_nothing_to_do(service):
    out = service.cli("keys", "rotate").stdout
    assert "re-wrapped 0 data key(s)" in out


async def test_a_batch_skips_keys_another_transaction_holds(db, ks_dsn, master_key, ks):
    old = KeyRing.from_setting(master_key)
    ids = []
    for _ in range(3):
        install_id = uuid.uuid4()
        await enroll_direct(db, ks, old, install_id)
        ids.append(install_id)
    ring = KeyRing.from_setting(f"{generate_key()},{master_key}")
    holder = await connect(ks_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM data_keys WHERE install_id = $1 FOR UPDATE", ids[0])
        done = await rewrap_batch(ks, ring.primary_id, lambda *row: rewrap(ring, *row), limit=10)
        assert done == 2 and await count_not_wrapped_by(ks, ring.primary_id) == 1  # no waiting on the held row
        await tx.rollback()
    finally:
        await holder.close()
    assert await rewrap_batch(ks, ring.primary_id, lambda *row: rewrap(ring, *row), limit=10) == 1
    assert await count_not_wrapped_by(ks, ring.primary_id) == 0
    for install_id in ids:
        r = await ks.fetchrow("SELECT kek_id, wrapped FROM data_keys WHERE install_id = $1", install_id)
        assert len(ring.unwrap(r["kek_id"], bytes(r["wrapped"]), wrap_context(install_id, 1))) == 32


def test_generate_is_only_for_the_key_file(db_dsn, master_key, tmp_path):
    proc = run_cli("keys", "rotate", "--generate",
                   env={"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}, check=False)
    assert proc.returncode == 1 and "embedded mode" in proc.stderr


@pytest.mark.slow
async def test_rotate_generate_in_embedded_mode(own_data_dir):
    from storage.embedded import EmbeddedPostgres

    data_dir = own_data_dir
    env = {"TELEMETRY_DATA_DIR": str(data_dir)}
    key_file = data_dir / "master.key"
    server = EmbeddedPostgres(data_dir)  # held by the test, so the commands below join it
    dsn = await asyncio.to_thread(server.start)
    try:
        first, _ = load_or_create_key_file(key_file)
        ring = KeyRing.from_setting(first)
        install_id = uuid.uuid4()
        conn = await connect(dsn)
        ks_dsn = keystore.default_dsn(dsn, embedded=True)
        await ensure_keystore_database(conn, ks_dsn)
        ks = await connect(ks_dsn)
        try:
            await migrate_both(conn, ks)
            _, k, w = await enroll_direct(conn, ks, ring, install_id)
            data_key = DataKey.from_bytes(1, ring.unwrap(k, w, wrap_context(install_id, 1)))
            sealed = seal(data_key, b"admin@example.org", email_context(install_id))
        finally:
            await conn.close()
            await ks.close()

        first_id = key_id_of_setting(first)
        out = (await asyncio.to_thread(run_cli, "keys", "rotate", "--generate", env=env)).stdout
        keys = key_file.read_text().strip().split(",")
        assert len(keys) == 2 and keys[1] == first
        new_id = key_id_of_setting(keys[0])
        assert f"every data key is now wrapped by {new_id}" in out

        conn = await connect(dsn)
        ks = await connect(ks_dsn)
        try:
            r = await ks.fetchrow("SELECT kek_id, wrapped FROM data_keys WHERE install_id = $1", install_id)
            assert r["kek_id"] == new_id
            ring = KeyRing.from_setting(keys[0])  # the new key alone opens what the old one sealed
            raw = ring.unwrap(r["kek_id"], bytes(r["wrapped"]), wrap_context(install_id, 1))
            assert open_(DataKey.from_bytes(1, raw), sealed, email_context(install_id)) == b"admin@example.org"

            # A connection held open is no running service: nothing refuses for it any more.
            # A live worker that does not load the new key (here: its row in the key store's list of
            # nodes, holding the two older keys) makes the rotation wait, then refuse, naming it.
            await ks.execute("INSERT INTO nodes (node_id, kek_ids) VALUES ('elsewhere:4242', $1::text[])", [new_id, first_id])
            proc = await asyncio.to_thread(run_cli, "keys", "rotate", "--generate", "--wait", "1", env=env, check=False)
            newest = key_file.read_text().strip().split(",")
            assert len(newest) == 3  # the key is added all the same
            newest_id = key_id_of_setting(newest[0])
            assert proc.returncode == 1 and "elsewhere:4242" in proc.stderr
            assert f"new primary key {newest_id}" in proc.stderr and f"holds {new_id}, {first_id}" in proc.stderr
            assert await ks.fetchval("SELECT kek_id FROM data_keys WHERE install_id = $1", install_id) == new_id
            # ...and so does `keys rotate` until that worker holds the key (or is gone)
            proc = await asyncio.to_thread(run_cli, "keys", "rotate", env=env, check=False)
            assert proc.returncode == 1 and "elsewhere:4242" in proc.stderr
            await ks.execute("UPDATE nodes SET kek_ids = $1::text[] WHERE node_id = 'elsewhere:4242'", [newest_id, new_id, first_id])
        finally:
            await conn.close()
            await ks.close()
        out = (await asyncio.to_thread(run_cli, "keys", "rotate", env=env)).stdout
        assert "re-wrapped 1 data key(s)" in out
    finally:
        await asyncio.to_thread(server.stop)


def test_no_key_material_is_printed(service):
    procs = [service.cli("keys", "rotate"), service.cli("sweep", "--once")]
    for key in service.settings.master_key.split(","):
        assert not any(key in p.stdout or key in p.stderr for p in procs)


@pytest.mark.slow
async def test_rotating_while_embedded_serve_runs_answers_no_503(own_data_dir):
    """The operator's sequence from issue 14: `keys rotate --generate`, then `keys rotate`, while an
    embedded `serve` runs and takes traffic. Its workers load the new key file by themselves."""
    import aiohttp

    from tests.test_serve import ServeProcess

    data_dir = own_data_dir
    env = {"TELEMETRY_DATA_DIR": str(data_dir)}
    server = ServeProcess(env, "--workers", "2")
    statuses: list[object] = []
    try:
        await server.wait_ready(120)
        secret = run_cli("enroll-secret", "create", env=env).stdout.strip().splitlines()[-1]
        installs = []
        async with aiohttp.ClientSession() as http:
            for _ in range(12):
                install_id = uuid.uuid4()
                async with http.post(server.url + "/v1/enroll", json={"install_id": str(install_id)},
                                     headers={"Authorization": f"Bearer {secret}"}) as r:
                    assert r.status == 201
                    installs.append((install_id, (await r.json())["token"]))

        async def beat(install_id, token):  # an e-mail: the installation's data key must be unwrapped
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id, email="a@example.org"),
                                         headers={"Authorization": f"Bearer {token}"}) as r:
                        statuses.append(r.status)
            except aiohttp.ClientError as exc:
                statuses.append(type(exc).__name__)

        done = asyncio.Event()

        async def traffic():  # the first four, all along (their keys cached in the workers)
            while not done.is_set():
                for install_id, token in installs[:4]:
                    await beat(install_id, token)

        load = asyncio.create_task(traffic())
        old_id = key_id_of_setting((data_dir / "master.key").read_text().strip())
        out = (await asyncio.to_thread(run_cli, "keys", "rotate", "--generate", env=env)).stdout
        new_id = key_id_of_setting((data_dir / "master.key").read_text().strip().split(",")[0])
        assert new_id != old_id
        assert f"re-wrapped 12 data key(s); every data key is now wrapped by {new_id}" in out  # a record key each
        out = (await asyncio.to_thread(run_cli, "keys", "rotate", env=env)).stdout
        assert "re-wrapped 0 data key(s)" in out and old_id in out.splitlines()[-1]  # the old key may go now
        # Installations never seen by a worker since the rotation: their keys are loaded and unwrapped
        # under the new key now.
        for install_id, token in installs[4:]:
            await beat(install_id, token)
        done.set()
        await load
        stderr = server.stderr
    finally:
        code = server.stop()
    assert code == 0
    assert len(statuses) > 12 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert stderr.count("key file reloaded") == 2  # each worker


async def test_rotation_refuses_while_a_running_worker_lacks_the_new_primary(service, db, ks):
    """The running service (this test process: one worker) holds only the old key."""
    import os
    import socket

    await service.enroll()
    old_id = key_id_of_setting(service.settings.master_key)
    new = generate_key()
    env = {**service.env, "TELEMETRY_MASTER_KEY": f"{new},{service.settings.master_key}"}
    proc = run_cli("keys", "rotate", env=env, check=False)
    assert proc.returncode == 1
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert f"{me} holds {old_id}" in proc.stderr and key_id_of_setting(new) in proc.stderr
    assert await kek_ids(ks) == {old_id: 1}  # nothing re-wrapped
    nodes = await ks.fetch("SELECT node_id, kek_ids FROM nodes")
    assert [(r["node_id"], r["kek_ids"]) for r in nodes] == [(me, [old_id])]


async def test_a_node_that_meets_a_key_it_lacks_logs_the_key_id(service, db, ks, caplog):
    install_id, token = await service.enroll()
    await ks.execute("UPDATE data_keys SET kek_id = '00000000deadbeef' WHERE install_id = $1", install_id)
    service.app[DATA_KEYS].evict(install_id)
    with caplog.at_level("ERROR"):
        status, body, _ = await service.request("POST", "/v1/heartbeats", token=token,
                                                json=heartbeat_body(install_id, email="a@example.org"))
    assert status == 503 and body["detail"] == "key material unavailable"
    lines = [r.getMessage() for r in caplog.records if "crypto failure" in r.getMessage()]
    assert lines and "00000000deadbeef" in lines[0], lines
    assert service.settings.master_key not in caplog.text


async def test_rotation_says_when_a_worker_still_wraps_under_the_old_primary(service, db, ks):
    """A worker holding the new key second (`old,new`) can read everything, so rotation goes on,
    but it still wraps new data keys under the old key: the old key must not be removed yet."""
    await service.enroll()
    old_id = key_id_of_setting(service.settings.master_key)
    new = generate_key()
    new_id = key_id_of_setting(new)
    service.app[NODES].interval = 3600  # the running service of this test holds the old key only: off the list
    await ks.execute("DELETE FROM nodes")
    await ks.execute("INSERT INTO nodes (node_id, kek_ids) VALUES ('other:1', $1::text[])", [old_id, new_id])
    env = {**service.env, "TELEMETRY_MASTER_KEY": f"{new},{service.settings.master_key}"}
    out = run_cli("keys", "rotate", env=env).stdout
    assert f"every data key is now wrapped by {new_id}" in out
    assert f"other:1 holds {old_id}, {new_id}" in out and "can be removed" not in out
    assert await kek_ids(ks) == {new_id: 1}
