"""Bearer-token authentication with a bounded cache that follows revocations within a second.

Unknown tokens are cheap: a well-formed token the database does not hold (or no longer holds
active) is remembered in a small negative cache for NEGATIVE_TTL seconds, so repeating it costs
no database round trip. A new token can never be hidden by it for long: the entries are keyed by
the token's hash (a fresh random token was never presented before it existed), the worker that
creates a token forgets it, and the follower drops every negative entry when it sees a newer
token (and in any case each lives at most NEGATIVE_TTL). Before any of this, an optional
per-address-prefix rate limit refuses a sender that tries too many requests (429).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from crypto.tokens import MAX_TOKEN_LENGTH, hash_token, role_of, same_hash
from ingest import deadline
from ingest.errors import AddressRateLimited, Forbidden, RateLimited, Unauthorized
from ingest.http.net import anonymised_text, client_ip
from ingest.http.ratelimit import TokenBuckets, retry_after_seconds
from ingest.keys import TOKEN_ID
from ingest.worker.background import POLL_INTERVAL, background
from storage import tokens as token_store
from storage.pool import acquire_until

log = logging.getLogger(__name__)

CACHE_TTL = 60.0  # belt and braces: even a missed revocation expires from the cache
# Revocation numbers are handed out before commit, so they can become visible slightly out of
# order; re-reading a short overlap makes sure a late-committing revocation is not skipped.
_OVERLAP = 100
NEGATIVE_TTL = 2.0  # seconds an unknown token is answered 401 from memory
NEGATIVE_MAX = 10_000  # unknown tokens remembered at most (the oldest entry forgotten first)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token id (safe to log) and what it is bound to."""

    token_id: str
    role: str
    install_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    install_text: str | None = None  # str(install_id), the form a body's install_id is compared in


