"""The `telemetry-ingest` command line: parses arguments and calls into the packages; nothing more."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import re
import sys
from collections.abc import Sequence

from ingest.settings import Settings, SettingsError, describe, env_name, secret_fields

log = logging.getLogger("ingest.cli")


class CliError(Exception):
    """A one-line message for the operator; exit status 1."""


# ---------------------------------------------------------------- shared set-up


def load_settings(args: argparse.Namespace | None = None) -> Settings:
    overrides = {}
    if args is not None:
        for f in dataclasses.fields(Settings):
            value = getattr(args, "opt_" + f.name, None)
            if value is not None:
                overrides[f.name] = value
    return Settings.from_env(overrides=overrides)


class Resolved:
    """Settings with a DSN and master key, and the embedded server if one was started."""

    def __init__(self, settings: Settings, *, create: bool = False) -> None:
        """create: make the data directory if there is none (only `serve` does: CONTRACT 8)."""
        from crypto.errors import KeyError_
        from crypto.keyring import KeyRing, load_or_create_key_file

        self.embedded = None
        self.key_file = None  # embedded mode's key file, when the keys came from it
        if settings.dsn is None:
            from storage.embedded import EmbeddedPostgres

            self.embedded = EmbeddedPostgres(settings.data_dir)
            if not create and not self.embedded.pgdata.is_dir():
                raise CliError(no_data_dir(settings))
            try:
                dsn = self.embedded.start()
            except Exception as exc:
                raise CliError(f"TELEMETRY_DATA_DIR: cannot start the embedded PostgreSQL in {self.embedded.pgdata}: {exc}") from None
            settings = settings.replace(dsn=dsn)
        if settings.master_key is None:
            if self.embedded is None:
                raise CliError("TELEMETRY_MASTER_KEY: required when TELEMETRY_DSN is set (make one with `telemetry-ingest keys generate`)")
            key_file = settings.data_dir / "master.key"
            value, created = load_or_create_key_file(key_file)
            if created:
                print(f"warning: generated a new key-encryption key in {key_file} (mode 0600); back it up: "
                      "without it the stored e-mails and scans cannot be read", file=sys.stderr)
            settings = settings.replace(master_key=value)
            self.key_file = key_file
        try:
            self.ring = KeyRing.from_setting(settings.master_key)
        except KeyError_ as exc:
            raise CliError(f"TELEMETRY_MASTER_KEY: {exc}") from None
        self.keystore_default = settings.keystore_dsn is None
        if self.keystore_default:
            from storage.keystore import default_dsn

            settings = settings.replace(keystore_dsn=default_dsn(settings.dsn, embedded=self.embedded is not None))
        self.settings = settings
        self.ks = None  # the key store's connection while a command runs (_with_db)

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


async def _connect(resolved: Resolved):
    """Connections to the data database and the key store, both checked and migrated: (conn, ks)."""
    import asyncpg

    from storage.databases import ensure_keystore_database, migrate_both
    from storage.pool import check_durability, connect

    settings = resolved.settings
    try:
        conn = await connect(settings.dsn, statement_cache_size=settings.db_statement_cache)
    except asyncpg.ClientConfigurationError as exc:  # asyncpg's own check of the DSN's parameters; names no secret
        raise CliError(f"TELEMETRY_DSN: {exc}") from None
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise CliError(f"TELEMETRY_DSN: cannot connect to PostgreSQL: {type(exc).__name__}") from None
    try:
        await check_durability(conn)
        if resolved.keystore_default:
            await ensure_keystore_database(conn, settings.keystore_dsn)
        try:
            ks = await connect(settings.keystore_dsn, statement_cache_size=settings.db_statement_cache)
        except asyncpg.InvalidCatalogNameError:
            raise CliError("TELEMETRY_KEYSTORE_DSN: the key store's database does not exist (create it, or leave "
                           "TELEMETRY_KEYSTORE_DSN unset for the default, which is created when missing)") from None
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            raise CliError(f"TELEMETRY_KEYSTORE_DSN: cannot connect to the key store: {type(exc).__name__}") from None
        try:
            await check_durability(ks)
            await migrate_both(conn, ks)
        except BaseException:
            await ks.close()
            raise
    except BaseException:
        await conn.close()
        raise
    return conn, ks


def _with_db(settings: Settings, work) -> object:
    """Run `work(conn, resolved)` against the database (resolved.ks: the key store), starting the embedded one if needed."""
    resolved = Resolved(settings)
    try:

        async def main():
            conn, resolved.ks = await _connect(resolved)
            try:
                return await work(conn, resolved)
            finally:
                await conn.close()
                await resolved.ks.close()

        return asyncio.run(main())
    finally:
        resolved.close()


# ---------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from ingest.logs import setup_logging

    settings = load_settings(args)
    setup_logging(settings.log_format)
    check_served(policy_in_force(settings))  # before any database is started: a bad file costs nothing
    resolved = Resolved(settings, create=True)
    try:
        if resolved.embedded is not None:
            print(f"telemetry-ingest: no TELEMETRY_DSN set; using the embedded PostgreSQL in {resolved.embedded.pgdata}", file=sys.stderr)
        asyncio.run(_prepare(resolved))
        from ingest.server import serve

        from ingest import address

        written = address.write(resolved.settings)
        try:
            return serve(resolved.settings, key_file=resolved.key_file, reload=_reloader(resolved.key_file))
        finally:
            if written:
                address.remove(resolved.settings)
    finally:
        resolved.close()


def no_data_dir(settings: Settings) -> str:
    """The one line of a command that found neither TELEMETRY_DSN nor a data directory."""
    return (f"no data directory at {settings.data_dir.resolve()} and no TELEMETRY_DSN: run `telemetry-ingest serve` "
            "first (only serve creates one), or set TELEMETRY_DATA_DIR or TELEMETRY_DSN")


def _reloader(key_file):
    """What a SIGHUP gives the new workers: the same settings, with the key file read again (embedded mode)."""

    def reload(settings: Settings) -> Settings:
        if key_file is None:
            return settings
        from crypto.keyring import KeyRing

        value = key_file.read_text().strip()
        KeyRing.from_setting(value)  # checked here: a bad file keeps the workers as they are
        return settings.replace(master_key=value)

    return reload


async def _prepare(resolved: Resolved) -> None:
    import datetime as dt

    from storage.databases import KeysMissing, check_keys, replay_erasures
    from storage.partitions import ensure_partitions

    conn, ks = await _connect(resolved)
    try:
        await ensure_partitions(conn, dt.datetime.now(dt.timezone.utc).date())
        # Erasures first: rows of installations the key store lists as erased (a restored backup)
        # go, and are then no reason to refuse the start.
        await replay_erasures(conn, ks)
        try:
            await check_keys(conn, ks, resolved.ring.key_ids)
        except KeysMissing as exc:
            raise CliError(f"TELEMETRY_KEYSTORE_DSN / TELEMETRY_MASTER_KEY: {exc}") from None
    finally:
        await conn.close()
        await ks.close()


async def store_new_token(conn, role: str, action: str, *, max_uses: int | None = None,
                          expires_in=None) -> tuple[str, str, dt.datetime | None]:
    """Make a token of role, store its hash and audit it as action, in one transaction on conn;
    returns (token_id, token, expires_at). What `create_token` runs (tests call it in process too)."""
    from crypto.tokens import new_token
    from storage.audit import record
    from storage.tokens import insert_token

    token_id, token, token_hash = new_token(role)
    async with conn.transaction():
        expires_at = None if expires_in is None else await conn.fetchval("SELECT now() + $1::interval", expires_in)
        await insert_token(conn, token_id, token_hash, role, max_uses=max_uses, expires_at=expires_at)
        detail = {"token_id": token_id}
        if max_uses is not None:
            detail["max_uses"] = max_uses
        if expires_at is not None:
            detail["expires_at"] = expires_at.isoformat()
        await record(conn, "cli", action, detail=detail)
    return token_id, token, expires_at


def create_token(role: str, action: str, *, max_uses: int | None = None, expires_in=None) -> tuple[str, str]:
    """Create a token of role in the database, audited as action; returns (token_id, token).

    max_uses and expires_in (a timedelta) limit an enrollment secret; the expiry is counted by the database's clock.
    """

    async def work(conn, resolved):
        return await store_new_token(conn, role, action, max_uses=max_uses, expires_in=expires_in)

    token_id, token, expires_at = _with_db(load_settings(), work)
    if max_uses is not None or expires_at is not None:
        uses = "unlimited" if max_uses is None else str(max_uses)
        print(f"uses: {uses}; expires: {'never' if expires_at is None else expires_at.isoformat()}")
    return token_id, token


def _create_token(role: str, action: str):
    def run(args: argparse.Namespace) -> int:
        limits = {"max_uses": getattr(args, "max_uses", None), "expires_in": getattr(args, "expires_in", None)}
        token_id, token = create_token(role, action, **limits)
        print(f"token id: {token_id}")
        print(token)
        return 0

    return run


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> dt.timedelta:
    """A DURATION such as 30m, 12h or 7d (also s), at most 3650 days."""
    m = _DURATION.fullmatch(value.strip())
    if not m or int(m.group(1)) * _UNIT_SECONDS[m.group(2)] > 3650 * 86400:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 30m, 12h or 7d (at most 3650d)")
    return dt.timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def _positive(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """Print every token's id, role, binding, uses and dates; never a token or its hash."""
    from storage.tokens import token_list

    def cell(v) -> str:
        if v is None:
            return "-"
        return v.isoformat(timespec="seconds") if isinstance(v, dt.datetime) else str(v)

    columns = ("token_id", "role", "install_id", "agent_id", "uses", "max_uses", "expires_at", "created_at", "revoked_at")

    async def work(conn, resolved):
        print("\t".join(columns))
        n = 0
        async with conn.transaction():
            async for r in token_list(conn):
                print("\t".join(cell(r[c]) for c in columns))
                n += 1
        return n

    _with_db(load_settings(), work)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from crypto.tokens import hash_token, role_of
    from storage.audit import record
    from storage.tokens import revoke

    given = args.token.strip()
    if given == "-":
        # The token itself comes on standard input: never in `ps` or shell history.
        given = sys.stdin.readline().strip()
        if role_of(given) is None:
            raise CliError("tokens revoke -: standard input must hold the token itself (tie_..., tii_..., tia_..., tiadm_...)")
    elif role_of(given) is not None:
        raise CliError("tokens revoke: a token on the command line shows in `ps` and shell history; "
                       "give its id (tid_...), or `-` and the token on standard input")
    by_hash = hash_token(given) if role_of(given) else None

    async def work(conn, resolved):
        async with conn.transaction():
            token_id = await revoke(conn, token_id=None if by_hash else given, token_hash=by_hash)
            if token_id:
                await record(conn, "cli", "token.revoke", detail={"token_id": token_id})
            return token_id

    token_id = _with_db(load_settings(), work)
    if not token_id:
        raise CliError("no active token with that value or id")
    print(f"revoked {token_id}")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from crypto.keyring import generate_key

    print(generate_key())
    return 0


