"""The policy file: the built-in one, the examples, the checker's one-line problems, `policy check` / `show`, `serve`."""

from __future__ import annotations

import tomllib
import uuid

import orjson
import pytest

import policy
from ingest.errors import Invalid
from ingest.pipeline.filter import Allowlist
from policy.loader import check_text
from tests.support import ROOT, run_cli

EXAMPLES = sorted((ROOT / "examples" / "policies").glob("*.toml"))


# ------------------------------------------------------------------ the built-in file


def test_the_builtin_file_is_what_the_builtin_paths_serve():
    from storage import admin
    from policy import categories as builtin_names

    b = policy.builtin()
    assert [c.name for c in b.categories] == ["installation", "scan"]
    inst, scan = builtin_names.INSTALLATION, builtin_names.SCAN
    assert {f.name: f.storage for f in inst.fields} == {
        "install_id": "key", "license_type": "plaintext", "version": "plaintext", "asset_count": "plaintext",
        "db_server_type": "plaintext", "web_server_type": "plaintext", "email": "encrypted"}
    assert inst.extra == (("ip_address", "anonymised", "network prefix (IPv4 /24, IPv6 /48) of the sender, for abuse handling"),)
    assert (inst.state, inst.record, inst.retention.days, inst.installation_key) == ("current", "heartbeat", 30, "install_id")
    assert scan.sealed and not inst.sealed and scan.idempotency_key == "scan_id"
    assert [f.name for f in scan.fields if f.storage == "key"] == ["scan_id"]
    assert {f.name for f in scan.fields} == {"scan_id", "scanned_at", "agent_version", "asset", "os", "hardware", "disks",
                                             "software", "network", "hotfixes", "services"}
    # PUT /v1/installation/settings: scan_retention_hours 1..720, derived from the scan category
    (setting,) = builtin_names.SCAN_SETTINGS.fields
    assert (setting.name, setting.minimum, setting.maximum, setting.required) == ("scan_retention_hours", 1, 720, True)
    assert builtin_names.MAX_SCAN_RETENTION_HOURS == builtin_names.DEFAULT_SCAN_RETENTION_HOURS == 720
    assert builtin_names.DEFAULT_HEARTBEAT_RETENTION_DAYS == 30
    # The statistics query is written for these columns: the file and the query must agree.
    assert inst.statistics == admin.STATS_DIMENSIONS
    assert [(f.name, f.max_length, f.required) for f in builtin_names.AGENT_REGISTRATION.fields] == [("name", 128, True)]
    assert builtin_names.ENROLLMENT.fields == (builtin_names.INSTALL_ID,)


def test_the_it_inventory_example_is_the_builtin_file():
    assert (ROOT / "examples" / "policies" / "it-inventory.toml").read_bytes() == policy.BUILTIN_PATH.read_bytes()


def test_the_builtin_file_ships_in_the_package():
    assert policy.BUILTIN_PATH.parent == ROOT / "policy"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "policy*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "*.toml" in pyproject["tool"]["setuptools"]["package-data"]["policy"]


def test_every_data_file_of_the_packages_is_declared_package_data():
    """A wheel carries only declared data files: a missing pattern is a service that cannot start when installed."""
    import fnmatch

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    for package in ("policy", "storage"):
        for path in (ROOT / package).rglob("*"):
            if path.suffix in (".sql", ".toml"):
                relative = path.relative_to(ROOT / package).as_posix()
                assert any(fnmatch.fnmatch(relative, pattern) for pattern in declared.get(package, ())), relative


def test_the_policy_package_imports_nothing_of_ours():
    for path in (ROOT / "policy").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for other in ("ingest", "storage", "crypto"):
            assert f"from {other}" not in text and f"import {other}" not in text, (path.name, other)


# ------------------------------------------------------------------ the examples


