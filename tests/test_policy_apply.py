"""A policy change at the next start: policy_applied against the file in force, `policy apply`, and what
`audit` and the statistics read of the records of a policy file's categories (issue 13, point 4).

The records are planted with SQL (the records endpoint is another part's); everything else is the real
CLI and the real app against a real PostgreSQL.
"""

import asyncio
import datetime as dt
import hashlib
import os
import uuid
from pathlib import Path

import orjson
import pytest

import policy
from crypto.envelope import FORMAT_VERSION
from crypto.keyring import KeyRing
from ingest.admin.compliance import audit_database
from ingest.settings import Settings
from policy.changes import compare, declared
from storage import applied
from tests.support import ROOT, run_cli, service_role_dsn, start_service
from tests.test_serve import ServeProcess, free_port

DIAGNOSTICS = ROOT / "examples" / "policies" / "diagnostics.toml"


@pytest.fixture
def env(db_dsn, master_key, tmp_path) -> dict[str, str]:
    return {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path)}


def without(text: str, *names: str) -> str:
    """The TOML text without the [[category.field]] / [[category.field.field]] tables of those names."""
    blocks = text.split("\n[[")
    keep = [b for b in blocks if not any(b.startswith(("category.field]]\nname = " + f'"{n}"',
                                                       "category.field.field]]\nname = " + f'"{n}"')) for n in names)]
    return "\n[[".join(keep)


def diagnostics_without(tmp_path: Path, *names: str) -> Path:
    out = tmp_path / "diagnostics-changed.toml"
    out.write_text(without(DIAGNOSTICS.read_text(), *names))
    return out


async def hold(db, declaration: dict, source: str = "earlier.toml") -> None:
    await applied.record_applied(db, declaration, source)


async def installation(db, *, restricted: bool = False) -> uuid.UUID:
    install_id = uuid.uuid4()
    await db.execute("INSERT INTO installations (install_id, last_seen_at, restricted) VALUES ($1, now(), $2)", install_id, restricted)
    return install_id


async def plant(db, category: str, install_id: uuid.UUID, fields: dict, *, sealed: bool = False,
                expires: dt.timedelta = dt.timedelta(days=7)) -> str:
    record_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO records (category, install_id, record_id, expires_at, fields, sealed, key_id) "
        "VALUES ($1, $2, $3, now() + $4::interval, $5::text::jsonb, $6, $7)",
        category, install_id, record_id, expires, orjson.dumps(fields).decode(),
        bytes([FORMAT_VERSION]) + os.urandom(60) if sealed else None, 1 if sealed else None)
    return record_id


async def heartbeat(db, install_id: uuid.UUID) -> None:
    from storage.partitions import ensure_partitions

    await ensure_partitions(db, dt.datetime.now(dt.timezone.utc).date())
    await db.execute("INSERT INTO heartbeats (install_id, received_at, license_type, version, asset_count) "
                     "VALUES ($1, now(), 'e', '1', 1)", install_id)


async def fields_of(db) -> dict[str, dict]:
    return {r[0]: orjson.loads(r[1]) for r in await db.fetch("SELECT record_id, fields::text FROM records")}


def diagnostic(machine: str | None = "a" * 64, **extra) -> dict:
    out = {"report_id": str(uuid.uuid4()), "occurred_at": "2026-12-01T10:00:00Z", "version": "1.0", "os": "linux",
           "fault": "crash", "uptime_s": 5, "stack": {"module": "core", "frames": ["f1", "f2"]}}
    if machine is not None:
        out["machine"] = machine
    return out | extra


# ------------------------------------------------------------------ the declaration


def test_declared_names_stored_fields_by_leaf_path_and_compare_tells_removals_from_additions(tmp_path):
    diag = policy.load(DIAGNOSTICS)
    paths = declared(diag)["diagnostic"]
    assert "stack.frames[]" in paths and "stack.module" in paths
    assert "description" not in paths  # not-stored: nothing of it is held
    assert "ip_address" in declared(policy.builtin())["installation"]  # stored, though not read from the body
    changed = policy.load(diagnostics_without(tmp_path, "machine", "frames"))
    change = compare(declared(diag), changed)
    assert change.fields_removed == (("diagnostic", "machine"), ("diagnostic", "stack.frames[]")) and not change.categories_removed
    assert compare(declared(changed), diag).fields_added == (("diagnostic", "machine"), ("diagnostic", "stack.frames[]"))
    assert not compare(declared(changed), diag).removes
    assert compare({"gone": ["x"]} | declared(diag), diag).removed_text() == "category[gone]"


