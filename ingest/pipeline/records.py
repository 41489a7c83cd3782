"""Records of a policy file's categories: each field put into the storage form the file declares.

A record is filtered by its category's allowlist (`ingest.pipeline.filter`, every depth), then
split by the file's storage forms (docs/policy.md "How records are stored"):

    key, plaintext   the value, in `fields`
    anonymised       the value must be an IPv4 or IPv6 address: its /24 or /48 prefix, in `fields`
    keyed-hash       HMAC-SHA256 of the value (hex) under the category's hash key, in `fields`
    encrypted        inside `sealed`: every encrypted value of the record, as one sealed JSON object
                     (the same shape as the record) under the installation's record data key
    not-stored       checked by the filter, then left out of everything

A category sealed whole (`sealed = true`) keeps only its key fields in `fields`; the whole
filtered record is sealed (compressed, as scans are) under the installation's key for the
retention epoch its expiry falls in. No category is known here by name: everything comes from
the `Category` handed in.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from crypto.documents import canonical, open_document_json, seal_document
from crypto.envelope import DataKey, open_, seal
from crypto.errors import DecryptionError
from ingest.errors import Forbidden, Invalid
from ingest.pipeline.filter import Allowlist
from policy import Category, Field

CLEAR_FORMS = frozenset({"key", "plaintext", "anonymised", "keyed-hash"})


def record_context(install_id: uuid.UUID, category: str, record_id: str, *, whole: bool) -> bytes:
    """Associated data of a record's sealed part: installation, category, record and which kind of seal."""
    kind = b"record-whole" if whole else b"record-fields"
    return install_id.bytes + kind + b"\x00" + category.encode() + b"\x00" + record_id.encode()


def anonymise_text(value: str, path: str) -> str:
    """The network prefix of an address sent in a body (IPv4 /24, IPv6 /48); 422 if it is not an address."""
    try:
        ip = ipaddress.ip_address(value.strip().split("%", 1)[0])
    except ValueError:
        raise Invalid(f"{path}: must be an IPv4 or IPv6 address (it is stored as its network prefix only)") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False))