def _declared_paths(raw_fields: list[dict], prefix: str = "") -> set[str]:
    """Every leaf of a category as `policy show` names it, read from the TOML itself (not through the loader)."""
    out = set()
    for f in raw_fields:
        path = prefix + f["name"]
        if f["type"] == "object":
            out |= _declared_paths(f["field"], path + ".")
        elif f["type"] == "list":
            out |= _declared_paths(f["field"], path + "[].") if "field" in f else {path + "[]"}
        else:
            out.add(path)
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_passes_the_check_and_show_discloses_every_declared_field(path, tmp_path):
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    checked = run_cli("policy", "check", str(path), env={})
    n = len(raw["category"])
    assert checked.stdout == f"policy ok: {n} categor{'y' if n == 1 else 'ies'}\n"
    # policy show of the policy in force (TELEMETRY_POLICY), as JSON and as the markdown table
    env = {"TELEMETRY_POLICY": str(path), "TELEMETRY_DATA_DIR": str(tmp_path / "none")}
    rows = orjson.loads(run_cli("policy", "show", "--format", "json", env=env).stdout)
    table = run_cli("policy", "show", env=env).stdout
    for c in raw["category"]:
        declared = _declared_paths(c["field"])
        shown = {r["field"] for r in rows if r["category"] == c["name"]}
        assert shown == declared, c["name"]
        for field_path in declared:
            assert f"| {c['name']} | `{field_path}` |" in table
        assert all(r["purpose"] and r["retention"] and r["stored_as"] for r in rows)
    assert not (tmp_path / "none").exists()  # showing a policy needs no database


def test_policy_show_of_a_file_states_its_storage_and_retention():
    rows = orjson.loads(run_cli("policy", "show", str(ROOT / "examples/policies/cloud-scan.toml"), "--format", "json", env={}).stdout)
    by_field = {r["field"]: r for r in rows}
    assert by_field["scan_id"]["stored_as"] == "plaintext (lookup key)"
    assert by_field["resources[].tags[]"]["stored_as"] == "encrypted"  # sealed whole, to the leaves
    assert by_field["account"]["retention"] == "48 hours after receipt by default; the installation may choose 24 to 48 hours"
    rows = orjson.loads(run_cli("policy", "show", str(ROOT / "examples/policies/diagnostics.toml"), "--format", "json", env={}).stdout)
    by_field = {r["field"]: r for r in rows}
    assert (by_field["description"]["stored_as"], by_field["description"]["retention"]) == ("not-stored", "not kept: checked, then discarded")
    assert (by_field["machine"]["stored_as"], by_field["version"]["retention"]) == ("keyed-hash", "14 days after receipt")
    rows = orjson.loads(run_cli("policy", "show", str(ROOT / "examples/policies/download-log.toml"), "--format", "json", env={}).stdout)
    assert {r["field"]: r["stored_as"] for r in rows}["address"] == "anonymised"


def test_an_examples_allowlist_keeps_only_declared_fields_and_applies_its_limits():
    """The filter the service runs, compiled from a file: what the file says is what is enforced."""
    download = policy.load(ROOT / "examples/policies/download-log.toml").category("download")
    allow = Allowlist(download.root)
    body = {"download_id": str(uuid.uuid4()), "downloaded_at": "2026-12-01T10:00:00Z", "licence_number": "AB-1234",
            "program": "scanner", "version": "4.2.1", "address": "192.0.2.7", "user_agent": "curl/8", "extra": {"a": 1}}
    kept, dropped = allow.filter_document(body)
    assert set(kept) == _declared_paths(tomllib.loads((ROOT / "examples/policies/download-log.toml").read_text())["category"][0]["field"])
    assert dropped == ["user_agent", "extra"]
    # a pattern matches the whole value, whether or not the file anchored it
    for bad in ("4.2.1 beta", "4.2.1\n", ""):
        with pytest.raises(Invalid, match="version"):
            allow.filter_document({**body, "version": bad})
    with pytest.raises(Invalid, match="licence_number: is required"):
        allow.filter_document({k: v for k, v in body.items() if k != "licence_number"})
    with pytest.raises(Invalid, match="program: must be at most 64"):
        allow.filter_document({**body, "program": "x" * 65})
    cloud = Allowlist(policy.load(ROOT / "examples/policies/cloud-scan.toml").category("cloud_scan").root)
    scan = {"scan_id": str(uuid.uuid4()), "scanned_at": "2026-12-01T10:00:00Z", "provider": "aws", "account": "prod",
            "resources": [{"resource_id": "i-1", "kind": "vm", "tags": ["a"], "owner": "alice@example.com"}]}
    kept, dropped = cloud.filter_document(scan)
    assert dropped == ["resources[].owner"] and kept["resources"] == [{"resource_id": "i-1", "kind": "vm", "tags": ["a"]}]
    with pytest.raises(Invalid, match="provider"):
        cloud.filter_document({**scan, "provider": "awsx"})


