"""`telemetry-ingest audit`: the database checked against the promises of the policy.

Each check reads the database itself (not the code's intentions) and reports a
finding per broken promise:

- schema      every table and column is declared in storage/layout.py
- retention   no scan or record (of a policy file's categories) past expires_at, no heartbeat history past its retention,
              no installation kept past the inactivity limit, no audit row past the audit
              log's retention (each beyond one sweep interval)
- erasure     no erasure left half-done, no row of an installation that no longer exists
- ciphertext  e-mails and scans hold sealed records (crypto.envelope format) only
- json        JSON columns hold declared keys with scalar values only
- keys        no key material in the data database; every data key in the key store is wrapped,
              by a key-encryption key of the configured ring; no epoch key outlives its epoch
              (beyond one sweep interval); no installation the key store lists as erased is
              still in the data database
- tokens      token hashes are 32-byte digests; no text column holds a bearer token
- personal    no text column holds an e-mail address in plaintext
- audit-log   the append-only triggers of audit_log are present and enabled
- policy      the database against the policy file in force: every category in `records` is one
              the file declares (not a built-in one, which has its own tables); every key of
              `records.fields`, at every depth, is a field of its category the file keeps in the
              clear; keyed-hash values are hashes and anonymised ones network prefixes; the policy
              recorded in `policy_applied` is the file in force
- service-role the role the service's pools log in as (TELEMETRY_SERVICE_DSN's, embedded mode's
              telemetry_service, else TELEMETRY_DSN's) cannot alter, disable or bypass those
              triggers: no superuser, not the owner of audit_log, its trigger function, schema or
              database, no SET of session_replication_role (storage.roles)
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from crypto.envelope import FORMAT_VERSION, HEADER_SIZE, TAG_SIZE
from crypto.keyring import WRAPPED_SIZE, KeyRing
from crypto.tokens import PREFIXES
from ingest.settings import Settings
from policy import Policy, builtin
from policy.changes import clear_leaves, compare, source_name
from storage import admin, applied, keystore, roles
from storage import audit as audit_log
from storage import records as record_store
from storage.layout import ANONYMISED_PATTERN, KEY_COLUMNS, KEYED_HASH_PATTERN, TABLES

TEXT_TYPES = ("text", "character varying", "character", "json", "jsonb")
JSON_TYPES = ("json", "jsonb")
AUDIT_LOG_GUARDS = ("audit_log_no_truncate", "audit_log_no_update")
# A bearer token: a role prefix followed by its random part (token_urlsafe: 43 characters).
TOKEN_PATTERN = "(^|[^A-Za-z0-9_])(" + "|".join(sorted(map(re.escape, PREFIXES.values()), key=len, reverse=True)) + ")[A-Za-z0-9_-]{20,}"
EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_SHA256_SIZE = 32
_WRAP_VERSION = 1


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken promise: which check, and what an operator needs to know to act on it."""

    check: str
    message: str


