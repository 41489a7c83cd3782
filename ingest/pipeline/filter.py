"""The allowlist filter: keep declared fields (checked against the policy), drop and report the rest.

The policy tree is compiled once into nested closures, so filtering a document
costs one dictionary walk, linear in its size. Dropped keys are reported as
dotted paths with `[]` for list items (`software[].license_key`), each once, in
the order first met; a declared field of the wrong type, range or format raises
Invalid with its path.

Lists of flat string-valued objects (a scan's `software`, `services`, ...) are
the hot path: thousands of items, each a handful of short strings. They are
checked in whole-list passes that run in C (every item a dict, the union of
their keys, the types and lengths of all their values); only when such a pass
finds a null or an error do the items concerned go through the per-item path,
which gives the exact result and message. Kept items are the parsed dicts
themselves, not copies. Every pass is linear in the list's size.

A null for an optional field is accepted and left out (stored as absent). A number
with a zero fraction (`120.0`) is an integer, as in JSON Schema, and kept as one.

An undeclared key is dropped without its value being looked at: the body's size,
value count and depth were bounded before it was parsed (`ingest.http.budget`), so a
dropped subtree costs nothing here.

Plaintext is for categories, not people: in a category that is not sealed whole, a
string field stored in plaintext refuses a value holding something shaped like an
e-mail address, an IPv4 or IPv6 address or a MAC address (`looks_personal`).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import uuid
from collections.abc import Callable
from itertools import chain, compress, count, repeat
from operator import contains, not_
from typing import Any

from ingest.errors import Invalid
from policy.categories import Field

# check(value, path, dropped) -> value to keep
Check = Callable[[Any, str, dict], Any]

_EMAIL = re.compile(r"[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")

# Shapes of personal data, each a whole word of a plaintext value: an e-mail address
# (anything@host.domain), a dotted-quad IPv4 address (optionally with a port or prefix length), an
# IPv6 address in any of its spellings (RFC 4291 2.2, also with an embedded IPv4 or a zone), a MAC
# address (six hex pairs joined by ':' or '-', or Cisco's three dotted quads). A word is delimited
# by the start or end of the value, whitespace or brackets, quotes, commas and semicolons. Written
# in the subset of regex syntax Python and ECMA-262 share, because /openapi.json states the same
# rule with this very pattern (as "not": {"pattern": ...}, a search), so schema and service agree.
_SEP = "\\t\\n\\x0b\\x0c\\r ()\\[\\]<>{},;'\"`"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_H = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((
    f"(?:{_H}:){{7}}{_H}", f"(?:{_H}:){{1,7}}:", f"(?:{_H}:){{1,6}}:{_H}", f"(?:{_H}:){{1,5}}(?::{_H}){{1,2}}",
    f"(?:{_H}:){{1,4}}(?::{_H}){{1,3}}", f"(?:{_H}:){{1,3}}(?::{_H}){{1,4}}", f"(?:{_H}:){{1,2}}(?::{_H}){{1,5}}",
    f"{_H}:(?::{_H}){{1,6}}", f":(?:(?::{_H}){{1,7}}|:)", f"(?:{_H}:){{6}}{_IPV4}", f"::(?:[Ff]{{4}}(?::0{{1,4}})?:)?{_IPV4}",
    f"(?:{_H}:){{1,5}}:{_IPV4}",
))
_SHAPES = "|".join((
    f"[^@{_SEP}]+@[^@.{_SEP}]+(?:\\.[^@.{_SEP}]+)+",
    f"{_IPV4}(?:[:/][0-9]{{1,5}})?",
    f"(?:{_IPV6})(?:%[0-9A-Za-z._-]+)?(?:/[0-9]{{1,3}})?",
    "[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}", "[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}",
    "[0-9A-Fa-f]{4}\\.[0-9A-Fa-f]{4}\\.[0-9A-Fa-f]{4}",
))
PERSONAL_PATTERN = f"(?:^|[{_SEP}])(?:{_SHAPES})(?:$|[{_SEP}])"
_PERSONAL = re.compile(PERSONAL_PATTERN)
# Every shape holds one of these: a value without any skips the regex (most license types, names).
_PERSONAL_HINTS = ("@", ":", ".", "-")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RFC3339 = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:)([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})")


def looks_personal(value: str) -> bool:
    """Whether a word of value is shaped like an e-mail address, an IPv4 or IPv6 address or a MAC address."""
    if not any(h in value for h in _PERSONAL_HINTS):
        return False
    if len(value) <= _REMEMBERED_LENGTH:
        return _looks_personal_short(value)
    return _PERSONAL.search(value) is not None


# Short values repeat (versions such as "4.2.1", server types): each is searched once per worker.
_REMEMBERED_LENGTH = 64
_REMEMBERED_VALUES = 4096  # per string field and worker


@functools.lru_cache(maxsize=4096)
def _looks_personal_short(value: str) -> bool:
    return _PERSONAL.search(value) is not None


def _rfc3339(v: str) -> bool:
    """Whether v is an RFC 3339 date-time (section 5.6: full-date "T" full-time, an offset required)."""
    m = _RFC3339.fullmatch(v)
    if m is None:
        return False
    # fromisoformat checks the ranges (month, day of month, hour, offset); a leap second (60) is
    # RFC 3339 but not a datetime, so it is checked as 59; fractions past microseconds are cut.
    date, hour_minute, sec, frac, offset = m.groups()
    text = date + "T" + hour_minute + ("59" if sec == "60" else sec) + (frac or "")[:7] + offset.upper()
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _type_error(path: str, what: str) -> Invalid:
    return Invalid(f"{path}: {what}")


def _compile_scalar(f: Field, plaintext: bool) -> Check:
    kind, max_len = f.kind, f.max_length
    if kind == "string":
        pattern = re.compile(f.pattern) if f.pattern else None
        no_people = plaintext and f.storage in ("plaintext", "key")  # lookup keys are in the clear too

        # Values seen to pass, remembered (short ones, a bounded number): plaintext categories
        # ("pro", "4.2.1", "nginx") repeat in nearly every document.
        passed: dict[str, None] = {}

        def check(v, path, dropped):
            if type(v) is not str:
                raise _type_error(path, "must be a string")
            if v in passed:
                return v
            if max_len is not None and len(v) > max_len:
                raise _type_error(path, f"must be at most {max_len} characters")
            if pattern is not None and not pattern.fullmatch(v):
                raise _type_error(path, "has characters outside the allowed set")
            if no_people and "\x00" in v:  # PostgreSQL text cannot hold it: 422 here, not a failed batch
                raise _type_error(path, "must not contain U+0000")
            if no_people and looks_personal(v):
                raise _type_error(path, "looks like an e-mail address, IP address or MAC address; "
                                        "this field is stored in plaintext and holds categories, not people")
            if len(v) <= _REMEMBERED_LENGTH:
                if len(passed) >= _REMEMBERED_VALUES:
                    passed.clear()
                passed[v] = None
            return v

    elif kind == "integer":
        lo, hi = f.minimum, f.maximum

        def check(v, path, dropped):
            if type(v) is not int:
                if type(v) is not float or not v.is_integer():  # is_integer: finite, zero fraction
                    raise _type_error(path, "must be an integer")
                v = int(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise _type_error(path, f"must be between {lo} and {hi}")
            return v

    elif kind == "number":

        def check(v, path, dropped):
            if type(v) is not int and (type(v) is not float or not math.isfinite(v)):
                raise _type_error(path, "must be a number")
            return v

    elif kind == "boolean":

        def check(v, path, dropped):
            if type(v) is not bool:
                raise _type_error(path, "must be true or false")
            return v

    elif kind == "uuid":

        def check(v, path, dropped):
            if type(v) is not str or len(v) > 36:
                raise _type_error(path, "must be a UUID string")
            if _CANONICAL_UUID.fullmatch(v):  # already the form str(uuid.UUID(v)) gives
                return v
            try:
                return str(uuid.UUID(v))
            except ValueError:
                raise _type_error(path, "must be a UUID string") from None

    elif kind == "time":

        def check(v, path, dropped):
            if type(v) is not str or len(v) > 40 or not _rfc3339(v):
                raise _type_error(path, "must be an RFC 3339 date-time with an offset (2026-12-01T10:00:00Z)")
            return v

    elif kind == "email":

        def check(v, path, dropped):
            if type(v) is not str or len(v) > min(max_len or 254, 254) or not _EMAIL.fullmatch(v):
                raise _type_error(path, "must be an e-mail address")
            return v

    else:  # pragma: no cover - the policy is ours
        raise ValueError(f"unknown kind {kind}")
    return check


def _compile(f: Field, plaintext: bool, fast: bool = True) -> Check:
    if f.kind == "object":
        return _compile_object(f, plaintext, fast)
    if f.kind == "list":
        item = _compile(f.items, plaintext, fast)
        max_items = f.max_items
        flat = _flat_strings(f.items, plaintext) if fast else None
        if flat is not None:
            return _compile_flat_list(f, item, *flat)

        def check_list(v, path, dropped):
            if type(v) is not list:
                raise _type_error(path, "must be a list")
            if max_items is not None and len(v) > max_items:
                raise _type_error(path, f"must have at most {max_items} items")
            item_path = path + "[]"
            return [item(x, item_path, dropped) for x in v]

        return check_list
    return _compile_scalar(f, plaintext)


def _flat_strings(f: Field, plaintext: bool) -> tuple[frozenset[str], int | None] | None:
    """(names, max_length) if f is an object of optional, pattern-free strings of one length bound, none of them
    checked for personal shapes; else None."""
    if f.kind != "object" or not f.fields:
        return None
    if any(c.kind != "string" or c.pattern or c.required or (plaintext and c.storage == "plaintext") for c in f.fields):
        return None
    bounds = {c.max_length for c in f.fields}
    if len(bounds) != 1:
        return None
    return frozenset(c.name for c in f.fields), bounds.pop()


_JUST_STR = frozenset((str,))
_JUST_DICT = frozenset((dict,))
_FEW_UNWANTED = 2  # undeclared keys in one list's items found by lookups (more: by walking each item's keys)


def _all_strings(values: list[Any]) -> bool:
    """Whether every value is a str: join checks it in C, about a third of the time of comparing each one's type.

    join also takes a str subclass, which a parsed body never holds (orjson makes exact str)."""
    try:
        "".join(values)
    except TypeError:
        return False
    return True


def _compile_flat_list(f: Field, item: Check, names: frozenset[str], max_len: int | None) -> Check:
    """The whole-list fast path for a list of flat string objects; falls back to `item` per item."""
    max_items = f.max_items
    values_of = dict.values

    def check_flat_list(v, path, dropped):
        if type(v) is not list:
            raise _type_error(path, "must be a list")
        if max_items is not None and len(v) > max_items:
            raise _type_error(path, f"must have at most {max_items} items")
        item_path = path + "[]"
        if not v:
            return []
        if not _JUST_DICT.issuperset(map(type, v)):
            return [item(x, item_path, dropped) for x in v]  # raises with the exact path and message
        items = v
        unwanted = set().union(*v).difference(names)
        if unwanted:
            items = list(v)
            extra: dict[str, None] = {}  # first-met order
            if len(unwanted) <= _FEW_UNWANTED:  # a lookup per item and key: cheaper than a walk of every item's keys
                holding = sorted(set().union(*(compress(count(), map(contains, v, repeat(k))) for k in unwanted)))
            else:
                holding = compress(count(), map(not_, map(unwanted.isdisjoint, v)))
            for i in holding:  # only the items holding one
                kept = {}
                for k, val in v[i].items():
                    if k in names:
                        kept[k] = val
                    else:
                        extra[k] = None
                items[i] = kept
            for k in extra:
                dropped[item_path + "." + k] = None
        values = list(chain.from_iterable(map(values_of, items)))
        if _all_strings(values) and (max_len is None or not values or max(map(len, values)) <= max_len):
            return items if items is not v else list(v)
        # A null, a wrong type or an over-long string somewhere: the items holding one go through
        # the per-item path (which leaves the null out or names the error), the others as they are.
        out = []
        for x in items:
            if _JUST_STR.issuperset(map(type, x.values())) and (max_len is None or not x or max(map(len, x.values())) <= max_len):
                out.append(x)
            else:
                out.append(item(x, item_path, dropped))
        return out

    return check_flat_list


def _compile_object(f: Field, plaintext: bool, fast: bool = True) -> Check:
    children = {c.name: _compile(c, plaintext, fast) for c in f.fields}
    required = tuple(c.name for c in f.fields if c.required)
    optional_null = {c.name for c in f.fields if not c.required}

    def check_object(v, path, dropped):
        if type(v) is not dict:
            raise _type_error(path or "body", "must be an object")
        out = {}
        prefix = path + "." if path else ""
        for key, value in v.items():
            check = children.get(key)
            if check is None:
                dropped[prefix + key] = None  # not walked: see the module docstring
            elif value is None and key in optional_null:
                continue  # null for an optional field: stored as absent
            else:
                out[key] = check(value, prefix + key, dropped)
        for name in required:
            if out.get(name) is None:
                raise _type_error(prefix + name, "is required")
        return out

    return check_object


class Allowlist:
    """A compiled filter for one category's root field."""

    def __init__(self, root: Field, *, fast: bool = True) -> None:
        # fast=False compiles without the whole-list fast path: the reference the tests compare it to.
        # A root stored encrypted is sealed whole: none of its strings is plaintext.
        self._check = _compile_object(root, root.storage != "encrypted", fast)

    def filter_document(self, doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(kept document, dropped dotted paths in first-seen order); Invalid on bad input."""
        dropped: dict[str, None] = {}
        kept = self._check(doc, "", dropped)
        return kept, list(dropped)