# ------------------------------------------------------------------ the checker

# A good category; each broken file below changes one thing of it.
GOOD = '''format = 1

[[category]]
name = "download"
purpose = "licence checks of downloads"
retention = "30d"
idempotency_key = "download_id"

[[category.field]]
name = "download_id"
type = "uuid"
required = true

[[category.field]]
name = "program"
type = "string"
max_length = 64
purpose = "which program was downloaded"
'''
P = 'purpose = "which program was downloaded"'  # line 18: a key to add another after

T = 'type = "string"\nmax_length = 64'  # lines 16 and 17: the program field's type and bound

BROKEN = [
    # (old -> new in GOOD, the one problem line expected after "FILE:")
    ('retention = "30d"', 'retention = "30 days"', '6: category[download].retention: must be a duration such as "30d" or "720h", not \'30 days\''),
    ('retention = "30d"\n', '', '3: category[download].retention: required: how long records are kept, such as "30d" or "720h"'),
    ('retention = "30d"', 'retention = "30d"\ncolour = "red"',
     '7: category[download].colour: unknown key (allowed: field, idempotency_key, installation_key, installations_may_shorten, '
     'name, purpose, record, retention, sealed, shortest_retention, state, statistics)'),
    ('max_length = 64', 'max_lenght = 64', '17: category[download].field[program].max_lenght: unknown key (allowed: field, item, max, '
     'max_items, max_length, min, name, pattern, purpose, required, source, storage, type)'),
    ('max_length = 64', 'max_length = "64"', '17: category[download].field[program].max_length: must be a whole number'),
    ('type = "string"', 'type = "text"', '16: category[download].field[program].type: required: one of string, integer, number, '
     'boolean, uuid, time, email, object, list'),
    (P, P + '\nstorage = "anonymised"\npattern = "[a-z]+"',
     '20: category[download].field[program].pattern: an anonymised field holds an IP address: it takes no pattern'),
    (T, 'type = "integer"\nstorage = "anonymised"',
     '17: category[download].field[program].storage: anonymised fits only a string field holding an IP address '
     '(stored as its /24 or /48 prefix) (this field is integer)'),
    (T, 'type = "boolean"\nstorage = "keyed-hash"',
     '17: category[download].field[program].storage: keyed-hash fits a string, email or uuid field (this field is boolean)'),
    (T, 'type = "integer"\nstorage = "encrypted"',
     '17: category[download].field[program].storage: encrypted fits a text field (string, email, uuid, time) (this field is integer)'),
    (T, 'type = "email"\nmax_length = 254',
     '15: category[download].field[program].storage: an e-mail address is personal data: store it encrypted, keyed-hash or '
     'not-stored (this field is email)'),
    (P, P + '\nstorage = "hashed"',
     '19: category[download].field[program].storage: must be one of plaintext, encrypted, anonymised, keyed-hash, not-stored'),
    ('name = "program"', 'name = "download_id"', '15: category[download].field[download_id]: declared twice'),
    ('idempotency_key = "download_id"', 'sealed = true',
     '7: category[download].idempotency_key: a sealed category needs an idempotency key (the field naming each record, such as scan_id)'),
    ('idempotency_key = "download_id"', 'idempotency_key = "id"', "7: category[download].idempotency_key: names no top-level field: 'id'"),
    ('idempotency_key = "download_id"', 'idempotency_key = "download_id"\nsealed = true\n\n[[category.field]]\nname = "a"\n'
     'type = "string"\nstorage = "plaintext"',
     '13: category[download].field[a].storage: the category is sealed: every field is inside the encrypted record '
     '(leave storage out or say "encrypted")'),
    ('type = "uuid"\nrequired = true', 'type = "uuid"', '10: category[download].field[download_id].required: a key field must be required = true'),
    ('max_length = 64', 'max_length = 64\nmin = 1', '18: category[download].field[program].min: min and max are for integer fields'),
    ('max_length = 64', 'max_length = 64\npattern = "[a-z"', '18: category[download].field[program].pattern: not a regular expression: '
     'unterminated character set at position 0'),
    (T, 'type = "object"\nfield = []', '17: category[download].field[program].field: declares no field'),
    ('max_length = 64', 'pattern = "[a-z]+"', '17: category[download].field[program].pattern: a pattern needs a max_length (it bounds the '
     'work of matching)'),
    ('max_length = 64', 'max_length = 64\npattern = "a{99999999999}"', '18: category[download].field[program].pattern: not a regular '
     'expression: the repetition number is too large'),
    (T, 'type = "list"\nitem = { type = ["string"] }', '17: category[download].field[program].item.type: required: one of '),
    ('retention = "30d"', 'retention = "30d"\nshortest_retention = "1h"',
     '7: category[download].shortest_retention: only with installations_may_shorten = true'),
    ('retention = "30d"', 'retention = "30d"\ninstallations_may_shorten = true\nshortest_retention = "31d"',
     '8: category[download].shortest_retention: is longer than the retention'),
    ('retention = "30d"', 'retention = "30d"\nstate = "latest"',
     '7: category[download].state: must be "current" (a current record per installation, and its history) or "events"'),
    ('retention = "30d"', 'retention = "30d"\nstatistics = ["download_id"]',
     "7: category[download].statistics: 'download_id': a dimension is a plaintext string, integer or boolean field (counts by it are published)"),
    (P, P + '\nsource = "peer"',
     '19: category[download].field[program].source: the sender\'s address is stored anonymised only: type = "string", storage = "anonymised"'),
    (T, 'type = "list"\nmax_items = 10',
     '15: category[download].field[program]: a list needs either `field` tables (a list of objects) or an `item` table (a list of scalars)'),
    (T, 'type = "list"\nitem = { type = "string", max_length = 0 }',
     '17: category[download].field[program].item.max_length: must be at least 1'),
    (T, 'type = "object"\nstorage = "plaintext"\nfield = [{ name = "a", type = "string" }]',
     '17: category[download].field[program].storage: an object has no storage: its fields carry their own'),
    ('name = "download"', 'name = "Download"', '4: category[1].name: required: lower-case letters, digits and _ (at most 32, starting '
     'with a letter; also the path /v1/records/{name}; not "agent")'),
    ('format = 1', 'format = 2', '1: format: this service reads format 1'),
    ('format = 1', 'format = 1\nvendor = "acme"', '2: vendor: unknown key (allowed: agents, category, format)'),
    ('retention = "30d"', 'retention = "30d', '6: toml: not TOML: Illegal character'),
]


