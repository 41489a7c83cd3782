"""What every command shares: settings, the one-line error, and the two databases opened, checked and migrated."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import re
import sys

from ingest.settings import Settings


class CliError(Exception):
    """A one-line message for the operator; exit status 1."""



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


async def connect_both(resolved: Resolved):
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


def with_db(settings: Settings, work) -> object:
    """Run `work(conn, resolved)` against the database (resolved.ks: the key store), starting the embedded one if needed."""
    resolved = Resolved(settings)
    try:

        async def main():
            conn, resolved.ks = await connect_both(resolved)
            try:
                return await work(conn, resolved)
            finally:
                await conn.close()
                await resolved.ks.close()

        return asyncio.run(main())
    finally:
        resolved.close()


def no_data_dir(settings: Settings) -> str:
    """The one line of a command that found neither TELEMETRY_DSN nor a data directory."""
    return (f"no data directory at {settings.data_dir.resolve()} and no TELEMETRY_DSN: run `telemetry-ingest serve` "
            "first (only serve creates one), or set TELEMETRY_DATA_DIR or TELEMETRY_DSN")


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])")


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> dt.timedelta:
    """A DURATION such as 30m, 12h or 7d (also s), at most 3650 days."""
    m = _DURATION.fullmatch(value.strip())
    if not m or int(m.group(1)) * _UNIT_SECONDS[m.group(2)] > 3650 * 86400:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 30m, 12h or 7d (at most 3650d)")
    return dt.timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def positive(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)
