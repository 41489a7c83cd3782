"""The policy the database holds (`policy_applied`, migration 0012), and the deletions of `policy apply --confirm`.

A category or field the file in force no longer declares has its stored values deleted here, in
batches, each batch its own transaction with its audit row, so a killed run is resumed by running
it again (every step deletes what is still there; nothing is counted twice). The new declaration is
written last, after every step has finished: until then `serve` keeps refusing to start.

Where a removed category's values live:

    a file category (records)   its rows in `records` and its retention choices in `record_settings`
    installation (built-in)     every `heartbeats` row; the metadata columns of `installations` set NULL
                                (the rows stay: they are the enrollment, with the tokens and keys)
    scan (built-in)             every `scans` row and the scan-byte counts of `scan_usage`

A removed field of a file category: its key, at every depth, from `records.fields` (an object or list
left empty by it goes too). Values inside `records.sealed` (encrypted fields, sealed categories) are
not rewritten: they go with their record, at its expiry or erasure (docs/policy.md says why).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import orjson

from policy.categories import BUILTIN_NAMES
from storage.audit import record
from storage.layout import INSTALLATION, SCAN, TABLES

BATCH = 5000
# The built-in categories keep their own tables (storage.layout); every other one is in `records`.
BUILTIN = BUILTIN_NAMES
# The metadata columns of an installation's current record: everything of its category but the key.
_METADATA = tuple(c for c in TABLES["installations"].policy + TABLES["installations"].sealed if c != INSTALLATION.installation_key)


async def held(conn) -> tuple[dict[str, list[str]], str] | None:
    """(declared, source) of the policy last applied, or None before the first start."""
    row = await conn.fetchrow("SELECT declared::text, source FROM policy_applied")
    return None if row is None else (orjson.loads(row[0]), row[1])


async def record_applied(conn, declared: dict[str, list[str]], source: str) -> None:
    """Make `declared` the policy the database holds."""
    await conn.execute(
        "INSERT INTO policy_applied (singleton, declared, source, applied_at) VALUES (true, $1::text::jsonb, $2, now()) "
        "ON CONFLICT (singleton) DO UPDATE SET declared = excluded.declared, source = excluded.source, applied_at = excluded.applied_at",
        orjson.dumps(declared).decode(), source,
    )


def json_path(path: str) -> str:
    """A field path (`stack.frames[]`, `modules[].name`) as an SQL/JSON path: $."stack"."frames"[*]."""
    out = "$"
    for seg in path.split("."):
        name, is_list = (seg[:-2], True) if seg.endswith("[]") else (seg, False)
        out += f'."{name}"' + ("[*]" if is_list else "")
    return out


def strip(node, path: str) -> bool:
    """Remove the field at path from a decoded `fields` object, at every list item; True if anything went."""
    return _strip(node, [(s[:-2], True) if s.endswith("[]") else (s, False) for s in path.split(".")])


def _strip(node, segs) -> bool:
    name, is_list = segs[0]
    if not isinstance(node, dict) or name not in node:
        return False
    if len(segs) == 1:
        del node[name]
        return True
    child = node[name]
    if is_list:
        changed = isinstance(child, list) and any([_strip(item, segs[1:]) for item in child])
        empty = changed and all(item == {} for item in child)
    else:
        changed = _strip(child, segs[1:])
        empty = changed and child == {}
    if empty:
        del node[name]
    return changed


@dataclass(frozen=True)
class Removal:
    """One step of `policy apply`: a whole category (path None) or one field of a file category."""

    category: str
    path: str | None = None

    @property
    def key(self) -> str:
        return f"category[{self.category}]" + (f".field[{self.path}]" if self.path else "")


async def count(conn, step: Removal) -> list[str]:
    """What the step deletes (or leaves to expiry), one phrase each: '12 record(s) in records'."""
    if step.path is None and step.category == INSTALLATION.name:
        rows = await conn.fetchval("SELECT count(*) FROM heartbeats")
        meta = await conn.fetchval(f"SELECT count(*) FROM installations WHERE {_any_set()}")
        return [f"{rows} heartbeat row(s)", f"the metadata of {meta} installation(s) (the installations stay enrolled)"]
    if step.path is None and step.category == SCAN.name:
        return [f"{await conn.fetchval('SELECT count(*) FROM scans')} scan(s)"]
    if step.path is None:
        n, settings = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM records WHERE category = $1), (SELECT count(*) FROM record_settings WHERE category = $1)",
            step.category)
        return [f"{n} record(s)"] + ([f"{settings} installation retention choice(s)"] if settings else [])
    clear, sealed, until = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE jsonb_path_exists(fields, $2::jsonpath)), count(sealed), max(expires_at) FILTER (WHERE sealed IS NOT NULL) "
        "FROM records WHERE category = $1", step.category, json_path(step.path))
    out = [f"its value in {clear} record(s)"]
    if sealed:
        # The applied declaration holds paths, not forms: whether this field was ever sealed is not
        # known here, so the note says what may be there, not that it is.
        out.append(f"not what the encrypted part of {sealed} sealed record(s) of the category holds of it (if it was "
                   f"stored encrypted, or the category is sealed): that goes with its records, "
                   f"the last by {until.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    return out


async def remove(conn, step: Removal, actor: str, *, batch: int = BATCH) -> int:
    """Delete what the step names, `batch` rows per transaction, each audited; returns rows changed."""
    if step.path is not None:
        return await _strip_field(conn, step, actor, batch)
    if step.category == INSTALLATION.name:
        n = await _batches(conn, step, actor, "DELETE FROM heartbeats WHERE (tableoid, ctid) IN "
                                              "(SELECT tableoid, ctid FROM heartbeats LIMIT $1)", batch)
        sets = ", ".join(f"{c} = NULL" for c in _METADATA)
        return n + await _batches(conn, step, actor, f"UPDATE installations SET {sets} WHERE install_id IN "
                                                     f"(SELECT install_id FROM installations WHERE {_any_set()} LIMIT $1)", batch)
    if step.category == SCAN.name:
        n = await _batches(conn, step, actor, "DELETE FROM scans WHERE (tableoid, ctid) IN (SELECT tableoid, ctid FROM scans LIMIT $1)", batch)
        return n + await _batches(conn, step, actor, "DELETE FROM scan_usage WHERE ctid IN (SELECT ctid FROM scan_usage LIMIT $1)", batch)
    n = await _batches(conn, step, actor, "DELETE FROM records WHERE ctid IN (SELECT ctid FROM records WHERE category = $2 LIMIT $1)",
                       batch, step.category)
    return n + await _batches(conn, step, actor, "DELETE FROM record_settings WHERE ctid IN "
                                                 "(SELECT ctid FROM record_settings WHERE category = $2 LIMIT $1)", batch, step.category)


def _any_set() -> str:
    return "(" + " OR ".join(f"{c} IS NOT NULL" for c in _METADATA) + ")"


def _detail(step: Removal, rows: int) -> dict:
    return {"category": step.category, "rows": rows} | ({"field": step.path} if step.path else {})


async def _batches(conn, step: Removal, actor: str, sql: str, batch: int, *args) -> int:
    total = 0
    while True:
        async with conn.transaction():
            n = int((await conn.execute(sql, batch, *args)).split()[-1])
            if n:
                await record(conn, actor, "policy.remove", None, _detail(step, n))
        total += n
        if n < batch:
            return total


async def _strip_field(conn, step: Removal, actor: str, batch: int) -> int:
    # In key order, from the start: a run resumed after a kill walks again over rows already
    # stripped (they no longer match) and finishes the rest. The SQL/JSON match is lax (it also
    # matches a shape the path does not declare); only a row strip() changed is written.
    path = json_path(step.path)
    after: tuple = (None, None)
    total = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT install_id, record_id, fields::text FROM records WHERE category = $1 AND jsonb_path_exists(fields, $2::jsonpath) "
                "AND ($4::uuid IS NULL OR (install_id, record_id) > ($4, $5)) ORDER BY install_id, record_id LIMIT $3 FOR UPDATE",
                step.category, path, batch, *after)
            ids, record_ids, values = [], [], []
            for r in rows:
                fields = orjson.loads(r[2])
                if strip(fields, step.path):
                    ids.append(r[0])
                    record_ids.append(r[1])
                    values.append(orjson.dumps(fields).decode())
            if ids:
                await conn.execute(
                    "UPDATE records r SET fields = u.f::jsonb FROM unnest($2::uuid[], $3::text[], $4::text[]) AS u(i, id, f) "
                    "WHERE r.category = $1 AND r.install_id = u.i AND r.record_id = u.id", step.category, ids, record_ids, values)
                await record(conn, actor, "policy.remove", None, _detail(step, len(ids)))
        total += len(ids)
        if len(rows) < batch:
            return total
        after = (rows[-1][0], rows[-1][1])
