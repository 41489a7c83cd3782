"""The privacy policy as data: the model, the TOML loader and checker, and the built-in file.

Arrows: `ingest` and `storage` import this package; it imports nothing of theirs.
"""

from __future__ import annotations

import functools
from pathlib import Path

from policy.loader import PolicyError, Problem, check_text, load, parse_duration
from policy.model import ENROLLMENT, INSTALL_ID, Category, Field, Policy, leaves

BUILTIN_PATH = Path(__file__).with_name("builtin.toml")

__all__ = ["BUILTIN_PATH", "ENROLLMENT", "INSTALL_ID", "Category", "Field", "Policy", "PolicyError", "Problem",
           "builtin", "check_text", "leaves", "load", "load_in_force", "parse_duration"]


@functools.cache
def builtin() -> Policy:
    """The built-in policy (policy/builtin.toml): an IT-inventory vendor's heartbeats and scans."""
    return load(BUILTIN_PATH)


def load_in_force(path: str | Path | None) -> Policy:
    """The policy a TELEMETRY_POLICY value puts in force: that file, or the built-in one (None)."""
    return builtin() if path is None else load(path)
