"""Enrollment and heartbeats."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import orjson
from aiohttp import web

from crypto.datakeys import wrap_context
from crypto.envelope import new_key_bytes
from crypto.tokens import new_token
from ingest import deadline
from ingest.errors import Conflict, Forbidden, Invalid, Unauthorized
from ingest.http.body import read_json
from ingest.http.net import anonymised_text, client_ip
from ingest.http.routes import json_response, refuse_unless_written
from ingest.keys import (
    AUTH,
    DATA_KEYS,
    EMAIL_SEALS,
    HEARTBEAT_WRITER,
    KEYRING,
    KEYSTORE_POOL,
    METRICS,
    POLICY,
    RESTRICTIONS,
    SETTINGS,
)
from ingest.pipeline.filter import Allowlist
from policy.categories import ENROLLMENT, INSTALLATION, declares
from storage import installations, keystore
from storage import tokens as token_store
from storage.errors import AlreadyExists

_ENROLL = Allowlist(ENROLLMENT)


# The usual heartbeat answer, encoded once.
_STORED_NOTHING_DROPPED = orjson.dumps({"stored": True, "dropped_fields": []})


async def enroll(request: web.Request) -> web.Response:
    """POST /v1/enroll: an enrollment secret buys an installation token for a new install_id."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "enroll")
    with deadline.not_counted():
        doc, _, _ = await read_json(request, limit=64 * 1024, decoded_limit=64 * 1024)
    kept, _ = _ENROLL.filter_document(doc)  # nothing else in this body is stored, so extras are ignored
    install_id = uuid.UUID(kept["install_id"])
    token_id, token, token_hash = new_token("installation")
    kek_id, wrapped = app[KEYRING].wrap(new_key_bytes(), wrap_context(install_id, 1))

    async def store_key() -> None:
        async with deadline.connection(app, pool=KEYSTORE_POOL) as ks:
            await keystore.add_first_key(ks, install_id, kek_id, wrapped)

    try:
        async with deadline.connection(app) as conn, conn.transaction():
            # The secret's use is counted in the enrollment's transaction (installations.enroll nests in it):
            # a 409 or a failure does not use it up, and concurrent enrollments cannot pass max_uses.
            if not await token_store.use_enrollment(conn, principal.token_id):
                app[AUTH].forget_id(principal.token_id)  # then refused without this transaction (negative cache)
                raise Unauthorized("this enrollment secret is used up or expired")
            await installations.enroll(conn, install_id, token_id=token_id, token_hash=token_hash, store_key=store_key)
    except AlreadyExists:
        raise Conflict("this install_id is already enrolled") from None
    app[AUTH].created(token_hash)
    return json_response({"install_id": str(install_id), "token": token}, status=201)


class Heartbeats:
    """POST /v1/heartbeats: authenticate, read, filter, seal the e-mail, group-commit, answer after commit."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.settings = app[SETTINGS]
        self.filter = Allowlist(INSTALLATION.root)
        metrics = app[METRICS]
        self.wire_bytes = metrics.deferred(metrics.request_bytes.labels("/v1/heartbeats", "wire"))
        self.decoded_bytes = metrics.deferred(metrics.request_bytes.labels("/v1/heartbeats", "decoded"))
        self.dropped = metrics.deferred(metrics.fields_dropped.labels("installation"))
        self.encrypt_latency = metrics.deferred(metrics.encrypt_latency.labels("installation"))
        self._parts: tuple | None = None  # what the app's start-up makes (auth, restrictions, keys, writer): bound at the first request

    async def handle(self, request: web.Request) -> web.Response:
        settings = self.settings
        parts = self._parts
        if parts is None:
            app = self.app
            parts = self._parts = (app[AUTH], app[RESTRICTIONS], app[DATA_KEYS], app[EMAIL_SEALS], app[HEARTBEAT_WRITER])
        auth, restrictions, data_keys, seals, writer = parts
        principal = await auth.authenticate(request, "installation")
        restrictions.check(principal.install_id)  # early; the writer checks again, locked
        limit = settings.heartbeat_max_bytes
        with deadline.not_counted():
            doc, wire, decoded = await read_json(request, limit=limit, decoded_limit=limit)
        self.wire_bytes.inc(wire)
        self.decoded_bytes.inc(decoded)
        kept, dropped = self.filter.filter_document(doc)
        if dropped:
            if settings.unknown_fields == "reject":
                raise Invalid(f"undeclared fields: {', '.join(dropped)}")
            self.dropped.inc(len(dropped))
        # The filter gives install_id in canonical form, as str(UUID) writes it.
        if kept["install_id"] != principal.install_text:
            raise Forbidden("install_id is not this token's installation")
        install_id = principal.install_id
        email = kept.get("email")
        email_ct = None
        if email is not None:
            key = await data_keys.newest(install_id)  # may wait for the database: not sealing time
            started = time.perf_counter()
            email_ct, sealed_now = seals.seal(key, install_id, email)
            if sealed_now:  # a use of the key, and a seal timed; a ciphertext handed out again is neither
                data_keys.count_use(install_id, key.key_id)
                self.encrypt_latency.observe(time.perf_counter() - started)
        row = installations.HeartbeatRow(
            install_id,
            dt.datetime.now(dt.timezone.utc),
            kept["license_type"],
            kept["version"],
            kept["asset_count"],
            kept.get("db_server_type"),
            kept.get("web_server_type"),
            email_ct,
            anonymised_text(client_ip(request, settings.trusted_proxies)),
            principal.token_id,
        )
        outcome = await writer.submit(row, decoded)
        refuse_unless_written(outcome)
        if not dropped:
            return web.Response(body=_STORED_NOTHING_DROPPED, content_type="application/json")
        return json_response({"stored": True, "dropped_fields": dropped})


def setup(app: web.Application) -> None:
    """Add enrollment and heartbeat routes (heartbeats only if the policy in force declares the built-in category)."""
    app.router.add_post("/v1/enroll", enroll)
    if declares(app[POLICY], INSTALLATION):
        app.router.add_post("/v1/heartbeats", Heartbeats(app).handle)
