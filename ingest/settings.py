"""Settings: one frozen dataclass, built once from the environment and `serve` flags, validated at start."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(v: str) -> float:
        n = float(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return parse


def _access_log(v: str) -> str:
    """on, off, or sample:N (N from 1 to 1,000,000)."""
    if v in ("on", "off"):
        return v
    kind, _, n = v.partition(":")
    if kind == "sample" and n.isdigit() and 1 <= int(n) <= 1_000_000:
        return f"sample:{int(n)}"
    raise ValueError("must be on, off or sample:N (N from 1 to 1000000)")


def _networks(v: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in v.split(",") if p.strip())


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # "_" too: container names have it


def _host(v: str) -> str:
    """An IP address or a host name (RFC 1123); an all-numeric name such as 256.1.1.1 is a bad address, not a name."""
    v = v.strip()
    if not v:
        raise ValueError("must not be empty")
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    labels = v.rstrip(".").split(".")
    if len(v) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("must be an IP address or a host name")
    return v


def _dsn(v: str) -> str:
    """A PostgreSQL URI (postgresql://user@host:port/db?...), the form asyncpg takes; checked without echoing it."""
    v = _nonempty(v)
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise ValueError("must be a postgresql:// URI") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URI")
    return v


def _nonempty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _setting(default: Any, parse: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    # secret: read from the environment only, never a flag (a command line shows in `ps` and shell history),
    # and never echoed in an error message.
    return field(default=default, metadata={"parse": parse, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Field `x_y` is read from TELEMETRY_X_Y and `serve --x-y` (secret fields: the environment only)."""

    # The contract's settings.
    dsn: str | None = _setting(None, _dsn, "PostgreSQL to use, a postgresql:// URI (unset: embedded PostgreSQL in the data directory)", secret=True)
    data_dir: Path = _setting(Path("./telemetry-data"), Path, "embedded database and generated key file")
    master_key: str | None = _setting(None, _nonempty, "key-encryption keys, comma-separated base64; first is primary", secret=True)
    host: str = _setting("127.0.0.1", _host, "listen address")
    port: int = _setting(8080, _int(0, 65535), "listen port")
    workers: int = _setting(os.cpu_count() or 1, _int(1, 256), "worker processes sharing the port")
    unknown_fields: str = _setting("drop", _choice("drop", "reject"), "what to do with undeclared fields: drop or reject")
    trusted_proxies: tuple[Network, ...] = _setting((), _networks, "CIDRs whose X-Forwarded-For is believed")
    sweep_interval: float = _setting(60.0, _float(0.05, 86400), "seconds between sweeps (the first runs at start)")
    keystore_dsn: str | None = _setting(None, _dsn, "PostgreSQL of the key store, a postgresql:// URI (unset: database <name>_keys on the TELEMETRY_DSN server; embedded: telemetry_keys)", secret=True)
    service_dsn: str | None = _setting(None, _dsn, "PostgreSQL for the service's serving connections, a postgresql:// URI logging in as a role that cannot alter or bypass the audit log (docs/admin.md#roles); TELEMETRY_DSN then migrates and sets the role up (unset: TELEMETRY_DSN itself; embedded: a generated role)", secret=True)
    json_max_values: int = _setting(1_000_000, _int(1, 1 << 31), "most JSON values in one body (counted before parsing; over it: 413)")
    policy: Path | None = _setting(None, lambda v: Path(_nonempty(v)), "path of a policy file (TOML, docs/policy.md); unset: the built-in policy (policy/builtin.toml)")
    # Beyond the contract (documented in the README).
    heartbeat_retention_days: int = _setting(30, _int(1, 3650), "days of heartbeat history kept")
    audit_retention_days: int = _setting(730, _int(30, 36500), "days the audit log of administrative actions keeps a row (at least 30)")
    inactive_days: int = _setting(400, _int(1, 36500), "days without heartbeat after which an installation is removed")
    # Data keys are replaced long before AES-GCM's random-nonce bound of 2**32 messages per key.
    data_key_max_uses: int = _setting(100_000_000, _int(1, 1 << 31), "records sealed under one data key before the sweeper adds a new one")
    data_key_max_age_days: int = _setting(90, _int(1, 36500), "days after which the sweeper gives an installation a new data key")
    stats_k: int = _setting(5, _int(1, 1_000_000), "smallest group shown in statistics")
    heartbeat_max_bytes: int = _setting(1 << 20, _int(1024, 1 << 30), "largest heartbeat body")
    scan_max_bytes: int = _setting(16 << 20, _int(1024, 1 << 31), "largest scan body as sent")
    scan_max_decoded_bytes: int = _setting(64 << 20, _int(1024, 1 << 32), "largest scan body after decompression")
    json_max_depth: int = _setting(32, _int(2, 1000), "deepest JSON nesting accepted")
    queue_size: int = _setting(10_000, _int(1, 10_000_000), "records waiting for commit per worker before 503")
    batch_max_rows: int = _setting(1000, _int(1, 100_000), "rows per group-commit batch")
    batch_max_bytes: int = _setting(8 << 20, _int(1024, 1 << 31), "bytes per group-commit batch")
    db_pool_size: int = _setting(10, _int(1, 1000), "database connections per worker")
    db_statement_cache: int = _setting(100, _int(0, 100_000), "prepared statements cached per connection (0 for PgBouncer transaction mode)")
    rate_limit: float = _setting(0.0, _float(0, 1e9), "requests per second per token on each node, shared out over its workers (0: off)")
    rate_burst: int = _setting(100, _int(1, 1_000_000), "burst size of the per-token rate limit on each node, shared out over its workers")
    address_rate_limit: float = _setting(500.0, _float(0, 1e9), "requests per second per client address prefix (IPv4 /24, IPv6 /48) to authenticated routes, counted before authentication, per node; loopback exempt (0: off)")
    address_rate_burst: int = _setting(1000, _int(1, 10_000_000), "burst size of the per-address-prefix rate limit")
    agents_per_installation: int = _setting(1000, _int(1, 100_000_000), "agents (not deleted) an installation may have; more is 429 naming the quota")
    scan_bytes_per_installation: int = _setting(10 << 30, _int(1 << 20, 1 << 50), "sealed scan bytes an installation may hold unexpired; more is 429 naming the quota")
    read_timeout: float = _setting(30.0, _float(0.1, 3600), "seconds a client may take to send its request")
    db_timeout: float = _setting(1.5, _float(0.1, 3600), "seconds a request may wait for the database, all its waits together, from its arrival (body reception not counted; plus 1 s per 10 MB committed) before 503")
    retry_after: int = _setting(1, _int(1, 3600), "seconds suggested in Retry-After when overloaded")
    log_format: str = _setting("text", _choice("text", "json"), "log lines as text or JSON")
    access_log: str = _setting("sample:100", _access_log, "the access line: on (every request), off, or sample:N (every request answered 4xx or 5xx and one in N of the others)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, str | None] | None = None) -> "Settings":
        """Build from TELEMETRY_* variables, then flags (overrides), validating each; SettingsError names the bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = env_name(f.name)
            raw = env.get(var)
            source = var
            if overrides and overrides.get(f.name) is not None:
                if f.metadata.get("secret"):
                    raise SettingsError(f"--{f.name.replace('_', '-')}: a secret setting is read from {var} only, never a flag")
                raw, source = overrides[f.name], "--" + f.name.replace("_", "-")
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{source}: invalid value {_shown(f.name, raw)}: {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def env_name(field_name: str) -> str:
    """TELEMETRY_ variable of a setting."""
    return "TELEMETRY_" + field_name.upper()


def secret_fields() -> frozenset[str]:
    """Names of the settings that are secrets: environment only, never shown."""
    return frozenset(f.name for f in dataclasses.fields(Settings) if f.metadata.get("secret"))


def _shown(name: str, raw: str) -> str:
    # Never echo secrets into a log or terminal.
    return "(hidden)" if name in secret_fields() else repr(raw)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, for --help and the README."""
    out = []
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "unset" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        out.append((env_name(f.name), shown, f.metadata["help"]))
    return out
