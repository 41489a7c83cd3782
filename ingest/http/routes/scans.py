"""Agents, an installation's scan settings, and scan uploads (CONTRACT.md sections 2, 4 and 5).

A scan upload: authenticate the agent, refuse it if its installation is restricted
(from the cached restriction set, before reading the body), read the body within the
wire limit, then on a worker thread, holding one of a few prepare slots: inflate
(within the decoded limit, counting JSON values and depth as it inflates), parse,
filter by the policy, serialise canonically, hash with the installation's key and
seal; group-commit (the writer checks restriction again, locked); answer after the
commit. The sealed row holds nothing else of the document in the clear.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hmac
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from aiohttp import web

from crypto.datakeys import epoch_end
from crypto.documents import canonical, content_digest, content_mac, seal_document
from crypto.envelope import DataKey
from crypto.tokens import new_token
from ingest import deadline
from ingest.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFoundProblem,
    QuotaExceeded,
    Unauthorized,
)
from ingest.http.body import (
    check_content_type,
    content_encoding,
    decode,
    parse_object,
    read_json,
    read_raw,
)
from ingest.http.routes import json_response, refuse_unless_written
from ingest.http.slots import PrepareSlots
from ingest.keys import (
    AUTH,
    DATA_KEYS,
    METRICS,
    POLICY,
    POOL,
    RESTRICTIONS,
    SCAN_PREPARE,
    SCAN_RETENTION,
    SCAN_SLOTS,
    SCAN_WRITER,
    SETTINGS,
)
from ingest.pipeline.batching import GroupCommitWriter
from ingest.pipeline.filter import Allowlist
from ingest.pipeline.sealed import scan_context
from policy import Field, Policy
from policy.categories import AGENT_REGISTRATION, SCAN, declares
from storage import agents as agent_store
from storage import records as record_store
from storage import scans as scan_store
from storage.errors import NotFound, QuotaReached

SMALL_BODY = 64 * 1024  # agent registration and settings bodies
SCAN_BATCH_BYTES = 2 << 20  # sealed bytes per scan batch (at most batch_max_bytes): short transactions
SCAN_QUEUE_BYTES = 64 << 20  # sealed bytes waiting for commit per worker before 503
# Every scan is inflated, parsed, filtered and sealed on a worker thread, so the event loop keeps
# answering heartbeats meanwhile, whatever a body's size on the wire says about its size decoded.
# Threads per worker process preparing scans: also bounds the memory of parsed documents. A scan
# waits up to PREPARE_WAIT seconds for one of them (503 after), and one token holds at most
# PREPARE_PER_TOKEN of them at once.
PREPARE_THREADS = 2
PREPARE_PER_TOKEN = 1
PREPARE_WAIT = 2.0

# The scan writer: one flusher that lingers 5 ms after a batch's first scan. Scans reach it one at
# a time (as their preparations end), and a flush takes about a millisecond, so without lingering
# a batch held 1.7 scans and each scan paid most of a commit and of the worker's wake-up after it.
# Lingering 5 ms: 6.5 scans a batch, 14 % less of the worker's CPU and 57 % less of PostgreSQL's per
# scan, 15 % more scans/s on one worker, heartbeats to the same worker unhurt (issue 16, eleventh
# round in benchmarks/README.md); a scan's answer comes at most 5 ms later.
SCAN_FLUSHERS = 1
SCAN_LINGER = 0.005

# How long a worker trusts its copy of an installation's scan retention. It picks the epoch key a
# scan is sealed under; a change made on another worker is seen within this long (until then a
# shortened retention seals under a later epoch's key, which outlives the scan a little longer,
# and a lengthened one lets the scan expire with the earlier epoch's key).
RETENTION_TTL = 10.0

# Retry-After of a quota's 429: an hour. Retrying sooner cannot help (an agent must be deleted, or
# stored scans expire, which the usage counts by day); longer than the reference client's
# max_retry_after (300 s), so it stops and keeps the record spooled instead of retrying.
QUOTA_RETRY_AFTER = 3600

_AGENT = Allowlist(AGENT_REGISTRATION)
_ABSENT = object()


def rfc3339(t: dt.datetime) -> str:
    """A UTC time as RFC 3339 with a Z (microseconds kept, so a stored time reads back the same)."""
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------ agents and settings


async def create_agent(request: web.Request) -> web.Response:
    """POST /v1/agents: an installation registers an agent and gets its token (shown once)."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "installation")
    with deadline.not_counted():
        doc, _, _ = await read_json(request, limit=SMALL_BODY, decoded_limit=SMALL_BODY)
    kept, _ = _AGENT.filter_document(doc)  # nothing else of this body is stored, so extras are ignored
    agent_id = uuid.uuid4()
    token_id, token, token_hash = new_token("agent")
    limit = app[SETTINGS].agents_per_installation
    try:
        async with deadline.connection(app) as conn:
            await agent_store.create(conn, principal.install_id, agent_id, kept["name"], token_id=token_id, token_hash=token_hash,
                                     max_agents=limit)
    except NotFound:
        raise Unauthorized("this installation no longer exists") from None
    except QuotaReached:
        raise QuotaExceeded("agents_per_installation", limit,
                            f"quota agents_per_installation ({limit}) reached: delete an agent first",
                            retry_after=QUOTA_RETRY_AFTER) from None
    app[AUTH].created(token_hash)
    return json_response({"agent_id": str(agent_id), "token": token}, status=201)