@pytest.mark.parametrize("old,new,expected", BROKEN, ids=[b[2].split(": ", 1)[1][:60] for b in BROKEN])
def test_each_broken_file_gives_its_one_line_problem(old, new, expected):
    assert GOOD.count(old) == 1, old
    policy_, problems = check_text(GOOD.replace(old, new), "bad.toml")
    assert policy_ is None
    lines = [p.render("bad.toml") for p in problems]
    assert len(lines) == 1 and lines[0].startswith("bad.toml:" + expected), lines


def test_the_good_file_is_good_and_every_problem_is_reported():
    good, problems = check_text(GOOD, "good.toml")
    assert problems == [] and [c.name for c in good.categories] == ["download"]
    assert good.category("download").fields[0].storage == "key"
    # several mistakes at once: one line each, in the order of the file
    text = GOOD.replace('retention = "30d"', 'retention = "1y"').replace(P, P + '\nstorage = "hashed"')
    _, problems = check_text(text, "bad.toml")
    assert [p.line for p in problems] == [6, 19]
    # a key field that is an object
    text = GOOD.replace('idempotency_key = "download_id"', 'idempotency_key = "program"').replace(
        'type = "string"\nmax_length = 64', 'type = "object"\nrequired = true\nfield = [{ name = "a", type = "string" }]')
    _, problems = check_text(text, "bad.toml")
    assert [p.render("bad.toml") for p in problems] == [
        "bad.toml:7: category[download].idempotency_key: 'program' is not a uuid or string field"]


def test_policy_check_command_exits_1_with_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('retention = "30d"', 'retention = "1y"').replace(P, P + '\nstorage = "hashed"'))
    proc = run_cli("policy", "check", str(bad), env={}, check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{bad}:6: category[download].retention: must be a duration such as \"30d\" or \"720h\", not '1y'",
        f"{bad}:19: category[download].field[program].storage: must be one of plaintext, encrypted, anonymised, keyed-hash, not-stored",
    ]
    missing = run_cli("policy", "check", str(tmp_path / "nothing.toml"), env={}, check=False)
    assert missing.returncode == 1 and missing.stdout == f"{tmp_path / 'nothing.toml'}: file: cannot read it: No such file or directory\n"
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert run_cli("policy", "check", str(good), env={}).stdout == "policy ok: 1 category\n"


