"""Sealed records: AES-256-GCM under a data key, bound to their owner and record.

Ciphertext format, version 1 (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       4     data key id (the key's serial within its installation)
    5       12    nonce, random per record
    17      n+16  AES-GCM ciphertext of n plaintext bytes, with its 16-byte tag

The associated data is never stored; the reader must rebuild it from where the
ciphertext was found::

    b"ti\\x01" || version || key id || len(context) (2 bytes) || context

where ``context`` is the caller's binding, e.g. installation id + record kind +
record id. A ciphertext copied to another row, installation or key therefore
fails to open. Every parsed length is checked before use.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.errors import DecryptionError

FORMAT_VERSION = 1
_HEADER = struct.Struct(">BI12s")
HEADER_SIZE = _HEADER.size  # 17
TAG_SIZE = 16
NONCE_SIZE = 12
KEY_SIZE = 32


@dataclass(frozen=True, slots=True)
class DataKey:
    """A plaintext data key with its serial, held only in memory.

    `mac_key` is derived from it (HKDF-SHA256) for keyed content hashes
    (crypto.documents.content_mac): it dies with the data key.
    """

    key_id: int
    aead: AESGCM
    mac_key: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, key_id: int, key: bytes) -> "DataKey":
        if len(key) != KEY_SIZE:
            raise ValueError("data key must be 32 bytes")
        mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"telemetry-ingest content mac v1").derive(key)
        return cls(key_id, AESGCM(key), mac_key)


def new_key_bytes() -> bytes:
    """Fresh random 256-bit key material."""
    return os.urandom(KEY_SIZE)


def _associated_data(key_id: int, context: bytes) -> bytes:
    if len(context) > 0xFFFF:
        raise ValueError("context too long")
    return b"ti\x01" + struct.pack(">BIH", FORMAT_VERSION, key_id, len(context)) + context


def seal(key: DataKey, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt plaintext, binding it to context (required: say whose and which record)."""
    if not context:
        raise ValueError("associated context is required")
    nonce = os.urandom(NONCE_SIZE)
    body = key.aead.encrypt(nonce, plaintext, _associated_data(key.key_id, context))
    return _HEADER.pack(FORMAT_VERSION, key.key_id, nonce) + body


def key_id_of(ciphertext: bytes) -> int:
    """The data key id a ciphertext needs; DecryptionError if it is not in our format."""
    if len(ciphertext) < HEADER_SIZE + TAG_SIZE or ciphertext[0] != FORMAT_VERSION:
        raise DecryptionError()
    return _HEADER.unpack_from(ciphertext)[1]


def open_(key: DataKey, ciphertext: bytes, context: bytes) -> bytes:
    """Decrypt a sealed record; any mismatch raises the one opaque DecryptionError."""
    if key_id_of(ciphertext) != key.key_id:
        raise DecryptionError()
    _, key_id, nonce = _HEADER.unpack_from(ciphertext)
    try:
        return key.aead.decrypt(nonce, ciphertext[HEADER_SIZE:], _associated_data(key_id, context))
    except InvalidTag:
        raise DecryptionError() from None


def looks_sealed(value: bytes) -> bool:
    """True if value has the shape of a version-1 ciphertext (used by the compliance audit)."""
    return len(value) >= HEADER_SIZE + TAG_SIZE and value[0] == FORMAT_VERSION