async def delete_agent(request: web.Request) -> web.Response:
    """DELETE /v1/agents/{agent_id}: revoke the agent; its token stops working at once (404 if not this installation's)."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "installation")
    try:
        agent_id = uuid.UUID(request.match_info["agent_id"])
    except ValueError:
        raise NotFoundProblem("no such agent") from None
    try:
        async with deadline.connection(app) as conn:
            await agent_store.revoke(conn, principal.install_id, agent_id)
    except NotFound:
        raise NotFoundProblem("no such agent") from None
    # This worker forgets the token now; the others follow the revocation log within POLL_INTERVAL.
    await app[AUTH].poll_revocations()
    return web.Response(status=204)


def settings_body(policy: Policy) -> Field:
    """The body of PUT /v1/installation/settings: one `<category>_retention_hours` per category the policy lets
    installations shorten (Policy.settings_field); with several, each is optional and at least one is sent."""
    body = policy.settings_field()
    if len(body.fields) <= 1:
        return body
    return Field(body.name, "object", fields=tuple(dataclasses.replace(f, required=False) for f in body.fields))


class InstallationSettings:
    """PUT /v1/installation/settings: set retentions; stored records' expiry moves earlier, never later."""

    def __init__(self, app: web.Application, policy: Policy) -> None:
        self.body = settings_body(policy)
        self.filter = Allowlist(self.body)
        # setting name -> category; the built-in scan category keeps its retention on the installation's row
        self.categories = {c.retention_setting: c for c in policy.categories if c.retention_setting is not None}

    async def handle(self, request: web.Request) -> web.Response:
        app = request.app
        principal = await app[AUTH].authenticate(request, "installation")
        with deadline.not_counted():
            doc, _, _ = await read_json(request, limit=SMALL_BODY, decoded_limit=SMALL_BODY)
        kept, _ = self.filter.filter_document(doc)
        if not kept:
            raise Invalid(f"send one of: {', '.join(self.categories) or '(no category may be shortened)'}")
        answer: dict[str, int] = {}
        async with deadline.connection(app) as conn:
            for setting, hours in kept.items():
                category = self.categories[setting]
                if category.name == SCAN.name:
                    now = await scan_store.set_retention(conn, principal.install_id, hours)
                    if now is None:
                        raise Unauthorized("this installation no longer exists")
                    app[SCAN_RETENTION].put(principal.install_id, now)
                    answer[setting] = now
                else:
                    async with conn.transaction():
                        if not await record_store.set_retention(conn, principal.install_id, category.name, hours):
                            raise Unauthorized("this installation no longer exists")
                    answer[setting] = hours
            if len(self.categories) > len(answer):  # the whole settings now in force
                chosen = await record_store.retentions_of(conn, principal.install_id)
                for setting, category in self.categories.items():
                    if setting in answer:
                        continue
                    if category.name == SCAN.name:
                        answer[setting] = await scan_store.retention_of(conn, principal.install_id)
                    else:
                        answer[setting] = chosen.get(category.name, category.retention_hours)
        return json_response(answer)