def policy_in_force(settings: Settings, path=None):
    """The policy of path, else of TELEMETRY_POLICY, else the built-in one; CliError naming the first problem."""
    from policy import PolicyError, load, load_in_force

    try:
        return load(path) if path is not None else load_in_force(settings.policy)
    except PolicyError as exc:
        first = exc.lines()[0]
        if path is not None:
            raise CliError(first) from None
        more = f" ({len(exc.problems)} problems: `telemetry-ingest policy check {exc.source}` lists them)" if len(exc.problems) > 1 else ""
        raise CliError(f"TELEMETRY_POLICY: {first}{more}") from None


def check_served(policy) -> None:
    """CliError unless serve enforces every category of the policy: today, the built-in ones on their own paths.

    POST /v1/records/{category} is not built yet, so a file declaring any other category (or changing,
    or leaving out, a built-in one) would promise what the service does not do: serve refuses it.
    """
    from policy import builtin

    served = {c.name: c for c in builtin().categories}
    given = {c.name: c for c in policy.categories}
    why = "this version receives only the built-in categories ({}) on their own paths; POST /v1/records/{{category}} is not implemented".format(
        ", ".join(served))
    for name, c in given.items():
        if served.get(name) != c:
            what = "differs from the built-in one" if name in served else "not served yet"
            raise CliError(f"TELEMETRY_POLICY: {policy.source}:{policy.lines.get(name, '?')}: category[{name}]: {what}: {why}")
    for name in served:
        if name not in given:
            raise CliError(f"TELEMETRY_POLICY: {policy.source}: category[{name}]: left out, but still received: {why}")
    if policy.agents != builtin().agents:
        raise CliError(f"TELEMETRY_POLICY: {policy.source}: agents: differs from the built-in agent registration: {why}")


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Print `policy ok: N categories`, or one line per problem of the file and exit 1."""
    from policy import PolicyError, load

    try:
        policy = load(args.file)
    except PolicyError as exc:
        print("\n".join(exc.lines()))
        return 1
    n = len(policy.categories)
    print(f"policy ok: {n} categor{'y' if n == 1 else 'ies'}")
    return 0


def audit_log_disclosure(days: int) -> list[dict[str, str]]:
    """What the service keeps of its own: the audit log of administrative actions, whatever the policy."""
    purpose = "accountability: which administrative action (export, erasure, restriction, token and key operations) was done, when"
    retention = f"{days} days (TELEMETRY_AUDIT_RETENTION_DAYS)"
    return [
        {"category": "audit log", "field": field, "purpose": purpose, "stored_as": "plaintext", "retention": retention}
        for field in ("install_id", "action", "at", "actor (admin token id, 'cli' or 'sweeper')")
    ]


def cmd_policy_show(args: argparse.Namespace) -> int:
    import orjson

    from policy import builtin

    settings = load_settings()
    policy = policy_in_force(settings, args.file)
    # The configured heartbeat history applies to the policy serve enforces; another file states its own.
    history = settings.heartbeat_retention_days if policy == builtin() else None
    rows = policy.disclosure_rows(heartbeat_retention_days=history, inactive_days=settings.inactive_days)
    rows += audit_log_disclosure(settings.audit_retention_days)
    if args.format == "json":
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    print("| category | field | purpose | stored as | retention |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {cell(r['category'])} | `{cell(r['field'])}` | {cell(r['purpose'])} | {cell(r['stored_as'])} | {cell(r['retention'])} |")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import orjson

    from ingest import address
    from ingest.demo import send_once

    url = args.url or address.running_url(load_settings())
    if not url.startswith(("http://", "https://")):
        raise CliError("send: --url must be an http:// or https:// URL")
    token = args.token or os.environ.get("TELEMETRY_TOKEN")
    if not token:
        raise CliError("send: --token (or TELEMETRY_TOKEN) is required")
    if (args.kind == "record") != (args.category is not None):
        raise CliError("send: --category CATEGORY goes with `send record`, and only with it")
    body = None
    if args.kind == "flush":
        if not args.spool:
            raise CliError("send flush: --spool DIR is required")
    else:
        try:
            raw = Path(args.file).read_bytes() if args.file else sys.stdin.buffer.read()
            body = orjson.loads(raw)
        except OSError as exc:
            raise CliError(f"send: cannot read {args.file}: {exc.strerror}") from None
        except orjson.JSONDecodeError:
            raise CliError("send: the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise CliError("send: the body must be a JSON object")
    status, shown = send_once(url, token, args.kind, body, args.spool, attempts=args.attempts,
                              category=args.category, ca_bundle=args.ca_bundle)
    print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from telemetry_ingest_client import ClientError

    from crypto.tokens import hash_token
    from ingest import address, demo
    from storage.audit import record
    from storage.tokens import revoke

    settings = load_settings()
    if settings.dsn is None and not (settings.data_dir / "pgdata").is_dir():
        raise CliError(no_data_dir(settings))
    url = args.url or address.running_url(settings)
    if not address.listening(url):
        raise CliError(f"nothing listening at {url}: is serve running?")
    print(f"demo against {url}")
    token_id, secret = create_token("enroll", "enroll_secret.create")
    print(f"created enrollment secret {token_id} (revoked again when the demo ends)")

    async def revoke_secret(conn, resolved):
        async with conn.transaction():
            if await revoke(conn, token_hash=hash_token(secret)):
                await record(conn, "cli", "token.revoke", detail={"token_id": token_id})

    made: list = []
    try:
        demo.run(url, secret, made=made)
    except ClientError as exc:
        raise CliError(f"demo: {exc}") from None
    finally:
        _with_db(settings, revoke_secret)
        if args.cleanup and made:
            _erase_demo(settings, made[0])
    return 0


def _erase_demo(settings: Settings, install_id) -> None:
    """`demo --cleanup`: erase the demo's installation (keys destroyed, tokens revoked, rows deleted)."""
    from ingest.rights import begin_erasure, finish_erasure

    async def work(conn, resolved):
        if await begin_erasure(conn, resolved.ks, install_id, "cli") is not None:
            await finish_erasure(conn, install_id, "cli")

    _with_db(settings, work)
    print(f"cleanup: erased the demo installation {install_id} (its keys, tokens, heartbeats, agent and scan)")