def test_strip_removes_a_path_at_every_depth_and_what_it_leaves_empty():
    doc = {"a": 1, "stack": {"module": "m", "frames": ["x"]}, "mods": [{"name": "n", "v": 1}, {"name": "o"}, {}]}
    assert applied.strip(doc, "stack.frames[]") and doc["stack"] == {"module": "m"}
    assert applied.strip(doc, "mods[].name") and doc["mods"] == [{"v": 1}, {}, {}]
    assert applied.strip(doc, "mods[].v") and "mods" not in doc  # every item left empty: the list goes
    assert not applied.strip(doc, "stack.nothing") and not applied.strip(doc, "b")
    assert doc == {"a": 1, "stack": {"module": "m"}}
    assert applied.json_path("mods[].name") == '$."mods"[*]."name"'


# ------------------------------------------------------------------ serve at its next start


async def serve_once(env: dict[str, str]) -> None:
    """Start serve, wait until it is ready, stop it: it must exit 0. A start that fails raises with
    serve's output (a try/finally asserting the stop's code hid that error behind "-15 == 0")."""
    srv = ServeProcess(env)
    try:
        await srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    output = srv.stderr
    code = srv.stop()
    assert code == 0, output[-3000:]


async def test_serve_records_the_first_policy_and_an_added_field_just_starts(env, db):
    await serve_once(env)
    held = await applied.held(db)
    assert held == (declared(policy.builtin()), "built-in")
    # The database held one field less (an older file): the field is added, serve starts and records the file.
    older = declared(policy.builtin())
    older["installation"].remove("web_server_type")
    await hold(db, older)
    await serve_once(env)
    assert await applied.held(db) == (declared(policy.builtin()), "built-in")
    detail = await db.fetchval("SELECT detail::text FROM audit_log WHERE action = 'policy.apply' ORDER BY id DESC LIMIT 1")
    assert orjson.loads(detail) == {"categories_added": 0, "fields_added": 1}


async def test_serve_refuses_what_the_file_no_longer_declares_until_policy_apply_confirm(env, db):
    """The database holds a category of an earlier file; the file in force (built-in) has none of it."""
    earlier = declared(policy.builtin()) | declared(policy.load(DIAGNOSTICS))
    await hold(db, earlier)
    install_id = await installation(db)
    ids = [await plant(db, "diagnostic", install_id, diagnostic()) for _ in range(3)]
    await db.execute("INSERT INTO record_settings (install_id, category, retention_hours) VALUES ($1, 'diagnostic', 24)", install_id)
    await heartbeat(db, install_id)

    proc = await asyncio.to_thread(run_cli, "serve", "--port", str(free_port()), env=env, check=False, timeout=60)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "category[diagnostic]" in line and "telemetry-ingest policy apply --confirm" in line and "nothing was deleted" in line
    assert await db.fetchval("SELECT count(*) FROM records") == 3
    assert await applied.held(db) == (earlier, "earlier.toml")

    shown = await asyncio.to_thread(run_cli, "policy", "apply", env=env)
    assert "category[diagnostic]: deletes 3 record(s); 1 installation retention choice(s)" in shown.stdout
    assert "nothing deleted" in shown.stdout
    assert await db.fetchval("SELECT count(*) FROM records") == 3  # changed nothing
    assert await db.fetchval("SELECT count(*) FROM record_settings") == 1
    assert await applied.held(db) == (earlier, "earlier.toml")

    done = await asyncio.to_thread(run_cli, "policy", "apply", "--confirm", env=env)
    assert "policy applied: built-in" in done.stdout
    assert await db.fetchval("SELECT count(*) FROM records WHERE record_id = ANY($1::text[])", ids) == 0
    assert await db.fetchval("SELECT count(*) FROM record_settings") == 0
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 1  # still declared: untouched
    assert await applied.held(db) == (declared(policy.builtin()), "built-in")
    removed = [orjson.loads(r[0]) for r in await db.fetch(
        "SELECT detail::text FROM audit_log WHERE action = 'policy.remove' AND actor = 'cli' ORDER BY id")]
    assert removed == [{"category": "diagnostic", "rows": 3}, {"category": "diagnostic", "rows": 1}]

    again = await asyncio.to_thread(run_cli, "policy", "apply", "--confirm", env=env)
    assert "nothing to change" in again.stdout
    await serve_once(env)


