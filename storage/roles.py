"""Who owns what: the service's serving connections cannot alter, disable or bypass the audit log.

Three roles (docs/admin.md, "Roles"):

- the **admin role**, TELEMETRY_DSN's user (embedded mode: the server's superuser `postgres`): it
  runs the migrations and every command of the command line, and owns `audit_log` (with its
  sequence and its trigger function) and `schema_migrations`;
- **telemetry_owner** (NOLOGIN): owns every other table and sequence of both databases, so that
  its members can make and drop the daily partitions (storage.partitions, storage.sweeper) and
  vacuum the key store; on `audit_log` it has SELECT, INSERT and DELETE (the triggers let only the
  sweeper's marked delete of rows past 30 days through), on `schema_migrations` SELECT;
- the **service role** (embedded mode: telemetry_service; otherwise TELEMETRY_SERVICE_DSN's user),
  the login of the serving pools, a member of telemetry_owner and nothing more: no superuser, not
  the owner of `audit_log`, its trigger function, its schema or its database, no SET of
  `session_replication_role`. So SQL run on a serving connection can neither disable nor drop the
  triggers nor make them skip (`session_replication_role = replica`), and RESET ROLE gives it
  nothing back: the role is the connection's login, not a SET ROLE.

`ensure` (run by `serve` as the admin role, after the migrations) makes this so; `findings` (run
by `audit`) reports every way a role could get round the triggers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import asyncpg

from storage.errors import RoleSetupError

OWNER = "telemetry_owner"
SERVICE = "telemetry_service"  # the embedded mode's service role
PASSWORD_FILE = "service-role.password"  # under TELEMETRY_DATA_DIR, mode 0600 (embedded mode)
# Relations that stay with the admin role: the service role must not own the audit log.
KEPT = ("audit_log", "schema_migrations")
_LOCK = 0x7E1E_0021  # serialises concurrent `serve` starts setting the roles up (transaction-scoped)
_SCRAM_ITERATIONS = 4096


# ---------------------------------------------------------------- DSNs and passwords


def user_of(dsn: str) -> str | None:
    """The role a postgresql:// URI logs in as, if it names one."""
    user = urlsplit(dsn).username
    return unquote(user) if user else None


def password_of(dsn: str) -> str | None:
    password = urlsplit(dsn).password
    return unquote(password) if password else None


def with_login(dsn: str, user: str, password: str | None) -> str:
    """dsn with its user and password replaced (host, database and parameters kept)."""
    split = urlsplit(dsn)
    host = split.netloc.rpartition("@")[2]
    login = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit(split._replace(netloc=login + "@" + host))


def _server(dsn: str) -> tuple:
    split = urlsplit(dsn)
    query = parse_qs(split.query)
    return split.hostname, split.port, tuple(query.get("host", ())), tuple(query.get("port", ()))


def keystore_login(keystore_dsn: str, dsn: str, service_dsn: str | None) -> str:
    """The key store DSN of the serving pool: on TELEMETRY_DSN's server, with the service role's login
    (roles are per server); on another server, TELEMETRY_KEYSTORE_DSN as given."""
    if service_dsn is None or _server(keystore_dsn) != _server(dsn):
        return keystore_dsn
    return with_login(keystore_dsn, user_of(service_dsn) or "", password_of(service_dsn))


