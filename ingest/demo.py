"""`telemetry-ingest demo`: a fake installation and agent talk to a running service through the reference client.

Every body carries a few fields the policy does not declare, so the output shows
the filter at work: what the service kept (and in what form) and what it dropped.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from ingest.client import Rejected, TelemetryClient
from storage.policy import INSTALLATION, SCAN

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


async def run(url: str, secret: str, out: Callable[[str], None] = print) -> None:
    """Enroll a fake installation with `secret`, send a heartbeat and (if the service can) a scan; report."""
    async with TelemetryClient(url, secret) as installation:
        enrolled = await installation.enroll(secret)
        out(f"enrolled a demo installation: install_id {enrolled.install_id}")

        body = demo_heartbeat(enrolled.install_id)
        answer = await installation.heartbeat(body)
        dropped = answer.body.get("dropped_fields", [])
        storage = {f.name: f.storage for f in INSTALLATION.fields}
        out(f"heartbeat: HTTP {answer.status}, stored: {str(answer.body.get('stored')).lower()}")
        out("  stored:  " + ", ".join(f"{k} ({storage.get(k, '?')})" for k in _kept_fields(body, dropped)))
        out("           sender address (anonymised to its network prefix, from the connection)")
        out("  dropped: " + (", ".join(dropped) or "nothing"))

        try:
            agent = await installation.create_agent(DEMO_AGENT_NAME)
        except Rejected as exc:
            if exc.status in (404, 405):
                out("scan: this service has no POST /v1/agents yet; no agent, so no scan sent")
                return
            raise
        out(f"created agent {DEMO_AGENT_NAME!r}: agent_id {agent.agent_id}")

    async with TelemetryClient(url, agent.token) as scanner:
        scan = {"scan_id": str(uuid.uuid4()), **demo_scan(dt.datetime.now(dt.timezone.utc))}
        try:
            answer = await scanner.upload_scan(scan)
        except Rejected as exc:
            if exc.status in (404, 405):
                out("scan: this service has no POST /v1/scans yet; no scan sent")
                return
            raise
        dropped = answer.body.get("dropped_fields", [])
        out(f"scan {answer.body.get('scan_id')}: HTTP {answer.status}, kept until {answer.body.get('expires_at')}")
        key = {f.name for f in SCAN.fields if f.storage == "key"}
        kept = _kept_fields(scan, [d for d in dropped if "." not in d and "[" not in d])
        out("  stored:  " + ", ".join(k if k in key else k + "*" for k in kept))
        out("           (* inside the one encrypted document; the others in the clear)")
        out("  dropped: " + (", ".join(dropped) or "nothing"))
        replay = await scanner.upload_scan(scan)
        same = "the same answer, stored once" if replay.body == answer.body else "a different answer"
        out(f"scan sent again with the same scan_id: HTTP {replay.status}, {same}")
