"""A bounded in-memory cache of unwrapped data keys, loaded through a callback (no SQL here)."""

from __future__ import annotations

import struct
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from crypto.envelope import DataKey
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing

# (key_id, kek_id, wrapped) rows of one installation, newest first.
Loader = Callable[[uuid.UUID], Awaitable[Iterable[tuple[int, str, bytes]]]]


def wrap_context(install_id: uuid.UUID, key_id: int) -> bytes:
    """Associated data that binds a wrapped data key to its installation and serial."""
    return install_id.bytes + struct.pack(">I", key_id)


class DataKeyCache:
    """Unwrapped data keys per installation, least recently used evicted first."""

    def __init__(self, ring: KeyRing, load: Loader, *, max_installations: int = 50_000) -> None:
        self._ring = ring
        self._load = load
        self._max = max_installations
        self._keys: OrderedDict[uuid.UUID, dict[int, DataKey]] = OrderedDict()
        self._newest: dict[uuid.UUID, int] = {}

    async def _entry(self, install_id: uuid.UUID) -> dict[int, DataKey]:
        keys = self._keys.get(install_id)
        if keys is not None:
            self._keys.move_to_end(install_id)
            return keys
        rows = list(await self._load(install_id))
        keys = {
            key_id: DataKey.from_bytes(key_id, self._ring.unwrap(kek_id, bytes(wrapped), wrap_context(install_id, key_id)))
            for key_id, kek_id, wrapped in rows
        }
        if not keys:
            raise DecryptionError()
        self._keys[install_id] = keys
        self._newest[install_id] = max(keys)
        while len(self._keys) > self._max:
            old, _ = self._keys.popitem(last=False)
            self._newest.pop(old, None)
        return keys

    async def current(self, install_id: uuid.UUID) -> DataKey:
        """The newest data key of an installation, for sealing."""
        keys = await self._entry(install_id)
        return keys[self._newest[install_id]]

    async def get(self, install_id: uuid.UUID, key_id: int) -> DataKey:
        """A specific data key, for opening; DecryptionError if it no longer exists."""
        keys = await self._entry(install_id)
        key = keys.get(key_id)
        if key is None:
            self.evict(install_id)  # maybe a newer key was made elsewhere: reload once
            key = (await self._entry(install_id)).get(key_id)
            if key is None:
                raise DecryptionError()
        return key

    def evict(self, install_id: uuid.UUID) -> None:
        """Forget an installation's keys (after erasure, rotation or revocation)."""
        self._keys.pop(install_id, None)
        self._newest.pop(install_id, None)
