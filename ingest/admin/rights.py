"""Data subject rights, shared by the admin routes and the command line: export (access) and erasure.

The export document (JSON, one object, written as a stream)::

    {"format": "telemetry-ingest export 1",
     "install_id": "...", "exported_at": "...",
     "installation": {current record, "email" decrypted, "ip_prefix" as stored},
     "heartbeats": [history, oldest first],
     "agents": [{"agent_id", "name", "created_at", "revoked_at"}],
     "tokens": [{"token_id", "role", "agent_id", "created_at", "revoked_at"}],   (handles only, never a hash)
     "scans": [{"scan_id", "agent_id", "received_at", "expires_at", "scan": {decrypted document}}],
     "records": [{"category", "record_id", "received_at", "expires_at", "record": {...}}],
     "audit": [{"at", "action"}]}

"records" holds the records of every category of the policy file (POST /v1/records/{category}),
unexpired, by category then receipt: the clear fields as stored (a keyed-hash value as its hash,
an anonymised address as its prefix) with the encrypted ones decrypted and put back in place; a
category sealed whole, its record decrypted. A not-stored field is not there: it never was.

A record that cannot be decrypted is listed with its value null and "unreadable": true.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from crypto.datakeys import wrap_context
from crypto.documents import open_document_json
from crypto.envelope import DataKey, key_id_of, open_
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing
from ingest.pipeline.records import open_record
from ingest.pipeline.sealed import email_context, scan_context
from ingest.worker.background import POLL_INTERVAL
from policy.categories import DEFAULT_HEARTBEAT_RETENTION_DAYS
from storage import admin, keystore
from storage import records as record_store
from storage import scans as scan_store
from storage.audit import record

log = logging.getLogger(__name__)

EXPORT_FORMAT = "telemetry-ingest export 1"
CHUNK = 64 * 1024
SCAN_PREFETCH = 4
OFFLOAD_BYTES = 1 << 20


def _default(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network, uuid.UUID)):
        return str(value)  # asyncpg's UUID is a subclass orjson does not take
    raise TypeError


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_UTC_Z)


class Export:
    """One installation's export, read from a single snapshot: call `start` inside a repeatable-read transaction."""

    def __init__(self, conn, install_id: uuid.UUID, head: bytes, keys: dict[int, DataKey], history_days: int) -> None:
        self._conn = conn
        self._history_days = history_days
        self.install_id = install_id
        self._head = head
        self._keys = keys

    @classmethod
    async def start(cls, conn, ks, ring: KeyRing, install_id: uuid.UUID,
                    history_days: int = DEFAULT_HEARTBEAT_RETENTION_DAYS) -> "Export | None":
        """Read the current record and unwrap the data keys from the key store `ks`; None if the
        installation is unknown or being erased."""
        row = await admin.exportable(conn, install_id)
        if row is None:
            return None
        keys = {}
        for r in await keystore.keys_of(ks, install_id):
            raw = ring.unwrap(r["kek_id"], bytes(r["wrapped"]), wrap_context(install_id, r["key_id"]))
            keys[r["key_id"]] = DataKey.from_bytes(r["key_id"], raw)
        current = dict(row)
        email_ct = current.pop("email_ct")
        current["email"] = None
        if email_ct is not None:
            ct = bytes(email_ct)
            plain = _open(keys, ct, lambda key: open_(key, ct, email_context(install_id)))
            if plain is None:
                current["email_unreadable"] = True
            else:
                current["email"] = plain.decode()
        head = {
            "format": EXPORT_FORMAT,
            "install_id": install_id,
            "exported_at": dt.datetime.now(dt.timezone.utc),
            "installation": current,
        }
        return cls(conn, install_id, _dumps(head)[:-1], keys, history_days)  # the head object, left open

    async def chunks(self) -> AsyncIterator[bytes]:
        """The document in pieces of about CHUNK bytes; memory stays bounded by the largest single record."""
        conn, install_id = self._conn, self.install_id
        buf = bytearray(self._head)
        sections = (
            ("heartbeats", self._rows(admin.heartbeat_history(conn, install_id, self._history_days))),
            ("agents", self._rows(admin.agents_of(conn, install_id))),
            ("tokens", self._rows(admin.tokens_of(conn, install_id))),
            ("scans", self._scans()),
            ("records", self._records()),
            ("audit", self._rows(admin.audit_of(conn, install_id))),
        )
        for name, pieces in sections:
            buf += b',"' + name.encode() + b'":['
            first = True
            async for piece in pieces:
                if not first:
                    buf += b","
                first = False
                buf += piece
                if len(buf) >= CHUNK:
                    yield bytes(buf)
                    buf.clear()
            buf += b"]"
        buf += b"}"
        yield bytes(buf)

    @staticmethod
    async def _rows(cursor) -> AsyncIterator[bytes]:
        """Each row of a server-side cursor as a JSON object."""
        async for r in cursor:
            yield _dumps(dict(r))

    async def _scans(self) -> AsyncIterator[bytes]:
        """Each unexpired scan as JSON, its document decrypted (spliced in as stored: canonical JSON)."""
        install_id = self.install_id
        # A sealed scan can be megabytes: fetch few at a time, so memory stays bounded by a few scans.
        async for r in scan_store.scan_history(self._conn, install_id, prefetch=SCAN_PREFETCH):
            meta = {"scan_id": r["scan_id"], "agent_id": r["agent_id"], "received_at": r["received_at"], "expires_at": r["expires_at"]}
            ciphertext = bytes(r["ciphertext"])
            context = scan_context(install_id, r["scan_id"])

            def opener(key: DataKey, ciphertext=ciphertext, context=context) -> bytes:
                return open_document_json(key, ciphertext, context)

            yield await self._with_opened(meta, "scan", ciphertext, opener, unreadable=None)

    async def _with_opened(self, meta: dict, name: str, ciphertext: bytes, opener: Callable[[DataKey], bytes],
                           *, unreadable: Any) -> bytes:
        """meta as JSON with meta[name] the opened value spliced in as it opened (JSON), or, when no key
        this node holds opens it, `unreadable` and "unreadable": true."""
        plain = await self._opened(ciphertext, opener)
        if plain is None:
            meta[name] = unreadable
            meta["unreadable"] = True
        else:
            meta[name] = orjson.Fragment(plain)
        return _dumps(meta)

    async def _opened(self, ciphertext: bytes, opener: Callable[[DataKey], bytes]) -> bytes | None:
        """_open(...) of one sealed value; megabytes to decrypt and inflate go to a thread, not the event loop."""
        if len(ciphertext) >= OFFLOAD_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, _open, self._keys, ciphertext, opener)
        return _open(self._keys, ciphertext, opener)

    async def _records(self) -> AsyncIterator[bytes]:
        """Each unexpired record of the file's categories as JSON, its sealed part opened (a few fetched at a time)."""
        install_id = self.install_id
        async for r in record_store.records_of(self._conn, install_id, prefetch=SCAN_PREFETCH):
            meta = {"category": r["category"], "record_id": r["record_id"], "received_at": r["received_at"],
                    "expires_at": r["expires_at"]}
            fields = orjson.loads(r["fields"])
            if r["sealed"] is None:
                meta["record"] = fields
                yield _dumps(meta)
                continue
            sealed = bytes(r["sealed"])

            def opener(key: DataKey, sealed=sealed, fields=fields, name=r["category"], record_id=r["record_id"]) -> bytes:
                return _dumps(open_record(name, None, install_id, record_id, fields, sealed, key))

            yield await self._with_opened(meta, "record", sealed, opener, unreadable=fields)