def keyed_hash(key: bytes, value: str) -> str:
    """What a keyed-hash field stores: HMAC-SHA256 of the value (UTF-8) under the category's key, hex."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def _split(f: Field, value: Any, path: str, hash_key: bytes | None) -> tuple[Any, Any]:
    """(clear part, encrypted part) of one filtered value; None for a part that holds nothing."""
    if f.kind == "object":
        clear, enc = {}, {}
        for c in f.fields:
            if c.name in value:
                cl, en = _split(c, value[c.name], f"{path}.{c.name}" if path else c.name, hash_key)
                if cl is not None:
                    clear[c.name] = cl
                if en is not None:
                    enc[c.name] = en
        return (clear or None), (enc or None)
    if f.kind == "list":
        parts = [_split(f.items, v, path + "[]", hash_key) for v in value]
        clear = [p[0] if p[0] is not None else {} for p in parts] if any(p[0] is not None for p in parts) else None
        enc = [p[1] if p[1] is not None else {} for p in parts] if any(p[1] is not None for p in parts) else None
        if f.items.kind != "object":  # a list of scalars: its items share one form
            clear = [p[0] for p in parts] if f.items.storage in CLEAR_FORMS else None
            enc = [p[1] for p in parts] if f.items.storage == "encrypted" else None
        return clear, enc
    storage = f.storage
    if storage in ("key", "plaintext"):
        return value, None
    if storage == "anonymised":
        return anonymise_text(value, path), None
    if storage == "keyed-hash":
        assert hash_key is not None
        return keyed_hash(hash_key, value), None
    if storage == "encrypted":
        return None, value
    return None, None  # not-stored


def merge(clear: Any, opened: Any) -> Any:
    """A record as it was stored, whole again: the clear part and the opened encrypted part
    (objects by key, lists by position)."""
    if opened is None:
        return clear
    if clear is None:
        return opened
    if isinstance(clear, dict) and isinstance(opened, dict):
        out = dict(clear)
        for k, v in opened.items():
            out[k] = merge(out.get(k), v)
        return out
    if isinstance(clear, list) and isinstance(opened, list):
        return [merge(a, b) for a, b in zip(clear, opened)] + clear[len(opened):] + opened[len(clear):]
    return opened


def _has_form(f: Field, forms: frozenset[str]) -> bool:
    if f.kind == "object":
        return any(_has_form(c, forms) for c in f.fields)
    if f.kind == "list":
        return _has_form(f.items, forms)
    return f.storage in forms


@dataclass(frozen=True)
class Prepared:
    """A record made ready to store, and what the answer needs."""

    record_id: str
    dropped: list[str]
    fields: bytes  # JSON of the clear part
    sealed: bytes | None
    content_mac: bytes | None
    size_plain: int


class RecordCategory:
    """One category of the file, compiled: its allowlist and how each field is stored."""

    def __init__(self, category: Category) -> None:
        self.category = c = category
        self.name = c.name
        self.filter = Allowlist(c.root)
        self.sealed_whole = c.sealed
        self.current = c.state == "current"
        self.needs_hash_key = c.idempotency_key is not None or _has_form(c.root, frozenset({"keyed-hash"}))
        self.needs_record_key = not c.sealed and _has_form(c.root, frozenset({"encrypted"}))
        self.peer_fields = tuple(name for name, storage, _ in c.extra if storage == "anonymised")

    def record_id(self, kept: dict[str, Any]) -> str:
        if self.category.idempotency_key is not None:
            return str(kept[self.category.idempotency_key])
        return "current" if self.current else str(uuid.uuid4())

    def prepare(self, doc: dict[str, Any], install_id: uuid.UUID, *, reject: bool, peer_prefix: str | None,
                hash_key: bytes | None, key: DataKey | None) -> Prepared:
        """Filter, check the installation key, split into storage forms, hash and seal (CPU only).

        key: the epoch key (sealed whole) or the record key (encrypted fields); Invalid (422) on a bad
        value, or in reject mode on an undeclared one; Forbidden (403) if the installation key is not
        the sender's."""
        c = self.category
        kept, dropped = self.filter.filter_document(doc)
        if dropped and reject:
            raise Invalid(f"undeclared fields: {', '.join(dropped)}")
        if c.installation_key is not None and uuid.UUID(kept[c.installation_key]) != install_id:
            raise Forbidden(f"{c.installation_key} is not this token's installation")
        record_id = self.record_id(kept)
        sealed = None
        if not self.sealed_whole:
            clear, enc = _split(c.root, kept, "", hash_key)
            clear = clear or {}
            for name in self.peer_fields:
                if peer_prefix is not None:
                    clear[name] = peer_prefix
        if self.sealed_whole:
            clear = {k: v for k, v in kept.items() if k in (c.idempotency_key, c.installation_key)}
            plain = canonical(kept)
            sealed = seal_document(key, plain, record_context(install_id, c.name, record_id, whole=True))
            stored_view = plain
        else:
            stored_view = canonical({"fields": clear, "encrypted": enc})
            if enc is not None:
                sealed = seal(key, canonical(enc), record_context(install_id, c.name, record_id, whole=False))
        mac = None
        if c.idempotency_key is not None:
            mac = hmac.new(hash_key, b"record-content\x00" + install_id.bytes + record_id.encode() + b"\x00" + stored_view,
                           hashlib.sha256).digest()
        fields = canonical(clear)
        return Prepared(record_id, dropped, fields, sealed, mac, len(stored_view))


def open_record(name: str, whole: bool | None, install_id: uuid.UUID, record_id: str, fields: dict[str, Any],
                sealed: bytes | None, key: DataKey | None) -> dict[str, Any]:
    """A stored record as the export shows it: the clear fields as stored, the sealed part opened and merged in.

    whole: whether the category is sealed whole (None: a category the file no longer declares, either
    kind is tried). crypto.errors.DecryptionError if the sealed part does not open.
    """
    if sealed is None:
        return fields
    if key is None:
        raise DecryptionError()
    if whole is not False:
        try:
            return orjson.loads(open_document_json(key, sealed, record_context(install_id, name, record_id, whole=True)))
        except DecryptionError:
            if whole:
                raise
    opened = orjson.loads(open_(key, sealed, record_context(install_id, name, record_id, whole=False)))
    return merge(fields, opened)
