"""Fuzzing: schemathesis against the live service from its own /openapi.json, and hypothesis on the parsers.

The allowlist filter's property tests are in tests/test_filter.py.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from multidict import CIMultiDict

from ingest.http.body import has_duplicate_keys, inflate, parse_object
from ingest.errors import BadRequest, TooLarge
from ingest.http.net import anonymise, client_ip
from ingest.http.openapi import build
from tests.fault_tools import agent_of
from tests.support import start_service

# ------------------------------------------------------------------ the live service


def _fuzz(url: str, tokens: dict[str, str], install_id: str, victim_id: str, max_examples: int) -> list[str]:
    """Run schemathesis on every operation (positive and negative data); the failures found, as text."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    documented = {f"{m.upper()} {path}" for path, ops in build()["paths"].items() for m in ops}
    # Loaded from its own URL, schemathesis leaves the document's own operation out.
    assert {op.label for op in operations} >= documented - {"GET /openapi.json"}
    for op in operations:
        role = ("enroll" if op.path == "/v1/enroll" else "agent" if op.path == "/v1/scans"
                else "admin" if op.path.startswith("/v1/admin/") else "installation")
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                # Point some cases at real resources, so that success paths are exercised as well.
                if isinstance(case.body, dict) and "install_id" in case.body and case.body["install_id"] != install_id:
                    if op.path == "/v1/heartbeats":
                        case.body["install_id"] = install_id
                if case.path_parameters and "install_id" in case.path_parameters and mode is GenerationMode.POSITIVE:
                    case.path_parameters["install_id"] = victim_id if case.method == "DELETE" else install_id
                try:
                    case.call_and_validate(base_url=url, headers=headers, checks=checks, timeout=30)
                except AssertionError as exc:  # schemathesis' failures are AssertionError subclasses
                    failures.append(f"{op.label} ({mode.value}): {exc}"[:2000])

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, op.label
    return failures


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_response_off_schema(db_dsn, master_key, tmp_path):
    async with start_service(db_dsn, master_key, tmp_path) as svc:
        install_id, token = await svc.enroll()
        victim_id, _ = await svc.enroll()
        _, agent_token = await agent_of(svc, token)
        tokens = {"enroll": svc.create_secret(), "installation": token, "agent": agent_token, "admin": svc.create_secret("admin-token")}
        failures = await asyncio.to_thread(_fuzz, svc.url, tokens, str(install_id), str(victim_id), 25)
        assert not failures, "\n\n".join(failures)
        metrics = (await svc.request("GET", "/metrics"))[1]
        # Some cases succeeded: the fuzzing reached past authentication and validation.
        assert 'route="/v1/heartbeats",status="200"' in metrics, "no heartbeat was ever accepted"
        assert 'status="500"' not in metrics


async def test_openapi_documents_every_route_and_nothing_else(service):
    """The document served is the one built from the policy, and it names exactly the routes the app serves."""
    status, doc, _ = await service.request("GET", "/openapi.json")
    assert status == 200 and doc == orjson.loads(orjson.dumps(build()))
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for resource in service.app.router.resources():
        for route in resource:
            if route.method not in ("HEAD", "*"):
                served.add((resource.canonical, route.method))
    assert documented == served


# ------------------------------------------------------------------ JSON: parse_object


KEYS = st.sampled_from(["a", "b", "install_id", "x:y", "\\", '"', "é", "\u2028", ":"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=":\\\"aé\u0000\u2028", max_size=6),
)


def _pairs_tree():
    """A JSON value whose objects are lists of (key, value) pairs: keys may repeat."""
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=3).map(lambda v: ("list", v)),
            st.lists(st.tuples(KEYS, children), max_size=3).map(lambda p: ("object", p)),
        ),
        max_leaves=10,
    )


def _escape(s: str, style: int) -> str:
    """A JSON string literal of s, escaped one of several legal ways."""
    if style == 0:
        return json.dumps(s, ensure_ascii=False)
    if style == 1:
        return json.dumps(s, ensure_ascii=True)
    # every character as \\uXXXX (":" becomes \\u003a or \\u003A)
    out = []
    for ch in s:
        if ord(ch) > 0xFFFF:
            out.append(json.dumps(ch))
            continue
        code = f"{ord(ch):04x}"
        out.append("\\u" + (code.upper() if style == 3 else code))
    return '"' + "".join(out) + '"'