class Authenticator:
    """Resolves bearer tokens to principals; cached, bounded, revocation-aware."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_entries: int = 100_000,
        on_revoke: Callable[[uuid.UUID], None] | None = None,
        limiter: TokenBuckets | None = None,
        db_timeout: float | None = None,
        address_limiter: TokenBuckets | None = None,
        trusted_proxies: tuple = (),
    ) -> None:
        self._pool = pool
        self._db_timeout = db_timeout
        self._limiter = limiter
        self._address_limiter = address_limiter
        self._trusted = trusted_proxies
        self._max = max_entries
        self._cache: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._hash_by_id: dict[str, bytes] = {}
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # token hash -> when the database said unknown
        self._newest_token = None  # creation time of the newest token the follower has seen
        self._position = 0
        self._on_revoke = on_revoke

    async def authenticate(self, request: web.Request, *roles: str) -> Principal:
        """The principal behind the request's bearer token, which must have one of roles.

        Called before the body is read: a request without a valid token is refused before it costs that.
        """
        if self._address_limiter is not None:
            self._check_address(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        # Tokens are ASCII; a header carrying other bytes (decoded with surrogates) is no token of ours.
        if (scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii()
                or role_of(token) is None):
            raise Unauthorized("a valid bearer token is required")
        principal = await self.resolve(token)
        request[TOKEN_ID] = principal.token_id  # named by the access line (an id is safe to log; the token is not)
        if self._limiter is not None:
            wait = self._limiter.take(principal.token_id)
            if wait:
                raise RateLimited("this token is over its request rate", headers={"Retry-After": retry_after_seconds(wait)})
        if principal.role not in roles:
            raise Forbidden(f"this endpoint needs {_role_names(roles)} token; this is {_role_names((principal.role,))} token")
        return principal

    async def resolve(self, token: str) -> Principal:
        """Look a token up (cache first); Unauthorized if unknown or revoked."""
        digest = hash_token(token)
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and now - hit[1] < CACHE_TTL:
            self._cache.move_to_end(digest)
            return hit[0]
        seen = self._unknown.get(digest)
        if seen is not None:
            if now - seen < NEGATIVE_TTL:
                raise Unauthorized("unknown or revoked token")
            del self._unknown[digest]
        async with acquire_until(self._pool, deadline.current(self._db_timeout)) as conn:
            row = await token_store.find_active(conn, digest)
        if row is None or not same_hash(row.token_hash, digest):
            self._forget(digest)
            self._unknown[digest] = now
            while len(self._unknown) > NEGATIVE_MAX:
                self._unknown.popitem(last=False)
            raise Unauthorized("unknown or revoked token")
        principal = Principal(row.token_id, row.role, row.install_id, row.agent_id,
                              None if row.install_id is None else str(row.install_id))
        self._cache[digest] = (principal, now)
        self._hash_by_id[row.token_id] = digest
        while len(self._cache) > self._max:
            old, (p, _) = self._cache.popitem(last=False)
            self._hash_by_id.pop(p.token_id, None)
        return principal

    def forget_id(self, token_id: str) -> None:
        """Drop a token from the cache (it was found used up or expired): its next use asks the database."""
        digest = self._hash_by_id.pop(token_id, None)
        if digest is not None:
            self._cache.pop(digest, None)

    def created(self, token_hash: bytes) -> None:
        """A token was just created by this worker: it must not be answered from the negative cache."""
        self._unknown.pop(token_hash, None)

    def _check_address(self, request: web.Request) -> None:
        ip = client_ip(request, self._trusted)
        # Loopback is exempt: a local proxy not declared in TELEMETRY_TRUSTED_PROXIES would make every
        # client one sender, and local tools (demo, send, health checks) are not the threat.
        if ip is None or ip.is_loopback:
            return
        wait = self._address_limiter.take(str(anonymised_text(ip)))
        if wait:
            raise AddressRateLimited("too many requests from this address range", headers={"Retry-After": retry_after_seconds(wait)})

    def _forget(self, digest: bytes) -> None:
        hit = self._cache.pop(digest, None)
        if hit is not None:
            self._hash_by_id.pop(hit[0].token_id, None)

    async def start_following(self) -> None:
        """Learn where the revocation log stands now (cache is empty, so nothing to evict)."""
        async with self._pool.acquire() as conn:
            self._position = await token_store.revocation_position(conn)
            self._newest_token = await token_store.newest_created(conn)

    async def poll_revocations(self) -> int:
        """Evict every token revoked since the last poll; returns how many were seen."""
        async with acquire_until(self._pool, deadline.current()) as conn:  # unbounded outside a request
            rows = await token_store.revoked_since(conn, max(0, self._position - _OVERLAP))
            newest = await token_store.newest_created(conn)
        if newest != self._newest_token:
            # A token was created since the last poll (perhaps one presented before it existed): forget
            # every unknown one. Creation times are taken at transaction start, so one committing late
            # may not move the newest; NEGATIVE_TTL bounds that case.
            self._newest_token = newest
            self._unknown.clear()
        for r in rows:
            digest = self._hash_by_id.pop(r["token_id"], None)
            if digest is not None:
                self._cache.pop(digest, None)
            if r["install_id"] is not None and self._on_revoke is not None and r["revoke_seq"] > self._position:
                self._on_revoke(r["install_id"])
            self._position = max(self._position, r["revoke_seq"])
        return len(rows)

    async def follow(self) -> None:
        """Poll revocations forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.poll_revocations()
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The database is away: requests fail with 503 meanwhile; keep trying.
                log.warning("revocation poll failed: %s", type(exc).__name__)


async def auth_ctx(app: web.Application):
    """cleanup_ctx: the authenticator and its revocation follower."""
    from ingest.keys import AUTH, DATA_KEYS, EMAIL_SEALS, POOL, SETTINGS

    s = app[SETTINGS]
    # Each worker enforces its share of the per-token rate: the port spreads connections over workers.
    limiter = TokenBuckets(s.rate_limit / s.workers, max(1, s.rate_burst // s.workers)) if s.rate_limit > 0 else None
    address_limiter = (TokenBuckets(s.address_rate_limit / s.workers, max(1, s.address_rate_burst // s.workers))
                       if s.address_rate_limit > 0 else None)
    keys, seals = app[DATA_KEYS], app[EMAIL_SEALS]

    def forget(install_id: uuid.UUID) -> None:  # an installation whose token was revoked: its keys reloaded, its e-mail sealed anew
        keys.evict(install_id)
        seals.forget(install_id)

    auth = Authenticator(app[POOL], on_revoke=forget, limiter=limiter, db_timeout=s.db_timeout,
                         address_limiter=address_limiter, trusted_proxies=s.trusted_proxies)
    await auth.start_following()
    app[AUTH] = auth
    async with background(auth.follow()):
        yield


_ROLE_NOUNS = {"enroll": "an enrollment-secret", "installation": "an installation", "agent": "an agent", "admin": "an admin"}


def _role_names(roles) -> str:
    """'an installation' or 'an agent or an admin': the roles a 403 names."""
    return " or ".join(_ROLE_NOUNS.get(r, f"a {r}") for r in roles)
