"""Every typed application key, in one place."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from crypto.datakeys import DataKeyCache
    from crypto.keyring import KeyRing
    from ingest.http.auth import Authenticator
    from ingest.http.routes.scans import Retentions
    from ingest.http.slots import PrepareSlots
    from ingest.logs import AccessSampler
    from ingest.metrics import Metrics
    from ingest.pipeline.batching import GroupCommitWriter
    from ingest.settings import Settings
    from ingest.worker.nodes import NodeReporter
    from ingest.worker.restrictions import Restrictions
    from ingest.worker.sweeper import Sweeper
    from policy import Policy

SETTINGS = web.AppKey("settings", "Settings")
# The policy in force (TELEMETRY_POLICY, or the built-in file), loaded once per worker by create_app.
POLICY = web.AppKey("policy", "Policy")
METRICS = web.AppKey("metrics", "Metrics")
POOL = web.AppKey("pool", asyncpg.Pool)
KEYSTORE_POOL = web.AppKey("keystore_pool", asyncpg.Pool)
KEYRING = web.AppKey("keyring", "KeyRing")
DATA_KEYS = web.AppKey("data_keys", "DataKeyCache")
EMAIL_SEALS = web.AppKey("email_seals", "RepeatedSeals")  # each installation's last sealed e-mail (heartbeats)
AUTH = web.AppKey("auth", "Authenticator")
HEARTBEAT_WRITER = web.AppKey("heartbeat_writer", "GroupCommitWriter")
SCAN_WRITER = web.AppKey("scan_writer", "GroupCommitWriter")
RECORD_WRITER = web.AppKey("record_writer", "GroupCommitWriter")  # POST /v1/records/{category}
SCAN_PREPARE = web.AppKey("scan_prepare", ThreadPoolExecutor)
SCAN_RETENTION = web.AppKey("scan_retention", "Retentions")
SCAN_SLOTS = web.AppKey("scan_slots", "PrepareSlots")
RESTRICTIONS = web.AppKey("restrictions", "Restrictions")
SWEEPER = web.AppKey("sweeper", "Sweeper")
# Embedded mode: the key file the worker's ring came from (watched: ingest.worker.nodes); None otherwise.
KEY_FILE = web.AppKey("key_file", object)
NODES = web.AppKey("nodes", "NodeReporter")
ACCESS_LOG = web.AppKey("access_log", "AccessSampler")  # which requests get an access line (TELEMETRY_ACCESS_LOG)

# Per request: the id (never the token) of the token that authenticated it, for the access line.
TOKEN_ID = web.RequestKey("token_id", str)
