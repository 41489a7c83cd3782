"""The service's serving role cannot alter, disable or bypass the audit log (storage.roles,
docs/admin.md#roles); embedded mode makes it and serves as it; `audit` reports a role that could."""

import asyncio
import datetime as dt
import stat
import uuid

import aiohttp
import asyncpg
import psutil
import pytest

from crypto.keyring import KeyRing
from ingest.admin.compliance import audit_database
from storage import roles
from storage.audit import delete_older_than, record
from storage.embedded import EmbeddedPostgres
from storage.partitions import ensure_partitions, partition_name, partitions_of
from storage.pool import connect
from storage.sweeper import detach_and_drop
from tests.support import heartbeat_body, run_cli

ROLE = "ti_test_service"  # roles belong to the server: one for every test, made by the first
UTC = dt.timezone.utc
OLD = dt.datetime.now(UTC) - dt.timedelta(days=40)


@pytest.fixture
async def as_service(db, ks, db_dsn):
    """The test database set up by roles.ensure (as `serve` does), and a connection logged in as the service role."""
    await roles.ensure(db, ks, ROLE)
    conn = await connect(roles.with_login(db_dsn, ROLE, None))
    yield conn
    await conn.close()


async def _audit_row(db, at: dt.datetime | None = None) -> int:
    await record(db, "cli", "token.revoke", detail={"token_id": "t1"})
    row_id = await db.fetchval("SELECT max(id) FROM audit_log")
    if at is not None:  # an old row: written by the admin role with the triggers out of the way (a test's liberty)
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute("UPDATE audit_log SET at = $1 WHERE id = $2", at, row_id)
    return row_id


async def test_serving_role_cannot_skip_the_triggers(as_service):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute("SET session_replication_role = replica")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute("SET LOCAL session_replication_role = replica")
    # RESET ROLE gives nothing back: the role is the login, not a SET ROLE
    await as_service.execute("RESET ROLE")
    assert await as_service.fetchval("SELECT current_user") == ROLE
    assert await as_service.fetchval("SHOW session_replication_role") == "origin"


@pytest.mark.parametrize("statement", [
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update",
    "ALTER TABLE audit_log DISABLE TRIGGER ALL",
    "DROP TRIGGER audit_log_no_update ON audit_log",
    "DROP TABLE audit_log",
    "ALTER TABLE audit_log OWNER TO telemetry_owner",
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
    "TRUNCATE audit_log",
])
async def test_serving_role_cannot_alter_the_audit_log(as_service, db, statement):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute(statement)
    assert sorted(await db.fetchval("SELECT array_agg(tgname::text) FROM pg_trigger WHERE tgrelid = 'audit_log'::regclass "
                                    "AND NOT tgisinternal AND tgenabled <> 'D'")) == ["audit_log_no_truncate", "audit_log_no_update"]


