"""`telemetry-ingest demo` and `send`: the reference client (telemetry_ingest_client) at work from the command line.

Every body carries a few fields the policy does not declare, so the output shows
the filter at work: what the service kept (and in what form) and what it dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from collections.abc import Callable
from typing import Any

from ingest.cli.context import CliError, load_settings, no_data_dir, with_db
from ingest.cli.tokens import create_token
from ingest.settings import Settings
from policy.categories import INSTALLATION, SCAN
from telemetry_ingest_client import (
    Backoff,
    CertificateError,
    Client,
    Rejected,
    Spooled,
    Unreachable,
)

DEMO_AGENT_NAME = "demo-agent"


def demo_heartbeat(install_id: uuid.UUID) -> dict[str, Any]:
    """What an installation sends, plus two fields it should not."""
    return {
        "install_id": str(install_id),
        "license_type": "enterprise",
        "version": "10.4.2.2031",  # four numbers all <= 255 would be a dotted quad: refused (CONTRACT 3)
        "asset_count": 1342,
        "db_server_type": "Microsoft SQL Server 2019",
        "web_server_type": "IIS 10.0",
        "email": "it-admin@example.com",
        # undeclared: the service must drop these
        "hostname": "INV-SRV-01.corp.example.com",
        "windows_user": "CORP\\jdoe",
    }


def demo_scan(now: dt.datetime) -> dict[str, Any]:
    """One machine's inventory as an agent reports it, plus a few fields it should not."""
    return {
        "scanned_at": now.isoformat(timespec="seconds"),
        "agent_version": "10.4.2",
        "asset": {
            "name": "WS-0042", "domain": "corp.example.com", "type": "Windows workstation",
            "manufacturer": "Dell Inc.", "model": "Latitude 7440", "serial_number": "7HX2QK3",
            "ip_address": "10.20.4.42", "mac_address": "3C:52:82:0A:1B:2C", "last_user": "CORP\\jdoe",
            "owner_phone": "+31 20 555 0142",  # undeclared
        },
        "os": {"name": "Windows 11 Pro", "version": "23H2", "build": "22631.3880", "architecture": "x64", "install_date": "2024-02-11"},
        "hardware": {"processor": "13th Gen Intel(R) Core(TM) i7-1365U", "cores": 10, "memory_mb": 32768, "bios_version": "1.9.1"},
        "disks": [{"name": "C:", "size_gb": 476.3, "free_gb": 212.8, "filesystem": "NTFS"}],
        "software": [
            {"name": "Microsoft 365 Apps for enterprise", "version": "16.0.17726.20160", "publisher": "Microsoft Corporation", "install_date": "2024-06-12"},
            {"name": "Mozilla Firefox (x64 en-US)", "version": "127.0.2", "publisher": "Mozilla", "install_date": "2024-06-27"},
            {"name": "7-Zip 23.01 (x64)", "version": "23.01", "publisher": "Igor Pavlov", "install_date": "2023-09-04",
             "license_key": "XXXXX-XXXXX-XXXXX"},  # undeclared
        ],
        "network": [{"adapter": "Intel(R) Wi-Fi 6E AX211 160MHz", "ip_address": "10.20.4.42", "mac_address": "3C:52:82:0A:1B:2C", "dhcp": True}],
        "hotfixes": [{"id": "KB5039212", "installed_on": "2024-06-11"}],
        "services": [{"name": "Spooler", "state": "Running", "start_mode": "Auto"}],
        "browser_history": ["https://intranet.example.com/hr/salaries"],  # undeclared
    }


def _kept_fields(body: dict[str, Any], dropped: list[str]) -> list[str]:
    """Top-level fields sent and not dropped."""
    return [k for k in body if k not in dropped]


