"""The privacy policy as data: what each category may hold, how it is stored, how long.

Validation (ingest), the storage layout, `policy show` and `audit` all read this
one description; no field name is repeated elsewhere by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["string", "integer", "number", "boolean", "uuid", "time", "email", "object", "list"]
Storage = Literal["key", "plaintext", "encrypted", "anonymised", "not stored"]


@dataclass(frozen=True, slots=True)
class Field:
    """One declared field; objects carry `fields`, lists carry `items`."""

    name: str
    kind: Kind
    required: bool = False
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    max_items: int | None = None
    fields: tuple["Field", ...] = ()
    items: "Field | None" = None
    storage: Storage = "plaintext"
    purpose: str = ""


@dataclass(frozen=True, slots=True)
class Category:
    """A category of data the privacy notice discloses."""

    name: str
    purpose: str
    root: Field
    retention: str
    extra: tuple[tuple[str, str, str], ...] = field(default=())  # (field, stored as, purpose) not read from the body

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.root.fields


def _s(name: str, max_length: int, **kw) -> Field:
    return Field(name, "string", max_length=max_length, **kw)


SHORT = 32
SCAN_STRING = 1024
SCAN_LIST = 100_000
MAX_SCAN_RETENTION_HOURS = 720
DEFAULT_SCAN_RETENTION_HOURS = 720
DEFAULT_HEARTBEAT_RETENTION_DAYS = 30
DEFAULT_INACTIVE_DAYS = 400

INSTALL_ID = Field("install_id", "uuid", required=True, storage="key", purpose="identifies the installation")
# The body of POST /v1/enroll: not telemetry, only the key it will be filed under.
ENROLLMENT = Field("enrollment", "object", fields=(INSTALL_ID,))
# The bodies of POST /v1/agents and PUT /v1/installation/settings: an installation's own configuration.
AGENT_REGISTRATION = Field("agent", "object", fields=(_s("name", 128, required=True, purpose="the installation's label for its agent"),))
SCAN_SETTINGS = Field(
    "settings",
    "object",
    fields=(Field("scan_retention_hours", "integer", required=True, minimum=1, maximum=MAX_SCAN_RETENTION_HOURS),),
)

INSTALLATION = Category(
    name="installation",
    purpose="installation metadata sent with each heartbeat",
    # {placeholders}: the configured limits, filled in by disclosure_rows
    retention="current record until {inactive_days} days without a heartbeat; heartbeat history {heartbeat_retention_days} days",
    root=Field(
        "heartbeat",
        "object",
        fields=(
            INSTALL_ID,
            _s("license_type", SHORT, required=True, purpose="licence statistics"),
            _s("version", SHORT, required=True, pattern=r"^[0-9A-Za-z.+-]+$", purpose="version statistics"),
            Field("asset_count", "integer", required=True, minimum=0, maximum=10_000_000, purpose="licence sizing"),
            _s("db_server_type", SHORT, purpose="platform statistics"),
            _s("web_server_type", SHORT, purpose="platform statistics"),
            Field("email", "email", max_length=254, storage="encrypted", purpose="contact of the installation's administrator"),
        ),
    ),
    extra=(("ip_address", "anonymised", "network prefix (IPv4 /24, IPv6 /48) of the sender, for abuse handling"),),
)

_asset = Field(
    "asset",
    "object",
    fields=tuple(
        _s(n, SCAN_STRING)
        for n in ("name", "domain", "type", "manufacturer", "model", "serial_number", "ip_address", "mac_address", "last_user")
    ),
)
_os = Field("os", "object", fields=tuple(_s(n, SCAN_STRING) for n in ("name", "version", "build", "architecture", "install_date")))
_hardware = Field(
    "hardware",
    "object",
    fields=(
        _s("processor", SCAN_STRING),
        Field("cores", "integer", minimum=0, maximum=1_000_000),
        Field("memory_mb", "integer", minimum=0, maximum=2**53),
        _s("bios_version", SCAN_STRING),
    ),
)


def _list_of(name: str, *children: Field) -> Field:
    return Field(name, "list", max_items=SCAN_LIST, items=Field(name, "object", fields=children))


SCAN = Category(
    name="scan",
    purpose="inventory of the machines an agent scans",
    retention=(
        f"{DEFAULT_SCAN_RETENTION_HOURS} hours after receipt by default; the installation may choose "
        f"1 to {MAX_SCAN_RETENTION_HOURS} hours"
    ),
    root=Field(
        "scan",
        "object",
        storage="encrypted",
        fields=(
            Field("scan_id", "uuid", required=True, storage="key", purpose="idempotency key of the upload"),
            Field("scanned_at", "time", required=True, storage="encrypted", purpose="when the agent scanned"),
            _s("agent_version", SHORT, storage="encrypted", purpose="agent version"),
            _asset,
            _os,
            _hardware,
            _list_of("disks", _s("name", SCAN_STRING), Field("size_gb", "number"), Field("free_gb", "number"), _s("filesystem", SCAN_STRING)),
            _list_of("software", *(_s(n, SCAN_STRING) for n in ("name", "version", "publisher", "install_date"))),
            _list_of("network", _s("adapter", SCAN_STRING), _s("ip_address", SCAN_STRING), _s("mac_address", SCAN_STRING), Field("dhcp", "boolean")),
            _list_of("hotfixes", _s("id", SCAN_STRING), _s("installed_on", SCAN_STRING)),
            _list_of("services", *(_s(n, SCAN_STRING) for n in ("name", "state", "start_mode"))),
        ),
    ),
)

CATEGORIES: tuple[Category, ...] = (INSTALLATION, SCAN)


def _leaves(f: Field, path: str):
    """(dotted path, field) of every scalar under f; list items are written name[].field."""
    if f.kind == "object":
        for c in f.fields:
            yield from _leaves(c, f"{path}.{c.name}" if path else c.name)
    elif f.kind == "list" and f.items is not None:
        item = f.items
        if item.kind == "object":
            for c in item.fields:
                yield from _leaves(c, f"{path}[].{c.name}")
        else:
            yield f"{path}[]", item
    else:
        yield path, f


def disclosure_rows(*, heartbeat_retention_days: int = DEFAULT_HEARTBEAT_RETENTION_DAYS,
                    inactive_days: int = DEFAULT_INACTIVE_DAYS) -> list[dict[str, str]]:
    """One row per declared field (nested ones by path): the table a privacy notice can quote.

    Retention is stated for the configured limits (the defaults unless given).
    """
    limits = {"heartbeat_retention_days": heartbeat_retention_days, "inactive_days": inactive_days}
    rows = []
    for cat in CATEGORIES:
        retention = cat.retention.format(**limits)
        for top in cat.fields:
            for path, f in _leaves(top, top.name):
                stored = f.storage if cat.root.storage != "encrypted" or f.storage == "key" else "encrypted"
                stored = "plaintext (lookup key)" if stored == "key" else stored
                purpose = f.purpose or top.purpose or cat.purpose
                rows.append({"category": cat.name, "field": path, "purpose": purpose, "stored_as": stored, "retention": retention})
        for name, stored, purpose in cat.extra:
            rows.append({"category": cat.name, "field": name, "purpose": purpose, "stored_as": stored, "retention": retention})
    # Not telemetry, but stored all the same: what an installation calls its agents.
    for f in AGENT_REGISTRATION.fields:
        rows.append({"category": "agent", "field": f.name, "purpose": f.purpose, "stored_as": f.storage,
                     "retention": "as long as the installation's record (erasure, or {inactive_days} days without a heartbeat)".format(**limits)})
    return rows
