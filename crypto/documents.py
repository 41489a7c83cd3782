"""Sealed JSON documents (scans): canonical form, keyed content hash, compression, sealing.

A document is stored as ``crypto.envelope.seal(key, payload, context)`` where,
in payload format 1::

    payload = zstd frame (content size in its header) of canonical(document)
    canonical(document) = JSON, UTF-8, keys sorted (orjson OPT_SORT_KEYS)
    context = installation id (16 bytes) || kind (e.g. b"scan") || record id (16 bytes) || format (1 byte)

The format number sits in the associated data, so a payload cannot be read as
another format, and the context binds it to its installation and record: a
ciphertext moved to another row or installation fails to open.

Idempotency compares documents without keeping their plaintext::

    content_digest = BLAKE2b-256(canonical(document))                 (held in memory only, never stored)
    content_mac    = keyed BLAKE2b-256(mac key; len(context) || context || content_digest)

where the MAC key is derived from the data key (``DataKey.mac_key``). Equal
documents of one record give equal MACs; nobody without the key can test a guess
against a stored one, and it dies with the key. Keying the digest rather than
the document lets a replay be compared under whichever data key sealed the
stored scan without keeping the document itself.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import uuid
from typing import Any

import orjson
import zstandard

from crypto.envelope import DataKey, open_, seal
from crypto.errors import DecryptionError

DOCUMENT_FORMAT = 1
MAC_SIZE = 32
_ZSTD_LEVEL = 1  # scan JSON shrinks about 5x at level 1; higher levels cost time for little more
# One compressor per thread (a ZstdCompressor must not be used by two threads at once): making one
# per document cost about 15 us of a 50 KiB scan's 100 (its context allocated and freed each time).
_compressors = threading.local()


def canonical(doc: dict[str, Any]) -> bytes:
    """The one serialisation of a document that its content hash and its payload use."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def document_context(install_id: uuid.UUID, kind: bytes, record_id: uuid.UUID, fmt: int = DOCUMENT_FORMAT) -> bytes:
    """Associated data of one sealed document: whose, what kind, which record, which payload format."""
    return install_id.bytes + kind + record_id.bytes + bytes((fmt,))


def content_digest(canonical_doc: bytes) -> bytes:
    """Unkeyed digest of a canonical document: input to content_mac, never to be stored."""
    return hashlib.blake2b(canonical_doc, digest_size=MAC_SIZE, person=b"ti-content").digest()


def content_mac(key: DataKey, context: bytes, digest: bytes) -> bytes:
    """Keyed hash of a document (given by its content_digest) in its context: what may be stored."""
    h = hashlib.blake2b(key=key.mac_key, digest_size=MAC_SIZE, person=b"ti-content-mac")
    h.update(struct.pack(">H", len(context)) + context + digest)
    return h.digest()


def seal_document(key: DataKey, canonical_doc: bytes, context: bytes) -> bytes:
    """Compress and seal a canonical document (payload format 1)."""
    compressor = getattr(_compressors, "zstd", None)
    if compressor is None:
        compressor = _compressors.zstd = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return seal(key, compressor.compress(canonical_doc), context)


def open_document_json(key: DataKey, ciphertext: bytes, context: bytes, *, max_size: int = 1 << 32) -> bytes:
    """Open and decompress a sealed document: its canonical JSON. The one opaque DecryptionError on any mismatch."""
    payload = open_(key, ciphertext, context)
    try:
        # The frame is authenticated, so ours; the bound only guards against a bug having written a huge one.
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_size)
    except zstandard.ZstdError:
        raise DecryptionError() from None


def open_document(key: DataKey, ciphertext: bytes, context: bytes) -> dict[str, Any]:
    """Open a sealed document and parse it."""
    return orjson.loads(open_document_json(key, ciphertext, context))
