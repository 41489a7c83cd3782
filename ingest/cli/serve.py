"""`telemetry-ingest serve`: the databases prepared once, then the supervisor (ingest.server)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from ingest.cli.context import CliError, Resolved, connect_both, load_settings
from ingest.cli.policy import check_applied, check_served, policy_in_force
from ingest.settings import Settings, describe, env_name, secret_fields


def cmd_serve(args: argparse.Namespace) -> int:
    from ingest.logs import setup_logging

    settings = load_settings(args)
    setup_logging(settings.log_format)
    # Read once, before any database is started (a bad file costs nothing); the workers, those a
    # SIGHUP starts too, enforce this policy, not whatever the file holds later.
    policy = policy_in_force(settings)
    check_served(policy)
    resolved = Resolved(settings, create=True)
    try:
        if resolved.embedded is not None:
            print(f"telemetry-ingest: no TELEMETRY_DSN set; using the embedded PostgreSQL in {resolved.embedded.pgdata}", file=sys.stderr)
        asyncio.run(_prepare(resolved, policy))
        from ingest.cli import address
        from ingest.server import serve

        written = address.write(resolved.settings)
        try:
            return serve(resolved.settings, key_file=resolved.key_file, reload=_reloader(resolved.key_file), policy=policy)
        finally:
            if written:
                address.remove(resolved.settings)
    finally:
        resolved.close()


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


async def _prepare(resolved: Resolved, policy) -> None:
    import datetime as dt

    from storage.databases import KeysMissing, check_keys, replay_erasures
    from storage.partitions import ensure_partitions

    conn, ks = await connect_both(resolved)
    try:
        await ensure_partitions(conn, dt.datetime.now(dt.timezone.utc).date())
        # Erasures first: rows of installations the key store lists as erased (a restored backup)
        # go, and are then no reason to refuse the start.
        await replay_erasures(conn, ks)
        try:
            await check_keys(conn, ks, resolved.ring.key_ids)
        except KeysMissing as exc:
            raise CliError(f"TELEMETRY_KEYSTORE_DSN / TELEMETRY_MASTER_KEY: {exc}") from None
        # What the database holds against the file in force: a removal waits for `policy apply --confirm`.
        await check_applied(conn, policy)
        if resolved.settings.service_dsn is not None:
            await _set_up_service_role(resolved, conn, ks)
    finally:
        await conn.close()
        await ks.close()


async def _set_up_service_role(resolved: Resolved, conn, ks) -> None:
    """As TELEMETRY_DSN's role: the service role and what it owns (storage.roles), then one login as it."""
    import asyncpg

    from storage import roles
    from storage.errors import RoleSetupError
    from storage.pool import connect

    settings = resolved.settings
    role = roles.user_of(settings.service_dsn)
    if role is None:
        raise CliError("TELEMETRY_SERVICE_DSN: must name the role to log in as (postgresql://ROLE:PASSWORD@host/db)")
    embedded = resolved.embedded is not None
    try:
        await roles.ensure(conn, ks, role, password=roles.password_of(settings.service_dsn), reset_password=embedded)
    except RoleSetupError as exc:
        raise CliError(str(exc)) from None
    if embedded and resolved.embedded.require_password(role):
        await conn.execute("SELECT pg_reload_conf()")
    # The workers would fail one by one otherwise: try the login now, and say which setting is wrong.
    for name, dsn in (("TELEMETRY_SERVICE_DSN", settings.service_dsn),
                      ("TELEMETRY_SERVICE_DSN (on the key store)", roles.keystore_login(settings.keystore_dsn, settings.dsn, settings.service_dsn))):
        try:
            probe = await connect(dsn, statement_cache_size=settings.db_statement_cache)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise CliError(f"{name}: cannot log in as {role}: {type(exc).__name__}") from None
        await probe.close()


class _SecretFlag(argparse.Action):
    """A secret setting given as a flag: an error naming the variable to use instead (the value is not echoed)."""

    def __init__(self, option_strings, dest, env: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.env = env

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string}: secrets are never taken from the command line; set {self.env} in the environment")


def add_commands(sub) -> None:
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
