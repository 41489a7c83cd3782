"""The allowlist filter: unit tests, and properties (hypothesis) over documents drawn from the policy."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import BadRequest, Invalid
from ingest.pipeline.filter import Allowlist
from policy.categories import INSTALLATION, SCAN, Field

FAST = Allowlist(SCAN.root)
REFERENCE = Allowlist(SCAN.root, fast=False)  # the plain per-item walk the fast path must agree with


def scan(**extra: Any) -> dict[str, Any]:
    doc = {"scan_id": str(uuid.uuid4()), "scanned_at": "2025-01-15T10:30:00+01:00"}
    doc.update(extra)
    return doc


# ------------------------------------------------------------------ unit tests


def test_declared_document_passes_unchanged():
    doc = scan(
        agent_version="7.1",
        asset={"name": "WS-1", "last_user": None},
        hardware={"cores": 8, "memory_mb": 1 << 40},
        disks=[{"name": "C:", "size_gb": 1.5, "free_gb": 0}],
        software=[{"name": "A", "version": "1", "publisher": None}, {"install_date": "2024-01-01"}],
        network=[{"dhcp": False}],
        hotfixes=[],
    )
    expected = orjson.loads(orjson.dumps(doc))
    del expected["asset"]["last_user"], expected["software"][0]["publisher"]  # null is stored as absent
    assert FAST.filter_document(doc) == (expected, [])
    assert REFERENCE.filter_document(doc) == (expected, [])


def test_dropped_paths_at_every_depth_in_first_met_order():
    doc = scan(
        zeta=1,
        asset={"name": "x", "owner": {"phone": "1"}},
        software=[{"name": "a", "license_key": "k"}, {"name": "b", "license_key": "k2", "path": "C:"}, {"path": "D:"}],
        services=[{"name": "s", "pid": 4}],
        network=[{"adapter": "eth0", "vlan": {"id": 3}}],
    )
    kept, dropped = FAST.filter_document(doc)
    assert dropped == ["zeta", "asset.owner", "software[].license_key", "software[].path", "services[].pid", "network[].vlan"]
    assert kept["software"] == [{"name": "a"}, {"name": "b"}, {}]
    assert kept["asset"] == {"name": "x"} and kept["services"] == [{"name": "s"}] and kept["network"] == [{"adapter": "eth0"}]
    assert "zeta" not in kept
    assert REFERENCE.filter_document(doc) == (kept, dropped)
    # the input is not changed
    assert doc["software"][0]["license_key"] == "k"


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"software": [{"name": "a"}, {"name": 5}]}, "software[].name"),
        ({"software": [{"name": "a"}, "b"]}, "software[]"),
        ({"software": [{"name": "x" * 1025}]}, "software[].name"),
        ({"software": {"name": "a"}}, "software"),
        ({"services": [{"state": ["Running"]}]}, "services[].state"),
        ({"disks": [{"size_gb": "512"}]}, "disks[].size_gb"),
        ({"disks": [{"size_gb": float("inf")}]}, "disks[].size_gb"),
        ({"network": [{"dhcp": 1}]}, "network[].dhcp"),
        ({"hardware": {"cores": True}}, "hardware.cores"),
        ({"hardware": {"cores": -1}}, "hardware.cores"),
        ({"asset": "WS-1"}, "asset"),
        ({"scanned_at": "2025-01-15"}, "scanned_at"),
        ({"scanned_at": "2025-01-15T10:30:00"}, "scanned_at"),
        ({"scan_id": "123"}, "scan_id"),
        ({"scan_id": None}, "scan_id"),
        ({"agent_version": "x" * 33}, "agent_version"),
    ],
)
def test_declared_field_of_wrong_type_is_422_with_its_path(patch, path):
    for f in (FAST, REFERENCE):
        with pytest.raises(Invalid) as exc:
            f.filter_document(scan(**patch))
        assert exc.value.detail.startswith(path + ":"), exc.value.detail


def test_too_many_items_is_422():
    small = Allowlist(Field("doc", "object", fields=(Field("xs", "list", max_items=2, items=Field("x", "object", fields=(Field("a", "string"),))),)))
    assert small.filter_document({"xs": [{"a": "1"}, {"a": "2"}]})[0] == {"xs": [{"a": "1"}, {"a": "2"}]}
    with pytest.raises(Invalid):
        small.filter_document({"xs": [{}, {}, {}]})


def test_missing_required_field_is_422():
    with pytest.raises(Invalid):
        FAST.filter_document({"scanned_at": "2025-01-15T10:30:00Z"})


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("where", ["top", "object", "list item"])
def test_dropped_values_are_not_walked(where):
    """Depth and size were bounded before parsing (ingest.http.budget); the filter drops an undeclared subtree
    without looking inside it: one nested deeper than any walk could go is dropped like a scalar."""
    deep = nested(200_000)  # a recursive or stack walk over this would take long, or fail
    for f in (FAST, REFERENCE):
        if where == "top":
            doc = scan(extra=deep)
        elif where == "object":
            doc = scan(asset={"extra": deep})
        else:
            doc = scan(software=[{"name": "a"}, {"extra": deep}])
        kept, dropped = f.filter_document(doc)
        assert dropped == [{"top": "extra", "object": "asset.extra", "list item": "software[].extra"}[where]]
        assert "extra" not in str(kept)[:10_000]


def test_heartbeat_policy_still_filters():
    f = Allowlist(INSTALLATION.root)
    doc = {"install_id": str(uuid.uuid4()), "license_type": "pro", "version": "1.0", "asset_count": 1, "x": {"y": 1}}
    kept, dropped = f.filter_document(doc)
    assert dropped == ["x"] and "x" not in kept


def test_large_software_list_fast_path_matches_reference():
    software = [{"name": f"App {i}", "version": "1.0", "publisher": "P", "install_date": "2024-01-01"} for i in range(5000)]
    for i in range(0, 5000, 50):
        software[i]["uninstall_string"] = "msiexec /x"
    software[777]["publisher"] = None
    doc = scan(software=software)
    kept, dropped = FAST.filter_document(doc)
    assert dropped == ["software[].uninstall_string"]
    assert (kept, dropped) == REFERENCE.filter_document(doc)
    assert all("uninstall_string" not in s for s in kept["software"]) and "publisher" not in kept["software"][777]
    assert kept["software"][778] is software[778]  # kept items are the parsed dicts, not copies


@pytest.mark.parametrize("extras", [("path",), ("path", "license_key"), ("path", "license_key", "arch", "size")])
def test_undeclared_keys_in_list_items_are_found_by_lookup_or_walk_in_first_met_order(extras):
    # Up to two undeclared keys are looked up item by item, more by walking each item's keys: both give
    # the items holding one, and the dropped paths in the order an item-by-item walk meets them.
    software = [{"name": f"App {i}", "version": "1.0"} for i in range(200)]
    for n, key in enumerate(reversed(extras)):  # the last-named key met first, the others later
        for i in range(10 + 30 * n, 200, 37):
            software[i] = {key: "x", **software[i]} if n % 2 else {**software[i], key: "x"}
    doc = scan(software=software)
    kept, dropped = FAST.filter_document(doc)
    assert (kept, dropped) == REFERENCE.filter_document(doc)
    assert set(dropped) >= {f"software[].{k}" for k in extras}
    assert dropped[0] == f"software[].{extras[-1]}"
    assert all(set(s) <= {"name", "version"} for s in kept["software"])


# ------------------------------------------------------------------ properties

KEY = st.text(min_size=0, max_size=12)
JSON_SCALAR = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
ANY_JSON = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3), max_leaves=8)


def valid(f: Field) -> st.SearchStrategy:
    """Values the policy accepts for field f (objects may carry undeclared keys, at any depth)."""
    if f.kind == "object":
        names = {c.name for c in f.fields}
        declared = st.fixed_dictionaries(
            {c.name: valid(c) for c in f.fields if c.required},
            optional={c.name: (valid(c) | st.none()) for c in f.fields if not c.required},
        )
        extras = st.dictionaries(KEY.filter(lambda k: k not in names), ANY_JSON, max_size=2)
        return st.tuples(declared, extras, st.booleans()).map(lambda t: {**t[1], **t[0]} if t[2] else {**t[0], **t[1]})
    if f.kind == "list":
        return st.lists(valid(f.items), max_size=6)
    if f.kind == "string":
        return st.text(max_size=min(f.max_length or 40, 40)) | st.just("x" * (f.max_length or 40))
    if f.kind == "integer":
        return st.integers(f.minimum, f.maximum)
    if f.kind == "number":
        return st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    if f.kind == "boolean":
        return st.booleans()
    if f.kind == "uuid":
        return st.uuids().map(str)
    if f.kind == "time":
        return st.datetimes(timezones=st.just(dt.timezone.utc)).map(lambda t: t.isoformat())
    raise AssertionError(f.kind)


def noisy(f: Field) -> st.SearchStrategy:
    """Like valid, but any declared value may also be any JSON value (so of the wrong type)."""
    if f.kind == "object":
        names = {c.name for c in f.fields}
        declared = st.fixed_dictionaries({}, optional={c.name: noisy(c) for c in f.fields})
        extras = st.dictionaries(KEY.filter(lambda k: k not in names), ANY_JSON, max_size=2)
        return st.tuples(declared, extras).map(lambda t: {**t[1], **t[0]}) | ANY_JSON
    if f.kind == "list":
        return st.lists(noisy(f.items), max_size=6) | ANY_JSON
    return valid(f) | ANY_JSON


def conforms(value: Any, f: Field) -> bool:
    """Every key of value, at every depth, is declared by f (and no null is kept)."""
    if f.kind == "object":
        children = {c.name: c for c in f.fields}
        return isinstance(value, dict) and all(k in children and conforms(v, children[k]) for k, v in value.items())
    if f.kind == "list":
        return isinstance(value, list) and all(conforms(v, f.items) for v in value)
    return value is not None and not isinstance(value, (dict, list))


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(valid(SCAN.root))
def test_output_never_holds_a_key_outside_the_policy_and_filtering_is_idempotent(doc):
    kept, dropped = FAST.filter_document(doc)
    assert conforms(kept, SCAN.root)
    assert FAST.filter_document(kept) == (kept, [])
    assert FAST.filter_document(orjson.loads(orjson.dumps(kept))) == (kept, [])
    # dropped names exactly the undeclared paths (each once)
    assert len(dropped) == len(set(dropped))
    assert (kept, dropped) == REFERENCE.filter_document(doc)


@PROPERTY
@given(noisy(SCAN.root))
def test_any_input_is_filtered_or_refused_and_fast_path_agrees(doc):
    try:
        expected = REFERENCE.filter_document(doc)
    except (Invalid, BadRequest):
        # Refused either way (with several faults the two may name a different one first).
        with pytest.raises((Invalid, BadRequest)):
            FAST.filter_document(doc)
        return
    kept, dropped = FAST.filter_document(doc)
    assert (kept, dropped) == expected
    assert conforms(kept, SCAN.root)
    assert FAST.filter_document(kept) == (kept, [])
