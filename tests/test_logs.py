"""Logs: one structured line per request (route, status, latency, request id), and nothing that identifies anyone."""

from __future__ import annotations

import contextlib
import io
import logging
import uuid

import orjson
import pytest

from ingest.logs import JsonFormatter, TextFormatter, make_handler, scrub
from tests.support import heartbeat_body


@contextlib.contextmanager
def captured_log(fmt: str):
    """Everything logged in this process while inside, formatted by the service's own handler."""
    stream = io.StringIO()
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
async def service(db_dsn, master_key, tmp_path):
    """The real app with an access line for every request (TELEMETRY_ACCESS_LOG=on; the default samples)."""
    from tests.support import start_service

    async with start_service(db_dsn, master_key, tmp_path, access_log="on") as svc:
        yield svc


def access_lines(text: str) -> list[dict]:
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    return [line for line in lines if line["logger"] == "ingest.access"]


async def test_one_json_line_per_request_with_route_status_latency_and_request_id(service):
    install_id, token = await service.enroll()
    with captured_log("json") as out:
        status, _, h1 = await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
        assert status == 200
        status, _, h2 = await service.request("GET", "/healthz", headers={"X-Request-ID": "lb-probe.42_a"})
        assert status == 200
        status, _, h3 = await service.request("POST", "/v1/heartbeats", token="tii_nonsense", json={})
        assert status == 401
        status, _, h4 = await service.request("GET", f"/v1/no-such/{install_id}")
        assert status == 404
    lines = access_lines(out.getvalue())
    assert len(lines) == 4
    expected = [
        ("/v1/heartbeats", "POST", 200, h1), ("/healthz", "GET", 200, h2),
        ("/v1/heartbeats", "POST", 401, h3), ("other", "GET", 404, h4),
    ]
    for line, (route, method, status, headers) in zip(lines, expected):
        assert line["message"] == "request" and line["level"] == "INFO"
        assert (line["route"], line["method"], line["status"]) == (route, method, status)
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert line["request_id"] == headers["X-Request-ID"]
        assert line["time"].endswith("Z")
    assert lines[1]["request_id"] == "lb-probe.42_a"  # a client's plain request id is kept and echoed
    generated = [lines[i]["request_id"] for i in (0, 2, 3)]
    assert len(set(generated)) == 3 and all(len(r) == 16 for r in generated)


async def test_access_line_names_the_token_id_never_the_token(service, db):
    install_id, token = await service.enroll()
    token_id = await db.fetchval("SELECT token_id FROM tokens WHERE install_id = $1 AND role = 'installation'", install_id)
    with captured_log("json") as out, captured_log("text") as text:
        assert (await service.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 200
        assert (await service.request("GET", "/v1/admin/stats", token=token))[0] == 403  # known token, wrong role
        assert (await service.request("POST", "/v1/heartbeats", token="tii_nonsense", json={}))[0] == 401
        assert (await service.request("GET", "/healthz"))[0] == 200
    lines = access_lines(out.getvalue())
    assert [line.get("token_id") for line in lines] == [token_id, token_id, None, None]
    assert token_id.startswith("tid_")
    assert f"token_id={token_id}" in text.getvalue()
    for output in (out.getvalue(), text.getvalue()):
        assert token not in output and token[4:] not in output


@pytest.mark.parametrize(
    "given, kept",
    [
        ("abc-123", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("ünïcode", False),
        # fixed values, not uuid4(): xdist's workers must collect the same test ids
        ("858ae855-b941-4d5e-b2e7-933f7d097e05", False),  # shaped like an install_id / agent_id / scan_id
        ("f8c2e71292c34e7289a691c9fa2173a5", True),  # 32 bare hex digits: nginx's $request_id
        ("tii_" + "a" * 43, False),  # shaped like a bearer token
        ("10.1.2.3", False),  # an address
    ],
)
async def test_client_request_id_kept_only_when_plain(service, given, kept):
    status, _, headers = await service.request("GET", "/healthz", headers={"X-Request-ID": given})
    assert status == 200
    assert (headers["X-Request-ID"] == given) is kept
    if not kept:
        assert len(headers["X-Request-ID"]) == 16


async def test_no_identifiers_or_secrets_in_the_log(service):
    secret = service.create_secret()
    install_id = uuid.uuid4()
    email = "jane.doe@customer.example"
    forwarded_ip = "203.0.113.77"
    with captured_log("json") as json_out, captured_log("text") as text_out:
        status, body, _ = await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})
        assert status == 201
        token = body["token"]
        body = heartbeat_body(install_id, email=email, hostname="WS-0042")
        for extra in ({}, {"X-Forwarded-For": forwarded_ip}, {"X-Request-ID": str(install_id)}, {"X-Request-ID": token}):
            status, _, _ = await service.request("POST", "/v1/heartbeats", token=token, json=body, headers=extra)
            assert status == 200
        # refusals of every kind, each carrying identifiers
        await service.request("POST", "/v1/enroll", token=secret, json={"install_id": str(install_id)})  # 409
        await service.request("POST", "/v1/heartbeats", token=token, json={**body, "email": "not-an-email " + email})  # 422
        await service.request("POST", "/v1/heartbeats", token=token, data=b"{" + email.encode(), headers={"Content-Type": "application/json"})  # 400
        await service.request("POST", "/v1/heartbeats", token=token + "x", json=body)  # 401
        await service.request("POST", "/v1/heartbeats", token=secret, json=body)  # 403
        await service.request("GET", f"/v1/admin/installations/{install_id}/export", token=token)  # a path with an id
        await service.request("DELETE", f"/v1/agents/{install_id}", token=token)
        await service.request("GET", f"/{email}/{forwarded_ip}")
    assert len(access_lines(json_out.getvalue())) == 13
    assert text_out.getvalue().count(" ingest.access: request route=") == 13
    for output in (json_out.getvalue(), text_out.getvalue()):
        for needle in (str(install_id), install_id.hex, token, token[4:], secret, secret[4:], email, forwarded_ip, "127.0.0.1", "WS-0042"):
            assert needle not in output, needle
        # ...and not because the formatters' safety net caught them: the lines never held any.
        for placeholder in ("[token]", "[email]", "[uuid]", "[ip]"):
            assert placeholder not in output, placeholder


