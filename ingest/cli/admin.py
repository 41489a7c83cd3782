"""Command-line side of the admin actions: `export ID`, `erase ID` and `audit`. Actions are audited as actor 'cli'."""

from __future__ import annotations

import argparse
import sys
import uuid

from ingest.cli.context import CliError, load_settings, with_db


def _install_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CliError(f"not an installation id (UUID): {value!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    """Write the installation's export document to standard output."""
    from ingest.admin.rights import write_export

    install_id = _install_id(args.install_id)
    out = sys.stdout.buffer
    held: list[bytes] = []  # --pretty: the whole document, indented once complete

    async def begin():
        pass

    async def write(chunk: bytes):
        if args.pretty:
            held.append(chunk)
        else:
            out.write(chunk)

    async def work(conn, resolved):
        return await write_export(conn, resolved.ks, resolved.ring, install_id, "cli", begin, write,
                                  resolved.settings.heartbeat_retention_days)

    if not with_db(load_settings(), work):
        raise CliError(f"no installation {install_id}")
    if args.pretty:
        import orjson

        out.write(orjson.dumps(orjson.loads(b"".join(held)), option=orjson.OPT_INDENT_2))
    out.write(b"\n")
    out.flush()
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase an installation (or finish an interrupted erasure)."""
    from ingest.admin.rights import begin_erasure, destroy_leftover_keys, finish_erasure

    install_id = _install_id(args.install_id)

    async def work(conn, resolved):
        state = await begin_erasure(conn, resolved.ks, install_id, "cli")
        if state is None:
            # Not in the data database, but its keys in the key store: a key store restored from a
            # backup older than the erasure (docs/operations.md). Destroy them and write the tombstone again.
            destroyed = await destroy_leftover_keys(conn, resolved.ks, install_id, "cli")
            return None if destroyed is None else f"keys:{destroyed}"
        await finish_erasure(conn, install_id, "cli")
        return state

    state = with_db(load_settings(), work)
    if state is None:
        raise CliError(f"no installation {install_id}")
    if state.startswith("keys:"):
        print(f"no installation {install_id} in the data database; destroyed its {state[5:]} key(s) left in the key store "
              "and recorded its erasure there")
        return 0
    print(f"erased {install_id}" + (" (an interrupted erasure was finished)" if state == "resumed" else ""))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Check the database against the policy in force; exit 1 with a report if any promise is broken."""
    from ingest.admin.compliance import audit_database, report
    from ingest.cli.policy import policy_in_force

    settings = load_settings()
    policy = policy_in_force(settings)  # the file in force: audit compares the database with it

    async def work(conn, resolved):
        return await audit_database(conn, resolved.ks, resolved.ring, resolved.settings, policy)

    findings = with_db(settings, work)
    print(report(findings))
    return 1 if findings else 0


def add_commands(sub) -> None:
    """Register the commands on the top-level subparsers."""
    export = sub.add_parser("export", help="write everything held about an installation as JSON to standard output")
    export.add_argument("install_id")
    export.add_argument("--pretty", action="store_true", help="indented, one field a line (default: one line)")
    export.set_defaults(func=cmd_export)
    erase = sub.add_parser("erase", help="erase an installation: destroy its keys, revoke its tokens, delete its rows")
    erase.add_argument("install_id")
    erase.set_defaults(func=cmd_erase)
    sub.add_parser("audit", help="check the database against the policy; non-zero exit and a report on any finding").set_defaults(func=cmd_audit)