def _open(keys: dict[int, DataKey], ciphertext: bytes, opener: Callable[[DataKey], bytes]) -> bytes | None:
    """opener(the data key the ciphertext names), or None if this record cannot be decrypted (logged without detail)."""
    try:
        key = keys.get(key_id_of(ciphertext))
        if key is None:
            raise DecryptionError()
        return opener(key)
    except DecryptionError:
        log.warning("export: a record could not be decrypted")
        return None


async def audit_export(conn, install_id: uuid.UUID, actor: str) -> bool:
    """Record the export before any data leaves; False if there is nothing to export."""
    async with conn.transaction():
        if await admin.exportable(conn, install_id) is None:
            return False
        await record(conn, actor, "installation.export", install_id)
    return True


async def write_export(conn, ks, ring: KeyRing, install_id: uuid.UUID, actor: str,
                       begin: Callable[[], Awaitable[Any]], write: Callable[[bytes], Awaitable[Any]],
                       history_days: int = DEFAULT_HEARTBEAT_RETENTION_DAYS) -> bool:
    """Audit, then stream the export: `begin()` once the document is known to exist, `write(chunk)` per piece.

    False (and nothing written) if the installation is unknown or being erased.
    """
    if not await audit_export(conn, install_id, actor):
        return False
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        export = await Export.start(conn, ks, ring, install_id, history_days)
        if export is None:
            return False
        await begin()
        async for chunk in export.chunks():
            await write(chunk)
    return True


# ---------------------------------------------------------------- erasure

# Token rows keep their install_id this long after revocation, so that every worker's
# revocation follower (polling every ingest.http.auth.POLL_INTERVAL) learns which
# installation's cached data keys to drop before the id is removed from them.
UNLINK_GRACE = 4 * POLL_INTERVAL


async def begin_erasure(conn, ks, install_id: uuid.UUID, actor: str) -> str | None:
    """Erasure's first steps, in this order: the key store destroys the keys and writes the
    tombstone, then the data database revokes the tokens and marks the installation erasing.
    'started' or 'resumed'; None if the data database has no such installation (nothing done)."""
    if await admin.erasure_state(conn, install_id) == "gone":
        return None
    destroyed = await keystore.destroy_installation(ks, install_id)
    return await admin.begin_erasure(conn, install_id, actor, keys_destroyed=destroyed)


async def destroy_leftover_keys(conn, ks, install_id: uuid.UUID, actor: str) -> int | None:
    """An installation the data database no longer has but whose keys the key store holds (a key
    store restored from a backup older than its erasure): destroy the keys, write the tombstone,
    audit it; the number of keys destroyed, or None if the store has none of it."""
    if not await keystore.holds_keys_of(ks, install_id):
        return None
    destroyed = await keystore.destroy_installation(ks, install_id)
    await record(conn, actor, "installation.erase", install_id, {"keys_destroyed": destroyed, "reason": "leftover keys"})
    return destroyed


async def finish_erasure(conn, install_id: uuid.UUID, actor: str, *, grace: float = UNLINK_GRACE) -> bool:
    """After begin_erasure: delete the rows in batches, unlink the id, drop the row.

    Safe to call again after a crash at any point; False if a live installation holds the id.
    """
    if await admin.erasure_state(conn, install_id) == "live":
        return False
    rows = await admin.delete_rows(conn, install_id)
    since = await admin.seconds_since_revocation(conn, install_id)
    if since is not None and since < grace:
        await asyncio.sleep(grace - since)
    return await admin.unlink(conn, install_id, actor, rows)