# ------------------------------------------------------------------ policy apply FILE: fields at every depth


async def test_policy_apply_deletes_exactly_the_removed_fields_at_every_depth(env, db, ks, tmp_path):
    await hold(db, declared(policy.load(DIAGNOSTICS)))
    install_id = await installation(db)
    with_machine = [await plant(db, "diagnostic", install_id, diagnostic()) for _ in range(2)]
    without_machine = await plant(db, "diagnostic", install_id, diagnostic(machine=None))
    sealed = await plant(db, "diagnostic", install_id, diagnostic(), sealed=True)
    before = await fields_of(db)
    changed = diagnostics_without(tmp_path, "machine", "frames")

    shown = await asyncio.to_thread(run_cli, "policy", "apply", str(changed), env=env)
    out = shown.stdout
    assert "category[diagnostic].field[machine]: deletes its value in 3 record(s)" in out
    assert "category[diagnostic].field[stack.frames[]]: deletes its value in 4 record(s)" in out
    assert "encrypted part of 1 sealed record(s) of the category holds of it" in out and "goes with its records" in out
    assert await fields_of(db) == before

    await asyncio.to_thread(run_cli, "policy", "apply", str(changed), "--confirm", env=env)
    after = await fields_of(db)
    for record_id, fields in before.items():
        expected = {k: v for k, v in fields.items() if k != "machine"}
        expected["stack"] = {"module": "core"}
        assert after[record_id] == expected, record_id
    assert set(after) == {*with_machine, without_machine, sealed}
    assert await applied.held(db) == (declared(policy.load(changed)), str(changed))
    # the database now keeps every promise of the new file
    ring = KeyRing.from_setting(env["TELEMETRY_MASTER_KEY"])
    findings = await audit_database(db, ks, ring, Settings(dsn=env["TELEMETRY_DSN"]), policy.load(changed))
    assert [f for f in findings if f.check in ("policy", "json")] == []


async def test_policy_apply_resumes_after_a_partial_run_and_is_idempotent(db, tmp_path):
    """A kill between batches leaves some rows stripped, some not: running it again finishes the rest."""
    install_id = await installation(db)
    for _ in range(7):
        await plant(db, "diagnostic", install_id, diagnostic())
    step = applied.Removal("diagnostic", "machine")
    # what a run killed after its first committed batch of 3 leaves behind
    first = await db.fetch("SELECT record_id FROM records ORDER BY install_id, record_id LIMIT 3")
    await db.execute("UPDATE records SET fields = fields - 'machine' WHERE record_id = ANY($1::text[])", [r[0] for r in first])
    assert await applied.remove(db, step, "cli", batch=2) == 4
    assert await db.fetchval("SELECT count(*) FROM records WHERE fields ? 'machine'") == 0
    assert await db.fetchval("SELECT count(*) FROM records WHERE fields ? 'version'") == 7
    assert await applied.remove(db, step, "cli", batch=2) == 0
    # each batch its own audited transaction: 2 + 2
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'policy.remove'") == 2


async def test_a_removed_builtin_category_empties_its_tables_but_keeps_the_enrollment(db):
    install_id = await installation(db)
    await db.execute("UPDATE installations SET license_type = 'e', version = '1', asset_count = 3, ip_prefix = '192.0.2.0/24' "
                     "WHERE install_id = $1", install_id)
    for _ in range(3):
        await heartbeat(db, install_id)
    step = applied.Removal(policy.builtin().categories[0].name)
    assert await applied.count(db, step) == ["3 heartbeat row(s)", "the metadata of 1 installation(s) (the installations stay enrolled)"]
    assert await applied.remove(db, step, "cli", batch=2) == 4
    row = await db.fetchrow("SELECT * FROM installations WHERE install_id = $1", install_id)
    assert row is not None and row["enrolled_at"] is not None
    assert (row["license_type"], row["version"], row["asset_count"], row["ip_prefix"], row["email_ct"]) == (None,) * 5
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 0


