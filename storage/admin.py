"""Queries behind the administrative actions: export, erasure, restriction, statistics, and the compliance audit."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence

import asyncpg
import orjson

from storage.audit import record
from storage.pool import cursor
from storage.tokens import revoke_installation

# ---------------------------------------------------------------- export


async def exportable(conn, install_id: uuid.UUID) -> asyncpg.Record | None:
    """The installation's current record, unless it is unknown or being erased."""
    return await conn.fetchrow(
        "SELECT install_id, enrolled_at, last_seen_at, heartbeat_at, license_type, version, asset_count, db_server_type, "
        "web_server_type, email_ct, ip_prefix, scan_retention_hours, restricted "
        "FROM installations WHERE install_id = $1 AND NOT erasing",
        install_id,
    )


def heartbeat_history(conn, install_id: uuid.UUID, retention_days: int, *, prefetch: int = 1000):
    """A server-side cursor over the installation's heartbeat history within retention, oldest first
    (use inside a transaction): rows past retention are never served, swept yet or not."""
    return cursor(
        conn,
        "SELECT received_at, license_type, version, asset_count, db_server_type, web_server_type, ip_prefix "
        "FROM heartbeats WHERE install_id = $1 AND received_at > now() - make_interval(days => $2) ORDER BY received_at",
        install_id,
        retention_days,
        prefetch=prefetch,
    )


def agents_of(conn, install_id: uuid.UUID, *, prefetch: int = 1000):
    """A server-side cursor over the installation's agents (no token material; inside a transaction)."""
    return cursor(
        conn, "SELECT agent_id, name, created_at, revoked_at FROM agents WHERE install_id = $1 ORDER BY created_at, agent_id",
        install_id, prefetch=prefetch,
    )


def tokens_of(conn, install_id: uuid.UUID, *, prefetch: int = 1000):
    """A server-side cursor over public handles of the installation's tokens (ids and dates; never a hash)."""
    return cursor(
        conn, "SELECT token_id, role, agent_id, created_at, revoked_at FROM tokens WHERE install_id = $1 ORDER BY created_at, token_id",
        install_id, prefetch=prefetch,
    )


def audit_of(conn, install_id: uuid.UUID, *, prefetch: int = 1000):
    """A server-side cursor over what was done to the installation, and when (without who: admin
    token ids are ours, not theirs; inside a transaction)."""
    return cursor(conn, "SELECT at, action FROM audit_log WHERE install_id = $1 ORDER BY id", install_id, prefetch=prefetch)


# ---------------------------------------------------------------- restriction


async def set_restricted(conn, install_id: uuid.UUID, restricted: bool, actor: str) -> bool:
    """Restrict or release an installation and audit it; False if it is unknown or being erased."""
    async with conn.transaction():
        found = await conn.fetchval(
            "UPDATE installations SET restricted = $2 WHERE install_id = $1 AND NOT erasing RETURNING true", install_id, restricted
        )
        if not found:
            return False
        await record(conn, actor, "installation.restriction", install_id, {"restricted": restricted})
    return True


# ---------------------------------------------------------------- erasure
#
# Crypto-shredding. First the key store destroys the installation's data keys and writes
# its tombstone (storage.keystore.destroy_installation): from then on every ciphertext of
# the installation is unreadable, in every copy of this database. Then begin_erasure revokes
# the tokens and marks the installation `erasing`, in one transaction: once it commits,
# every request about it behaves as if it were gone. delete_rows and unlink then remove what is left, in
# short transactions; calling them again after a crash finishes the job. The
# installation row goes last, so while anything of it remains, it is still
# marked `erasing` and a new enrollment of the same id waits (409) until it is clean.

# Tables whose rows of an installation are deleted in bounded batches, in this order.
# records and record_settings: the categories of a policy file (migration 0012; their foreign keys
# cascade too, but in batches here the installation row's delete stays short).
ERASE_TABLES = ("heartbeats", "scans", "records", "record_settings", "agents")
ERASE_BATCH = 5000


