"""What the database may hold: every table and column, derived from the policy plus the service's bookkeeping.

`telemetry-ingest audit` compares the live schema with this declaration. A table
or column that is not declared here is a finding: nothing outside a declared
category is ever stored. A migration that adds a table or column must declare it
here, saying whether it carries policy data (named after the policy field) or
the service's own bookkeeping.

How a policy field is stored decides its column name:

    key, plaintext   the field's own name           (license_type)
    encrypted        name + "_ct", sealed records    (email -> email_ct)
    anonymised       ANONYMISED[name]                (ip_address -> ip_prefix)
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.categories import AGENT_REGISTRATION, INSTALLATION, SCAN, Category

ANONYMISED = {"ip_address": "ip_prefix"}


def stored_column(name: str, storage: str) -> str | None:
    """The column a policy field is stored in, or None if it is not stored as a column of its own."""
    if storage in ("key", "plaintext"):
        return name
    if storage == "encrypted":
        return name + "_ct"
    if storage == "anonymised":
        return ANONYMISED[name]
    return None


def policy_columns(category: Category, forms: tuple[str, ...]) -> tuple[str, ...]:
    """Columns holding a category's top-level fields stored in one of forms (a sealed category yields only its keys)."""
    out = []
    for f in category.fields:
        storage = f.storage if category.root.storage != "encrypted" or f.storage == "key" else "inside the sealed document"
        if storage in forms:
            out.append(stored_column(f.name, storage))
    for name, storage, _ in category.extra:
        if storage in forms:
            out.append(stored_column(name, storage))
    return tuple(c for c in out if c)


CLEAR = ("key", "plaintext", "anonymised")


@dataclass(frozen=True)
class Table:
    """A declared table: columns from the policy, bookkeeping columns, sealed columns, JSON keys allowed."""

    policy: tuple[str, ...] = ()
    bookkeeping: tuple[str, ...] = ()
    sealed: tuple[str, ...] = ()  # bytea columns that must hold crypto.envelope records only
    json_keys: tuple[tuple[str, frozenset[str]], ...] = ()  # (json column, keys allowed at its top level)
    # JSON columns whose keys the policy file in force names (categories, declared fields): `audit`
    # compares them with the file, not with a list here.
    policy_json: tuple[str, ...] = ()

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(self.policy) | frozenset(self.bookkeeping) | frozenset(self.sealed)


# Keys allowed in audit_log.detail, at any depth: ids of tokens and keys, counts, flags,
# table names. Never a secret or personal data (`audit` also looks for those in every value).
AUDIT_DETAIL_KEYS = frozenset({
    # tokens and restriction
    "token_id", "role", "restricted", "max_uses", "expires_at",
    # erasure
    "resumed", "rows", "tokens_revoked", "keys_destroyed", "reason",
    # sweeps
    "at", "rows_deleted", "partitions", "partitions_dropped", "partitions_created", "installations_erased", "data_keys_added",
    # key rotation
    "primary", "from", "rewrapped", "kek_id",
    # policy apply (storage.applied): the category and field path removed, and the totals
    "category", "field", "categories_removed", "fields_removed", "categories_added", "fields_added",
    # table names used as keys of the counts above
    "heartbeats", "scans", "installations", "agents", "tokens", "data_keys", "audit_log", "records",
})

TABLES: dict[str, Table] = {
    "installations": Table(
        policy=policy_columns(INSTALLATION, CLEAR),
        sealed=policy_columns(INSTALLATION, ("encrypted",)),
        bookkeeping=("enrolled_at", "last_seen_at", "heartbeat_at", "scan_retention_hours", "restricted", "erasing", "restriction_seq",
                     "retention_shortened_at"),
    ),
    # Heartbeat history: the plaintext and anonymised fields (the e-mail lives in the current record only).
    "heartbeats": Table(
        policy=policy_columns(INSTALLATION, CLEAR),
        bookkeeping=("received_at",),
    ),
    "scans": Table(
        policy=policy_columns(SCAN, CLEAR),  # scan_id: everything else of a scan is inside the sealed document
        bookkeeping=("install_id", "agent_id", "received_at", "expires_at", "key_id", "content_mac", "size_wire", "size_decoded", "size_plain"),
        sealed=("ciphertext",),
    ),
    "agents": Table(
        policy=tuple(f.name for f in AGENT_REGISTRATION.fields),
        bookkeeping=("install_id", "agent_id", "created_at", "revoked_at"),
    ),
    "tokens": Table(bookkeeping=("token_id", "token_hash", "role", "install_id", "agent_id", "created_at", "revoked_at", "revoke_seq",
                                 "max_uses", "uses", "expires_at")),
    # Sealed scan bytes per installation and UTC day of expiry, for the scan-bytes quota (migration 0006).
    "scan_usage": Table(bookkeeping=("install_id", "expires_on", "bytes")),
    "audit_log": Table(
        bookkeeping=("id", "at", "actor", "action", "install_id", "detail"),
        json_keys=(("detail", AUDIT_DETAIL_KEYS),),
    ),
    "schema_migrations": Table(bookkeeping=("version", "name", "applied_at")),
    # How far the key store's erasure tombstones have been replayed here (storage.databases).
    "erasure_replay": Table(bookkeeping=("singleton", "erased_through")),
    # Who sweeps now, until when (storage.sweeper, migration 0008): a process name and a time.
    "sweeper_lease": Table(bookkeeping=("singleton", "holder", "expires_at")),
    # Records of the categories a policy file declares (migration 0012): `fields` holds the declared
    # clear values by name (audit compares its keys with the file in force), `sealed` the encrypted part.
    "records": Table(
        policy=("fields",),
        bookkeeping=("category", "install_id", "record_id", "received_at", "expires_at", "key_id", "content_mac"),
        sealed=("sealed",),
        policy_json=("fields",),
    ),
    # An installation's shortened retention per category (PUT /v1/installation/settings).
    "record_settings": Table(bookkeeping=("install_id", "category", "retention_hours")),
    # The categories and fields the database holds, as last applied (`policy apply --confirm`).
    "policy_applied": Table(bookkeeping=("singleton", "declared", "source", "applied_at"), policy_json=("declared",)),
}

# The forms `audit` expects in records.fields (storage forms, docs/policy.md): a keyed hash is
# HMAC-SHA256 as 64 lower-case hex digits; an anonymised address is its network, IPv4 /24 or
# IPv6 /48, as text ("192.0.2.0/24", "2001:db8:1::/48"), the same form as installations.ip_prefix.
KEYED_HASH_PATTERN = "^[0-9a-f]{64}$"
ANONYMISED_PATTERN = r"^([0-9]{1,3}\.){3}0/24$|^(([0-9a-f]{1,4}:){1,3}|:):/48$"

# Columns of key material: they belong in the key store (storage.keystore), never in the data database.
KEY_COLUMNS = frozenset({"wrapped", "kek_id"})
