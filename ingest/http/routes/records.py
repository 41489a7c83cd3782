"""POST /v1/records/{category}: every category a policy file declares beyond the built-in ones.

The rules of heartbeats and scans (CONTRACT.md sections 2-5, 11): an installation token; the
category must be declared (404 otherwise); a restricted installation is refused (403) before its
body is read; the body is read within the category's limits (a category sealed whole has the scan
limits, the others the heartbeat limit), inflated within the decoded limit and the JSON value
budget, parsed, filtered at every depth (undeclared fields dropped and reported, or 422 in reject
mode), each field put in its declared storage form (`ingest.pipeline.records`), group-committed
(the writer checks restriction and erasure again, locked) and answered only after the commit:
201 stored, 200 when the same idempotency key and content were stored already, 409 same key,
other content. A large body is prepared on the scans' worker threads, holding one of their slots.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hmac
import uuid

from aiohttp import web

from crypto.datakeys import epoch_end, new_wrapped_hash_key, hash_key_context
from ingest import deadline
from ingest.errors import Conflict
from ingest.http.body import check_content_type, content_encoding, decode, parse_object, read_raw
from ingest.http.net import anonymised_text, client_ip
from ingest.http.routes import json_response, refuse_unless_written
from ingest.keys import (
    AUTH,
    DATA_KEYS,
    KEYRING,
    KEYSTORE_POOL,
    METRICS,
    POLICY,
    POOL,
    RECORD_WRITER,
    RESTRICTIONS,
    SCAN_PREPARE,
    SCAN_SLOTS,
    SETTINGS,
)
from ingest.pipeline.batching import GroupCommitWriter
from ingest.pipeline.records import RecordCategory
from policy import Policy
from policy.categories import file_categories
from storage import keystore
from storage import records as record_store

# A body up to this size (on the wire) is prepared on the event loop; a larger one on a worker thread.
INLINE_BYTES = 64 * 1024
RECORD_BATCH_BYTES = 2 << 20  # bytes per batch (at most batch_max_bytes): short transactions
RECORD_QUEUE_BYTES = 64 << 20  # bytes waiting for commit per worker before 503


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


class HashKeys:
    """Each category's hash key, unwrapped, made in the key store on first use and cached for the worker's life."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._keys: dict[str, bytes] = {}
        self._lock = asyncio.Lock()

    async def get(self, category: str) -> bytes:
        key = self._keys.get(category)
        if key is not None:
            return key
        async with self._lock:
            if category not in self._keys:
                ring = self._app[KEYRING]
                kek_id, wrapped = new_wrapped_hash_key(ring, category)
                async with deadline.connection(self._app, pool=KEYSTORE_POOL) as ks:
                    kek_id, wrapped = await keystore.hash_key(ks, category, kek_id, wrapped)
                self._keys[category] = ring.unwrap(kek_id, wrapped, hash_key_context(category))
        return self._keys[category]


