"""Sealed values: the sealing contexts of an e-mail and a scan, and stored scans read back for the export and tests.

Like every read of scans, these never return an expired scan (storage.scans filters
``expires_at > now()``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from crypto.datakeys import DataKeyCache
from crypto.documents import (
    DOCUMENT_FORMAT,
    document_context,
    open_document,
    open_document_json,
)
from storage import scans as scan_store
from storage.scans import StoredScan


def email_context(install_id: uuid.UUID) -> bytes:
    """Associated data of an installation's sealed e-mail."""
    return install_id.bytes + b"installation.email"


def scan_context(install_id: uuid.UUID, scan_id: uuid.UUID, fmt: int = DOCUMENT_FORMAT) -> bytes:
    """Associated data of a sealed scan: installation, kind, scan_id and payload format."""
    return document_context(install_id, b"scan", scan_id, fmt)


async def decrypt_scan(data_keys: DataKeyCache, scan: StoredScan) -> dict[str, Any]:
    """The filtered document of a stored scan; crypto.errors.DecryptionError if it does not open where it lies."""
    key = await data_keys.get(scan.install_id, scan.key_id)
    return open_document(key, bytes(scan.ciphertext), scan_context(scan.install_id, scan.scan_id))


async def decrypt_scan_json(data_keys: DataKeyCache, scan: StoredScan) -> bytes:
    """The same as canonical JSON bytes (for streaming it out without re-serialising, e.g. orjson.Fragment)."""
    key = await data_keys.get(scan.install_id, scan.key_id)
    return open_document_json(key, bytes(scan.ciphertext), scan_context(scan.install_id, scan.scan_id))


async def read_scan(conn, data_keys: DataKeyCache, install_id: uuid.UUID, scan_id: uuid.UUID) -> dict[str, Any] | None:
    """The decrypted document of an installation's unexpired scan, or None if there is none."""
    scan = await scan_store.find_scan(conn, install_id, scan_id)
    return None if scan is None else await decrypt_scan(data_keys, scan)


async def read_scans(conn, data_keys: DataKeyCache, install_id: uuid.UUID) -> AsyncIterator[tuple[StoredScan, bytes]]:
    """(stored scan, its document as JSON) for each unexpired scan, oldest first; one transaction, one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for r in scan_store.scan_history(conn, install_id):
            scan = scan_store.stored_scan(r)
            yield scan, await decrypt_scan_json(data_keys, scan)