def load_or_create_password(data_dir: Path) -> str:
    """The embedded service role's password, from <data_dir>/service-role.password (made, mode 0600, if absent)."""
    path = data_dir / PASSWORD_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for password, computed here so that the password
    itself is never sent in a statement (which the server could log)."""
    if not (password.isascii() and password.isprintable()):
        raise RoleSetupError("the service role's password must be printable ASCII to be set by serve; "
                             "create the role yourself (docs/admin.md#roles)")
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    salt_b64, stored_b64, server_b64 = (base64.b64encode(b).decode() for b in (salt, stored, server))
    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{salt_b64}${stored_b64}:{server_b64}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------- setting up


async def ensure(data: asyncpg.Connection, ks: asyncpg.Connection, role: str, *, password: str | None = None,
                 reset_password: bool = False) -> None:
    """As the admin role, after the migrations: make telemetry_owner and `role` (LOGIN, member of
    telemetry_owner; created with `password` if missing, its password set anew if reset_password),
    hand every table and sequence but KEPT to telemetry_owner in both databases, and grant what the
    service needs of the audit log and no more. RoleSetupError if the admin role may not."""
    try:
        async with data.transaction():
            await data.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            me = await data.fetchval("SELECT current_user")
            if role == me:
                raise RoleSetupError(f"TELEMETRY_SERVICE_DSN: logs in as {role}, the role of TELEMETRY_DSN, which owns "
                                     "the audit log; give the service a role of its own (docs/admin.md#roles)")
            await _ensure_login(data, role, password, reset_password)
            # CREATE: the daily partitions, and (for a non-superuser) ALTER ... OWNER TO needs it too
            await data.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {OWNER}")
            await _hand_over(data, role)
            await data.execute(f"REVOKE ALL ON audit_log, schema_migrations FROM {OWNER}, {_ident(role)}")
            await data.execute(f"GRANT SELECT, INSERT, DELETE ON audit_log TO {OWNER}")
            await data.execute(f"GRANT USAGE ON SEQUENCE audit_log_id_seq TO {OWNER}")
            await data.execute(f"GRANT SELECT ON schema_migrations TO {OWNER}")
        async with ks.transaction():
            # Roles belong to a server: a key store on another server keeps the roles its DSN gives.
            if await ks.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])", [OWNER, role]) == 2:
                await ks.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {OWNER}")  # (ALTER ... OWNER TO needs it)
                await _hand_over(ks, role)
                await ks.execute(f"REVOKE CREATE ON SCHEMA public FROM {OWNER}")  # no partitions here
                await ks.execute(f"REVOKE ALL ON schema_migrations FROM {OWNER}, {_ident(role)}")
                await ks.execute(f"GRANT SELECT ON schema_migrations TO {OWNER}")
    except asyncpg.InsufficientPrivilegeError as exc:
        raise RoleSetupError(f"TELEMETRY_DSN: its role cannot set up the service role {role} ({exc.message}); "
                             "see docs/admin.md#roles for the statements to run as a superuser") from None


async def _create_role(conn: asyncpg.Connection, name: str, options: str) -> None:
    """CREATE ROLE unless it exists. Roles belong to the server, the advisory lock to one database: two
    databases of one server setting up at once race here, and the loser finds the role made."""
    if await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", name):
        return
    try:
        async with conn.transaction():  # a savepoint: the loser's error does not end the outer transaction
            await conn.execute(f"CREATE ROLE {_ident(name)} {options}")
    except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        pass


async def _ensure_login(conn: asyncpg.Connection, role: str, password: str | None, reset_password: bool) -> None:
    await _create_role(conn, OWNER, "NOLOGIN")
    # The admin role hands tables to telemetry_owner, which needs membership unless it is a superuser.
    if not await conn.fetchval("SELECT rolsuper OR pg_has_role(current_user, $1, 'MEMBER') FROM pg_roles "
                               "WHERE rolname = current_user", OWNER):
        await conn.execute(f"GRANT {OWNER} TO current_user")
    secret = "" if password is None else f" PASSWORD '{scram_verifier(password)}'"
    if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
        await _create_role(conn, role, "LOGIN" + secret)
    elif reset_password and secret:
        await conn.execute(f"ALTER ROLE {_ident(role)}{secret}")
    if not await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, OWNER):
        await conn.execute(f"GRANT {OWNER} TO {_ident(role)}")


_TO_HAND_OVER = """
SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S')
  AND c.relowner NOT IN (SELECT oid FROM pg_roles WHERE rolname IN ($1, $2))
  AND c.relname <> ALL($3::text[])
  -- a serial's sequence follows its table
  AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
