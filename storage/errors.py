"""Errors of the storage package."""


class StorageError(Exception):
    """Base of storage failures."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or is not accepting work now (retryable)."""


class UnsafeDatabase(StorageError):
    """The database is configured so that acknowledged writes could be lost."""


class RoleSetupError(StorageError):
    """The service role cannot be set up as TELEMETRY_DSN's role (storage.roles); the message says what to do, never a password."""


class AlreadyExists(StorageError):
    """A unique key is taken (e.g. install_id already enrolled)."""


class NotFound(StorageError):
    """The row does not exist."""


class Restricted(StorageError):
    """Processing of this installation is restricted."""


class QuotaReached(StorageError):
    """An installation is at one of its quotas (named by `quota`, e.g. agents_per_installation)."""

    def __init__(self, quota: str, limit: int) -> None:
        super().__init__(f"{quota} ({limit}) reached")
        self.quota = quota
        self.limit = limit
