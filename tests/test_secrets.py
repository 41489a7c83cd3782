"""Secrets: after a representative workload, no token, e-mail, raw IP address or scan marker is in the logs or the database.

The workload covers the happy paths and the failing ones (errors are where secrets leak: an
exception message, a refused header echoed into a log line), in-process with every logger at
DEBUG through the service's own handler, and through `serve` as a process (its standard error).
Then every line logged and every column of every row of every table, as text, is searched.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import ipaddress
import logging
import secrets
import signal
import uuid

import aiohttp
import orjson
import pytest

from ingest.logs import make_handler
from tests.fault_tools import JSON, agent_of, database_as_text, http_request, raw_http, scan_body
from tests.support import heartbeat_body, start_service
from tests.test_serve import ServeProcess

RAW_IPS = ["198.51.100.77", "2001:db8::77", "203.0.113.9"]


@contextlib.contextmanager
def every_log_line():
    """Everything logged in this process, at DEBUG, through the service's handler, as text and as JSON lines."""
    text, js = io.StringIO(), io.StringIO()
    handlers = [make_handler("text", text), make_handler("json", js)]
    root = logging.getLogger()
    level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield lambda: text.getvalue() + "\n" + js.getvalue()
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(level)


class Secrets:
    """Everything the workload used that must never be written down in the clear."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def add(self, kind: str, value: str) -> str:
        self.values[f"{kind} {len(self.values)}"] = value
        return value

    def marker(self) -> str:
        return self.add("scan marker", f"MARK{secrets.token_hex(6)}")

    def email(self) -> str:
        return self.add("e-mail", f"leak.{secrets.token_hex(4)}@example.org")

    def found_in(self, text: str) -> list[str]:
        """Names of the values found in text (tokens also without their prefix; markers also hex-encoded, as in bytea)."""
        found = []
        for name, value in self.values.items():
            forms = {value}
            if name.startswith("token") and value.split("_", 1)[0] in ("tie", "tii", "tia", "tiadm"):
                forms.add(value.split("_", 1)[1])
            if name.startswith(("scan marker", "e-mail")):
                forms.add(value.encode().hex())
            if any(f in text for f in forms):
                found.append(f"{name}: {value}")
        return found


async def workload(svc, port: int, s: Secrets) -> list[uuid.UUID]:
    """Enrol, send heartbeats and scans (from addresses behind a trusted proxy), fail in many ways, use the admin API."""
    secret = s.add("token enroll", svc.create_secret())
    admin = s.add("token admin", svc.create_secret("admin-token"))
    installs = []
    for _ in range(2):
        install_id, token = await svc.enroll(secret=secret)
        s.add("token installation", token)
        _, agent = await agent_of(svc, token, name="inventory agent")  # a name is stored as given (disclosed)
        s.add("token agent", agent)
        installs.append((install_id, token, agent))
    (a, token_a, agent_a), (b, token_b, agent_b) = installs
    for ip in RAW_IPS:
        h = {"X-Forwarded-For": f"{ip}, 127.0.0.1"}
        status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token_a, json=heartbeat_body(a, email=s.email()), headers=h)
        assert status == 200
        status, _, _ = await svc.request("POST", "/v1/scans", token=agent_a, headers=h, json=scan_body(
            marker=s.marker(), undeclared=s.marker(), asset={"name": s.marker(), "ip_address": ip, "owner_email": s.email()}))
        assert status == 201
    # Failures, each carrying something secret.
    bad = [
        ("POST", "/v1/heartbeats", token_a, heartbeat_body(a, email=s.email() + "x" * 300)),  # 422 on the e-mail
        ("POST", "/v1/heartbeats", token_a, heartbeat_body(b, email=s.email())),  # 403: another installation
        ("POST", "/v1/heartbeats", "tii_" + s.add("token unknown", secrets.token_urlsafe(32)), heartbeat_body(a)),  # 401
        ("POST", "/v1/scans", agent_b, scan_body(marker=s.marker(), scanned_at="yesterday " + s.marker())),  # 422
        ("POST", "/v1/scans", agent_b, scan_body(marker=s.marker(), install_id=str(a))),  # 403
        ("POST", "/v1/enroll", token_a, {"install_id": str(uuid.uuid4())}),  # 403
        ("GET", f"/v1/admin/installations/{token_a}/export", admin, None),  # 404, a token in the path
        ("GET", f"/v1/admin/installations/{a}/export?email={s.email()}&t={token_b}", token_a, None),  # 403
    ]
    for method, path, token, body in bad:
        status, _, _ = await svc.request(method, path, token=token, json=body, headers={"X-Request-ID": token_b})
        assert 400 <= status < 500, (path, status)
    # Below the client library: a duplicate key, invalid UTF-8, an oversized header carrying a token and an e-mail.
    hb = orjson.dumps(heartbeat_body(a, email=s.email()))
    for request in (
        http_request("POST", "/v1/heartbeats", token=token_a, body=hb[:-1] + b', "email": "' + s.email().encode() + b'"}', headers=JSON),
        http_request("POST", "/v1/heartbeats", token=token_a, body=hb.replace(b"@", b"\xff@"), headers=JSON),
        http_request("POST", "/v1/heartbeats", token=token_a, body=hb, headers={**JSON, "X-Big": f"{token_b} {s.email()} {RAW_IPS[0]} " + "a" * 9000}),
        http_request("POST", "/v1/heartbeats", token=token_a, body=gzip.compress(hb)[:-8], headers={**JSON, "Content-Encoding": "gzip"}),
    ):
        status, _, _ = await raw_http(port, request)
        assert status is not None and 400 <= status < 500
    # Admin: export (decrypts, answers; writes nothing down), restrict, erase; and a revoked agent.
    assert (await svc.request("GET", f"/v1/admin/installations/{a}/export", token=admin))[0] == 200
    assert (await svc.request("PUT", f"/v1/admin/installations/{b}/restriction", token=admin, json={"restricted": True}))[0] == 200
    assert (await svc.request("POST", "/v1/heartbeats", token=token_b, json=heartbeat_body(b, email=s.email())))[0] == 403
    assert (await svc.request("GET", "/v1/admin/stats", token=admin))[0] == 200
    svc.cli("tokens", "revoke", "-", input=agent_b + "\n")
    await asyncio.sleep(0.5)
    assert (await svc.request("POST", "/v1/scans", token=agent_b, json=scan_body(marker=s.marker())))[0] == 401
    assert (await svc.request("GET", "/metrics"))[0] == 200
    return [a, b]


@pytest.mark.slow
async def test_no_secret_in_the_logs_or_the_database(db_dsn, master_key, tmp_path, db):
    s = Secrets()
    with every_log_line() as logged:
        async with start_service(db_dsn, master_key, tmp_path, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
                                 access_log="on") as svc:
            ids = await workload(svc, int(svc.url.rsplit(":", 1)[1]), s)
            s.add("master key", master_key)  # not a token, but never to be logged either
        lines = logged()
    dump = await database_as_text(db)
    # The workload reached the database: anonymised prefixes and sealed e-mails are there.
    assert "198.51.100.0/24" in dump and "2001:db8::/48" in dump
    assert await db.fetchval("SELECT count(*) FROM installations WHERE email_ct IS NOT NULL") >= 1
    assert await db.fetchval("SELECT count(*) FROM scans") == len(RAW_IPS)
    assert "ingest.access" in lines and "Got more than" in lines  # the log saw the traffic, and the refused header
    leaks = {"log": s.found_in(lines), "database": s.found_in(dump)}
    assert not leaks["log"] and not leaks["database"], leaks
    for raw in RAW_IPS:
        assert raw not in lines and raw not in dump
    for install_id in ids:  # install ids are stored (as keys), but never logged
        assert str(install_id) not in lines and install_id.hex not in lines


@pytest.mark.slow
async def test_no_secret_in_the_standard_error_of_serve(db_dsn, master_key, tmp_path, db):
    env = {"TELEMETRY_DSN": db_dsn, "TELEMETRY_MASTER_KEY": master_key, "TELEMETRY_DATA_DIR": str(tmp_path),
           "TELEMETRY_ACCESS_LOG": "on"}
    s = Secrets()
    outputs = []
    for fmt in ("text", "json"):
        server = ServeProcess(env, "--workers", "2", "--log-format", fmt, "--trusted-proxies", "127.0.0.1/32")
        try:
            await server.wait_ready()

            class Remote:  # the same workload, against the process
                url = server.url

                def __init__(self, http):
                    self.http = http

                async def request(self, method, path, *, token=None, json=None, headers=None):
                    h = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
                    async with self.http.request(method, self.url + path, json=json, headers=h) as r:
                        raw = await r.read()
                        return r.status, (orjson.loads(raw) if raw and r.content_type.endswith("json") else raw), r.headers

                def cli(self, *args, input=None):
                    from tests.support import run_cli

                    return run_cli(*args, env=env, input=input)

                def create_secret(self, kind="enroll-secret"):
                    return self.cli(kind, "create").stdout.strip().splitlines()[-1]

                async def enroll(self, secret):
                    install_id = uuid.uuid4()
                    status, body, _ = await self.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
                    assert status == 201
                    return install_id, body["token"]

            async with aiohttp.ClientSession() as http:
                await workload(Remote(http), server.port, s)
            server.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.proc.wait, 15) == 0
            outputs.append(server.stderr)  # start-up to shutdown
        finally:
            server.stop()
    stderr = "\n".join(outputs)
    assert "request" in stderr and "listening" in stderr  # the access lines and start-up are there
    assert not s.found_in(stderr), s.found_in(stderr)
    assert not any(raw in stderr for raw in RAW_IPS)
    assert not s.found_in(await database_as_text(db))
