"""The docs against the code and the live service, so they cannot drift: the README's problem slugs, settings table and
quickstart (run as is), and docs/api.md against /openapi.json."""

from __future__ import annotations

import dataclasses
import re

from ingest import errors
from ingest.settings import Settings, describe, env_name
from tests.support import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _problem_classes() -> list[type[errors.Problem]]:
    out, todo = [], list(errors.Problem.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def _used_outside_errors_module(name: str) -> bool:
    pattern = re.compile(rf"\b{name}\b")
    return any(pattern.search(p.read_text(encoding="utf-8")) for p in (ROOT / "ingest").rglob("*.py") if p.name != "errors.py")


def test_readme_problem_slugs_are_exactly_those_the_code_can_answer():
    m = re.search(r"\*\*Problem types\*\* are `[^`]+<slug>` with slugs\s+(.*?)\.\n", README, re.S)
    assert m, "the problem-type list was not found in README.md"
    documented = re.findall(r"`([a-z-]+)`", m.group(1))
    assert len(documented) == len(set(documented))
    classes = _problem_classes()
    unused = [cls.__name__ for cls in classes if not _used_outside_errors_module(cls.__name__)]
    assert not unused, f"problem classes nothing raises: {unused}"
    assert set(documented) == {cls.slug for cls in classes}
    assert "`http-<status>`" in m.group(1)  # the errors middleware's fallback for any other HTTPException


def _settings_rows() -> list[tuple[list[str], list[str]]]:
    """(variables, default cells) of each row of the README's settings table."""
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`TELEMETRY_"):
            names = re.findall(r"`(TELEMETRY_[A-Z0-9_]+)`", cells[0])
            rows.append((names, [c.strip() for c in cells[1].split(" / ")]))
    return rows


def test_readme_settings_table_lists_every_setting_and_only_those():
    documented = [name for names, _ in _settings_rows() for name in names]
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    fields = {env_name(f.name) for f in dataclasses.fields(Settings)}
    assert {v for v, _, _ in describe()} == fields
    assert not fields - set(documented), f"settings missing from the README table: {sorted(fields - set(documented))}"
    assert not set(documented) - fields, f"README lists settings the code lacks: {sorted(set(documented) - fields)}"


def test_readme_settings_defaults_are_the_codes():
    """Each default the table gives as a literal (`60`) is, read by the setting's own parser, the dataclass default."""
    by_var = {env_name(f.name): f for f in dataclasses.fields(Settings)}
    checked = 0
    for names, defaults in _settings_rows():
        if len(names) != len(defaults):
            continue
        for name, cell in zip(names, defaults):
            literal = re.fullmatch(r"`([^`]+)`(?: \([^)]*\))?", cell)
            f = by_var.get(name)
            if literal is None or f is None:
                continue  # described in words ("number of CPUs", "16 MiB"), or a setting the other test reports
            assert f.metadata["parse"](literal.group(1)) == f.default, (name, cell, f.default)
            checked += 1
    assert checked >= 15


# ------------------------------------------------------------------ the quickstart, pasted as is


def _quickstart_blocks() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


async def test_readme_quickstart_pastes_as_is_and_reaches_a_stored_heartbeat_and_scan(service, db):
    """The README's quickstart, both blocks, run by bash against a live service: only the activation line
    (this test's interpreter may live elsewhere) and the port differ."""
    import asyncio
    import os
    import sys
    import uuid

    blocks = _quickstart_blocks()
    assert len(blocks) == 2
    script = "\n".join(blocks)
    port = service.url.rsplit(":", 1)[1]
    bindir = os.path.dirname(sys.executable)
    assert script.count(". .venv/bin/activate") == 1 and script.count("PORT=8080") == 1
    script = script.replace(". .venv/bin/activate", f'PATH="{bindir}:$PATH"').replace("PORT=8080", f"PORT={port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")} | service.env
    proc = await asyncio.create_subprocess_exec("bash", "-euo", "pipefail", "-c", script, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert '{"stored":true,"dropped_fields":["hostname"]}' in lines
    assert any(line.startswith('{"scan_id":"') and line.endswith('"dropped_fields":["browser_history"]}') for line in lines)
    erased = [line for line in lines if line.startswith("erased ")]
    assert len(erased) == 1
    install_id = uuid.UUID(erased[0].split()[1])
    assert f'"install_id": "{install_id}"' in out  # the export --pretty, indented
    assert any(line.startswith('telemetry_requests_total{') and 'route="/v1/scans"' in line for line in lines)
    # Erased: nothing of it is left (it was stored, or the export above would have failed).
    assert await db.fetchval("SELECT count(*) FROM installations WHERE install_id = $1", install_id) == 0


# ------------------------------------------------------------------ docs/api.md against /openapi.json

API_MD = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
METHODS = ("get", "put", "post", "delete", "patch")


def _api_sections() -> dict[tuple[str, str], str]:
    """(method, path) of every `### METHOD /path` heading of docs/api.md -> its text."""
    out = {}
    for m in re.finditer(r"^### (GET|PUT|POST|DELETE|PATCH) (/\S*)\n(.*?)(?=^#{2,3} |\Z)", API_MD, re.S | re.M):
        key = (m.group(1).lower(), m.group(2))
        assert key not in out, f"{key} documented twice"
        out[key] = m.group(3)
    return out


async def test_api_md_documents_every_endpoint_and_status_of_the_live_openapi_and_no_other(service):
    status, spec, _ = await service.request("GET", "/openapi.json")
    assert status == 200
    live = {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items() if method in METHODS}
    sections = _api_sections()
    assert sorted(set(live) - set(sections)) == [], "endpoints of /openapi.json missing from docs/api.md"
    assert sorted(set(sections) - set(live)) == [], "docs/api.md documents endpoints /openapi.json lacks"
    for (method, path), text in sections.items():
        statuses = re.search(r"^\*\*Statuses:\*\*(.*?)(?:\n\n|\Z)", text, re.S | re.M)
        assert statuses, f"{method.upper()} {path}: no **Statuses:** line"
        documented = re.findall(r"`(\d{3})`", statuses.group(1))
        assert documented == sorted(set(documented)), f"{method.upper()} {path}: statuses repeated or out of order"
        assert set(documented) == set(live[(method, path)]["responses"]), f"{method.upper()} {path}: statuses differ"
        # A curl example of this very request (path parameters as shell variables).
        pattern = re.sub(r"\\\{[a-z_]+\\\}", r"\\$[A-Z_]+", re.escape(path)) + r"(?:\s|$|')"
        curl = re.search(r"```sh\n(.*?)```", text, re.S)
        assert curl and "curl " in curl.group(1) and re.search(pattern, curl.group(1)), f"{method.upper()} {path}: no curl example"
        if method != "get":
            assert f"-X {method.upper()}" in curl.group(1), f"{method.upper()} {path}: the example uses another method"


def test_api_md_problem_types_are_exactly_those_the_code_can_answer():
    table = API_MD.split("## Problem types", 1)[1]
    rows = re.findall(r"^\| `([a-z-]+)` \| (\d{3}) \|", table, re.M)
    assert len(rows) == len({slug for slug, _ in rows})
    code = {cls.slug: cls.status for cls in _problem_classes()}
    assert dict((slug, int(status)) for slug, status in rows) == code