async def test_policy_apply_refuses_to_change_a_builtin_categorys_fields(env, db, tmp_path):
    held = declared(policy.builtin())
    held["installation"].append("hostname")
    await hold(db, held)
    proc = await asyncio.to_thread(run_cli, "policy", "apply", "--confirm", env=env, check=False)
    assert proc.returncode == 1
    assert "category[installation].field[hostname]: a built-in category keeps its fields" in proc.stderr
    assert await applied.held(db) == (held, "earlier.toml")


# ------------------------------------------------------------------ audit against the file in force


async def test_audit_finds_undeclared_keys_categories_raw_hashes_and_a_policy_not_applied(db, ks, master_key, db_dsn, tmp_path):
    diag = policy.load(DIAGNOSTICS)
    settings = Settings(dsn=db_dsn, master_key=master_key)
    ring = KeyRing.from_setting(master_key)
    install_id = await installation(db)
    await plant(db, "diagnostic", install_id, diagnostic(machine=hashlib.sha256(b"m").hexdigest()))
    assert [f for f in await audit_database(db, ks, ring, settings, diag) if f.check in ("policy", "json")] == []

    await plant(db, "diagnostic", install_id, diagnostic(stack={"module": "core", "locals": {"password": "x"}}))
    await plant(db, "diagnostic", install_id, diagnostic(machine="host-17.example"))
    await plant(db, "diagnostic", install_id, diagnostic(description="free text that is never kept"))
    await plant(db, "telemetry_x", install_id, {"anything": 1})
    await plant(db, "scan", install_id, {})
    await hold(db, declared(diag) | {"crash": ["crash_id"]})
    messages = [f.message for f in await audit_database(db, ks, ring, settings, diag) if f.check == "policy"]
    assert "1 record(s) in records of category telemetry_x, which the policy in force does not declare" in messages
    assert "1 record(s) in records of category scan, which has its own tables" in messages
    assert ("records.fields of category diagnostic hold what the policy in force does not keep in the clear: "
            "description, stack.locals") in messages  # not descending into stack.locals
    assert "1 value(s) of diagnostic.machine in records.fields are not keyed hashes (64 hex digits)" in messages
    assert any(m.startswith("the policy the database holds (applied from earlier.toml) is not the file in force "
                            f"({DIAGNOSTICS}): the file no longer declares category[crash]") for m in messages)
    assert len(messages) == 5


async def test_audit_finds_anonymised_values_that_are_not_prefixes(db, ks, master_key, db_dsn):
    download = policy.load(ROOT / "examples" / "policies" / "download-log.toml")
    settings = Settings(dsn=db_dsn, master_key=master_key)
    install_id = await installation(db)
    base = {"download_id": str(uuid.uuid4()), "downloaded_at": "2026-12-01T10:00:00Z", "licence_number": "b" * 64,
            "program": "p", "version": "1"}
    for address in ("192.0.2.0/24", "2001:db8:1::/48", "2001:db8::/48"):
        await plant(db, "download", install_id, base | {"address": address})
    ring = KeyRing.from_setting(master_key)
    assert [f for f in await audit_database(db, ks, ring, settings, download) if f.check == "policy"] == []
    for address in ("192.0.2.17", "192.0.2.0/32", "2001:db8:1:2::/64"):
        await plant(db, "download", install_id, base | {"address": address})
    messages = [f.message for f in await audit_database(db, ks, ring, settings, download) if f.check == "policy"]
    assert messages == ["3 value(s) of download.address in records.fields are not network prefixes (IPv4 /24, IPv6 /48)"]


async def test_audit_command_reads_the_file_in_force(env, db, tmp_path):
    install_id = await installation(db)
    await plant(db, "diagnostic", install_id, diagnostic())
    env = env | {"TELEMETRY_SERVICE_DSN": await service_role_dsn(env["TELEMETRY_DSN"])}  # a role fit to serve
    proc = await asyncio.to_thread(run_cli, "audit", env=env, check=False)  # the built-in file declares no diagnostic
    assert proc.returncode == 1 and "category diagnostic, which the policy in force does not declare" in proc.stdout
    proc = await asyncio.to_thread(run_cli, "audit", env=env | {"TELEMETRY_POLICY": str(DIAGNOSTICS)}, check=False)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip() == "audit passed"


# ------------------------------------------------------------------ statistics over the declared dimensions