async def audit_database(conn, ks, ring: KeyRing, settings: Settings, policy: Policy | None = None) -> list[Finding]:
    """Run every check on the data database `conn` and the key store `ks` against the policy in force
    (default: the built-in one); an empty list means both keep every promise."""
    policy = policy or builtin()
    found: list[Finding] = []
    live = await admin.stored_columns(conn)

    def add(check: str, message: str) -> None:
        found.append(Finding(check, message))

    # schema
    for table, columns in live.items():
        declared = TABLES.get(table)
        if declared is None:
            add("schema", f"table {table} is not declared in storage/layout.py (columns: {', '.join(columns)})")
            continue
        for column in columns:
            if column not in declared.columns:
                add("schema", f"column {table}.{column} is not declared in storage/layout.py")

    # retention
    overdue = await admin.retention_overdue(
        conn, grace_seconds=settings.sweep_interval, heartbeat_days=settings.heartbeat_retention_days,
        inactive_days=settings.inactive_days, scans="scans" in live,
    )
    limits = {
        "scans": "past their expires_at",
        "heartbeats": f"of heartbeat history older than {settings.heartbeat_retention_days} days",
        "installations": f"without a heartbeat for more than {settings.inactive_days} days",
    }
    if "records" in live:
        overdue["records"] = await record_store.count_overdue(conn, settings.sweep_interval)
        limits["records"] = "past their expires_at"
    for table, n in overdue.items():
        if n:
            add("retention", f"{n} row(s) in {table} {limits[table]}")
    grace = dt.timedelta(seconds=settings.sweep_interval)
    n = await audit_log.count_older_than(conn, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=settings.audit_retention_days) - grace)
    if n:
        add("retention", f"{n} row(s) in audit_log older than {settings.audit_retention_days} days")

    # erasure
    for install_id in await admin.unfinished_erasures(conn):
        add("erasure", f"erasure of installation {install_id} began but did not finish: run `telemetry-ingest erase {install_id}`")
    with_install_id = [t for t, cols in live.items() if t in TABLES and t != "installations" and t != "audit_log" and "install_id" in cols]
    for table, n in (await admin.orphans(conn, with_install_id)).items():
        if n:
            add("erasure", f"{n} row(s) in {table} belong to no installation (left behind by an erasure or removal)")

    # ciphertext
    for table, declared in TABLES.items():
        for column in declared.sealed:
            if column in live.get(table, {}):
                n = await admin.unsealed(conn, table, column, min_size=HEADER_SIZE + TAG_SIZE, version=FORMAT_VERSION)
                if n:
                    add("ciphertext", f"{n} value(s) of {table}.{column} are not sealed records (crypto.envelope format v{FORMAT_VERSION})")

    # json
    for table, columns in live.items():
        declared = TABLES.get(table)
        allowed = dict(declared.json_keys) if declared else {}
        for column, typ in columns.items():
            if typ not in JSON_TYPES or declared is None or column in declared.policy_json:
                continue  # policy_json columns: compared with the file in force, below
            if column not in allowed:
                add("json", f"{table}.{column} holds JSON but has no declared keys in storage/layout.py")
                continue
            outside = await admin.json_keys_outside(conn, table, column, allowed[column])
            if outside:
                add("json", f"{table}.{column} holds keys outside the policy: {', '.join(outside)}")

    # keys
    for table, columns in live.items():
        held = sorted(KEY_COLUMNS & set(columns))
        if table == "data_keys" or held:
            add("keys", f"the data database holds key material: {table}" + (f" ({', '.join(held)})" if held else "")
                + "; data keys belong in the key store only")
    for kek_id, n in sorted((await keystore.kek_ids(ks)).items()):
        if kek_id not in ring:
            add("keys", f"{n} data key(s) are wrapped by key id {kek_id}, which is not in the configured key ring")
    n = await keystore.badly_wrapped(ks, WRAPPED_SIZE, _WRAP_VERSION)
    if n:
        add("keys", f"{n} data key(s) are not in the wrapped format (stored unwrapped?)")
    n = await keystore.count_expired(ks, dt.datetime.now(dt.timezone.utc) - grace)
    if n:
        add("keys", f"{n} epoch key(s) in the key store outlived their epoch by more than one sweep interval")
    stones = await keystore.tombstones(ks)
    back = await admin.enrolled_before(conn, stones)
    if back:
        add("keys", f"{len(back)} installation(s) the key store lists as erased are in the data database "
                    "(a restored backup?): the next sweep or start erases them again")

    # tokens and plaintext personal data in text columns
    n = await admin.unhashed_tokens(conn, _SHA256_SIZE)
    if n:
        add("tokens", f"{n} token(s) stored without hashing (token_hash is not a {_SHA256_SIZE}-byte SHA-256 digest)")
    for table, columns in live.items():
        text = [c for c, typ in columns.items() if typ in TEXT_TYPES]
        if not text or "." in table:  # another schema's relation: already reported as undeclared
            continue
        counts = await admin.count_matching(conn, table, text, [TOKEN_PATTERN, EMAIL_PATTERN])
        for column in text:
            if counts[column, 0]:
                add("tokens", f"{counts[column, 0]} value(s) of {table}.{column} contain a bearer token "
                              f"({'/'.join(PREFIXES.values())} prefix)")
            if counts[column, 1]:
                add("personal", f"{counts[column, 1]} value(s) of {table}.{column} contain an e-mail address in plaintext")

    # audit log
    guards = await admin.audit_log_guards(conn)
    missing = [g for g in AUDIT_LOG_GUARDS if g not in guards]
    if missing:
        add("audit-log", f"audit_log is not append-only: trigger(s) {', '.join(missing)} missing or disabled")

    # policy
    if "records" in live:
        await _check_records(conn, policy, add)
    if "policy_applied" in live:
        held = await applied.held(conn)
        # No row: no serve has started on this database yet; the first one records the file in force.
        change = None if held is None else compare(held[0], policy)
        if change is not None and change.changes:
            what = [f"no longer declares {change.removed_text()}"] if change.removes else []
            if change.categories_added or change.fields_added:
                what.append("adds " + "; ".join([f"category[{c}]" for c in change.categories_added]
                                                + [f"category[{c}].field[{p}]" for c, p in change.fields_added]))
            add("policy", f"the policy the database holds (applied from {held[1]}) is not the file in force "
                          f"({source_name(policy)}): the file {', and '.join(what)}; "
                          "`telemetry-ingest policy apply` shows what applying it deletes")

    # service role
    role = roles.user_of(settings.service_dsn) if settings.service_dsn else None
    for message in await roles.findings(conn, role or await conn.fetchval("SELECT current_user")):
        add("service-role", message + ("" if settings.service_dsn else "; set TELEMETRY_SERVICE_DSN (docs/admin.md#roles)"))
    return found