class Retentions:
    """Each installation's scan retention, as this worker last read it (at most RETENTION_TTL old)."""

    def __init__(self, app: web.Application, *, max_entries: int = 100_000) -> None:
        self._app = app
        self._max = max_entries
        self._hours: dict[uuid.UUID, tuple[int, float]] = {}

    async def hours(self, install_id: uuid.UUID) -> int:
        """The retention in hours; Unauthorized if the installation is gone."""
        hit = self._hours.get(install_id)
        now = time.monotonic()
        if hit is not None and now - hit[1] < RETENTION_TTL:
            return hit[0]
        async with deadline.connection(self._app) as conn:
            hours = await scan_store.retention_of(conn, install_id)
        if hours is None:
            raise Unauthorized("this installation no longer exists")
        self.put(install_id, hours)
        return hours

    def put(self, install_id: uuid.UUID, hours: int) -> None:
        if len(self._hours) >= self._max:
            self._hours.clear()  # rare and cheap to refill: one small read per installation
        self._hours[install_id] = (hours, time.monotonic())


# ------------------------------------------------------------------ scans


class Sealed(NamedTuple):
    """A scan made ready to store, and what the answer needs."""

    scan_id: uuid.UUID
    dropped: list[str]
    digest: bytes  # of the canonical document, in memory only: to compare a replay under another key
    content_mac: bytes
    ciphertext: bytes
    size_decoded: int
    size_plain: int


