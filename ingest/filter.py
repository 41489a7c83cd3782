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

A null for an optional field is accepted and left out (stored as absent).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Callable
from itertools import chain, compress, count
from operator import not_
from typing import Any

from ingest.errors import BadRequest, Invalid
from storage.policy import Field

# check(value, path, dropped) -> value to keep
Check = Callable[[Any, str, dict], Any]

_EMAIL = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


def _type_error(path: str, what: str) -> Invalid:
    return Invalid(f"{path}: {what}")


def _compile_scalar(f: Field) -> Check:
    kind, max_len = f.kind, f.max_length
    if kind == "string":
        pattern = re.compile(f.pattern) if f.pattern else None

        def check(v, path, dropped):
            if type(v) is not str:
                raise _type_error(path, "must be a string")
            if max_len is not None and len(v) > max_len:
                raise _type_error(path, f"must be at most {max_len} characters")
            if pattern is not None and not pattern.match(v):
                raise _type_error(path, "has characters outside the allowed set")
            return v

    elif kind == "integer":
        lo, hi = f.minimum, f.maximum

        def check(v, path, dropped):
            if type(v) is not int:
                raise _type_error(path, "must be an integer")
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
            try:
                return str(uuid.UUID(v))
            except ValueError:
                raise _type_error(path, "must be a UUID string") from None

    elif kind == "time":

        def check(v, path, dropped):
            if type(v) is not str or not 10 <= len(v) <= 40 or "T" not in v.upper():
                raise _type_error(path, "must be an RFC 3339 date-time")
            try:
                t = dt.datetime.fromisoformat(v)
            except ValueError:
                raise _type_error(path, "must be an RFC 3339 date-time") from None
            if t.tzinfo is None:
                raise _type_error(path, "must carry a time zone offset")
            return v

    elif kind == "email":

        def check(v, path, dropped):
            if type(v) is not str or len(v) > (max_len or 254) or not _EMAIL.match(v):
                raise _type_error(path, "must be an e-mail address")
            return v

    else:  # pragma: no cover - the policy is ours
        raise ValueError(f"unknown kind {kind}")
    return check


def _compile(f: Field, max_depth: int, depth: int, fast: bool = True) -> Check:
    if f.kind == "object":
        return _compile_object(f, max_depth, depth, fast)
    if f.kind == "list":
        item = _compile(f.items, max_depth, depth + 1, fast)
        max_items = f.max_items
        flat = _flat_strings(f.items) if fast else None
        if flat is not None:
            return _compile_flat_list(f, item, *flat, max_depth, depth + 2)

        def check_list(v, path, dropped):
            if type(v) is not list:
                raise _type_error(path, "must be a list")
            if max_items is not None and len(v) > max_items:
                raise _type_error(path, f"must have at most {max_items} items")
            item_path = path + "[]"
            return [item(x, item_path, dropped) for x in v]

        return check_list
    return _compile_scalar(f)


def _flat_strings(f: Field) -> tuple[frozenset[str], int | None] | None:
    """(names, max_length) if f is an object of optional, pattern-free strings of one length bound; else None."""
    if f.kind != "object" or not f.fields:
        return None
    if any(c.kind != "string" or c.pattern or c.required for c in f.fields):
        return None
    bounds = {c.max_length for c in f.fields}
    if len(bounds) != 1:
        return None
    return frozenset(c.name for c in f.fields), bounds.pop()


_JUST_STR = frozenset((str,))
_JUST_DICT = frozenset((dict,))


def _compile_flat_list(f: Field, item: Check, names: frozenset[str], max_len: int | None, max_depth: int, value_depth: int) -> Check:
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
            for i in compress(count(), map(not_, map(unwanted.isdisjoint, v))):  # only the items holding one
                kept = {}
                for k, val in v[i].items():
                    if k in names:
                        kept[k] = val
                    else:
                        _check_depth(val, value_depth, max_depth)
                        extra[k] = None
                items[i] = kept
            for k in extra:
                dropped[item_path + "." + k] = None
        values = list(chain.from_iterable(map(values_of, items)))
        if _JUST_STR.issuperset(map(type, values)) and (max_len is None or not values or max(map(len, values)) <= max_len):
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


def _compile_object(f: Field, max_depth: int, depth: int, fast: bool = True) -> Check:
    children = {c.name: _compile(c, max_depth, depth + 1, fast) for c in f.fields}
    required = tuple(c.name for c in f.fields if c.required)
    optional_null = {c.name for c in f.fields if not c.required}
    child_depth = depth + 1

    def check_object(v, path, dropped):
        if type(v) is not dict:
            raise _type_error(path or "body", "must be an object")
        out = {}
        prefix = path + "." if path else ""
        for key, value in v.items():
            check = children.get(key)
            if check is None:
                _check_depth(value, child_depth, max_depth)
                dropped[prefix + key] = None
            elif value is None and key in optional_null:
                continue  # null for an optional field: stored as absent
            else:
                out[key] = check(value, prefix + key, dropped)
        for name in required:
            if out.get(name) is None:
                raise _type_error(prefix + name, "is required")
        return out

    return check_object


def _check_depth(value: Any, depth: int, max_depth: int) -> None:
    """400 if a dropped value nests deeper than allowed (it is not stored, but it is not accepted either)."""
    if type(value) not in (dict, list):
        return
    stack = [(value, depth + 1)]
    while stack:
        v, d = stack.pop()
        if d > max_depth:
            raise BadRequest(f"JSON nesting deeper than {max_depth}")
        children = v.values() if type(v) is dict else v
        for c in children:
            if type(c) in (dict, list):
                stack.append((c, d + 1))


class Allowlist:
    """A compiled filter for one category's root field."""

    def __init__(self, root: Field, *, max_depth: int = 32, fast: bool = True) -> None:
        # fast=False compiles without the whole-list fast path: the reference the tests compare it to.
        self._check = _compile_object(root, max_depth, 1, fast)

    def filter_document(self, doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(kept document, dropped dotted paths in first-seen order); Invalid or BadRequest on bad input."""
        dropped: dict[str, None] = {}
        kept = self._check(doc, "", dropped)
        return kept, list(dropped)