def _render(value, rnd) -> str:
    ws = rnd.choice(["", " ", "\n", "\t ", "\r\n  "])
    if isinstance(value, tuple) and value[0] == "list":
        return "[" + ws + ("," + ws).join(_render(v, rnd) for v in value[1]) + ws + "]"
    if isinstance(value, tuple) and value[0] == "object":
        items = [f"{_escape(k, rnd.randrange(4))}{ws}:{ws}{_render(v, rnd)}" for k, v in value[1]]
        return "{" + ws + ("," + ws).join(items) + ws + "}"
    if isinstance(value, str):
        return _escape(value, rnd.randrange(4))
    return json.dumps(value)


def _has_repeat(value) -> bool:
    if isinstance(value, tuple) and value[0] == "list":
        return any(_has_repeat(v) for v in value[1])
    if isinstance(value, tuple) and value[0] == "object":
        keys = [k for k, _ in value[1]]
        return len(set(keys)) != len(keys) or any(_has_repeat(v) for _, v in value[1])
    return False


@st.composite
def json_texts(draw):
    """(JSON text of an object, whether some object in it repeats a key)."""
    pairs = draw(st.lists(st.tuples(KEYS, _pairs_tree()), max_size=4))
    root = ("object", pairs)
    return _render(root, draw(st.randoms(use_true_random=False))).encode(), _has_repeat(root)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None)
@given(json_texts())
@example((b'{"a": 1, "\\u0061": 2}', True))
@example((b'{"a": "\\\\u003a", "b": 1}', False))
@example((b'{"a": "\\u003a", "a": "::"}', True))
def test_duplicate_keys_are_found_exactly(case):
    text, repeats = case
    if repeats:
        with pytest.raises(BadRequest):
            parse_object(text)
    else:
        assert parse_object(text) == json.loads(text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=30),
       st.sampled_from([None, 1, 2]), st.booleans())
def test_any_object_round_trips_however_it_is_formatted(value, indent, ascii_only):
    doc = {"v": value}
    for text in (orjson.dumps(doc), json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()):
        assert parse_object(text) == doc
        assert parse_object(bytearray(text)) == doc
        assert has_duplicate_keys(text, doc) is False


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
@example(b"\xef\xbb\xbf{}")
@example(b'{"a": "\xed\xa0\x80"}')
@example(b"{" * 2000)
def test_parse_object_takes_anything_and_answers_only_400(data):
    try:
        doc = parse_object(data)
    except BadRequest:
        return
    assert isinstance(doc, dict)


@pytest.mark.parametrize("depth", [100, 253, 254, 255, 300, 999, 1000, 1023, 1024, 1025])
def test_deep_documents_never_escape_as_anything_but_400(depth):
    for text in (b'{"a":' + b"[" * depth + b"]" * depth + b"}", b'{"a":' + b'{"b":' * depth + b"1" + b"}" * depth + b"}"):
        try:
            assert isinstance(parse_object(text), dict)
        except BadRequest:
            pass
        dup = text[:-1] + b',"a":1}'
        with pytest.raises(BadRequest):
            parse_object(dup)


# ------------------------------------------------------------------ inflate


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=5000), st.sampled_from(["identity", "gzip", "zstd"]), st.integers(1, 6000))
def test_inflate_round_trips_within_the_limit_and_refuses_past_it(data, encoding, limit):
    packed = {"identity": lambda d: d, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[encoding](data)
    if len(data) <= limit:
        assert bytes(inflate(packed, encoding, limit)) == data
    else:
        with pytest.raises(TooLarge):
            inflate(packed, encoding, limit)


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=400), st.sampled_from(["gzip", "zstd"]), st.integers(0, 3))
@example(b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip", 0)
@example(b"\x28\xb5\x2f\xfd\x00\x00\x00\x00", "zstd", 0)
def test_inflate_takes_any_bytes_and_answers_only_400_or_413(junk, encoding, mangle):
    base = gzip.compress(b'{"a": 1}' * 50) if encoding == "gzip" else zstandard.ZstdCompressor().compress(b'{"a": 1}' * 50)
    data = [junk, base[: len(junk) % len(base)] + junk, base + junk, zlib.compress(junk)][mangle]
    try:
        out = inflate(data, encoding, 1000)
    except (BadRequest, TooLarge):
        return
    assert len(out) <= 1000


# ------------------------------------------------------------------ addresses: client_ip, anonymise


class _Transport:
    def __init__(self, peer):
        self.peer = peer

    def get_extra_info(self, name):
        return self.peer if name == "peername" else None


class _Request:
    def __init__(self, peer, forwarded: list[str]):
        self.transport = _Transport(peer)
        self.headers = CIMultiDict(("X-Forwarded-For", v) for v in forwarded)


ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
HOPS = st.one_of(ADDRESSES, st.sampled_from(["", " ", "unknown", "1.2.3", "::ffff:10.0.0.1", "fe80::1%eth0", "10.0.0.1:80", "[::1]"]),
                 st.text(max_size=20))
TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"), ipaddress.ip_network("127.0.0.1/32")]


@settings(max_examples=500, deadline=None, database=None)
@given(ADDRESSES | st.sampled_from(["10.1.2.3", "127.0.0.1", "fd00::5"]), st.lists(st.lists(HOPS, max_size=4).map(", ".join), max_size=3),
       st.booleans())
def test_client_ip_is_the_peer_or_a_forwarded_hop_and_never_raises(peer, forwarded, trust):
    trusted = TRUSTED if trust else []
    ip = client_ip(_Request((peer, 1234), forwarded), trusted)
    peer_ip = ipaddress.ip_address(peer)
    peer_ip = peer_ip.ipv4_mapped or peer_ip if peer_ip.version == 6 else peer_ip
    if not trust or not any(peer_ip in n for n in TRUSTED):
        assert ip == peer_ip  # an untrusted peer's header is never believed
    else:
        hops = [ipaddress.ip_address(h.strip().split("%")[0]) for f in forwarded for h in f.split(",") if _is_ip(h)]
        hops = [h.ipv4_mapped or h if h.version == 6 else h for h in hops]
        assert ip == peer_ip or ip in hops
    if ip is not None:
        net = anonymise(ip)
        assert ip in net and net.prefixlen == (24 if ip.version == 4 else 48)
        assert anonymise(net.network_address) == net


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip().split("%")[0])
        return True
    except ValueError:
        return False


