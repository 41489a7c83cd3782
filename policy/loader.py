"""Read a policy file (TOML, docs/policy.md) into the model, or say what is wrong with it.

`check_text` collects every problem it can find rather than stopping at the first:
one `Problem` per mistake, naming the key (`category[download].field[address].storage`)
and, where it can, the line. tomllib keeps no line numbers, so the line is found by
scanning the text: the n-th `[[category]]` header, then the `name = "..."` line of each
field on the way down, then the key itself before the next table header. Good enough to
put an editor on the right line; a key written in an unusual layout may get the line of
its table instead.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.model import Category, Field, Policy

TYPES = ("string", "integer", "number", "boolean", "uuid", "time", "email", "object", "list")
SCALARS = frozenset(TYPES) - {"object", "list"}
STORAGE = ("plaintext", "encrypted", "anonymised", "keyed-hash", "not-stored")
# Which storage forms fit which types (outside a sealed category).
FITS = {
    "plaintext": frozenset({"string", "integer", "number", "boolean", "uuid", "time"}),
    "encrypted": frozenset({"string", "email", "uuid", "time"}),
    "anonymised": frozenset({"string"}),  # an IP address, stored as its prefix
    "keyed-hash": frozenset({"string", "email", "uuid"}),
    "not-stored": SCALARS,
}
WHY_NOT = {
    "plaintext": "an e-mail address is personal data: store it encrypted, keyed-hash or not-stored",
    "encrypted": "encrypted fits a text field (string, email, uuid, time)",
    "anonymised": "anonymised fits only a string field holding an IP address (stored as its /24 or /48 prefix)",
    "keyed-hash": "keyed-hash fits a string, email or uuid field",
}
STATISTICS_TYPES = frozenset({"string", "integer", "boolean"})

TOP_KEYS = frozenset({"format", "category", "agents"})
CATEGORY_KEYS = frozenset({"name", "purpose", "record", "retention", "installations_may_shorten", "shortest_retention",
                           "sealed", "idempotency_key", "installation_key", "state", "statistics", "field"})
FIELD_KEYS = frozenset({"name", "type", "purpose", "required", "max_length", "min", "max", "pattern", "max_items",
                        "storage", "source", "field", "item"})
ITEM_KEYS = frozenset({"type", "purpose", "max_length", "min", "max", "pattern", "storage"})
AGENTS_KEYS = frozenset({"purpose", "field"})

CATEGORY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DURATION = re.compile(r"([1-9][0-9]{0,5})([hd])")
MAX_RETENTION = dt.timedelta(days=3650)
MAX_DEPTH = 30  # the body's own object is level 1; TELEMETRY_JSON_MAX_DEPTH is 32 by default
RESERVED_CATEGORIES = frozenset({"agent"})  # the disclosure's name for agent registrations


_ONE_LINE = {c: f"\\x{c:02x}" for c in range(32)} | {0x7F: "\\x7f", 0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file."""

    key: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        # One line, whatever names the file holds.
        return f"{where}: {self.key}: {self.message}".translate(_ONE_LINE)


