"""/v1/admin/*: export, erasure and restriction of an installation, and anonymous statistics.

Every call needs an admin token; every action on an installation is written to the
audit log under the admin token's id (never the token). A path id that is not a
UUID is answered 404, like an unknown one: there is no such resource.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web

from ingest import deadline
from ingest.admin import rights
from ingest.errors import Invalid, NotFoundProblem
from ingest.http.body import read_json
from ingest.http.routes import json_response
from ingest.keys import (
    AUTH,
    DATA_KEYS,
    EMAIL_SEALS,
    KEYRING,
    KEYSTORE_POOL,
    POLICY,
    POOL,
    RESTRICTIONS,
    SETTINGS,
)
from storage import admin
from storage.applied import BUILTIN
from storage.pool import acquire_until

log = logging.getLogger(__name__)

_BODY_LIMIT = 64 * 1024


def _install_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["install_id"])
    except ValueError:
        raise NotFoundProblem("no such installation") from None


async def export(request: web.Request) -> web.StreamResponse:
    """GET .../export: the installation's data as one JSON document, streamed from one snapshot."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "admin")
    install_id = _install_id(request)
    resp = web.StreamResponse(headers={
        "Content-Disposition": f'attachment; filename="installation-{install_id}.json"',
        "Cache-Control": "no-store",
    })
    resp.content_type = "application/json"
    resp.enable_chunked_encoding()

    # The request's deadline bounds the wait until the document begins (audit, snapshot, keys); then
    # the stream takes as long as the export's size and the client's reading need.
    bound = asyncio.timeout_at(deadline.current(app[SETTINGS].db_timeout))

    async def begin() -> None:
        bound.reschedule(None)
        await resp.prepare(request)

    try:
        async with bound, acquire_until(app[POOL], None) as conn, acquire_until(app[KEYSTORE_POOL], None) as ks:
            found = await rights.write_export(conn, ks, app[KEYRING], install_id, principal.token_id, begin, resp.write,
                                             app[SETTINGS].heartbeat_retention_days)
    except ConnectionError:
        return resp  # the client went away; the snapshot transaction was rolled back
    except Exception as exc:
        if not resp.prepared:
            raise  # nothing sent yet: the middleware answers (503 for database or key trouble)
        # Half a document is on the wire: cut the connection so the client cannot take it for a whole one.
        log.warning("export broke off after it began: %s", type(exc).__name__)
        request.protocol.force_close()
        return resp
    if not found:
        raise NotFoundProblem("no such installation")
    await resp.write_eof()
    return resp


async def erase(request: web.Request) -> web.Response:
    """DELETE: destroy the keys, revoke the tokens, delete the rows (or finish an interrupted erasure)."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "admin")
    install_id = _install_id(request)
    async with deadline.connection(app) as conn, deadline.connection(app, pool=KEYSTORE_POOL) as ks:
        state = await rights.begin_erasure(conn, ks, install_id, principal.token_id)
    if state is None:
        raise NotFoundProblem("no such installation")
    # This worker forgets at once; the others follow through their revocation pollers.
    app[DATA_KEYS].evict(install_id)
    app[EMAIL_SEALS].forget(install_id)
    await app[AUTH].poll_revocations()
    # Finishing waits up to rights.UNLINK_GRACE for every worker to see the revocation: that much more
    # time. Cut off, the erasure stays begun (keys destroyed, tokens revoked); the sweeper finishes it.
    async with deadline.connection(app, extra=rights.UNLINK_GRACE) as conn:
        await rights.finish_erasure(conn, install_id, principal.token_id)
    app[DATA_KEYS].evict(install_id)
    app[EMAIL_SEALS].forget(install_id)
    return web.Response(status=204)


async def restriction(request: web.Request) -> web.Response:
    """PUT .../restriction {"restricted": bool}: stop (or resume) processing; stored data is kept."""
    app = request.app
    principal = await app[AUTH].authenticate(request, "admin")
    install_id = _install_id(request)
    with deadline.not_counted():
        doc, _, _ = await read_json(request, limit=_BODY_LIMIT, decoded_limit=_BODY_LIMIT)
    restricted = doc.get("restricted")
    if type(restricted) is not bool:
        raise Invalid("restricted: required, must be true or false")
    async with deadline.connection(app) as conn:
        found = await admin.set_restricted(conn, install_id, restricted, principal.token_id)
    if not found:
        raise NotFoundProblem("no such installation")
    # This worker's early check follows at once; the others within POLL_INTERVAL (the writers check
    # the row itself meanwhile, so nothing is stored either way).
    await app[RESTRICTIONS].poll()
    return json_response({"install_id": str(install_id), "restricted": restricted})


async def stats(request: web.Request) -> web.Response:
    """GET /v1/admin/stats: aggregate counts of active installations; groups below k folded into "other"."""
    app = request.app
    await app[AUTH].authenticate(request, "admin")
    async with deadline.connection(app) as conn:
        body = await admin.statistics(conn, k=app[SETTINGS].stats_k, categories=[
            (c.name, c.statistics) for c in app[POLICY].categories if c.statistics and c.name not in BUILTIN])
    return json_response(body)


def setup(app: web.Application) -> None:
    """Add the admin routes."""
    # No HEAD: it would read (and audit) a whole export only to throw it away.
    app.router.add_get("/v1/admin/installations/{install_id}/export", export, allow_head=False)
    app.router.add_delete("/v1/admin/installations/{install_id}", erase)
    app.router.add_put("/v1/admin/installations/{install_id}/restriction", restriction)
    app.router.add_get("/v1/admin/stats", stats, allow_head=False)
