"""Key-encryption keys (KEKs) and the wrapping of per-installation data keys.

A KEK is 32 random bytes, written in settings as standard base64. Its id is
the first 8 bytes of SHA-256("telemetry-ingest kek" || key), in hex: stable,
printable, and it reveals nothing usable about the key.

Wrapped data key format, version 1::

    0x01 || nonce (12 bytes) || AES-256-GCM(KEK, data key (32 bytes)) with tag (16 bytes)

with associated data ``b"tiwrap\\x01" || kek id || context`` so a wrapped key
cannot be moved to another installation or key serial.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.envelope import KEY_SIZE, NONCE_SIZE, TAG_SIZE
from crypto.errors import DecryptionError, KeyError_

_WRAP_VERSION = 1
WRAPPED_SIZE = 1 + NONCE_SIZE + KEY_SIZE + TAG_SIZE


def kek_id(key: bytes) -> str:
    """The public id of a key-encryption key."""
    return hashlib.sha256(b"telemetry-ingest kek" + key).digest()[:8].hex()


def generate_key() -> str:
    """A new KEK in the setting's format (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode()


def parse_keys(value: str) -> list[bytes]:
    """Parse a comma- or newline-separated list of base64 keys; KeyError_ names the bad one's position."""
    parts = [p.strip() for p in value.replace("\n", ",").split(",") if p.strip()]
    if not parts:
        raise KeyError_("no key given")
    keys = []
    for position, part in enumerate(parts, 1):
        try:
            raw = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise KeyError_(f"key #{position} is not valid base64") from None
        if len(raw) != KEY_SIZE:
            raise KeyError_(f"key #{position} is {len(raw)} bytes, expected {KEY_SIZE}")
        keys.append(raw)
    return keys


class KeyRing:
    """Ordered KEKs: the first wraps new data keys, every one unwraps."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise KeyError_("a key ring needs at least one key")
        self._keys: dict[str, AESGCM] = {}
        for key in keys:
            if len(key) != KEY_SIZE:
                raise KeyError_(f"key-encryption keys must be {KEY_SIZE} bytes")
            self._keys.setdefault(kek_id(key), AESGCM(key))
        self.primary_id = kek_id(keys[0])

    @classmethod
    def from_setting(cls, value: str) -> "KeyRing":
        """Build from the TELEMETRY_MASTER_KEY format."""
        return cls(parse_keys(value))

    def adopt(self, other: "KeyRing") -> None:
        """Take other's keys in place (a reloaded key file): every holder of this ring sees them at once."""
        # The keys first: a concurrent wrap() that read the old primary id still finds it (a
        # rotation keeps the old key after the new one).
        self._keys = dict(other._keys)
        self.primary_id = other.primary_id

    @property
    def key_ids(self) -> list[str]:
        """Ids of every key held, primary first."""
        return list(self._keys)

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._keys

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The ids among needed that this ring cannot unwrap with."""
        return sorted({k for k in needed if k not in self._keys})

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap a data key under the primary KEK; returns (kek id, wrapped bytes)."""
        nonce = os.urandom(NONCE_SIZE)
        ad = b"tiwrap\x01" + self.primary_id.encode() + context
        body = self._keys[self.primary_id].encrypt(nonce, data_key, ad)
        return self.primary_id, bytes([_WRAP_VERSION]) + nonce + body

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Unwrap a data key; KeyError_ if the KEK is absent, DecryptionError if anything else is wrong."""
        aead = self._keys.get(key_id)
        if aead is None:
            raise KeyError_(f"key-encryption key {key_id} is not configured")
        if len(wrapped) != WRAPPED_SIZE or wrapped[0] != _WRAP_VERSION:
            raise DecryptionError()
        ad = b"tiwrap\x01" + key_id.encode() + context
        try:
            return aead.decrypt(wrapped[1 : 1 + NONCE_SIZE], wrapped[1 + NONCE_SIZE :], ad)
        except InvalidTag:
            raise DecryptionError() from None


def load_or_create_key_file(path: Path) -> tuple[str, bool]:
    """Read the key file, creating it (mode 0600) with one new key if absent; returns (value, created)."""
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    value = generate_key()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def prepend_key_to_file(path: Path) -> str:
    """Add a new primary key in front of the key file's keys (embedded-mode rotation); returns its id."""
    value = generate_key()
    existing = path.read_text().strip()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + ("," + existing if existing else "") + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kek_id(base64.b64decode(value))