def test_client_ip_without_transport_or_with_odd_peers():
    assert client_ip(_Request(None, ["1.2.3.4"]), TRUSTED) is None
    req = _Request(("127.0.0.1", 1), ["198.51.100.77, 10.0.0.9"])
    assert client_ip(req, TRUSTED) == ipaddress.ip_address("198.51.100.77")
    req = _Request(("127.0.0.1", 1), ["2001:db8::77", "garbage, 10.0.0.9"])
    assert client_ip(req, TRUSTED) == ipaddress.ip_address("10.0.0.9")  # the walk stops at the malformed hop
    assert anonymise(None) is None
    assert str(anonymise(ipaddress.ip_address("2001:db8::77"))) == "2001:db8::/48"


def _schemathesis_cli(url: str, token: str, paths: str, *, phases: str, max_examples: int, cwd: Path) -> subprocess.CompletedProcess:
    """`schemathesis run` with every check, on the operations whose path matches paths, as the given token
    (in cwd: it keeps a cache in .schemathesis/ there, which is not the repository's)."""
    exe = Path(sys.executable).with_name("schemathesis")
    argv = [str(exe), "run", url + "/openapi.json", "--checks", "all", "--phases", phases,
            "--include-path-regex", paths, "--header", f"Authorization: Bearer {token}",
            "--max-examples", str(max_examples), "--generation-deterministic", "--seed", "12",
            "--request-timeout", "30", "--workers", "1", "--no-color", "--output-truncate", "false"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}, cwd=cwd)


@pytest.mark.slow
async def test_schemathesis_every_check_in_its_coverage_and_stateful_phases(db_dsn, master_key, tmp_path):
    """The CLI as an operator would run it: examples, coverage (boundary values, integral numbers, wrong methods)
    and stateful phases, every check, for each role's operations."""
    async with start_service(db_dsn, master_key, tmp_path) as svc:
        install_id, token = await svc.enroll()
        _, agent_token = await agent_of(svc, token)
        roles = [
            (svc.create_secret(), r"^/v1/enroll$"),
            (token, r"^/v1/(heartbeats|installation/settings|agents)"),
            (agent_token, r"^/v1/scans$"),
            (svc.create_secret("admin-token"), r"^/v1/admin/"),
            ("none", r"^/(healthz|readyz|metrics|openapi\.json)$"),
        ]
        failures, outputs = [], {}
        for tok, paths in roles:
            proc = await asyncio.to_thread(_schemathesis_cli, svc.url, tok, paths, phases="examples,coverage,stateful", max_examples=10,
                                           cwd=tmp_path)
            outputs[paths] = proc.stdout
            if proc.returncode != 0:
                failures.append(f"{paths}: exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
        assert not failures, "\n\n".join(failures)
        # The phases ran (they were not skipped for want of something to do).
        for paths, out in outputs.items():
            assert "✅ Coverage" in out, (paths, out[-3000:])
        installation = outputs[roles[1][1]]
        assert "✅ Stateful" in installation and "1 covered" in installation, installation[-3000:]
        metrics = (await svc.request("GET", "/metrics"))[1]
        assert 'status="500"' not in metrics