def test_scrub_removes_shapes_of_identifiers_but_keeps_times_and_numbers():
    install_id = uuid.uuid4()
    line = (f"2024-05-01T12:30:45.123Z failed for {install_id} (request {install_id.hex}) token tia_{'Q' * 43} "
            f"from 198.51.100.7 and 2001:db8::1 and ::ffff:10.0.0.1 mail <a.b+c@mail.example.org> latency 12.5 version 4.2.1")
    out = scrub(line)
    assert str(install_id) not in out and "Q" * 43 not in out
    assert install_id.hex in out  # bare hex is left alone: nginx's request ids look like that
    assert "198.51.100.7" not in out and "2001:db8::1" not in out and "10.0.0.1" not in out and "mail.example.org" not in out
    assert out.startswith("2024-05-01T12:30:45.123Z failed for [uuid]") and "latency 12.5 version 4.2.1" in out


def test_formatters_scrub_exceptions_and_extras():
    try:
        raise ValueError("key (install_id)=(6f1c1a52-5a63-4d59-9f0e-3a7e0e9c2b11) already exists")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    record.detail = "contact admin@example.com"
    for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
        out = formatter.format(record)
        assert "6f1c1a52" not in out and "admin@example.com" not in out and "ValueError" in out


async def test_unusual_method_is_neither_a_label_nor_logged(service):
    weird = "TIIXSECRETMETHOD"
    async with service.http.request(weird, service.url + "/v1/heartbeats") as resp:
        assert 400 <= resp.status < 500, resp.status
    text = (await service.request("GET", "/metrics"))[1]
    assert weird not in text
    # whatever the parser lets through, a label only ever holds a known method or OTHER
    from aiohttp.test_utils import make_mocked_request

    from ingest.http.middleware import method_of

    assert method_of(make_mocked_request("PROPFIND", "/")) == "OTHER"
    assert method_of(make_mocked_request("POST", "/")) == "POST"


@pytest.mark.parametrize("mode", ["off", "sample:4"])
async def test_access_log_setting_turns_the_line_off_or_samples_it_but_every_request_is_counted(
        db_dsn, master_key, tmp_path, mode):
    from tests.support import start_service

    async with start_service(db_dsn, master_key, tmp_path, access_log=mode) as svc:
        install_id, token = await svc.enroll()
        with captured_log("json") as out:
            for _ in range(8):
                status, _, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id))
                assert status == 200
            status, _, _ = await svc.request("GET", "/v1/no-such")
            assert status == 404
        lines = access_lines(out.getvalue())
        # sample:4: the worker's 4th and 8th 2xx requests (the enrollment was its 1st), and the 404 (every 4xx, 5xx)
        assert [line["status"] for line in lines] == ([] if mode == "off" else [200, 200, 404])
        metrics = (await svc.request("GET", "/metrics"))[1]
        assert 'telemetry_requests_total{method="POST",route="/v1/heartbeats",status="200"} 8.0' in metrics


def test_access_log_sampling_keeps_every_4xx_and_5xx_and_one_in_n_of_the_rest():
    from ingest.logs import AccessSampler
    from ingest.settings import Settings, SettingsError

    sampler = AccessSampler("sample:3")
    kept = [sampler.wanted(s) for s in (200, 200, 200, 503, 200, 401, 200, 200, 500, 204)]
    assert kept == [False, False, True, True, False, True, False, True, True, False]
    assert Settings().access_log == "sample:100"  # the default: errors always, one in 100 of the rest
    default = AccessSampler(Settings().access_log)
    assert sum(default.wanted(200) for _ in range(1000)) == 10 and default.wanted(422)
    assert all(AccessSampler("on").wanted(200) for _ in range(3))
    assert not any(AccessSampler("off").wanted(s) for s in (200, 500))
    assert Settings.from_env({"TELEMETRY_ACCESS_LOG": "sample:10"}).access_log == "sample:10"
    for bad in ("sample:0", "sample:", "sometimes", "sample:x"):
        with pytest.raises(SettingsError, match="TELEMETRY_ACCESS_LOG"):
            Settings.from_env({"TELEMETRY_ACCESS_LOG": bad})


def test_fresh_request_ids_are_random_and_a_forked_worker_draws_its_own():
    """Generated request ids are 16 random hex digits (read in bulk, not counted), and a worker
    forked from a process that already handed some out does not repeat the parent's next ones."""
    import os
    import re

    from ingest.http.middleware import _fresh_id

    ids = [_fresh_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(re.fullmatch("[0-9a-f]{16}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first four ids, then out at once
        os.write(write, "".join(_fresh_id() for _ in range(4)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert len(child) == 64 and child != "".join(_fresh_id() for _ in range(4))
