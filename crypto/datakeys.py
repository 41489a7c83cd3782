"""Data keys of an installation, and a bounded in-memory cache of them loaded through callbacks (no SQL here).

Two kinds of data key, told apart by their id (the 4-byte key id of crypto.envelope):

- record keys, ids 1, 2, ... (below EPOCH_KEY_BASE): seal the installation's current record (its
  e-mail). The newest seals; the sweeper adds a new one when it is worn.
- epoch keys, id EPOCH_KEY_BASE + n for retention epoch n: seal the scans whose expires_at falls
  in epoch n, the UTC day n after 1970-01-01 (EPOCH). The key store destroys an epoch key in the
  first sweep after the epoch ends; no scan sealed under it is unexpired by then, so nothing is
  lost, and every copy of the data database loses the means to open those scans at once.

Why a day: an installation keeping scans 30 days holds at most 31 epoch keys, one keeping them
24 or 48 hours two or three; a scan stays openable in a copy of the data database at most one
day (plus a sweep interval) past its expiry. docs/admin.md gives the sizes.

Entries live at most `ttl` seconds, so a data key added elsewhere (the sweeper replaces worn
keys) is used for sealing by every worker within that time; until then sealing with the older,
still valid key is fine. The cache also counts the seals it hands keys out for; the owner drains
the counts now and then (`drain_uses`) and adds them up in the database.
"""

from __future__ import annotations

import datetime as dt
import struct
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from crypto.envelope import DataKey, new_key_bytes
from crypto.errors import DecryptionError
from crypto.keyring import KeyRing

# (key_id, kek_id, wrapped[, retiring]) rows of one installation, newest first; a retiring key opens
# what it sealed but seals nothing new.
Loader = Callable[[uuid.UUID], Awaitable[Iterable[tuple]]]
# Store a new epoch key: (install_id, key_id, epoch end, kek_id, wrapped) -> "usable" (a key with that
# id can seal now), "spent" (that id was retired early and is never made again) or "erased".
Creator = Callable[[uuid.UUID, int, dt.datetime, str, bytes], Awaitable[str]]
# How many later epochs a scan may be sealed under when its own epoch's key was retired early
# (a retention shortened, then lengthened again): each step makes the key outlive the scan a day more.
MAX_EPOCH_STEPS = 40

EPOCH_KEY_BASE = 1 << 30
EPOCH = dt.timedelta(days=1)
_EPOCH_ZERO = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def epoch_key_id(expires_at: dt.datetime) -> int:
    """The id of the epoch key that seals a record expiring at expires_at."""
    return EPOCH_KEY_BASE + (expires_at - _EPOCH_ZERO) // EPOCH


def epoch_end(key_id: int) -> dt.datetime:
    """When an epoch key's epoch ends: every record it sealed has expired by then."""
    return _EPOCH_ZERO + (key_id - EPOCH_KEY_BASE + 1) * EPOCH


def is_epoch_key(key_id: int) -> bool:
    return key_id >= EPOCH_KEY_BASE


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


def hash_key_context(category: str) -> bytes:
    """Associated data that binds a wrapped hash key (storage.keystore.hash_keys) to its category."""
    return b"hash-key\x00" + category.encode()


def new_wrapped_hash_key(ring: KeyRing, category: str) -> tuple[str, bytes]:
    """A fresh 256-bit key for the keyed hashes of a category, wrapped by the primary KEK: (kek id, wrapped)."""
    return ring.wrap(new_key_bytes(), hash_key_context(category))


def rewrap_hash_key(ring: KeyRing, category: str, kek_id: str, wrapped: bytes) -> tuple[str, bytes]:
    """A category's hash key wrapped by the primary KEK instead of kek_id (stored hashes stay valid)."""
    context = hash_key_context(category)
    return ring.wrap(ring.unwrap(kek_id, bytes(wrapped), context), context)