class PolicyError(ValueError):
    """A policy file that cannot be used; `problems` holds every problem found, `lines()` renders them."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(problems[0].render(source))
        self.source = source
        self.problems = problems

    def lines(self) -> list[str]:
        return [p.render(self.source) for p in self.problems]


def parse_duration(text: str) -> dt.timedelta | None:
    """"30d" or "720h" as a timedelta; None if it is not such a duration."""
    m = DURATION.fullmatch(text)
    if m is None:
        return None
    n = int(m.group(1))
    return dt.timedelta(hours=n) if m.group(2) == "h" else dt.timedelta(days=n)


def whole_value(pattern: str) -> str:
    """The pattern anchored so that a match (re.match, or JSON Schema's search) covers the whole value.

    `^...$` without alternation is kept as written (the built-in file's form). Otherwise it is
    wrapped; the final `(?!\\n)` stops Python's `$` from matching before a trailing newline, and
    is a no-op in JSON Schema (ECMA 262) regular expressions.
    """
    if pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$") and "|" not in pattern:
        return pattern
    return f"^(?:{pattern})$(?!\\n)"


class _Lines:
    """Finds the line of a key by scanning the text (see the module docstring)."""

    _HEADER = re.compile(r"\s*\[")
    _CATEGORY = re.compile(r"\s*\[\[\s*category\s*\]\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.categories = [i for i, line in enumerate(self.lines) if self._CATEGORY.match(line)]

    def _table(self, table: str) -> int | None:
        """The line of a top-level table's header, or of a top-level key (before the first header)."""
        header = re.compile(rf"\s*\[\[?\s*{re.escape(table)}\s*[\].]")
        key = re.compile(rf"\s*{re.escape(table)}\s*=")
        top_level = True
        for i, line in enumerate(self.lines):
            if header.match(line):
                return i
            top_level = top_level and not self._HEADER.match(line)
            if top_level and key.match(line):
                return i
        return None

    def find(self, start: tuple[str, int | str], names: tuple, key: str | None) -> int | None:
        """1-based line of key in the table reached from start (("category", i) or ("table", "agents")) by field names."""
        if start[0] == "category":
            at = self.categories[start[1]] if start[1] < len(self.categories) else None
        else:
            at = self._table(start[1])
        if at is None:
            return None
        for name in names:
            nth = 0
            if isinstance(name, tuple):  # (name, n): its n-th declaration (0-based), for "declared twice"
                name, nth = name
            pattern = re.compile(rf"(?:^\s*|[{{,]\s*)name\s*=\s*([\"']){re.escape(name)}\1")
            hits = (i for i in range(at + 1, len(self.lines)) if pattern.search(self.lines[i]))
            found = next(itertools.islice(hits, nth, None), None)
            if found is None:
                return at + 1
            at = found
        if key is None:
            return at + 1
        pattern = re.compile(rf"(?:^\s*|[{{,]\s*){re.escape(key)}\s*=|^\s*\[\[?[^\]]*\.{re.escape(key)}\s*\]")
        if pattern.search(self.lines[at]):  # an inline table: { name = "x", key = ... }
            return at + 1
        # From the table's start (its name line may come after the key) to the next table header.
        begin = at
        while begin > 0 and not self._HEADER.match(self.lines[begin]):
            begin -= 1
        for i in range(begin, len(self.lines)):
            if i == begin and self._HEADER.match(self.lines[i]):
                continue  # the table's own header: a key is on a line of its own, or a sub-table's header
            if i > at and self._HEADER.match(self.lines[i]) and not pattern.search(self.lines[i]):
                break
            if pattern.search(self.lines[i]):
                return i + 1
        return at + 1


class _Reader:
    def __init__(self, text: str) -> None:
        self.where = _Lines(text)
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str, at: tuple, names: tuple[str, ...] = (), line_key: str | None = None) -> None:
        self.problems.append(Problem(key, message, self.where.find(at, names, line_key)))

    def get(self, raw: dict, key: str, kinds: type | tuple[type, ...], path: str, at: tuple, names: tuple[str, ...],
            what: str) -> Any:
        """raw[key] if it has the right TOML type, else None (and a problem); None if absent."""
        if key not in raw:
            return None
        value = raw[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # bool is an int in Python, not in TOML
        if type(value) not in kinds:
            self.problem(f"{path}.{key}", f"must be {what}", at, names, key)
            return None
        return value

    def unknown(self, raw: dict, allowed: frozenset[str], path: str, at: tuple, names: tuple[str, ...]) -> None:
        for key in raw:
            if key not in allowed:
                self.problem(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})", at, names, key)

    # ------------------------------------------------------------ fields

    def fields(self, raw: Any, path: str, at: tuple, names: tuple[str, ...], *, sealed: bool, depth: int,
               keys: frozenset[str] = frozenset()) -> tuple[Field, ...]:
        """The `field` tables of an object (or of a list's items)."""
        if not isinstance(raw, list) or not all(isinstance(f, dict) for f in raw):
            self.problem(f"{path}.field", "must be an array of tables ([[...field]])", at, names, "field")
            return ()
        if not raw:
            self.problem(f"{path}.field", "declares no field", at, names, "field")
            return ()
        out, seen = [], set()
        for i, f in enumerate(raw):
            name = f.get("name")
            if isinstance(name, str) and name in seen:
                nth = sum(1 for g in raw[:i] if isinstance(g, dict) and g.get("name") == name)
                self.problem(f"{path}.field[{name}]", "declared twice", at, names + ((name, nth),), None)
                continue
            field = self.field(f, path, at, names, i, sealed=sealed, depth=depth, keys=keys)
            if field is not None:
                seen.add(field.name)
                out.append(field)
        return tuple(out)

    def field(self, raw: dict, parent: str, at: tuple, parent_names: tuple[str, ...], index: int, *, sealed: bool,
              depth: int, keys: frozenset[str]) -> Field | None:
        name = raw.get("name")
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            path = f"{parent}.field[{index + 1}]"
            self.problem(f"{path}.name", "required: a name of letters, digits and _ (at most 64, not starting with a digit)",
                         at, parent_names, None if name is None else "name")
            if not isinstance(name, str):
                return None
            name = f"#{index + 1}"
        path = f"{parent}.field[{name}]"
        names = parent_names + (name,)
        self.unknown(raw, FIELD_KEYS, path, at, names)
        if depth > MAX_DEPTH:
            self.problem(path, f"nested deeper than {MAX_DEPTH} levels", at, names)
            return None
        kind = raw.get("type")
        if kind not in TYPES:
            self.problem(f"{path}.type", f"required: one of {', '.join(TYPES)}", at, names, "type" if "type" in raw else None)
            return None
        purpose = self.get(raw, "purpose", str, path, at, names, "a string") or ""
        required = self.get(raw, "required", bool, path, at, names, "true or false") or False
        source = self.get(raw, "source", str, path, at, names, "a string")
        if source is not None and source != "peer":
            self.problem(f"{path}.source", 'the only source is "peer" (the sender\'s address)', at, names, "source")
        is_key = name in keys and depth == 2
        if kind == "object":
            self._no(raw, ("max_length", "min", "max", "pattern", "max_items", "item", "storage", "source"), path, at, names,
                     "an object has no {key}: its fields carry their own")
            if "field" not in raw:
                self.problem(path, "an object needs its `field` tables", at, names)
                return None
            children = self.fields(raw["field"], path, at, names, sealed=sealed, depth=depth + 1)
            return Field(name, "object", required=required, fields=children, purpose=purpose)
        if kind == "list":
            self._no(raw, ("max_length", "min", "max", "pattern", "storage", "source"), path, at, names,
                     "a list has no {key}: its `item` table (scalars) or `field` tables (objects) carry it")
            max_items = self.get(raw, "max_items", int, path, at, names, "a whole number")
            if max_items is not None and max_items < 1:
                self.problem(f"{path}.max_items", "must be at least 1", at, names, "max_items")
            if ("field" in raw) == ("item" in raw):
                self.problem(path, "a list needs either `field` tables (a list of objects) or an `item` table (a list of scalars)",
                             at, names)
                return None
            if "field" in raw:
                children = self.fields(raw["field"], path, at, names, sealed=sealed, depth=depth + 2)
                items = Field(name, "object", fields=children)
            else:
                item = raw["item"]
                if not isinstance(item, dict):
                    self.problem(f"{path}.item", "must be a table (item = { type = \"string\", ... })", at, names, "item")
                    return None
                self.unknown(item, ITEM_KEYS, f"{path}.item", at, names)
                if not isinstance(item.get("type"), str) or item["type"] not in SCALARS:
                    self.problem(f"{path}.item.type", f"required: one of {', '.join(sorted(SCALARS))} (a list of objects "
                                 "uses `field` tables)", at, names, "item")
                    return None
                items = self.scalar(item, name, item["type"], f"{path}.item", at, names, sealed=sealed,
                                    purpose=self.get(item, "purpose", str, f"{path}.item", at, names, "a string") or "")
            return Field(name, "list", required=required, max_items=max_items, items=items, purpose=purpose)
        self._no(raw, ("field", "item", "max_items"), path, at, names, f"a {kind} field has no {{key}}")
        if is_key:
            return self.key_field(raw, name, kind, path, at, names, required, purpose)
        if source == "peer":
            self._peer(raw, kind, path, at, names, depth)
        return self.scalar(raw, name, kind, path, at, names, sealed=sealed, required=required, purpose=purpose)

    def _no(self, raw: dict, keys: tuple[str, ...], path: str, at: tuple, names: tuple[str, ...], message: str) -> None:
        for key in keys:
            if key in raw:
                self.problem(f"{path}.{key}", message.format(key=key), at, names, key)

    def _peer(self, raw: dict, kind: str, path: str, at: tuple, names: tuple[str, ...], depth: int) -> None:
        if depth != 2:
            self.problem(f"{path}.source", 'source = "peer" is for a top-level field', at, names, "source")
        if kind != "string" or raw.get("storage") != "anonymised":
            self.problem(f"{path}.source", 'the sender\'s address is stored anonymised only: type = "string", '
                         'storage = "anonymised"', at, names, "source")
        if raw.get("required"):
            self.problem(f"{path}.required", "the sender's address is never read from the body: it cannot be required",
                         at, names, "required")

    def key_field(self, raw: dict, name: str, kind: str, path: str, at: tuple, names: tuple[str, ...], required: bool,
                  purpose: str) -> Field:
        """The installation key or idempotency key: a required field stored in the clear as the record's lookup key."""
        storage = raw.get("storage", "plaintext")
        if storage != "plaintext":
            self.problem(f"{path}.storage", "a key field is stored in the clear as the record's lookup key: "
                         'leave storage out or say "plaintext"', at, names, "storage")
        if not required:
            self.problem(f"{path}.required", "a key field must be required = true", at, names, "required" if "required" in raw else None)
        if kind not in ("uuid", "string"):
            self.problem(f"{path}.type", "a key field is a uuid or a string", at, names, "type")
        f = self.scalar({k: v for k, v in raw.items() if k != "storage"}, name, kind, path, at, names, sealed=False,
                        required=required, purpose=purpose)
        if kind == "string" and f.max_length is None:
            self.problem(f"{path}.max_length", "a string key field needs a max_length", at, names)
        return Field(f.name, f.kind, required=True, max_length=f.max_length, pattern=f.pattern, storage="key", purpose=purpose)

    def scalar(self, raw: dict, name: str, kind: str, path: str, at: tuple, names: tuple[str, ...], *, sealed: bool,
               required: bool = False, purpose: str = "") -> Field:
        max_length = self.get(raw, "max_length", int, path, at, names, "a whole number")
        if max_length is not None:
            if kind not in ("string", "email"):
                self.problem(f"{path}.max_length", "max_length is for string and email fields", at, names, "max_length")
                max_length = None
            elif max_length < 1:
                self.problem(f"{path}.max_length", "must be at least 1", at, names, "max_length")
        minimum = self.get(raw, "min", int, path, at, names, "a whole number")
        maximum = self.get(raw, "max", int, path, at, names, "a whole number")
        if (minimum is not None or maximum is not None) and kind != "integer":
            self.problem(f"{path}.{'min' if minimum is not None else 'max'}", "min and max are for integer fields", at, names,
                         "min" if minimum is not None else "max")
            minimum = maximum = None
        if minimum is not None and maximum is not None and minimum > maximum:
            self.problem(f"{path}.min", f"min ({minimum}) is above max ({maximum})", at, names, "min")
        pattern = self.get(raw, "pattern", str, path, at, names, "a string (a regular expression)")
        if pattern is not None:
            if kind != "string":
                self.problem(f"{path}.pattern", "pattern is for string fields", at, names, "pattern")
                pattern = None
            else:
                try:
                    re.compile(pattern)
                    pattern = whole_value(pattern)
                except (re.error, OverflowError, RecursionError, ValueError) as exc:
                    self.problem(f"{path}.pattern", f"not a regular expression: {exc}", at, names, "pattern")
                    pattern = None
                if pattern is not None and max_length is None:
                    # The match runs on every record: its cost is bounded by the value's length.
                    self.problem(f"{path}.pattern", "a pattern needs a max_length (it bounds the work of matching)", at, names, "pattern")
        storage = self.get(raw, "storage", str, path, at, names, "a string")
        if sealed:
            if storage not in (None, "encrypted"):
                self.problem(f"{path}.storage", "the category is sealed: every field is inside the encrypted record "
                             '(leave storage out or say "encrypted")', at, names, "storage")
            return Field(name, kind, required=required, max_length=max_length, minimum=minimum, maximum=maximum,
                         pattern=pattern, storage="encrypted" if storage == "encrypted" else "plaintext", purpose=purpose)
        storage = "plaintext" if storage is None else storage
        if storage not in STORAGE:
            self.problem(f"{path}.storage", f"must be one of {', '.join(STORAGE)}", at, names, "storage")
            storage = "not-stored"
        elif kind not in FITS[storage]:
            self.problem(f"{path}.storage", f"{WHY_NOT[storage]} (this field is {kind})", at, names, "storage")
        elif storage == "anonymised" and pattern is not None:
            self.problem(f"{path}.pattern", "an anonymised field holds an IP address: it takes no pattern", at, names, "pattern")
        return Field(name, kind, required=required, max_length=max_length, minimum=minimum, maximum=maximum,
                     pattern=pattern, storage=storage, purpose=purpose)

    # ------------------------------------------------------------ categories

    def category(self, raw: Any, index: int) -> Category | None:
        at = ("category", index)
        name = raw.get("name")
        if not isinstance(name, str) or not CATEGORY_NAME.fullmatch(name) or name in RESERVED_CATEGORIES:
            self.problem(f"category[{index + 1}].name", "required: lower-case letters, digits and _ (at most 32, starting "
                         "with a letter; also the path /v1/records/{name}; not \"agent\")", at, (), "name" if "name" in raw else None)
            if not isinstance(name, str):
                return None
        path = f"category[{name}]"
        self.unknown(raw, CATEGORY_KEYS, path, at, ())
        purpose = self.get(raw, "purpose", str, path, at, (), "a string")
        if not purpose or not purpose.strip():
            self.problem(f"{path}.purpose", "required: why the data is kept, as the privacy notice says it", at, (),
                         "purpose" if "purpose" in raw else None)
        record = self.get(raw, "record", str, path, at, (), "a string") or "record"
        retention = self.duration(raw, "retention", path, at, required=True)
        may_shorten = self.get(raw, "installations_may_shorten", bool, path, at, (), "true or false") or False
        shortest = self.duration(raw, "shortest_retention", path, at, required=False)
        if may_shorten and shortest is None and "shortest_retention" not in raw:
            shortest = dt.timedelta(hours=1)
        if shortest is not None:
            if not may_shorten:
                self.problem(f"{path}.shortest_retention", "only with installations_may_shorten = true", at, (), "shortest_retention")
                shortest = None
            elif retention is not None and shortest > retention:
                self.problem(f"{path}.shortest_retention", "is longer than the retention", at, (), "shortest_retention")
        sealed = self.get(raw, "sealed", bool, path, at, (), "true or false") or False
        state = self.get(raw, "state", str, path, at, (), "a string") or "events"
        if state not in ("current", "events"):
            self.problem(f"{path}.state", 'must be "current" (a current record per installation, and its history) or "events"',
                         at, (), "state")
        idempotency_key = self.get(raw, "idempotency_key", str, path, at, (), "a field name")
        installation_key = self.get(raw, "installation_key", str, path, at, (), "a field name")
        if state == "current" and idempotency_key is not None:
            self.problem(f"{path}.idempotency_key", 'a state = "current" category keeps one record per installation, '
                         "each new one replacing it: it has no idempotency key", at, (), "idempotency_key")
        elif state == "current" and sealed:
            self.problem(f"{path}.sealed", 'a state = "current" category cannot be sealed whole (a sealed category '
                         "names each record by its idempotency key); seal its fields with storage = \"encrypted\"", at, (), "sealed")
        elif sealed and idempotency_key is None:
            self.problem(f"{path}.idempotency_key", "a sealed category needs an idempotency key (the field naming each record, "
                         "such as scan_id)", at, (), "sealed")
        if idempotency_key is not None and idempotency_key == installation_key:
            self.problem(f"{path}.idempotency_key", "is also the installation key", at, (), "idempotency_key")
        keys = frozenset(k for k in (idempotency_key, installation_key) if k)
        if "field" not in raw:
            self.problem(path, "a category needs its `field` tables", at, ())
            return None
        declared = self.fields(raw["field"], path, at, (), sealed=sealed, depth=2, keys=keys)
        body = tuple(f for f in declared if not _is_peer(raw["field"], f.name))
        extra = tuple((f.name, f.storage, f.purpose or purpose or "") for f in declared if _is_peer(raw["field"], f.name))
        top = {f.name: f for f in body}
        for key_name, what in ((idempotency_key, "idempotency_key"), (installation_key, "installation_key")):
            if key_name is not None and key_name not in top:
                self.problem(f"{path}.{what}", f"names no top-level field: {key_name!r}", at, (), what)
        for key_name, what in ((idempotency_key, "idempotency_key"), (installation_key, "installation_key")):
            if key_name in top and top[key_name].storage != "key":
                self.problem(f"{path}.{what}", f"{key_name!r} is not a uuid or string field", at, (), what)
        if installation_key is not None and installation_key in top and top[installation_key].kind != "uuid":
            self.problem(f"{path}.installation_key", "the installation key is a uuid field", at, (), "installation_key")
        if sealed and extra:
            self.problem(f"{path}.sealed", "a sealed category keeps nothing outside its record: no source = \"peer\" field",
                         at, (), "sealed")
        statistics = self.statistics(raw, path, at, top, sealed)
        if retention is None:
            return None
        return Category(name=name, purpose=purpose or "", root=Field(name, "object", fields=body,
                                                                      storage="encrypted" if sealed else "plaintext"),
                        retention=retention, extra=extra, record=record, state=state, idempotency_key=idempotency_key,
                        installation_key=installation_key, shortest_retention=shortest, statistics=statistics)

    def statistics(self, raw: dict, path: str, at: tuple, top: dict[str, Field], sealed: bool) -> tuple[str, ...]:
        dims = self.get(raw, "statistics", list, path, at, (), "a list of field names")
        if dims is None:
            return ()
        if sealed and dims:
            self.problem(f"{path}.statistics", "a sealed category has no statistics: nothing of it is in the clear", at, (), "statistics")
            return ()
        out = []
        for d in dims:
            f = top.get(d) if isinstance(d, str) else None
            if f is None:
                self.problem(f"{path}.statistics", f"names no top-level field: {d!r}", at, (), "statistics")
            elif f.storage != "plaintext" or f.kind not in STATISTICS_TYPES:
                self.problem(f"{path}.statistics", f"{d!r}: a dimension is a plaintext string, integer or boolean field "
                             "(counts by it are published)", at, (), "statistics")
            elif d in out:
                self.problem(f"{path}.statistics", f"{d!r} listed twice", at, (), "statistics")
            else:
                out.append(d)
        return tuple(out)

    def duration(self, raw: dict, key: str, path: str, at: tuple, *, required: bool) -> dt.timedelta | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.problem(f"{path}.{key}", 'required: how long records are kept, such as "30d" or "720h"', at, ())
            return None
        d = parse_duration(value) if isinstance(value, str) else None
        if d is None:
            self.problem(f"{path}.{key}", f'must be a duration such as "30d" or "720h", not {value!r}', at, (), key)
        elif d > MAX_RETENTION:
            self.problem(f"{path}.{key}", "is longer than 3650 days", at, (), key)
            return None
        return d

    def agents(self, raw: Any) -> Field | None:
        at = ("table", "agents")
        if not isinstance(raw, dict):
            self.problem("agents", "must be a table ([agents])", at, ())
            return None
        self.unknown(raw, AGENTS_KEYS, "agents", at, ())
        if "field" not in raw:
            self.problem("agents", "needs its `field` tables (what an installation may say about an agent)", at, ())
            return None
        fields = self.fields(raw["field"], "agents", at, (), sealed=False, depth=2)
        for f in fields:
            if f.kind not in STATISTICS_TYPES or f.storage != "plaintext":
                self.problem(f"agents.field[{f.name}]", "an agent's fields are plaintext strings, integers or booleans", at, (f.name,))
        return Field("agent", "object", fields=fields)


def _is_peer(raw_fields: Any, name: str) -> bool:
    return isinstance(raw_fields, list) and any(isinstance(f, dict) and f.get("name") == name and f.get("source") == "peer"
                                                for f in raw_fields)


def check_text(text: str, source: str = "<policy>") -> tuple[Policy | None, list[Problem]]:
    """(the policy, []) if text is a good policy file, else (None, every problem found)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        return None, [Problem("toml", f"not TOML: {exc}", int(m.group(1)) if m else None)]
    return check_document(doc, text, source)


def check_document(doc: dict[str, Any], text: str, source: str = "<policy>") -> tuple[Policy | None, list[Problem]]:
    """check_text for a document already parsed from text (the text is read only to find lines)."""
    r = _Reader(text)
    for key in doc:
        if key not in TOP_KEYS:
            r.problem(key, f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})", ("table", key), ())
    if "format" in doc and doc["format"] != 1:
        r.problem("format", "this service reads format 1", ("table", "format"), ())
    raw_categories = doc.get("category")
    categories, lines = [], {}
    if not isinstance(raw_categories, list) or not raw_categories or not all(isinstance(c, dict) for c in raw_categories):
        r.problem("category", "at least one [[category]] table is required", ("table", "category"), ())
        raw_categories = []
    for i, raw in enumerate(raw_categories):
        before = len(r.problems)
        name = raw.get("name")
        if isinstance(name, str) and name in lines:
            r.problem(f"category[{name}]", "declared twice", ("category", i), (), "name")
            continue
        c = r.category(raw, i)
        if c is not None and len(r.problems) == before:
            categories.append(c)
        if isinstance(name, str):
            lines[name] = r.where.find(("category", i), (), None) or 0
    agents = r.agents(doc["agents"]) if "agents" in doc else None
    if r.problems:
        return None, sorted(r.problems, key=lambda p: p.line or 0)  # stable: the order found, within a line
    return Policy(tuple(categories), agents=agents, source=source, lines=lines), []


def load(path: str | Path) -> Policy:
    """The policy in the file at path; PolicyError (every problem, one per line) if it cannot be used."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, [Problem("file", f"cannot read it: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise PolicyError(source, [Problem("file", "not UTF-8 text")]) from None
    policy, problems = check_text(text, source)
    if problems:
        raise PolicyError(source, problems)
    return policy
