"""Sealed values: the sealing contexts of an e-mail and a scan, and stored scans read back for the export and tests.

Like every read of scans, these never return an expired scan (storage.scans filters
``expires_at > now()``).
"""

from __future__ import annotations

import hashlib
import hmac
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
from crypto.envelope import DataKey, seal
from storage import scans as scan_store
from storage.scans import StoredScan


def email_context(install_id: uuid.UUID) -> bytes:
    """Associated data of an installation's sealed e-mail."""
    return install_id.bytes + b"installation.email"


class RepeatedSeals:
    """An installation's sealed e-mail, handed out again while its e-mail and data key stay the same.

    The database leaves a current record alone when a heartbeat repeats it (data migration 0017),
    and compares the sealed e-mail as bytes: sealing afresh (a new random nonce) would make every
    heartbeat a change. So each worker keeps, per installation, the data key id, a digest of the
    e-mail and its ciphertext from the last heartbeat it sealed; the same e-mail under the same key
    gets that ciphertext again, anything else is sealed anew. The digest is keyed with the data
    key's MAC key (it dies with the key, as the ciphertext does): no e-mail is kept in plaintext.
    Bounded: past max_entries the oldest entry goes (12 to 23 MiB when full). Different workers seal the
    same e-mail differently, so an installation whose heartbeats reach several workers rewrites its record.
    """

    def __init__(self, max_entries: int = 50_000) -> None:  # as many installations as the data-key cache
        self._max = max_entries
        self._last: dict[uuid.UUID, tuple[int, bytes, bytes]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, install_id: uuid.UUID) -> bool:
        return install_id in self._last

    def forget(self, install_id: uuid.UUID) -> None:
        """Drop an installation's entry (its tokens were revoked: erased, or about to be)."""
        self._last.pop(install_id, None)

    def seal(self, key: DataKey, install_id: uuid.UUID, email: str) -> tuple[bytes, bool]:
        """The sealed e-mail (crypto.envelope.seal with email_context), and whether it was sealed now
        (False: handed out again; no use of the key to count)."""
        plaintext = email.encode()
        digest = hashlib.blake2b(plaintext, key=key.mac_key, digest_size=16, person=b"ti-email-seal").digest()
        last = self._last.get(install_id)
        if last is not None and last[0] == key.key_id and hmac.compare_digest(last[1], digest):
            return last[2], False
        sealed = seal(key, plaintext, email_context(install_id))
        if last is None and len(self._last) >= self._max:
            del self._last[next(iter(self._last))]
        self._last[install_id] = (key.key_id, digest, sealed)
        return sealed, True


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
