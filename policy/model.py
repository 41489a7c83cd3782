"""The policy model: categories, their fields, how each is stored and how long it is kept.

Frozen dataclasses, built by `policy.loader` from a TOML file (docs/policy.md) and
read by validation, the storage layout, the OpenAPI document, `policy show` and
`audit`. Nothing here knows a category by name.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["string", "integer", "number", "boolean", "uuid", "time", "email", "object", "list"]
# "key": the record's lookup key in the clear (the installation key, an idempotency key); the file says
# plaintext for those, the loader marks them.
Storage = Literal["key", "plaintext", "encrypted", "anonymised", "keyed-hash", "not-stored"]
State = Literal["current", "events"]


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
    """A category of data the privacy notice discloses.

    A sealed category has `root.storage == "encrypted"`: the filtered record is encrypted
    whole, only its keys stay in the clear. `extra` lists what is stored without being read
    from the body (the sender's address): (field, stored as, purpose).
    """

    name: str
    purpose: str
    root: Field
    retention: dt.timedelta
    extra: tuple[tuple[str, str, str], ...] = field(default=())
    record: str = "record"  # what one record is called in the disclosure ("heartbeat")
    state: State = "events"
    idempotency_key: str | None = None
    installation_key: str | None = None
    shortest_retention: dt.timedelta | None = None  # set when installations may shorten the retention
    statistics: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.root.fields

    @property
    def sealed(self) -> bool:
        return self.root.storage == "encrypted"

    @property
    def retention_hours(self) -> int:
        return int(self.retention.total_seconds()) // 3600

    @property
    def retention_setting(self) -> str | None:
        """Name of the installation setting that shortens this category's retention, if it may."""
        return None if self.shortest_retention is None else f"{self.name}_retention_hours"

    def retention_text(self, *, history_days: int | None = None, inactive_days: int, own_table: bool = True) -> str:
        """The retention as a privacy notice states it, for the configured limits.

        own_table False: a category received at POST /v1/records/{name} (not a built-in one with its
        own tables), whose `current` state keeps the latest record only, `retention` after its receipt."""
        if self.state == "current" and not own_table:
            return f"the latest {self.record} only, {self._expiry_text()}"
        if self.state == "current":
            days = history_days if history_days is not None else self.retention.days
            return (f"current record until {inactive_days} days without a {self.record}; "
                    f"{self.record} history {days} days")
        return self._expiry_text()

    def _expiry_text(self) -> str:
        if self.shortest_retention is not None:
            lo = int(self.shortest_retention.total_seconds()) // 3600
            return (f"{self.retention_hours} hours after receipt by default; the installation may choose "
                    f"{lo} to {self.retention_hours} hours")
        return f"{_duration_text(self.retention)} after receipt"


def _duration_text(d: dt.timedelta) -> str:
    if d.seconds == 0 and d.days:
        return f"{d.days} day" + ("s" if d.days != 1 else "")
    hours = int(d.total_seconds()) // 3600
    return f"{hours} hour" + ("s" if hours != 1 else "")


@dataclass(frozen=True)
class Policy:
    """Every category a file declares, the agent registration it allows, and where it came from."""

    categories: tuple[Category, ...]
    agents: Field | None = None  # the body of POST /v1/agents: an installation's labels for its agents
    source: str = field(default="", compare=False)  # the file's path, for messages
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # category name -> line

    def category(self, name: str) -> Category:
        """The category of that name (KeyError if the file does not declare it)."""
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(name)

    def settings_field(self) -> Field:
        """The body of PUT /v1/installation/settings: one retention setting per shortenable category."""
        return Field("settings", "object", fields=tuple(
            Field(c.retention_setting, "integer", required=True, minimum=int(c.shortest_retention.total_seconds()) // 3600,
                  maximum=c.retention_hours)
            for c in self.categories if c.retention_setting is not None))

    def disclosure_rows(self, *, heartbeat_retention_days: int | None = None, inactive_days: int,
                        records: frozenset[str] = frozenset()) -> list[dict[str, str]]:
        """One row per declared field (nested ones by path): the table a privacy notice can quote.

        heartbeat_retention_days, when given, is the configured history of the categories that keep a
        current record (TELEMETRY_HEARTBEAT_RETENTION_DAYS); otherwise the file's retention is stated.
        records: the categories received at POST /v1/records/{name} (the others have tables of their own).
        """
        rows = []
        for cat in self.categories:
            retention = cat.retention_text(history_days=heartbeat_retention_days, inactive_days=inactive_days,
                                           own_table=cat.name not in records)
            for top in cat.fields:
                for path, f in leaves(top, top.name):
                    stored = f.storage if not cat.sealed or f.storage == "key" else "encrypted"
                    stored = "plaintext (lookup key)" if stored == "key" else stored
                    purpose = f.purpose or top.purpose or cat.purpose
                    kept = "not kept: checked, then discarded" if stored == "not-stored" else retention
                    rows.append({"category": cat.name, "field": path, "purpose": purpose, "stored_as": stored, "retention": kept})
            for name, stored, purpose in cat.extra:
                rows.append({"category": cat.name, "field": name, "purpose": purpose, "stored_as": stored, "retention": retention})
        if self.agents is not None:
            # Not telemetry, but stored all the same: what an installation calls its agents.
            record = next((c.record for c in self.categories if c.state == "current"), "record")
            for f in self.agents.fields:
                rows.append({"category": "agent", "field": f.name, "purpose": f.purpose, "stored_as": f.storage,
                             "retention": f"as long as the installation's record (erasure, or {inactive_days} days without a {record})"})
        return rows


def leaves(f: Field, path: str):
    """(dotted path, field) of every scalar under f; list items are written name[].field."""
    if f.kind == "object":
        for c in f.fields:
            yield from leaves(c, f"{path}.{c.name}" if path else c.name)
    elif f.kind == "list" and f.items is not None:
        item = f.items
        if item.kind == "object":
            for c in item.fields:
                yield from leaves(c, f"{path}[].{c.name}")
        else:
            yield f"{path}[]", item
    else:
        yield path, f


# The body of POST /v1/enroll: not telemetry of any category, only the key an installation's
# records are filed under. The service's own, the same under every policy file.
INSTALL_ID = Field("install_id", "uuid", required=True, storage="key", purpose="identifies the installation")
ENROLLMENT = Field("enrollment", "object", fields=(INSTALL_ID,))