ORDER BY c.relname
"""


async def _hand_over(conn: asyncpg.Connection, role: str) -> None:
    """Every table and sequence of the public schema but KEPT to telemetry_owner (storage.partitions
    gives a new partition to its parent's owner; one the service role owns is left: it is a member
    of telemetry_owner either way)."""
    for r in await conn.fetch(_TO_HAND_OVER, OWNER, role, list(KEPT)):
        kind = "SEQUENCE" if r["relkind"] == "S" else "TABLE"
        await conn.execute(f"ALTER {kind} {_ident(r['relname'])} OWNER TO {OWNER}")


# ---------------------------------------------------------------- checking


_ROLE_SQL = """
SELECT r.rolsuper, r.rolcreaterole,
       pg_has_role(r.oid, c.relowner, 'MEMBER') AS owns_log,
       pg_has_role(r.oid, n.nspowner, 'MEMBER') AS owns_schema,
       pg_has_role(r.oid, d.datdba, 'MEMBER') AS owns_database,
       has_table_privilege(r.oid, c.oid, 'UPDATE') AS may_update,
       has_table_privilege(r.oid, c.oid, 'TRUNCATE') AS may_truncate
FROM pg_roles r, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_database d
WHERE r.rolname = $1 AND c.oid = to_regclass('audit_log') AND d.datname = current_database()
"""

_GUARD_FUNCTIONS_SQL = """
SELECT DISTINCT p.proname, pg_has_role($1, p.proowner, 'MEMBER') AS owns,
       coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pg_temp'] AS pinned
FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
WHERE t.tgrelid = to_regclass('audit_log') AND NOT t.tgisinternal
ORDER BY p.proname
"""


async def findings(conn: asyncpg.Connection, role: str) -> list[str]:
    """Every way `role` could alter, disable or bypass the audit log's triggers, one message each
    (empty: none). Read from the catalog of the data database `conn`."""
    if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
        return [f"the service's role {role} does not exist (embedded mode: `serve` creates it)"]
    if await conn.fetchval("SELECT to_regclass('audit_log') IS NULL"):
        return []  # no audit log at all: the audit-log check reports it
    r = await conn.fetchrow(_ROLE_SQL, role)
    out = []
    bypass = "so it can disable or bypass the audit log's triggers"
    if r["rolsuper"]:
        out.append(f"the service connects as {role}, a superuser, {bypass} (session_replication_role = replica)")
    else:
        if r["owns_log"]:
            out.append(f"the service's role {role} owns audit_log (or is a member of its owner), {bypass}")
        if r["owns_schema"] or r["owns_database"]:
            out.append(f"the service's role {role} owns the database or the schema of audit_log, so it can drop the table")
        if r["rolcreaterole"]:
            out.append(f"the service's role {role} has CREATEROLE, so it can make itself more")
        if await conn.fetchval("SELECT current_setting('server_version_num')::int >= 150000") and \
                await conn.fetchval("SELECT has_parameter_privilege($1, 'session_replication_role', 'SET')", role):
            out.append(f"the service's role {role} may SET session_replication_role, {bypass}")
        if (r["may_update"] or r["may_truncate"]) and not r["owns_log"]:  # (an owner holds every privilege)
            out.append(f"the service's role {role} holds UPDATE or TRUNCATE on audit_log (revoke them)")
    for f in await conn.fetch(_GUARD_FUNCTIONS_SQL, role):
        if f["owns"] and not r["rolsuper"]:
            out.append(f"the service's role {role} owns the trigger function {f['proname']}, so it can replace it")
        if not f["pinned"]:
            out.append(f"the trigger function {f['proname']} does not pin its search_path (pg_catalog, pg_temp), "
                       "so a role that can create functions can shadow what it calls")
    return out