class DataKeyCache:
    """Unwrapped data keys per installation, least recently used evicted first."""

    def __init__(self, ring: KeyRing, load: Loader, *, create: Creator | None = None, max_installations: int = 50_000,
                 ttl: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = ring
        self._load = load
        self._create = create
        self._max = max_installations
        self._ttl = ttl
        self._clock = clock
        self._keys: OrderedDict[uuid.UUID, dict[int, DataKey]] = OrderedDict()
        self._retiring: dict[uuid.UUID, frozenset[int]] = {}
        self._newest: dict[uuid.UUID, int] = {}
        self._loaded_at: dict[uuid.UUID, float] = {}
        self._uses: Counter[tuple[uuid.UUID, int]] = Counter()
        self._expiries: dict[tuple[uuid.UUID, int], dt.datetime] = {}

    async def _entry(self, install_id: uuid.UUID) -> dict[int, DataKey]:
        keys = self._keys.get(install_id)
        if keys is not None:
            if self._clock() - self._loaded_at[install_id] < self._ttl:
                self._keys.move_to_end(install_id)
                return keys
            self.evict(install_id)
        rows = [tuple(r) for r in await self._load(install_id)]
        keys = {
            r[0]: DataKey.from_bytes(r[0], self._ring.unwrap(r[1], bytes(r[2]), wrap_context(install_id, r[0])))
            for r in rows
        }
        self._retiring[install_id] = frozenset(r[0] for r in rows if len(r) > 3 and r[3])
        record_keys = [k for k in keys if not is_epoch_key(k)]
        if not record_keys:
            raise DecryptionError()  # erased (its keys destroyed), or never enrolled
        self._keys[install_id] = keys
        self._newest[install_id] = max(record_keys)
        self._loaded_at[install_id] = self._clock()
        while len(self._keys) > self._max:
            old, _ = self._keys.popitem(last=False)
            self._newest.pop(old, None)
            self._loaded_at.pop(old, None)
            self._retiring.pop(old, None)
        return keys

    async def current(self, install_id: uuid.UUID) -> DataKey:
        """The newest data key of an installation, for sealing (counted as one use of it)."""
        key = await self.newest(install_id)
        self.count_use(install_id, key.key_id)
        return key

    async def newest(self, install_id: uuid.UUID) -> DataKey:
        """The newest data key of an installation, not counted: whoever seals with it calls count_use."""
        keys = await self._entry(install_id)
        return keys[self._newest[install_id]]

    def count_use(self, install_id: uuid.UUID, key_id: int) -> None:
        """One seal with this key (added up in the key store through drain_uses)."""
        self._uses[(install_id, key_id)] += 1

    async def for_expiry(self, install_id: uuid.UUID, expires_at: dt.datetime) -> DataKey:
        """The key that seals records expiring at expires_at: its epoch's key, made in the key store on
        first use (counted as a use). If that epoch's key was retired early, the next epoch's that is not:
        a key may outlive what it seals, never the other way round."""
        first = epoch_key_id(expires_at)
        for key_id in range(first, first + MAX_EPOCH_STEPS):
            key = await self._sealing_key(install_id, key_id)
            if key is not None:
                self._uses[(install_id, key_id)] += 1
                return key
        raise DecryptionError()

    async def _sealing_key(self, install_id: uuid.UUID, key_id: int) -> DataKey | None:
        """Epoch key key_id if it may seal (made now if it does not exist); None if that id is spent."""
        for attempt in range(2):
            keys = await self._entry(install_id)
            if key_id in self._retiring.get(install_id, ()):
                return None
            key = keys.get(key_id)
            if key is not None:
                return key
            if attempt == 0:
                self.evict(install_id)  # another worker may have made it: reload before making one
        if self._create is None:
            raise DecryptionError()
        kek_id, wrapped = new_wrapped_key(self._ring, install_id, key_id)
        state = await self._create(install_id, key_id, epoch_end(key_id), kek_id, wrapped)
        self.evict(install_id)  # read back whichever key won, ours or a concurrent worker's
        if state == "erased":
            raise DecryptionError()  # the installation lost its keys (erased) meanwhile
        if state != "usable":
            return None
        key = (await self._entry(install_id)).get(key_id)
        if key is None or key_id in self._retiring.get(install_id, ()):
            raise DecryptionError()
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
        self._retiring.pop(install_id, None)

    def drain_uses(self) -> dict[tuple[uuid.UUID, int], int]:
        """Seals counted per (installation, key id) since the last drain; the count restarts at zero."""
        uses, self._uses = dict(self._uses), Counter()
        return uses

    def note_expiry(self, install_id: uuid.UUID, key_id: int, expires_at: dt.datetime) -> None:
        """A record sealed under key_id was stored, expiring at expires_at (reported with the uses)."""
        k = (install_id, key_id)
        if k not in self._expiries or self._expiries[k] < expires_at:
            self._expiries[k] = expires_at

    def drain_expiries(self) -> dict[tuple[uuid.UUID, int], dt.datetime]:
        """The latest expiry noted per (installation, key id) since the last drain."""
        out, self._expiries = self._expiries, {}
        return out