# ---------------------------------------------------------------- parser


class _SecretFlag(argparse.Action):
    """A secret setting given as a flag: an error naming the variable to use instead (the value is not echoed)."""

    def __init__(self, option_strings, dest, env: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.env = env

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string}: secrets are never taken from the command line; set {self.env} in the environment")


def build_parser() -> argparse.ArgumentParser:
    import platform

    from ingest import version

    parser = argparse.ArgumentParser(prog="telemetry-ingest", description="Secure telemetry ingestion service.")
    parser.add_argument("--version", action="version", version=f"telemetry-ingest {version()} (Python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service", formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="settings (environment variable, default, meaning):\n" + "\n".join(f"  {v} [{d}] {h}" for v, d, h in describe()))
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name in secret_fields():
            # Not offered, and refused when given: the value would show in `ps` and shell history.
            serve.add_argument(flag, action=_SecretFlag, help=argparse.SUPPRESS, env=env_name(f.name))
        else:
            serve.add_argument(flag, dest="opt_" + f.name, metavar="VALUE", help=f.metadata["help"])
    serve.set_defaults(func=cmd_serve)

    secret = sub.add_parser("enroll-secret", help="enrollment secrets").add_subparsers(dest="action", required=True)
    create_secret = secret.add_parser("create", help="create an enrollment secret (printed on the last line)")
    create_secret.add_argument("--max-uses", type=_positive, metavar="N", help="enrollments it may make (default: unlimited)")
    create_secret.add_argument("--expires-in", type=duration, metavar="DURATION", help="refused after this long: 30m, 12h, 7d (default: never)")
    create_secret.set_defaults(func=_create_token("enroll", "enroll_secret.create"))

    admin = sub.add_parser("admin-token", help="admin tokens").add_subparsers(dest="action", required=True)
    admin.add_parser("create", help="create an admin token (printed on the last line)").set_defaults(func=_create_token("admin", "admin_token.create"))

    tokens = sub.add_parser("tokens", help="tokens").add_subparsers(dest="action", required=True)
    revoke = tokens.add_parser("revoke", help="revoke a token, given its id, or `-` and the token itself on standard input")
    revoke.add_argument("token", metavar="ID_OR_DASH", help="the token's id (tid_...), or - to read the token from standard input")
    revoke.set_defaults(func=cmd_tokens_revoke)
    tokens.add_parser("list", help="every token's id, role, installation, agent, uses, expiry, creation and revocation "
                      "(tab-separated; never a token or its hash)").set_defaults(func=cmd_tokens_list)

    keys = sub.add_parser("keys", help="key-encryption keys").add_subparsers(dest="action", required=True)
    keys.add_parser("generate", help="print a new key in the TELEMETRY_MASTER_KEY format").set_defaults(func=cmd_keys_generate)
    from ingest import cli_retention  # sweep --once, keys rotate (imported here: it imports this module)

    cli_retention.add_commands(sub, keys)

    policy = sub.add_parser("policy", help="the data policy").add_subparsers(dest="action", required=True)
    show = policy.add_parser("show", help="print the disclosure table of the policy in force (TELEMETRY_POLICY or built-in)")
    show.add_argument("file", nargs="?", metavar="FILE", help="a policy file to show instead of the one in force")
    show.add_argument("--format", choices=("markdown", "json"), default="markdown")
    show.set_defaults(func=cmd_policy_show)
    check = policy.add_parser("check", help="check a policy file: `policy ok: N categories`, or one line per problem and exit 1")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_policy_check)

    send = sub.add_parser("send", help="send a heartbeat, scan or record with the reference client (retries, spool)")
    send.add_argument("kind", choices=("heartbeat", "scan", "record", "flush"),
                      help="what to send (record: of --category; flush: only what is spooled)")
    send.add_argument("--url", help="the service, e.g. http://127.0.0.1:8080 (default: the running serve's address, "
                      "from the data directory)")
    send.add_argument("--category", help="the policy category of `send record` (POST /v1/records/CATEGORY)")
    send.add_argument("--ca-bundle", metavar="FILE", help="PEM file of the CAs to trust for https:// (default: the system's)")
    send.add_argument("--token", help="installation token (heartbeat) or agent token (scan); default $TELEMETRY_TOKEN, "
                      "which other users cannot read in the process list")
    send.add_argument("--file", help="the JSON body (default: standard input)")
    send.add_argument("--spool", metavar="DIR", help="keep the record in this directory until it is delivered")
    send.add_argument("--attempts", type=int, default=6, metavar="N", help="tries per record before giving up (or leaving it spooled)")
    send.set_defaults(func=cmd_send)

    demo = sub.add_parser("demo", help="enroll a fake installation at a running service; show what is stored and dropped")
    demo.add_argument("--url", help="the running service (default: the running serve's address, from the data directory)")
    demo.add_argument("--cleanup", action="store_true", help="erase the demo installation (and all it sent) when done")
    demo.set_defaults(func=cmd_demo)
    from ingest import cli_admin  # export, erase, audit (imported here: it imports this module)

    cli_admin.add_commands(sub)
    return parser


# Commands that later modules add: name -> function(subparsers) registering them.
EXTENSIONS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    for extend in EXTENSIONS:
        extend(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except SettingsError as exc:
        print(f"telemetry-ingest: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"telemetry-ingest: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `telemetry-ingest policy show | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        from storage.errors import UnsafeDatabase

        if isinstance(exc, UnsafeDatabase):
            print(f"telemetry-ingest: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