async def test_stats_count_file_category_dimensions_with_k_folding(db_dsn, master_key, tmp_path, db):
    live = [await installation(db) for _ in range(3)]
    restricted = await installation(db, restricted=True)
    for i in range(6):
        await plant(db, "diagnostic", live[i % 3], diagnostic(version="1.0", fault="crash"))
    for i in range(4):
        await plant(db, "diagnostic", live[i % 3], diagnostic(version="2.0", fault="hang" if i < 2 else "assert"))
    await plant(db, "diagnostic", live[0], diagnostic(version="3.0-rc", fault="hang"))
    await plant(db, "diagnostic", live[0], diagnostic(version="9.9", fault="assert", os="other"))
    # not counted: a restricted installation's, an expired one
    for _ in range(5):
        await plant(db, "diagnostic", restricted, diagnostic(version="7.7"))
    await plant(db, "diagnostic", live[1], diagnostic(version="7.7"), expires=dt.timedelta(hours=-1))
    async with start_service(db_dsn, master_key, tmp_path, policy=DIAGNOSTICS) as svc:
        token = svc.create_secret("admin-token")
        status, body, _ = await svc.request("GET", "/v1/admin/stats", token=token)
    assert status == 200
    stats = body["categories"]["diagnostic"]
    assert stats["suppressed"] is False and stats["records"] == 12
    by = {d: {g["value"]: g["records"] for g in groups} for d, groups in stats["by"].items()}
    # 3.0-rc and 9.9 (1 each) are below k = 5; so that 'other' is no group below k, the smallest shown (2.0) joins it
    assert by["version"] == {"1.0": 6, "other": 6}
    assert by["fault"] == {"crash": 6, "other": 6}  # hang 3 and assert 3: together not below k
    # a stored value "other" is folded too, and then every group
    assert by["os"] == {"other": 12}
    for groups in stats["by"].values():
        assert all(g["records"] >= 5 for g in groups)
    assert str(live[0]) not in orjson.dumps(body).decode()


async def test_stats_of_a_category_below_k_are_suppressed_and_the_builtin_answer_has_no_categories(db_dsn, master_key, tmp_path, db):
    install_id = await installation(db)
    for _ in range(4):
        await plant(db, "diagnostic", install_id, diagnostic())
    async with start_service(db_dsn, master_key, tmp_path, policy=DIAGNOSTICS) as svc:
        token = svc.create_secret("admin-token")
        _, body, _ = await svc.request("GET", "/v1/admin/stats", token=token)
    assert body["categories"]["diagnostic"] == {"suppressed": True, "records": None, "by": {"version": [], "os": [], "fault": []}}
    async with start_service(db_dsn, master_key, tmp_path) as svc:
        _, body, _ = await svc.request("GET", "/v1/admin/stats", token=token)
    assert "categories" not in body


async def test_policy_apply_killed_halfway_records_nothing_and_a_second_run_finishes(env, db, tmp_path):
    import signal
    import subprocess
    import sys

    await hold(db, declared(policy.load(DIAGNOSTICS)))
    install_id = await installation(db)
    rows = [("diagnostic", install_id, str(uuid.uuid4()), orjson.dumps(diagnostic()).decode()) for _ in range(2000)]
    await db.executemany("INSERT INTO records (category, install_id, record_id, expires_at, fields) "
                         "VALUES ($1, $2, $3, now() + interval '1 day', $4::text::jsonb)", rows)
    changed = diagnostics_without(tmp_path, "machine")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "policy", "apply", str(changed), "--confirm", "--batch", "1"],
                            env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'policy.remove'") < 5:
            assert proc.poll() is None, "policy apply finished before it could be killed"
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    left = await db.fetchval("SELECT count(*) FROM records WHERE fields ? 'machine'")
    assert 0 < left < 2000
    assert await applied.held(db) == (declared(policy.load(DIAGNOSTICS)), "earlier.toml")  # nothing recorded yet
    # (serve compares with that held declaration, so it still refuses: the test above)
    await asyncio.to_thread(run_cli, "policy", "apply", str(changed), "--confirm", env=env)
    assert await db.fetchval("SELECT count(*) FROM records WHERE fields ? 'machine'") == 0
    assert await db.fetchval("SELECT count(*) FROM records WHERE fields ? 'version'") == 2000
    assert await applied.held(db) == (declared(policy.load(changed)), str(changed))
