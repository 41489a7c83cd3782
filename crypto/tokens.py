"""Bearer tokens: random, role-prefixed, stored only as SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIXES = {"enroll": "tie_", "installation": "tii_", "agent": "tia_", "admin": "tiadm_"}
_ROLE_BY_PREFIX = {v: k for k, v in PREFIXES.items()}
# Longest prefix first: "tiadm_" must not be read as something shorter. Sorted once, not per request.
_PREFIXES_LONGEST_FIRST = tuple(sorted(_ROLE_BY_PREFIX, key=len, reverse=True))
MAX_TOKEN_LENGTH = 128


def new_token(role: str) -> tuple[str, str, bytes]:
    """(token_id, token, sha256 of token) for a fresh 256-bit token of role."""
    token = PREFIXES[role] + secrets.token_urlsafe(32)
    return "tid_" + secrets.token_hex(8), token, hash_token(token)


def hash_token(token: str) -> bytes:
    """SHA-256 of the token: the only form ever stored."""
    return hashlib.sha256(token.encode()).digest()


def role_of(token: str) -> str | None:
    """The role a token's prefix claims, or None if it has no known prefix."""
    for prefix in _PREFIXES_LONGEST_FIRST:
        if token.startswith(prefix):
            return _ROLE_BY_PREFIX[prefix]
    return None


def same_hash(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two token hashes."""
    return hmac.compare_digest(a, b)
