"""The built-in policy's categories, as the built-in routes and tables use them.

The policy itself is data: `policy/builtin.toml`, read by the `policy` package. This
module only names what the heartbeat and scan paths, their tables (storage.layout)
and the sweeper are built for; every value here comes from that file.
"""

from __future__ import annotations

from policy import ENROLLMENT, INSTALL_ID, Category, Field, Policy, builtin

__all__ = ["AGENT_REGISTRATION", "CATEGORIES", "DEFAULT_HEARTBEAT_RETENTION_DAYS", "DEFAULT_INACTIVE_DAYS",
           "DEFAULT_SCAN_RETENTION_HOURS", "ENROLLMENT", "INSTALLATION", "INSTALL_ID", "MAX_SCAN_RETENTION_HOURS", "SCAN",
           "SCAN_SETTINGS", "STATS_DIMENSIONS", "Category", "Field", "disclosure_rows", "declares", "file_categories"]

BUILTIN = builtin()
# The categories the built-in paths serve: POST /v1/heartbeats and POST /v1/scans.
INSTALLATION: Category = BUILTIN.category("installation")
SCAN: Category = BUILTIN.category("scan")
CATEGORIES: tuple[Category, ...] = BUILTIN.categories
# The bodies of POST /v1/agents and PUT /v1/installation/settings: an installation's own configuration.
AGENT_REGISTRATION: Field = BUILTIN.agents
SCAN_SETTINGS: Field = BUILTIN.settings_field()

BUILTIN_NAMES = frozenset(c.name for c in CATEGORIES)


def file_categories(policy: Policy) -> tuple[Category, ...]:
    """The categories of a policy received at POST /v1/records/{category} (those not built in), in file order."""
    return tuple(c for c in policy.categories if c.name not in BUILTIN_NAMES)


def declares(policy: Policy, builtin_category: Category) -> bool:
    """Whether the policy declares a built-in category (then as built in: serve checks it), so its own path is served."""
    return any(c.name == builtin_category.name for c in policy.categories)


MAX_SCAN_RETENTION_HOURS = SCAN.retention_hours
DEFAULT_SCAN_RETENTION_HOURS = SCAN.retention_hours
DEFAULT_HEARTBEAT_RETENTION_DAYS = INSTALLATION.retention.days
STATS_DIMENSIONS = INSTALLATION.statistics
# Not the policy's: how long an installation that stopped sending is kept (TELEMETRY_INACTIVE_DAYS).
DEFAULT_INACTIVE_DAYS = 400


def disclosure_rows(*, heartbeat_retention_days: int = DEFAULT_HEARTBEAT_RETENTION_DAYS,
                    inactive_days: int = DEFAULT_INACTIVE_DAYS) -> list[dict[str, str]]:
    """The built-in policy's disclosure table, for the configured limits (policy.Policy.disclosure_rows)."""
    return BUILTIN.disclosure_rows(heartbeat_retention_days=heartbeat_retention_days, inactive_days=inactive_days)