class Scans:
    """POST /v1/scans."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.settings = app[SETTINGS]
        self.filter = Allowlist(SCAN.root)
        metrics = app[METRICS]
        self.wire_bytes = metrics.request_bytes.labels("/v1/scans", "wire")
        self.decoded_bytes = metrics.request_bytes.labels("/v1/scans", "decoded")
        self.dropped = metrics.fields_dropped.labels("scan")
        self.encrypt_latency = metrics.encrypt_latency.labels("scan")
        self.received = metrics.scans_received

    async def handle(self, request: web.Request) -> web.Response:
        app, s = self.app, self.settings
        principal = await app[AUTH].authenticate(request, "agent")
        install_id = principal.install_id
        app[RESTRICTIONS].check(install_id)  # before the body is read, let alone inflated
        check_content_type(request)
        encoding = content_encoding(request)
        with deadline.not_counted():  # the client's time, not the database's
            raw = await read_raw(request, s.scan_max_bytes, s.read_timeout)
        size_wire = len(raw)
        self.wire_bytes.inc(size_wire)
        received_at = dt.datetime.now(dt.timezone.utc)
        hours = await app[SCAN_RETENTION].hours(install_id)
        # Sealed under the key of the retention epoch it will expire in: that key is destroyed
        # when the epoch ends, and with it this scan in every copy of the data database.
        key = await app[DATA_KEYS].for_expiry(install_id, received_at + dt.timedelta(hours=hours))
        prepare = functools.partial(self.prepare, raw, encoding, install_id, key)
        with deadline.not_counted():  # waiting for a slot and CPU time, not the database's
            async with app[SCAN_SLOTS].hold(principal.token_id):
                sealed = await asyncio.get_running_loop().run_in_executor(app[SCAN_PREPARE], prepare)
        del raw, prepare
        row = scan_store.ScanRow(
            install_id, principal.agent_id, sealed.scan_id, received_at, key.key_id, epoch_end(key.key_id),
            sealed.content_mac, size_wire, sealed.size_decoded, sealed.size_plain, sealed.ciphertext, principal.token_id,
        )
        outcome = await app[SCAN_WRITER].submit(row, len(sealed.ciphertext))
        refuse_unless_written(outcome.status)
        if outcome.status == scan_store.OVER_QUOTA:
            limit = s.scan_bytes_per_installation
            raise QuotaExceeded("scan_bytes_per_installation", limit,
                                f"quota scan_bytes_per_installation ({limit} sealed bytes of unexpired scans) reached; nothing was stored",
                                retry_after=QUOTA_RETRY_AFTER)
        body = {"scan_id": str(sealed.scan_id), "expires_at": rfc3339(outcome.expires_at), "dropped_fields": sealed.dropped}
        if outcome.status == scan_store.STORED:
            self.received.inc()
            app[DATA_KEYS].note_expiry(install_id, key.key_id, outcome.expires_at)
            return json_response(body, status=201)
        if not await self._same_content(install_id, sealed, key, outcome):
            raise Conflict("this scan_id was already stored with other content")
        return json_response(body)

    def prepare(self, raw: bytes, encoding: str, install_id: uuid.UUID, key: DataKey) -> Sealed:
        """Inflate, parse, filter, serialise, hash and seal (CPU only: may run on a worker thread)."""
        s = self.settings
        data = decode(raw, encoding, s.scan_max_decoded_bytes, max_values=s.json_max_values, max_depth=s.json_max_depth)
        size_decoded = len(data)
        self.decoded_bytes.inc(size_decoded)
        doc = parse_object(data)
        del data
        _check_claimed_installation(doc, install_id)
        kept, dropped = self.filter.filter_document(doc)
        if dropped:
            if s.unknown_fields == "reject":
                raise Invalid(f"undeclared fields: {', '.join(dropped)}")
            self.dropped.inc(len(dropped))
        scan_id = uuid.UUID(kept["scan_id"])
        plain = canonical(kept)
        del doc, kept
        context = scan_context(install_id, scan_id)
        digest = content_digest(plain)
        started = time.perf_counter()
        ciphertext = seal_document(key, plain, context)
        self.encrypt_latency.observe(time.perf_counter() - started)
        return Sealed(scan_id, dropped, digest, content_mac(key, context, digest), ciphertext, size_decoded, len(plain))

    async def _same_content(self, install_id: uuid.UUID, sealed: Sealed, key: DataKey, outcome: scan_store.ScanOutcome) -> bool:
        """Whether a stored scan's content MAC is this upload's (recomputed under its key if that differs)."""
        if outcome.key_id != key.key_id:
            key = await self.app[DATA_KEYS].get(install_id, outcome.key_id)
        mine = content_mac(key, scan_context(install_id, sealed.scan_id), sealed.digest)
        return hmac.compare_digest(mine, outcome.content_mac)


def _check_claimed_installation(doc: dict[str, Any], install_id: uuid.UUID) -> None:
    """A scan names no installation (the token does); if its body does anyway, it must be the token's (else 403).

    The key is taken out before filtering: it is understood, not stored from the body, and not reported as dropped.
    """
    claimed = doc.pop("install_id", _ABSENT)
    if claimed is _ABSENT:
        return
    try:
        if type(claimed) is not str or len(claimed) > 36:
            raise ValueError
        claimed = uuid.UUID(claimed)
    except ValueError:
        raise Invalid("install_id: must be a UUID string") from None
    if claimed != install_id:
        raise Forbidden("install_id is not this token's installation")


async def scan_writer_ctx(app: web.Application):
    """cleanup_ctx: the threads that prepare scans (and the slots that bound how many wait for them), and the
    scan group-commit writer, apart from the heartbeats' so large scans never queue before them."""
    s = app[SETTINGS]
    executor = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="scan-prepare")
    app[SCAN_PREPARE] = executor
    app[SCAN_SLOTS] = PrepareSlots(PREPARE_THREADS, PREPARE_PER_TOKEN, PREPARE_WAIT, s.retry_after)
    batch_bytes = min(s.batch_max_bytes, SCAN_BATCH_BYTES)
    writer: GroupCommitWriter[scan_store.ScanRow] = GroupCommitWriter(
        "scan", app[POOL], functools.partial(scan_store.write_scans, max_bytes=s.scan_bytes_per_installation), app[METRICS],
        max_queue=s.queue_size, max_rows=s.batch_max_rows, max_bytes=batch_bytes,
        max_queue_bytes=SCAN_QUEUE_BYTES, retry_after=s.retry_after, timeout=s.db_timeout,
        flushers=SCAN_FLUSHERS, linger=SCAN_LINGER,
    )
    writer.start()
    app[SCAN_WRITER] = writer
    app[SCAN_RETENTION] = Retentions(app)
    yield
    await writer.close()
    executor.shutdown(wait=False, cancel_futures=True)  # requests are answered by now; nothing waits on these


def setup(app: web.Application) -> None:
    """Add the agent, settings and scan routes, and the scan writer (after the other writers, so it drains first).

    Each as the policy in force says: /v1/agents only with its `[agents]` table, /v1/scans only if it declares
    the built-in scan category (the prepare threads serve the records path's large bodies too, so they stay)."""
    policy = app[POLICY]
    app.cleanup_ctx.append(scan_writer_ctx)
    if policy.agents is not None:
        app.router.add_post("/v1/agents", create_agent)
        app.router.add_delete("/v1/agents/{agent_id}", delete_agent)
    app.router.add_put("/v1/installation/settings", InstallationSettings(app, policy).handle)
    if declares(policy, SCAN):
        app.router.add_post("/v1/scans", Scans(app).handle)