async def begin_erasure(conn, install_id: uuid.UUID, actor: str, *, keys_destroyed: int = 0) -> str | None:
    """After the key store destroyed the keys: 'started' or 'resumed'; None if no such installation."""
    async with conn.transaction():
        erasing = await conn.fetchval("SELECT erasing FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        if erasing is None:
            return None
        await conn.execute("UPDATE installations SET erasing = true WHERE install_id = $1", install_id)
        revoked = await revoke_installation(conn, install_id)
        detail = {"keys_destroyed": keys_destroyed, "tokens_revoked": revoked}
        if erasing:
            detail["resumed"] = True
        await record(conn, actor, "installation.erase", install_id, detail)
    return "resumed" if erasing else "started"


async def erasure_state(conn, install_id: uuid.UUID) -> str:
    """'erasing' (begun, not finished), 'live' (enrolled, not being erased) or 'gone' (no installation row)."""
    erasing = await conn.fetchval("SELECT erasing FROM installations WHERE install_id = $1", install_id)
    return "gone" if erasing is None else "erasing" if erasing else "live"


# Rows of an id may be removed while no live installation holds it: its row is marked erasing,
# or gone already (another eraser, e.g. the sweeper, finished first). A new enrollment of the id
# inserts its row with its first token, so this guard, read in each statement's snapshot, keeps
# the newcomer's rows out of reach.
_NOT_LIVE = "NOT EXISTS (SELECT 1 FROM installations WHERE install_id = $1 AND NOT erasing)"


async def delete_rows(conn, install_id: uuid.UUID, *, batch: int = ERASE_BATCH) -> int:
    """Phase two: delete the installation's rows table by table, `batch` rows per transaction; returns how many."""
    total = 0
    for table in ERASE_TABLES:
        # (tableoid, ctid) names a row uniquely even across the partitions of a partitioned table.
        sql = (
            f"DELETE FROM {table} WHERE install_id = $1 AND {_NOT_LIVE} AND (tableoid, ctid) IN "
            f"(SELECT tableoid, ctid FROM {table} WHERE install_id = $1 LIMIT $2)"
        )
        while True:
            n = int((await conn.execute(sql, install_id, batch)).split()[-1])
            total += n
            if n < batch:
                break
    return total


async def seconds_since_revocation(conn, install_id: uuid.UUID) -> float | None:
    """How long ago the installation's last token revocation committed (None if it has no revoked tokens)."""
    return await conn.fetchval(
        "SELECT extract(epoch FROM clock_timestamp() - max(revoked_at))::float8 FROM tokens WHERE install_id = $1", install_id
    )


async def unlink(conn, install_id: uuid.UUID, actor: str, rows: int) -> bool:
    """Last phase: sweep stragglers, drop the id from the (revoked) token rows, delete the installation row.

    False if a live installation holds the id (begin_erasure was not run on it, or it was enrolled anew).
    """
    async with conn.transaction():
        erasing = await conn.fetchval("SELECT erasing FROM installations WHERE install_id = $1 FOR UPDATE", install_id)
        if erasing is False:
            return False
        for table in ERASE_TABLES:
            status = await conn.execute(f"DELETE FROM {table} WHERE install_id = $1 AND {_NOT_LIVE}", install_id)
            rows += int(status.split()[-1])
        # Revoke anything that slipped in, and keep the rows (without the id): every worker's
        # token cache still learns of the revocation by token id.
        await conn.execute(
            "UPDATE tokens SET install_id = NULL, agent_id = NULL, revoked_at = coalesce(revoked_at, now()), "
            f"revoke_seq = coalesce(revoke_seq, nextval('token_revocations')) WHERE install_id = $1 AND {_NOT_LIVE}",
            install_id,
        )
        await conn.execute("DELETE FROM installations WHERE install_id = $1 AND erasing", install_id)
        await record(conn, actor, "installation.erased", install_id, {"rows": rows})
    return True


# ---------------------------------------------------------------- statistics

STATS_DIMENSIONS = ("version", "license_type", "db_server_type", "web_server_type")


# Groups below k are folded into 'other'. If 'other' would then be a non-empty group
# below k, the smallest shown groups join it until it is not: otherwise a single small
# group could be read off as the difference. A stored value 'other' is folded too.
def _fold(other: str, carried: str = "") -> str:
    """The CTEs that fold `groups` (dimension, value, n) below k ($1) into `other`, a SQL literal of
    the value's type, as `folded`; carried: further columns of `groups` kept along (", assets")."""
    return f"""marked AS (
    SELECT *, (n < $1 OR coalesce(value = {other}, false)) AS small FROM groups
),
ordered AS (
    SELECT *,
        coalesce(sum(n) FILTER (WHERE small) OVER (PARTITION BY dimension), 0) AS small_total,
        coalesce(sum(n) OVER (PARTITION BY dimension ORDER BY small DESC, n, value NULLS FIRST
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
    FROM marked
),
folded AS (
    SELECT dimension, (small OR (small_total > 0 AND before < $1)) AS is_other,
           CASE WHEN small OR (small_total > 0 AND before < $1) THEN {other} ELSE value END AS value, n{carried}
    FROM ordered
)
"""


_STATS_SQL = """
WITH active AS (
    SELECT version, license_type, db_server_type, web_server_type, asset_count::bigint AS asset_count
    FROM installations
    WHERE last_seen_at >= now() - make_interval(days => $2) AND NOT restricted AND NOT erasing
),
groups AS (
    SELECT 'version' AS dimension, version AS value, count(*) AS n, sum(asset_count) AS assets FROM active GROUP BY version
    UNION ALL
    SELECT 'license_type', license_type, count(*), sum(asset_count) FROM active GROUP BY license_type
    UNION ALL
    SELECT 'db_server_type', db_server_type, count(*), sum(asset_count) FROM active GROUP BY db_server_type
    UNION ALL
    SELECT 'web_server_type', web_server_type, count(*), sum(asset_count) FROM active GROUP BY web_server_type
),
""" + _fold("'other'", ", assets") + """SELECT dimension, value, is_other, sum(n)::bigint AS installations, sum(assets)::bigint AS asset_count
FROM folded
GROUP BY dimension, value, is_other
ORDER BY dimension, is_other, installations DESC, value
"""


# The same fold over the records of one category of a policy file (migration 0012): the group is the
# records with one value of a declared dimension (its JSON value in `fields`, null when absent), and
# each record is in exactly one group per dimension, as each installation is above.
_RECORD_STATS_SQL = """
WITH live AS (
    SELECT r.fields FROM records r JOIN installations i ON i.install_id = r.install_id
    WHERE r.category = $2 AND r.expires_at > now() AND NOT i.restricted AND NOT i.erasing
),
groups AS (
    SELECT d.dimension, l.fields -> d.dimension AS value, count(*) AS n
    FROM live l CROSS JOIN unnest($3::text[]) AS d(dimension)
    GROUP BY 1, 2
),
""" + _fold("'\"other\"'::jsonb") + """SELECT dimension, value::text AS value, is_other, sum(n)::bigint AS records
FROM folded
GROUP BY dimension, value, is_other
ORDER BY dimension, is_other, records DESC, value
"""


async def statistics(conn, *, k: int, active_days: int = 30, categories: Sequence[tuple[str, Sequence[str]]] = ()) -> dict:
    """Aggregate counts of active installations by each dimension, groups below k folded into 'other'.

    categories: (name, dimensions) of the policy file's categories kept in `records` that declare
    statistics; each gets its record counts by dimension under "categories", folded the same way.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        total, assets = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(asset_count), 0)::bigint FROM installations "
            "WHERE last_seen_at >= now() - make_interval(days => $1) AND NOT restricted AND NOT erasing",
            active_days,
        )
        rows = await conn.fetch(_STATS_SQL, k, active_days)
        per_category = {}
        for name, dimensions in categories:
            n = await conn.fetchval(
                "SELECT count(*) FROM records r JOIN installations i ON i.install_id = r.install_id "
                "WHERE r.category = $1 AND r.expires_at > now() AND NOT i.restricted AND NOT i.erasing", name)
            per_category[name] = (n, list(dimensions), await conn.fetch(_RECORD_STATS_SQL, k, name, list(dimensions)))
    by: dict[str, list[dict]] = {d: [] for d in STATS_DIMENSIONS}
    if total < k:
        # Fewer active installations than k: any count or total would describe a group below k.
        out = {"k": k, "active_days": active_days, "suppressed": True, "active_installations": None,
               "asset_count_total": None, "by": by}
    else:
        for r in rows:
            by[r["dimension"]].append({"value": r["value"], "installations": r["installations"], "asset_count": r["asset_count"]})
        out = {"k": k, "active_days": active_days, "suppressed": False, "active_installations": total,
               "asset_count_total": assets, "by": by}
    if per_category:
        out["categories"] = {name: _record_groups(k, n, dimensions, groups) for name, (n, dimensions, groups) in per_category.items()}
    return out


def _record_groups(k: int, total: int, dimensions: list[str], rows) -> dict:
    by: dict[str, list[dict]] = {d: [] for d in dimensions}
    if total < k:  # as above: with fewer than k records, every count describes a group below k
        return {"suppressed": True, "records": None, "by": by}
    for r in rows:
        by[r["dimension"]].append({"value": None if r["value"] is None else orjson.loads(r["value"]), "records": r["records"]})
    return {"suppressed": False, "records": total, "by": by}


# ---------------------------------------------------------------- compliance audit


_STORED_RELATIONS = """
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE c.relkind IN ('r', 'p', 'm', 'f') AND NOT c.relispartition
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
"""


async def stored_columns(conn) -> dict[str, dict[str, str]]:
    """Every relation that can hold rows (partitions excepted: they have their parent's columns): column -> type.

    Relations outside the current schema are named schema.relation.
    """
    rows = await conn.fetch(
        "SELECT CASE WHEN n.nspname = current_schema() THEN c.relname ELSE n.nspname || '.' || c.relname END AS rel, "
        "a.attname, format_type(a.atttypid, NULL) AS type" + _STORED_RELATIONS + "ORDER BY rel, a.attnum"
    )
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(r["rel"], {})[r["attname"]] = r["type"]
    return out


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def count_matching(conn, table: str, columns: Sequence[str], patterns: Sequence[str]) -> dict[tuple[str, int], int]:
    """For each (column, pattern index): rows of table whose column, as text, matches the regular expression (one scan)."""
    exprs = [
        f"count(*) FILTER (WHERE {ident(c)}::text ~ ${i + 1})" for c in columns for i in range(len(patterns))
    ]
    row = await conn.fetchrow(f"SELECT {', '.join(exprs)} FROM {ident(table)}", *patterns)
    keys = [(c, i) for c in columns for i in range(len(patterns))]
    return dict(zip(keys, row))


async def unsealed(conn, table: str, column: str, *, min_size: int, version: int) -> int:
    """Non-null values of a bytea column that cannot be a sealed record (too short, or wrong version byte)."""
    return await conn.fetchval(
        f"SELECT count(*) FROM {ident(table)} WHERE {ident(column)} IS NOT NULL "
        f"AND (length({ident(column)}) < $1 OR get_byte({ident(column)}, 0) <> $2)",
        min_size, version,
    )


async def json_keys_outside(conn, table: str, column: str, allowed: Iterable[str]) -> list[str]:
    """Distinct keys, at any depth, of a json(b) column that are not in allowed ('(not an object)' for a non-object value)."""
    col = ident(column)
    rows = await conn.fetch(
        f"""
        WITH RECURSIVE walk(key, value) AS (
            SELECT NULL::text, {col}::jsonb FROM {ident(table)} WHERE {col} IS NOT NULL
            UNION ALL
            SELECT c.key, c.value FROM walk w CROSS JOIN LATERAL (
                SELECT e.key, e.value
                FROM jsonb_each(CASE WHEN jsonb_typeof(w.value) = 'object' THEN w.value ELSE '{{}}'::jsonb END) e
                UNION ALL
                SELECT NULL, a.value
                FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.value) = 'array' THEN w.value ELSE '[]'::jsonb END) a
            ) c
        )
        SELECT DISTINCT key FROM walk WHERE key IS NOT NULL AND NOT (key = ANY($1::text[]))
        UNION
        SELECT '(not an object)' FROM {ident(table)} WHERE {col} IS NOT NULL AND jsonb_typeof({col}::jsonb) <> 'object'
        ORDER BY 1
        """,
        list(allowed),
    )
    return [r[0] for r in rows]


async def retention_overdue(conn, *, grace_seconds: float, heartbeat_days: int, inactive_days: int, scans: bool) -> dict[str, int]:
    """Rows kept past their retention (by more than grace_seconds, the sweeper's slack)."""
    out = {
        "heartbeats": await conn.fetchval(
            "SELECT count(*) FROM heartbeats WHERE received_at < now() - make_interval(days => $1, secs => $2)",
            heartbeat_days, grace_seconds,
        ),
        "installations": await conn.fetchval(
            "SELECT count(*) FROM installations "
            "WHERE coalesce(last_seen_at, enrolled_at) < now() - make_interval(days => $1, secs => $2)",
            inactive_days, grace_seconds,
        ),
    }
    if scans:
        out["scans"] = await conn.fetchval(
            "SELECT count(*) FROM scans WHERE expires_at <= now() - make_interval(secs => $1)", grace_seconds
        )
    return out


async def unfinished_erasures(conn) -> list[uuid.UUID]:
    """Installations whose erasure began but did not finish."""
    return [r[0] for r in await conn.fetch("SELECT install_id FROM installations WHERE erasing ORDER BY install_id")]


async def orphans(conn, tables: Iterable[str]) -> dict[str, int]:
    """Rows carrying an install_id whose installation no longer exists, by table."""
    out = {}
    for table in tables:
        out[table] = await conn.fetchval(
            f"SELECT count(*) FROM {ident(table)} t WHERE t.install_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM installations i WHERE i.install_id = t.install_id)"
        )
    return out


async def enrolled_before(conn, erased_at: dict[uuid.UUID, dt.datetime]) -> list[uuid.UUID]:
    """Installations of this database enrolled at or before their time in erased_at (tombstones)."""
    ids = list(erased_at)
    back = []
    for i in range(0, len(ids), 10_000):
        rows = await conn.fetch("SELECT install_id, enrolled_at FROM installations WHERE install_id = ANY($1::uuid[])", ids[i : i + 10_000])
        back += [r["install_id"] for r in rows if r["enrolled_at"] <= erased_at[r["install_id"]]]
    return sorted(back)


async def unhashed_tokens(conn, size: int) -> int:
    """Token rows whose stored hash is not a `size`-byte digest."""
    return await conn.fetchval("SELECT count(*) FROM tokens WHERE token_hash IS NULL OR length(token_hash) <> $1", size)


async def audit_log_guards(conn) -> list[str]:
    """Names of the enabled triggers that keep audit_log append-only."""
    rows = await conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass('audit_log') AND NOT tgisinternal AND tgenabled <> 'D'"
    )
    return sorted(r[0] for r in rows)