async def test_serving_role_cannot_update_or_delete_an_audit_row(as_service, db):
    recent = await _audit_row(db)
    old = await _audit_row(db, at=OLD)
    for statement in ("UPDATE audit_log SET action = 'x' WHERE id = $1", "DELETE FROM audit_log WHERE id = $1"):
        for row_id in (recent, old):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_service.execute(statement, row_id)
    # marked as the sweeper marks its deletes: a recent row stays refused, also when the service
    # shadows now() (the trigger function calls pg_catalog's only: migration 0013)
    await as_service.execute("CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'infinity'::timestamptz $$")
    async with as_service.transaction():
        await as_service.execute("SET LOCAL search_path = public, pg_catalog")
        await as_service.execute("SET LOCAL telemetry.audit_sweep = 'on'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_service.execute("DELETE FROM audit_log WHERE id = $1", recent)
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE id = ANY($1::bigint[])", [recent, old]) == 2
    # what the trigger lets through, the sweeper's delete of a row past 30 days, the role may do
    assert await delete_older_than(as_service, dt.datetime.now(UTC) - dt.timedelta(days=35)) == 1
    assert await db.fetchval("SELECT array_agg(id) FROM audit_log WHERE id = ANY($1::bigint[])", [recent, old]) == [recent]


async def test_serving_role_does_the_services_work(as_service, db, ks, ks_dsn):
    """Partitions made and dropped, audit rows written, the key store used and vacuumed, as the service role."""
    day = OLD.date()
    await ensure_partitions(db, day, days_back=0, days_ahead=0)  # made by the admin role (a migration, `serve`)...
    await roles.ensure(db, ks, ROLE)  # ...handed over at the next start
    await ensure_partitions(as_service, day - dt.timedelta(days=1), days_back=0, days_ahead=0)  # made by the service
    await ensure_partitions(db, day - dt.timedelta(days=2), days_back=0, days_ahead=0)  # the admin role again (`sweep --once`)
    made = [day - dt.timedelta(days=n) for n in range(3)]
    owners = await db.fetch("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relname = ANY($1::text[])",
                            [partition_name("heartbeats", d) for d in made])
    assert [r[0] for r in owners] == [roles.OWNER]  # a partition belongs to its parent's owner, whoever made it
    for d in made:
        await detach_and_drop(as_service, "heartbeats", partition_name("heartbeats", d))
    assert day not in {d for _, d in await partitions_of(db, "heartbeats")}
    await record(as_service, "sweeper", "sweep", detail={})
    service_ks = await connect(roles.with_login(ks_dsn, ROLE, None))
    try:
        assert await service_ks.fetchval("SELECT current_user") == ROLE
        await service_ks.execute("DELETE FROM erasures WHERE install_id = $1", uuid.uuid4())
        await service_ks.execute("VACUUM (SKIP_LOCKED) data_keys, erasures")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await service_ks.execute("DROP TABLE schema_migrations")
    finally:
        await service_ks.close()
    assert await roles.findings(as_service, ROLE) == []


async def test_findings_name_each_way_round_the_triggers(as_service, db):
    assert await roles.findings(db, "postgres") and "superuser" in (await roles.findings(db, "postgres"))[0]
    assert await roles.findings(db, "ti_no_such_role") == ["the service's role ti_no_such_role does not exist (embedded mode: `serve` creates it)"]
    cases = [
        ("ALTER TABLE audit_log OWNER TO {r}", "ALTER TABLE audit_log OWNER TO postgres", "owns audit_log"),
        ("GRANT UPDATE ON audit_log TO {r}", "REVOKE UPDATE ON audit_log FROM {r}", "holds UPDATE or TRUNCATE"),
        ("GRANT SET ON PARAMETER session_replication_role TO {r}", "REVOKE SET ON PARAMETER session_replication_role FROM {r}",
         "may SET session_replication_role"),
        ("ALTER FUNCTION audit_log_append_only() OWNER TO {r}", "ALTER FUNCTION audit_log_append_only() OWNER TO postgres",
         "owns the trigger function audit_log_append_only"),
        ("ALTER FUNCTION audit_log_append_only() RESET search_path", "ALTER FUNCTION audit_log_append_only() SET search_path = pg_catalog, pg_temp",
         "does not pin its search_path"),
    ]
    for plant, undo, words in cases:
        await db.execute(plant.format(r=ROLE))
        try:
            found = await roles.findings(db, ROLE)
        finally:
            await db.execute(undo.format(r=ROLE))  # (a parameter privilege is the server's: always undone)
        assert len(found) == 1 and words in found[0], (plant, found)
    assert await roles.findings(db, ROLE) == []


async def test_audit_reports_a_superuser_service(service, db, ks, master_key, db_dsn):
    # TELEMETRY_DSN a superuser and no TELEMETRY_SERVICE_DSN: the service connects as a superuser
    env = {k: v for k, v in service.env.items() if k != "TELEMETRY_SERVICE_DSN"}
    proc = run_cli("audit", env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()[1:]]
    assert lines == [line for line in lines if line.startswith("[service-role]")] and len(lines) == 1, proc.stdout
    assert "a superuser" in lines[0] and "TELEMETRY_SERVICE_DSN" in lines[0]
    # with a service role set up, no finding
    await roles.ensure(db, ks, ROLE)
    settings = service.settings.replace(service_dsn=roles.with_login(db_dsn, ROLE, None))
    assert [f for f in await audit_database(db, ks, KeyRing.from_setting(master_key), settings) if f.check == "service-role"] == []


# ------------------------------------------------------------------ embedded mode, end to end


async def _service_backends(conn) -> set[str]:
    return {r[0] for r in await conn.fetch(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")}


async def _eventually(predicate, timeout: float = 60):
    for _ in range(int(timeout * 10)):
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.slow
async def test_embedded_mode_serves_as_its_own_role(own_data_dir):
    from tests.test_serve import ServeProcess, enroll

    data_dir = own_data_dir
    env = {"TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_SWEEP_INTERVAL": "0.5"}
    server = ServeProcess(env, "--workers", "1")
    embedded = None
    try:
        await server.wait_ready()
        password_file = data_dir / roles.PASSWORD_FILE
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 40
        # never on a command line (serve, its workers, the server's processes) nor in the output
        for proc in psutil.process_iter(["cmdline"]):
            assert password not in " ".join(proc.info["cmdline"] or ())
        assert password not in server.stderr
        embedded = EmbeddedPostgres(data_dir)
        admin_dsn = embedded.start()
        admin = await connect(admin_dsn)
        try:
            # the serving pools (data and key store) log in as the service role, and it is what `audit` wants
            async def only_the_service() -> bool:  # (a connection of serve's start-up may take a moment to go)
                return await _service_backends(admin) == {roles.SERVICE}

            assert await _eventually(only_the_service), await _service_backends(admin)
            assert await roles.findings(admin, roles.SERVICE) == []
            assert await admin.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'audit_log'") == "postgres"
            # its password is asked for
            async def refused() -> bool:  # (once the server has reloaded pg_hba.conf)
                try:
                    await (await asyncpg.connect(roles.with_login(admin_dsn, roles.SERVICE, "wrong"))).close()
                except asyncpg.InvalidPasswordError:
                    return True
                return False

            assert await _eventually(refused)
            service = await connect(roles.with_login(admin_dsn, roles.SERVICE, password))
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await service.execute("SET session_replication_role = replica")
                # an expired day of heartbeat history, made as the service makes its partitions
                old_day = OLD.date()
                await ensure_partitions(service, old_day, days_back=0, days_ahead=0)
            finally:
                await service.close()

            admin_token = run_cli("admin-token", "create", env=env).stdout.strip().splitlines()[-1]
            async with aiohttp.ClientSession() as http:
                install_id, token = await enroll(http, server.url, env)
                async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
                async with http.get(server.url + f"/v1/admin/installations/{install_id}/export",
                                    headers={"Authorization": f"Bearer {admin_token}"}) as r:
                    assert r.status == 200
                    assert (await r.json())["heartbeats"]
            assert await admin.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 1
            assert await admin.fetchval("SELECT count(*) FROM audit_log WHERE action = 'installation.export' AND install_id = $1",
                                        install_id) == 1

            async def dropped() -> bool:
                return old_day not in {d for _, d in await partitions_of(admin, "heartbeats")}

            assert await _eventually(dropped), "the sweeper (as the service role) did not drop the expired partition"
            proc = run_cli("audit", env=env, check=False)
            assert proc.returncode == 0 and proc.stdout.strip() == "audit passed", proc.stdout + proc.stderr
            assert "Traceback" not in server.stderr and password not in server.stderr, server.stderr
        finally:
            await admin.close()
    finally:
        assert server.stop() == 0
        if embedded is not None:
            embedded.stop()


def test_service_dsn_is_refused_in_embedded_mode(tmp_path):
    data_dir = tmp_path / "data"
    proc = run_cli("serve", env={"TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_SERVICE_DSN": "postgresql://u:pw@h/db"}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "TELEMETRY_SERVICE_DSN" in lines[0] and "pw" not in proc.stderr
    assert not data_dir.exists()


# ------------------------------------------------------------------ TELEMETRY_DSN with TELEMETRY_SERVICE_DSN


@pytest.mark.slow
async def test_serve_with_a_service_dsn_serves_as_that_role(db_dsn, db, master_key, tmp_path):
    from tests.test_serve import ServeProcess, enroll

    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path),
           "TELEMETRY_SERVICE_DSN": roles.with_login(db_dsn, ROLE, None)}
    server = ServeProcess(env, "--workers", "1")
    try:
        await server.wait_ready()
        name = await db.fetchval("SELECT current_database()")

        async def backends() -> set[str]:
            return {r[0] for r in await db.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND datname IN ($1, $2) AND pid <> pg_backend_pid()", name, name + "_keys")}

        async def only_the_service() -> bool:  # data database and key store
            return await backends() == {ROLE}

        assert await _eventually(only_the_service), await backends()
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, server.url, env)
            async with http.post(server.url + "/v1/heartbeats", json=heartbeat_body(install_id),
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 1
        assert await db.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'heartbeats'") == roles.OWNER
        proc = run_cli("audit", env=env, check=False)
        assert proc.returncode == 0 and proc.stdout.strip() == "audit passed", proc.stdout + proc.stderr
        assert "Traceback" not in server.stderr, server.stderr
    finally:
        assert server.stop() == 0


def test_a_service_dsn_of_the_migrating_role_is_refused(db_dsn, master_key, tmp_path):
    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path),
           "TELEMETRY_SERVICE_DSN": db_dsn}
    proc = run_cli("serve", "--port", "0", env=env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "TELEMETRY_SERVICE_DSN" in lines[0] and "own" in lines[0], proc.stderr


async def test_a_migrating_role_that_is_no_superuser_sets_the_service_up(pg_server_dsn):
    """The managed-server path of docs/admin.md#roles: the roles made once by a superuser, the
    migrating role owning its databases but no superuser and without CREATEROLE."""
    from storage.databases import migrate_both
    from tests.conftest import _with_database

    migrator, service_role = "ti_test_migrator", "ti_test_service_m"
    name = f"ti_test_{uuid.uuid4().hex[:12]}"
    su = await connect(pg_server_dsn)
    try:
        for role, options in ((migrator, "LOGIN"), (roles.OWNER, "NOLOGIN"), (service_role, "LOGIN")):
            if not await su.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
                await su.execute(f"CREATE ROLE {role} {options}")
        await su.execute(f"GRANT {roles.OWNER} TO {migrator}, {service_role}")  # what the superuser runs once
        for db_name in (name, name + "_keys"):
            await su.execute(f'CREATE DATABASE "{db_name}" OWNER {migrator}')
        admin_dsn = roles.with_login(_with_database(pg_server_dsn, name), migrator, None)
        ks_admin_dsn = roles.with_login(_with_database(pg_server_dsn, name + "_keys"), migrator, None)
        data, ks = await connect(admin_dsn), await connect(ks_admin_dsn)
        try:
            await migrate_both(data, ks)
            await roles.ensure(data, ks, service_role)
            assert await roles.findings(data, service_role) == []
            assert [f for f in await roles.findings(data, migrator) if "owns audit_log" in f]  # the admin role would not do
        finally:
            await data.close()
            await ks.close()
        service = await connect(roles.with_login(admin_dsn, service_role, None))
        try:
            await ensure_partitions(service, OLD.date(), days_back=0, days_ahead=0)
            await detach_and_drop(service, "heartbeats", partition_name("heartbeats", OLD.date()))
            await record(service, "sweeper", "sweep", detail={})
            for statement in ("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update", "SET session_replication_role = replica",
                              "DROP TABLE audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await service.execute(statement)
        finally:
            await service.close()
    finally:
        for db_name in (name, name + "_keys"):
            await su.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await su.execute(f"DROP ROLE IF EXISTS {migrator}")
        await su.execute(f"DROP ROLE IF EXISTS {service_role}")
        await su.close()
