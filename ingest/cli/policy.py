"""`telemetry-ingest policy show` and `policy check`, and the policy `serve` enforces."""

from __future__ import annotations

import argparse

from ingest.cli.context import CliError, load_settings
from ingest.settings import Settings


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
    """CliError unless serve can enforce every category of the policy as the file says.

    A category of the file's own is received at POST /v1/records/{category}. A built-in category
    (installation, scan) has tables made for it: declared, it must be declared exactly as built in
    (or renamed, to become a category of the file's own); left out, its path answers 404. The same
    for `[agents]`: as built in, or left out (then /v1/agents answers 404).
    """
    from policy import builtin

    served = {c.name: c for c in builtin().categories}
    why = "a built-in category keeps its own path and tables, so it is declared exactly as built in (policy/builtin.toml) or left out; " \
          "give a category of your own another name"
    for c in policy.categories:
        if c.name in served and served[c.name] != c:
            raise CliError(f"TELEMETRY_POLICY: {policy.source}:{policy.lines.get(c.name, '?')}: category[{c.name}]: "
                           f"differs from the built-in one: {why}")
    if policy.agents is not None and policy.agents != builtin().agents:
        raise CliError(f"TELEMETRY_POLICY: {policy.source}: agents: differs from the built-in agent registration: "
                       "[agents] is declared exactly as built in (policy/builtin.toml) or left out")


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
    from policy.categories import file_categories

    settings = load_settings()
    policy = policy_in_force(settings, args.file)
    # The configured heartbeat history applies to the policy serve enforces; another file states its own.
    history = settings.heartbeat_retention_days if policy == builtin() else None
    rows = policy.disclosure_rows(heartbeat_retention_days=history, inactive_days=settings.inactive_days,
                                  records=frozenset(c.name for c in file_categories(policy)))
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


def add_commands(sub) -> None:
    policy = sub.add_parser("policy", help="the data policy").add_subparsers(dest="action", required=True)
    show = policy.add_parser("show", help="print the disclosure table of the policy in force (TELEMETRY_POLICY or built-in)")
    show.add_argument("file", nargs="?", metavar="FILE", help="a policy file to show instead of the one in force")
    show.add_argument("--format", choices=("markdown", "json"), default="markdown")
    show.set_defaults(func=cmd_policy_show)
    check = policy.add_parser("check", help="check a policy file: `policy ok: N categories`, or one line per problem and exit 1")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_policy_check)