class Records:
    """POST /v1/records/{category}."""

    def __init__(self, app: web.Application, policy: Policy) -> None:
        self.app = app
        self.settings = app[SETTINGS]
        self.categories = {c.name: RecordCategory(c) for c in file_categories(policy)}
        self.hash_keys = HashKeys(app)
        metrics = app[METRICS]
        self.wire_bytes = {name: metrics.request_bytes.labels(f"/v1/records/{name}", "wire") for name in self.categories}
        self.decoded_bytes = {name: metrics.request_bytes.labels(f"/v1/records/{name}", "decoded") for name in self.categories}
        self.dropped = {name: metrics.fields_dropped.labels(name) for name in self.categories}

    async def handle(self, rc: RecordCategory, request: web.Request) -> web.Response:
        app, s = self.app, self.settings
        c = rc.category
        principal = await app[AUTH].authenticate(request, "installation")
        install_id = principal.install_id
        app[RESTRICTIONS].check(install_id)  # before the body is read; the writer checks again, locked
        check_content_type(request)
        encoding = content_encoding(request)
        limit, decoded_limit = ((s.scan_max_bytes, s.scan_max_decoded_bytes) if rc.sealed_whole
                                else (s.heartbeat_max_bytes, s.heartbeat_max_bytes))
        with deadline.not_counted():
            raw = await read_raw(request, limit, s.read_timeout)
        self.wire_bytes[c.name].inc(len(raw))
        received_at = dt.datetime.now(dt.timezone.utc)
        key = None
        if rc.sealed_whole:
            hours = c.retention_hours
            if c.retention_setting is not None:
                async with deadline.connection(app) as conn:
                    hours = min(await record_store.retention_hours(conn, install_id, c.name) or hours, hours)
            # Sealed under the key of the retention epoch it will expire in: destroyed when the epoch ends.
            key = await app[DATA_KEYS].for_expiry(install_id, received_at + dt.timedelta(hours=hours))
        elif rc.needs_record_key:
            key = await app[DATA_KEYS].current(install_id)
        hash_key = await self.hash_keys.get(c.name) if rc.needs_hash_key else None
        peer = anonymised_text(client_ip(request, s.trusted_proxies)) if rc.peer_fields else None
        prepare = functools.partial(self.prepare, rc, raw, encoding, install_id, peer, hash_key, key)
        if len(raw) <= INLINE_BYTES:
            prepared = prepare()
        else:
            with deadline.not_counted():  # waiting for a slot and CPU time, not the database's
                async with app[SCAN_SLOTS].hold(principal.token_id):
                    prepared = await asyncio.get_running_loop().run_in_executor(app[SCAN_PREPARE], prepare)
        del raw, prepare
        if prepared.dropped:
            self.dropped[c.name].inc(len(prepared.dropped))
        row = record_store.RecordRow(
            c.name, install_id, prepared.record_id, received_at, c.retention_hours, prepared.fields, prepared.sealed,
            None if prepared.sealed is None else key.key_id, epoch_end(key.key_id) if rc.sealed_whole else None,
            prepared.content_mac, rc.current, principal.token_id,
        )
        outcome = await app[RECORD_WRITER].submit(row, len(prepared.fields) + len(prepared.sealed or b""))
        refuse_unless_written(outcome.status)
        body = {"record_id": prepared.record_id, "expires_at": rfc3339(outcome.expires_at) if outcome.expires_at else None,
                "dropped_fields": prepared.dropped}
        if outcome.status == record_store.STORED:
            if rc.sealed_whole:
                app[DATA_KEYS].note_expiry(install_id, key.key_id, outcome.expires_at)
            return json_response(body, status=201)
        if prepared.content_mac is None or outcome.content_mac is None or \
                not hmac.compare_digest(prepared.content_mac, outcome.content_mac):
            raise Conflict(f"this {c.idempotency_key} was already stored with other content")
        return json_response(body)

    def prepare(self, rc: RecordCategory, raw: bytes, encoding: str, install_id: uuid.UUID, peer: str | None,
                hash_key: bytes | None, key):
        """Inflate within limits and the value budget, parse, filter, split, hash and seal (CPU only)."""
        s = self.settings
        decoded_limit = s.scan_max_decoded_bytes if rc.sealed_whole else s.heartbeat_max_bytes
        data = decode(raw, encoding, decoded_limit, max_values=s.json_max_values, max_depth=s.json_max_depth)
        self.decoded_bytes[rc.name].inc(len(data))
        doc = parse_object(data)
        del data
        return rc.prepare(doc, install_id, reject=s.unknown_fields == "reject", peer_prefix=peer, hash_key=hash_key, key=key)


async def record_writer_ctx(app: web.Application):
    """cleanup_ctx: the records' group-commit writer, apart from the heartbeats' and the scans'."""
    s = app[SETTINGS]
    writer: GroupCommitWriter[record_store.RecordRow] = GroupCommitWriter(
        "records", app[POOL], record_store.write_records, app[METRICS],
        max_queue=s.queue_size, max_rows=s.batch_max_rows, max_bytes=min(s.batch_max_bytes, RECORD_BATCH_BYTES),
        max_queue_bytes=RECORD_QUEUE_BYTES, retry_after=s.retry_after, timeout=s.db_timeout,
    )
    writer.start()
    app[RECORD_WRITER] = writer
    yield
    await writer.close()


def setup(app: web.Application) -> None:
    """Add POST /v1/records/<name> for each category of the policy in force's own, and their writer.

    One route per category, as /openapi.json documents them; any other /v1/records/... is a 404."""
    policy = app[POLICY]
    if not file_categories(policy):
        return
    app.cleanup_ctx.append(record_writer_ctx)
    records = Records(app, policy)
    for name, rc in records.categories.items():
        app.router.add_post(f"/v1/records/{name}", functools.partial(records.handle, rc))
