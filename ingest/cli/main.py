"""The `telemetry-ingest` entry point: the parser of every command group; each group's module adds its own commands.

The modules of `ingest.cli` build on `ingest.cli.context` (and on each other's helpers where one
command uses another's), never on this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ingest.cli import admin, demo, policy, retention, serve, tokens
from ingest.cli.context import CliError
from ingest.settings import SettingsError


def build_parser() -> argparse.ArgumentParser:
    import platform

    from ingest import version

    parser = argparse.ArgumentParser(prog="telemetry-ingest", description="Secure telemetry ingestion service.")
    parser.add_argument("--version", action="version", version=f"telemetry-ingest {version()} (Python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_commands(sub)
    keys = tokens.add_commands(sub)
    retention.add_commands(sub, keys)
    policy.add_commands(sub)
    demo.add_commands(sub)
    admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