# ---------------------------------------------------------------- records of the file's categories


async def record_categories(conn) -> dict[str, int]:
    """How many records each category in `records` holds."""
    return {r[0]: r[1] for r in await conn.fetch("SELECT category, count(*) FROM records GROUP BY category ORDER BY category")}


async def record_paths_outside(conn, category: str, allowed: Iterable[str], *, limit: int = 20) -> list[str]:
    """Paths in the category's `records.fields` (at every depth, list items as name[]) that are not in
    allowed, without descending into one; '(not an object)' for a `fields` that is not an object."""
    rows = await conn.fetch(
        """
        WITH RECURSIVE walk(path, value) AS (
            SELECT NULL::text, fields FROM records WHERE category = $1
            UNION ALL
            SELECT c.path, c.value FROM walk w CROSS JOIN LATERAL (
                SELECT coalesce(w.path || '.', '') || e.key AS path, e.value
                FROM jsonb_each(CASE WHEN jsonb_typeof(w.value) = 'object' THEN w.value ELSE '{}'::jsonb END) e
                UNION ALL
                SELECT w.path || '[]', a.value
                FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.value) = 'array' AND w.path IS NOT NULL
                                               THEN w.value ELSE '[]'::jsonb END) a
            ) c
            WHERE w.path IS NULL OR w.path = ANY($2::text[])
        )
        SELECT * FROM (
            SELECT DISTINCT path FROM walk WHERE path IS NOT NULL AND NOT (path = ANY($2::text[]))
            UNION
            SELECT '(not an object)' FROM records WHERE category = $1 AND jsonb_typeof(fields) <> 'object'
        ) p ORDER BY 1 LIMIT $3
        """,
        category, list(allowed), limit,
    )
    return [r[0] for r in rows]


async def record_values_not_matching(conn, category: str, json_path: str, pattern: str) -> int:
    """Values at the SQL/JSON path in the category's `records.fields` that are not strings matching pattern."""
    return await conn.fetchval(
        "SELECT count(*) FROM records r CROSS JOIN LATERAL jsonb_path_query(r.fields, $2::jsonpath) v "
        "WHERE r.category = $1 AND NOT (jsonb_typeof(v) = 'string' AND (v #>> '{}') ~ $3)",
        category, json_path, pattern,
    )
