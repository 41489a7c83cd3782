"""`telemetry-ingest policy show`, `policy check` and `policy apply`, and the policy `serve` enforces."""

from __future__ import annotations

import argparse

from ingest.cli.context import CliError, load_settings, positive
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

    from policy.categories import INSTALLATION, file_categories

    settings = load_settings()
    policy = policy_in_force(settings, args.file)
    # The configured heartbeat history (TELEMETRY_HEARTBEAT_RETENTION_DAYS) is what the sweeper keeps
    # wherever the built-in heartbeats are served; a file without them states its own retentions.
    history = settings.heartbeat_retention_days if INSTALLATION in policy.categories else None
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


APPLY = "telemetry-ingest policy apply"


async def check_applied(conn, policy) -> None:
    """At serve's start: the file in force against the policy the database holds (storage.applied).

    None held (a first start) or only additions: the file is recorded, and what it adds simply starts
    being stored. A category or field it no longer declares: CliError naming them and the command that
    deletes them; nothing is deleted here.
    """
    from policy.changes import compare, declared, source_name
    from storage import applied
    from storage.audit import record

    async with conn.transaction():
        await conn.execute("LOCK TABLE policy_applied IN EXCLUSIVE MODE")  # workers of two serves starting at once
        held = await applied.held(conn)
        change = None if held is None else compare(held[0], policy)
        if change is not None and change.removes:
            raise CliError(
                f"the policy in force ({source_name(policy)}) no longer declares what the database holds: "
                f"{change.removed_text()}; `{APPLY}` shows what that deletes, `{APPLY} --confirm` deletes it "
                "(nothing was deleted)")
        if change is None or change.changes:  # the same fields in another order change nothing
            await applied.record_applied(conn, declared(policy), source_name(policy))
            if change is not None:
                await record(conn, "cli", "policy.apply", None, {
                    "categories_added": len(change.categories_added), "fields_added": len(change.fields_added)})


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """Show what applying the file deletes from the database; with --confirm delete it and record the file."""
    from ingest.cli.context import with_db
    from policy.changes import compare, declared, source_name
    from storage import applied
    from storage.audit import record

    settings = load_settings()
    policy = policy_in_force(settings, args.file)
    source = source_name(policy)

    async def work(conn, resolved):
        held = await applied.held(conn)
        if held is None:
            print(f"policy apply: the database holds no applied policy yet; {source} declares "
                  f"{len(policy.categories)} categor{'y' if len(policy.categories) == 1 else 'ies'}: nothing to delete")
            change = None
        else:
            change = compare(held[0], policy)
            builtin_fields = [(c, p) for c, p in change.fields_removed if c in applied.BUILTIN]
            if builtin_fields:
                c, p = builtin_fields[0]
                raise CliError(f"{source}: category[{c}].field[{p}]: a built-in category keeps its fields in its own "
                               "tables' columns; it can be left out of the file whole, not changed")
            print(f"policy apply: {source} against the policy the database holds (applied from {held[1]})")
        steps = [] if change is None else ([applied.Removal(c) for c in change.categories_removed]
                                           + [applied.Removal(c, p) for c, p in change.fields_removed])
        for step in steps:
            print(f"  {step.key}: {'deletes' if not args.confirm else 'deleting'} " + "; ".join(await applied.count(conn, step)))
        if change is not None and not change.changes:
            print("nothing to change: the database holds this policy")
            return 0
        if not args.confirm:
            if steps:
                print(f"nothing deleted: `{APPLY}{' ' + str(args.file) if args.file else ''} --confirm` deletes it and records the file")
            else:
                print(f"nothing to delete; `{APPLY} --confirm` records the file (serve does at its next start)")
            return 0
        total = 0
        for step in steps:
            n = await applied.remove(conn, step, "cli", batch=args.batch)
            total += n
            print(f"  {step.key}: {n} row(s) deleted or emptied")
        async with conn.transaction():
            await applied.record_applied(conn, declared(policy), source)
            await record(conn, "cli", "policy.apply", None, {
                "categories_removed": 0 if change is None else len(change.categories_removed),
                "fields_removed": 0 if change is None else len(change.fields_removed), "rows": total})
        print(f"policy applied: {source}")
        return 0

    return with_db(settings, work)


def add_commands(sub) -> None:
    policy = sub.add_parser("policy", help="the data policy").add_subparsers(dest="action", required=True)
    show = policy.add_parser("show", help="print the disclosure table of the policy in force (TELEMETRY_POLICY or built-in)")
    show.add_argument("file", nargs="?", metavar="FILE", help="a policy file to show instead of the one in force")
    show.add_argument("--format", choices=("markdown", "json"), default="markdown")
    show.set_defaults(func=cmd_policy_show)
    check = policy.add_parser("check", help="check a policy file: `policy ok: N categories`, or one line per problem and exit 1")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_policy_check)
    apply = policy.add_parser("apply", help="show what a policy change deletes from the database; with --confirm delete it "
                                            "and record the file (serve refuses to start until then)")
    apply.add_argument("file", nargs="?", metavar="FILE", help="the policy file to apply (default: the one in force)")
    apply.add_argument("--confirm", action="store_true", help="delete the stored values of what the file no longer declares")
    apply.add_argument("--batch", type=positive, default=5000, metavar="N", help="rows per transaction (default 5000)")
    apply.set_defaults(func=cmd_policy_apply)
