"""Tokens: `enroll-secret create`, `admin-token create`, `tokens list`, `tokens revoke`; and `keys generate`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from ingest.cli.context import CliError, duration, load_settings, positive, with_db


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

    token_id, token, expires_at = with_db(load_settings(), work)
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

    with_db(load_settings(), work)
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

    token_id = with_db(load_settings(), work)
    if not token_id:
        raise CliError("no active token with that value or id")
    print(f"revoked {token_id}")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from crypto.keyring import generate_key

    print(generate_key())
    return 0


def add_commands(sub):
    """Add the token commands and `keys generate`; returns the `keys` subcommands for the other key commands."""
    secret = sub.add_parser("enroll-secret", help="enrollment secrets").add_subparsers(dest="action", required=True)
    create_secret = secret.add_parser("create", help="create an enrollment secret (printed on the last line)")
    create_secret.add_argument("--max-uses", type=positive, metavar="N", help="enrollments it may make (default: unlimited)")
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
    return keys