def run(url: str, secret: str, out: Callable[[str], None] = print, made: list | None = None) -> None:
    """Enroll a fake installation with `secret`, send a heartbeat and a scan; report. made gets its install_id."""
    install_id = uuid.uuid4()
    token = Client(url).enroll(secret, install_id)
    if made is not None:
        made.append(install_id)
    out(f"enrolled a demo installation: install_id {install_id}")
    installation = Client(url, token)

    body = demo_heartbeat(install_id)
    answer = installation.heartbeat(body)
    dropped = answer.get("dropped_fields", [])
    storage = {f.name: f.storage for f in INSTALLATION.fields}
    out(f"heartbeat: HTTP {answer.status}, stored: {str(answer.get('stored')).lower()}")
    out("  stored:  " + ", ".join(f"{k} ({storage.get(k, '?')})" for k in _kept_fields(body, dropped)))
    out("           sender address (anonymised to its network prefix, from the connection)")
    out("  dropped: " + (", ".join(dropped) or "nothing"))

    agent = installation.create_agent(DEMO_AGENT_NAME)
    out(f"created agent {DEMO_AGENT_NAME!r}: agent_id {agent['agent_id']}")

    scanner = Client(url, agent["token"])
    scan = {"scan_id": str(uuid.uuid4()), **demo_scan(dt.datetime.now(dt.timezone.utc))}
    answer = scanner.scan(scan)
    dropped = answer.get("dropped_fields", [])
    out(f"scan {answer.get('scan_id')}: HTTP {answer.status}, kept until {answer.get('expires_at')}")
    key = {f.name for f in SCAN.fields if f.storage == "key"}
    kept = _kept_fields(scan, [d for d in dropped if "." not in d and "[" not in d])
    out("  stored:  " + ", ".join(k if k in key else k + "*" for k in kept))
    out("           (* inside the one encrypted document; the others in the clear)")
    out("  dropped: " + (", ".join(dropped) or "nothing"))
    replay = scanner.scan(scan)
    same = "the same answer, stored once" if replay == answer else "a different answer"
    out(f"scan sent again with the same scan_id: HTTP {replay.status}, {same}")


def send_once(url: str, token: str, kind: str, body: dict[str, Any] | None, spool_dir: str | None,
              attempts: int = Backoff.attempts, category: str | None = None,
              ca_bundle: str | None = None) -> tuple[int, Any]:
    """What `telemetry-ingest send` does: (exit status, JSON to print). kind "flush" sends only the spool.

    Exit status: 0 delivered, 1 rejected or unreachable (or a certificate that does not verify), 75 spooled.
    """
    client = Client(url, token, spool_dir=spool_dir, ca_bundle=ca_bundle, backoff=Backoff(attempts=attempts))
    if kind == "flush":
        report = client.flush_spool()
        summary = {
            "delivered": len(report.delivered), "rejected": len(report.rejected), "remaining": report.remaining,
            "stopped_by": str(report.stopped_by) if report.stopped_by else None, "busy": report.busy,
        }
        # 1 when anything was refused (set aside, or a 401 that stopped the flush), even if nothing
        # remains spooled; 75 when records wait for a service that was not reached; 0 otherwise.
        if report.rejected or isinstance(report.stopped_by, (Rejected, CertificateError)):
            return 1, summary
        return (0 if report.remaining == 0 else 75), summary
    assert body is not None
    try:
        if kind == "heartbeat":
            answer = client.heartbeat(body)
        elif kind == "scan":
            answer = client.scan(body)
        else:
            answer = client.record(category or "", body)
    except Rejected as exc:
        return 1, exc.answer.raw
    except Spooled as exc:
        return 75, {"spooled": str(exc.path), "detail": str(exc)}  # 75: EX_TEMPFAIL, try again later
    except Unreachable as exc:
        return 1, {"error": "unreachable", "detail": str(exc)}
    except CertificateError as exc:
        return 1, {"error": "certificate", "detail": str(exc)}
    return 0, answer.raw


# ---------------------------------------------------------------- the commands


def cmd_send(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import orjson

    from ingest.cli import address
    from ingest.cli.demo import send_once

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
    from crypto.tokens import hash_token
    from ingest.cli import address
    from storage.audit import record
    from storage.tokens import revoke
    from telemetry_ingest_client import ClientError

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
        run(url, secret, made=made)
    except ClientError as exc:
        raise CliError(f"demo: {exc}") from None
    finally:
        with_db(settings, revoke_secret)
        if args.cleanup and made:
            _erase_demo(settings, made[0])
    return 0


def _erase_demo(settings: Settings, install_id) -> None:
    """`demo --cleanup`: erase the demo's installation (keys destroyed, tokens revoked, rows deleted)."""
    from ingest.admin.rights import begin_erasure, finish_erasure

    async def work(conn, resolved):
        if await begin_erasure(conn, resolved.ks, install_id, "cli") is not None:
            await finish_erasure(conn, install_id, "cli")

    with_db(settings, work)
    print(f"cleanup: erased the demo installation {install_id} (its keys, tokens, heartbeats, agent and scan)")


def add_commands(sub) -> None:
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