# ------------------------------------------------------------------ TELEMETRY_POLICY at serve start


def test_serve_stops_on_a_bad_policy_file_with_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('retention = "30d"', 'retention = "1y"'))
    data = tmp_path / "data"
    env = {"TELEMETRY_POLICY": str(bad), "TELEMETRY_DATA_DIR": str(data)}
    proc = run_cli("serve", env=env, check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == f"telemetry-ingest: TELEMETRY_POLICY: {bad}:6: category[download].retention: must be a duration such as \"30d\" or \"720h\", not '1y'\n"
    assert not data.exists()  # refused before any database was started
    # the same file given as a flag; and policy show of the policy in force refuses it too
    assert run_cli("serve", "--policy", str(bad), env={"TELEMETRY_DATA_DIR": str(data)}, check=False).stderr == proc.stderr
    shown = run_cli("policy", "show", env=env, check=False)
    assert shown.returncode == 1 and shown.stderr == proc.stderr


def test_serve_takes_every_example_and_a_built_in_category_only_as_built_in(tmp_path):
    """check_served (what serve runs before it starts anything): a category of the file's own is
    received at POST /v1/records/{category}; a built-in one, declared, must be as built in."""
    from ingest.cli.context import CliError
    from ingest.cli.policy import check_served

    for path in sorted((ROOT / "examples/policies").glob("*.toml")):
        check_served(policy.load(path))  # no error
    text = policy.BUILTIN_PATH.read_text(encoding="utf-8")
    # the built-in file minus its scans: served (POST /v1/scans then answers 404)
    partial = tmp_path / "partial.toml"
    partial.write_text(text.split("# ----------------------------------------------------------------- agent scans")[0])
    check_served(policy.load(partial))
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace('max_length = 32\npattern = "^[0-9A-Za-z.+-]+$"', 'max_length = 40\npattern = "^[0-9A-Za-z.+-]+$"'))
    with pytest.raises(CliError) as exc:
        check_served(policy.load(changed))
    assert str(exc.value).startswith(f"TELEMETRY_POLICY: {changed}:8: category[installation]: differs from the built-in one: ")
    agents = tmp_path / "agents.toml"
    agents.write_text(text.replace('max_length = 128\nrequired = true\npurpose = "the installation\'s label', 'max_length = 64\nrequired = true\npurpose = "the installation\'s label'))
    with pytest.raises(CliError, match="agents: differs from the built-in agent registration"):
        check_served(policy.load(agents))


# ------------------------------------------------------------------ docs/policy.md


def test_the_docs_example_is_a_good_file_and_every_key_is_documented():
    import re

    from policy import loader

    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    example = max(re.findall(r"```toml\n(.*?)```", text, re.S), key=len)
    good, problems = check_text(example, "docs/policy.md")
    assert problems == [] and [c.name for c in good.categories] == ["download", "crash"]
    keys = loader.TOP_KEYS | loader.CATEGORY_KEYS | loader.FIELD_KEYS | loader.ITEM_KEYS | loader.AGENTS_KEYS
    for word in sorted(keys | set(loader.TYPES) | set(loader.STORAGE)):
        assert f"`{word}`" in text, word
    # the disclosure shown in the docs is what policy show prints for the example
    rows = good.disclosure_rows(inactive_days=400)
    for r in rows:
        line = f"| {r['category']} | `{r['field']}` | {r['purpose']} | {r['stored_as']} | {r['retention']} |"
        if f"`{r['field']}`" in text.split("`policy show` turns it into", 1)[1].split("```", 2)[1]:
            assert line in text, line


# ------------------------------------------------------------------ serve with a file