async def _check_records(conn, policy: Policy, add) -> None:
    in_records = {c.name: c for c in policy.categories if c.name not in applied.BUILTIN}
    for name, n in (await admin.record_categories(conn)).items():
        if name in applied.BUILTIN:
            add("policy", f"{n} record(s) in records of category {name}, which has its own tables")
        elif name not in in_records:
            add("policy", f"{n} record(s) in records of category {name}, which the policy in force does not declare")
    for name, category in in_records.items():
        clear = clear_leaves(category)
        allowed = set()
        for path, _ in clear:
            # every enclosing object and list of a declared leaf may be there too: a.b[].c needs a, a.b, a.b[]
            for i, ch in enumerate(path):
                if ch == ".":
                    allowed.add(path[:i])
                elif ch == "[":
                    allowed.update((path[:i], path[:i + 2]))
            allowed.add(path)
        outside = await admin.record_paths_outside(conn, name, sorted(allowed))
        if outside:
            add("policy", f"records.fields of category {name} hold what the policy in force does not keep in the clear: "
                          + ", ".join(outside))
        for path, storage in clear:
            form = {"keyed-hash": (KEYED_HASH_PATTERN, "keyed hashes (64 hex digits)"),
                    "anonymised": (ANONYMISED_PATTERN, "network prefixes (IPv4 /24, IPv6 /48)")}.get(storage)
            if form is None:
                continue
            n = await admin.record_values_not_matching(conn, name, applied.json_path(path), form[0])
            if n:
                add("policy", f"{n} value(s) of {name}.{path} in records.fields are not {form[1]}")


def report(findings: list[Finding]) -> str:
    """The human-readable report: 'audit passed', or one line per finding."""
    if not findings:
        return "audit passed"
    lines = [f"audit FAILED: {len(findings)} finding(s)"]
    lines += [f"  [{f.check}] {f.message}" for f in findings]
    return "\n".join(lines)
