"""Request bodies: heartbeats and scan documents shaped per CONTRACT.md sections 3 and 4."""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from typing import Any

import orjson

SCAN_SIZE_BYTES = 50 * 1024  # the "50 KiB scan" of the end-to-end scan figures
FILTER_SCAN_ENTRIES = 5000  # the "5,000-entry scan" of the allowlist filter figures
SCAN_UNKNOWN_KEYS = ("custom_inventory", "asset.owner_phone", "software.uninstall_string")


def heartbeat(install_id: str) -> dict[str, Any]:
    """A heartbeat as an installation sends it; every field is declared."""
    return {
        "install_id": install_id,
        "license_type": "pro",
        "version": "4.2.1",
        "asset_count": 120,
        "db_server_type": "postgresql",
        "web_server_type": "nginx",
        "email": "ops@example.com",
    }


def heartbeat_body(install_id: str) -> bytes:
    return orjson.dumps(heartbeat(install_id))


def json_headers(token: str, *, encoding: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if encoding:
        headers["Content-Encoding"] = encoding
    return headers


_PUBLISHERS = ("Microsoft Corporation", "Adobe Inc.", "Google LLC", "Oracle Corporation", "Mozilla", "JetBrains s.r.o.")
_PRODUCTS = ("Visual C++ Redistributable", "Runtime", "Office", "Reader", "Chrome", "Java", "Firefox", "Toolbox", "SDK")


def _software(rng: random.Random, i: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": f"{rng.choice(_PRODUCTS)} {rng.randint(2005, 2025)} x{rng.choice((64, 86))} ({i})",
        "version": f"{rng.randint(1, 30)}.{rng.randint(0, 99)}.{rng.randint(0, 99999)}",
        "publisher": rng.choice(_PUBLISHERS),
        "install_date": f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }
    if i % 50 == 0:
        entry["uninstall_string"] = f"MsiExec.exe /X{{{uuid.UUID(int=rng.getrandbits(128))}}}"  # not declared: dropped
    return entry


def scan_document(software_entries: int, *, scan_id: str | None = None, seed: int = 0) -> dict[str, Any]:
    """A scan with ``software_entries`` software items and a few undeclared keys (SCAN_UNKNOWN_KEYS)."""
    rng = random.Random(seed)
    doc: dict[str, Any] = {
        "scanned_at": "2025-01-15T10:30:00Z",
        "agent_version": "7.1.0",
        "asset": {
            "name": "WS-0042",
            "domain": "corp.example.com",
            "type": "Windows",
            "manufacturer": "Dell Inc.",
            "model": "OptiPlex 7090",
            "serial_number": "5CG1234XYZ",
            "ip_address": "10.1.2.3",
            "mac_address": "00:1A:2B:3C:4D:5E",
            "last_user": "CORP\\jdoe",
            "owner_phone": "+1 555 0100",  # not declared: dropped
        },
        "os": {
            "name": "Windows 11 Pro",
            "version": "23H2",
            "build": "22631.3007",
            "architecture": "x64",
            "install_date": "2023-11-02",
        },
        "hardware": {"processor": "Intel(R) Core(TM) i7-11700", "cores": 8, "memory_mb": 32768, "bios_version": "1.14.0"},
        "disks": [
            {"name": f"{d}:", "size_gb": 512, "free_gb": rng.randint(10, 400), "filesystem": "NTFS"} for d in "CDE"
        ],
        "software": [_software(rng, i) for i in range(software_entries)],
        "network": [
            {"adapter": "Ethernet", "ip_address": "10.1.2.3", "mac_address": "00:1A:2B:3C:4D:5E", "dhcp": True},
            {"adapter": "Wi-Fi", "ip_address": "192.168.1.20", "mac_address": "00:1A:2B:3C:4D:5F", "dhcp": True},
        ],
        "hotfixes": [{"id": f"KB50{rng.randint(10000, 99999)}", "installed_on": "2024-12-10"} for _ in range(20)],
        "services": [
            {"name": f"Service{i}", "state": rng.choice(("Running", "Stopped")), "start_mode": "Auto"} for i in range(30)
        ],
        "custom_inventory": {"rack": "B4"},  # not declared: dropped
    }
    if scan_id is not None:
        doc["scan_id"] = scan_id
    return doc


def scan_document_of_size(target_bytes: int, *, seed: int = 0) -> dict[str, Any]:
    """A scan (without scan_id) whose JSON is about ``target_bytes`` long."""
    base = len(orjson.dumps(scan_document(0, seed=seed)))
    per_entry = len(orjson.dumps(scan_document(100, seed=seed))) - base
    entries = max(0, round((target_bytes - base) * 100 / per_entry))
    return scan_document(entries, seed=seed)


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown


class GzipScanBodies:
    """gzip bodies of one scan document that differ only in ``scan_id``, compressed once.

    Gzip per request would cost the load generator ~0.4 ms of CPU per 50 KiB. The
    document is serialised with ``scan_id`` last; everything before it is deflated
    once (ending in a sync flush, so byte-aligned and not final), and each body
    appends the scan_id tail as a final stored block. The CRC-32 of the constant
    part is kept and extended with the tail. The result is a standard one-member
    gzip stream.
    """

    def __init__(self, doc: dict[str, Any], level: int = 6) -> None:
        if "scan_id" in doc or not doc:
            raise ValueError("give a non-empty document without scan_id")
        self._head = orjson.dumps(doc)[:-1] + b',"scan_id":"'
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._deflated_head = _GZIP_HEADER + deflate.compress(self._head) + deflate.flush(zlib.Z_SYNC_FLUSH)
        self._crc = zlib.crc32(self._head)
        self.decoded_size = len(self._head) + len(str(uuid.UUID(int=0))) + 2
        self.wire_size = len(self.body(str(uuid.UUID(int=0))))

    def body(self, scan_id: str) -> bytes:
        tail = scan_id.encode() + b'"}'
        size = len(tail)
        stored_final = b"\x01" + struct.pack("<HH", size, size ^ 0xFFFF) + tail
        trailer = struct.pack("<II", zlib.crc32(tail, self._crc), (len(self._head) + size) & 0xFFFFFFFF)
        return self._deflated_head + stored_final + trailer


def fifty_kib_scans() -> GzipScanBodies:
    """Bodies of the 50 KiB scan of the scan figures, gzip-compressed."""
    return GzipScanBodies(scan_document_of_size(SCAN_SIZE_BYTES))
