"""A bounded in-memory cache of unwrapped data keys, loaded through a callback (no SQL here).

Entries live at most `ttl` seconds, so a data key added elsewhere (the sweeper replaces worn
keys) is used for sealing by every worker within that time; until then sealing with the older,
still valid key is fine. The cache also counts the seals it hands keys out for; the owner drains
the counts now and then (`drain_uses`) and adds them up in the database.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from crypto.envelope import DataKey, new_key_bytes
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing

# (key_id, kek_id, wrapped) rows of one installation, newest first.
Loader = Callable[[uuid.UUID], Awaitable[Iterable[tuple[int, str, bytes]]]]


def wrap_context(install_id: uuid.UUID, key_id: int) -> bytes:
    """Associated data that binds a wrapped data key to its installation and serial."""
    return install_id.bytes + struct.pack(">I", key_id)


def new_wrapped_key(ring: KeyRing, install_id: uuid.UUID, key_id: int) -> tuple[str, bytes]:
    """Fresh data key number key_id of an installation, wrapped by the primary KEK: (kek id, wrapped)."""
    return ring.wrap(new_key_bytes(), wrap_context(install_id, key_id))


def rewrap(ring: KeyRing, install_id: uuid.UUID, key_id: int, kek_id: str, wrapped: bytes) -> tuple[str, bytes]:
    """The same data key wrapped by the primary KEK instead of kek_id (payloads stay as they are)."""
    context = wrap_context(install_id, key_id)
    return ring.wrap(ring.unwrap(kek_id, bytes(wrapped), context), context)


class DataKeyCache:
    """Unwrapped data keys per installation, least recently used evicted first."""

    def __init__(self, ring: KeyRing, load: Loader, *, max_installations: int = 50_000, ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = ring
        self._load = load
        self._max = max_installations
        self._ttl = ttl
        self._clock = clock
        self._keys: OrderedDict[uuid.UUID, dict[int, DataKey]] = OrderedDict()
        self._newest: dict[uuid.UUID, int] = {}
        self._loaded_at: dict[uuid.UUID, float] = {}
        self._uses: Counter[tuple[uuid.UUID, int]] = Counter()

    async def _entry(self, install_id: uuid.UUID) -> dict[int, DataKey]:
        keys = self._keys.get(install_id)
        if keys is not None:
            if self._clock() - self._loaded_at[install_id] < self._ttl:
                self._keys.move_to_end(install_id)
                return keys
            self.evict(install_id)
        rows = list(await self._load(install_id))
        keys = {
            key_id: DataKey.from_bytes(key_id, self._ring.unwrap(kek_id, bytes(wrapped), wrap_context(install_id, key_id)))
            for key_id, kek_id, wrapped in rows
        }
        if not keys:
            raise DecryptionError()
        self._keys[install_id] = keys
        self._newest[install_id] = max(keys)
        self._loaded_at[install_id] = self._clock()
        while len(self._keys) > self._max:
            old, _ = self._keys.popitem(last=False)
            self._newest.pop(old, None)
            self._loaded_at.pop(old, None)
        return keys

    async def current(self, install_id: uuid.UUID) -> DataKey:
        """The newest data key of an installation, for sealing (counted as one use of it)."""
        keys = await self._entry(install_id)
        key = keys[self._newest[install_id]]
        self._uses[(install_id, key.key_id)] += 1
        return key

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
        self._loaded_at.pop(install_id, None)

    def drain_uses(self) -> dict[tuple[uuid.UUID, int], int]:
        """Seals counted per (installation, key id) since the last drain; the count restarts at zero."""
        uses, self._uses = dict(self._uses), Counter()
        return uses