@pytest.mark.slow
async def test_serve_runs_the_it_inventory_file_as_the_builtin_policy(db_dsn, master_key, tmp_path):
    import aiohttp

    from tests.test_serve import ServeProcess, enroll

    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path),
           "TELEMETRY_POLICY": str(ROOT / "examples/policies/it-inventory.toml"), "TELEMETRY_WORKERS": "1"}
    serve = ServeProcess(env)
    try:
        await serve.wait_ready()
        async with aiohttp.ClientSession() as http:
            install_id, token = await enroll(http, serve.url, env)
            body = {"install_id": str(install_id), "license_type": "enterprise", "version": "4.2.1", "asset_count": 3, "hostname": "pc-1"}
            async with http.post(serve.url + "/v1/heartbeats", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200 and (await r.json()) == {"stored": True, "dropped_fields": ["hostname"]}
    finally:
        assert serve.stop() == 0, serve.stderr


# ------------------------------------------------------------------ the checker never fails itself

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from policy import loader  # noqa: E402

_KEYS = sorted(loader.TOP_KEYS | loader.CATEGORY_KEYS | loader.FIELD_KEYS | loader.ITEM_KEYS)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True), st.text(max_size=12),
                     st.sampled_from(loader.TYPES + loader.STORAGE + ("30d", "1h", "peer", "current", "[a-", "a|b")))


def _docs():
    keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=6))
    return st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
                        max_leaves=40)


def _category_docs():
    field = st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "scan_id", "Bad name", "x\ny"]), "type": st.sampled_from(loader.TYPES)},
                                  optional={k: _docs() for k in sorted(loader.FIELD_KEYS - {"name", "type"})})
    category = st.fixed_dictionaries({"name": st.sampled_from(["c", "d", "agent", "e\rf", "g\u2028"]), "field": st.lists(field, max_size=4)},
                                     optional={k: _docs() for k in sorted(loader.CATEGORY_KEYS - {"name", "field"})})
    return st.fixed_dictionaries({"category": st.lists(category, min_size=1, max_size=3)}, optional={"agents": _docs()})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(st.sampled_from(_KEYS), _docs(), max_size=4), _category_docs()))
def test_the_checker_answers_every_document_with_a_policy_or_problems(doc):
    found, problems = loader.check_document(doc, "", "f.toml")
    assert (found is None) == bool(problems)
    for p in problems:
        assert p.key and p.message and len(p.render("f.toml").splitlines()) == 1


# ------------------------------------------------------------------ rules found by the docs review

_EVENTS = """
format = 1

[[category]]
name = "ticket"
purpose = "support tickets"
retention = "30d"
{extra}

[[category.field]]
name = "ticket_ref"
type = "string"
max_length = 300
required = true

[[category.field]]
name = "contact"
type = "email"
max_length = 400
storage = "encrypted"
"""


@pytest.mark.parametrize("extra, key", [
    ('state = "current"\nidempotency_key = "ticket_ref"', "category[ticket].idempotency_key"),
    ('state = "current"\nsealed = true', "category[ticket].sealed"),
])
def test_a_current_category_has_no_idempotency_key_and_is_not_sealed_whole(extra, key):
    found, problems = check_text(_EVENTS.format(extra=extra))
    assert found is None and any(key in str(p) for p in problems), problems


def test_a_string_lookup_key_is_refused_when_it_is_an_email_and_an_email_is_at_most_254_characters():
    found, problems = check_text(_EVENTS.format(extra='idempotency_key = "ticket_ref"'))
    assert found is not None, problems
    allow = Allowlist(found.category("ticket").root)
    kept, _ = allow.filter_document({"ticket_ref": "T-1234", "contact": "a@example.com"})
    assert kept["ticket_ref"] == "T-1234"
    with pytest.raises(Invalid):  # a lookup key is kept in the clear: no people in it
        allow.filter_document({"ticket_ref": "alice@example.com"})
    with pytest.raises(Invalid):  # max_length = 400 does not lift the e-mail's own limit
        allow.filter_document({"ticket_ref": "T-1", "contact": "a" * 290 + "@example.com"})


def test_policy_show_states_the_configured_heartbeat_history_for_a_file_with_the_builtin_heartbeats(tmp_path):
    text = (ROOT / "examples" / "policies" / "it-inventory.toml").read_text()
    text += (ROOT / "examples" / "policies" / "download-log.toml").read_text().split("format = 1", 1)[1]
    path = tmp_path / "both.toml"
    path.write_text(text)
    shown = run_cli("policy", "show", str(path), "--format", "json", env={"TELEMETRY_HEARTBEAT_RETENTION_DAYS": "7",
                                                                          "TELEMETRY_DATA_DIR": str(tmp_path)})
    rows = orjson.loads(shown.stdout)
    heartbeat = {r["retention"] for r in rows if r["category"] == "installation"}
    assert heartbeat and all("history 7 days" in r for r in heartbeat), heartbeat
    assert any(r["category"] == "download" for r in rows)
