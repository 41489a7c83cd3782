"""CONTRACT 8's safe commands: only serve creates a data directory; export --pretty; a 403 names the role it needs."""

from __future__ import annotations

import uuid

import orjson
import pytest

from tests.support import heartbeat_body, run_cli

# Every command that opens the database (or needs the running service) with its least arguments.
COMMANDS = [
    ("audit",),
    ("enroll-secret", "create"),
    ("admin-token", "create"),
    ("tokens", "list"),
    ("tokens", "revoke", "tid_0000"),
    ("keys", "rotate"),
    ("sweep", "--once"),
    ("export", "0b6f3c8e-8f59-4b7e-9a51-4c2b7f1d2e10"),
    ("erase", "0b6f3c8e-8f59-4b7e-9a51-4c2b7f1d2e10"),
    ("demo",),
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_without_dsn_or_data_directory_a_command_exits_1_naming_the_directory_and_creates_nothing(tmp_path, args):
    data_dir = tmp_path / "nowhere" / "telemetry-data"
    proc = run_cli(*args, env={"TELEMETRY_DATA_DIR": str(data_dir)}, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data_dir) in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()  # no directory, no database, no key file


def test_send_without_url_or_running_serve_exits_1_naming_where_it_looked(tmp_path):
    data_dir = tmp_path / "telemetry-data"
    proc = run_cli("send", "heartbeat", env={"TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_TOKEN": "tii_x"},
                   check=False, input="{}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"telemetry-ingest: no running serve found: {data_dir / 'serve.json'} does not exist "
        "(start `telemetry-ingest serve`, or give --url)"]
    assert not data_dir.exists()


def test_an_existing_data_directory_is_used_and_a_stale_address_file_is_not_believed(tmp_path):
    data_dir = tmp_path / "telemetry-data"
    (data_dir / "pgdata").mkdir(parents=True)
    (data_dir / "serve.json").write_text('{"url": "http://127.0.0.1:1", "host": "127.0.0.1", "port": 1, "pid": 999999999}')
    proc = run_cli("send", "heartbeat", env={"TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_TOKEN": "tii_x"},
                   check=False, input="{}")
    assert proc.returncode == 1 and "names process 999999999, which has exited" in proc.stderr


async def test_export_pretty_is_the_same_document_indented(service):
    install_id, token = await service.enroll()
    status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
    assert status == 200
    plain = service.cli("export", str(install_id)).stdout
    pretty = service.cli("export", "--pretty", str(install_id)).stdout
    assert len(plain.strip().splitlines()) == 1
    assert len(pretty.strip().splitlines()) > 10 and pretty.startswith("{\n  ")
    a, b = orjson.loads(plain), orjson.loads(pretty)
    for doc in (a, b):  # the second export is itself audited, and later
        doc.pop("exported_at")
        doc.pop("audit")
    assert a == b and b["installation"]["install_id"] == str(install_id)


@pytest.mark.parametrize(("method", "path", "role", "wants"), [
    ("POST", "/v1/heartbeats", "admin", "an installation"),
    ("POST", "/v1/scans", "installation", "an agent"),
    ("GET", "/v1/admin/stats", "installation", "an admin"),
    ("POST", "/v1/enroll", "installation", "an enrollment-secret"),
])
async def test_a_403_names_the_role_the_endpoint_needs(service, method, path, role, wants):
    if role == "admin":
        token = service.create_secret("admin-token")
    else:
        _, token = await service.enroll()
    status, body, _ = await service.request(method, path, token=token, json={"install_id": str(uuid.uuid4())})
    assert status == 403 and body["type"].endswith("/forbidden")
    assert body["detail"] == f"this endpoint needs {wants} token; this is an {role} token"
