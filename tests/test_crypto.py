"""Unit tests of crypto/: the envelope format, the key ring, tokens, the key file."""

import base64
import os
import stat
import uuid

import pytest

from crypto import envelope
from crypto.datakeys import DataKeyCache, wrap_context
from crypto.errors import DecryptionError, KeyError_
from crypto.keyring import KeyRing, kek_id, load_or_create_key_file, parse_keys, prepend_key_to_file
from crypto.tokens import PREFIXES, hash_token, new_token, role_of


def key(n=1):
    return envelope.DataKey.from_bytes(n, envelope.new_key_bytes())


def test_seal_open_round_trip_and_header():
    k = key(7)
    ct = envelope.seal(k, b"secret", b"ctx")
    assert ct[0] == envelope.FORMAT_VERSION
    assert envelope.key_id_of(ct) == 7
    assert b"secret" not in ct
    assert envelope.open_(k, ct, b"ctx") == b"secret"
    # random nonces: the same plaintext never gives the same ciphertext
    assert envelope.seal(k, b"secret", b"ctx") != ct


@pytest.mark.parametrize("mutate", ["context", "flip", "truncate", "version", "other_key", "key_id"])
def test_open_fails_opaquely(mutate):
    k = key(1)
    ct = envelope.seal(k, b"payload", b"install-a|scan-1")
    ctx = b"install-a|scan-1"
    use = k
    if mutate == "context":
        ctx = b"install-b|scan-1"
    elif mutate == "flip":
        ct = ct[:-1] + bytes([ct[-1] ^ 1])
    elif mutate == "truncate":
        ct = ct[:10]
    elif mutate == "version":
        ct = b"\x02" + ct[1:]
    elif mutate == "other_key":
        use = key(1)
    elif mutate == "key_id":
        ct = ct[:1] + (2).to_bytes(4, "big") + ct[5:]
    with pytest.raises(DecryptionError) as exc:
        envelope.open_(use, ct, ctx)
    assert str(exc.value) == "Decryption failed."


def test_context_is_required():
    with pytest.raises(ValueError):
        envelope.seal(key(), b"x", b"")


def test_keyring_wraps_with_primary_and_unwraps_with_any():
    old, new = os.urandom(32), os.urandom(32)
    ring_old = KeyRing([old])
    kid, wrapped = ring_old.wrap(b"k" * 32, b"ctx")
    assert kid == kek_id(old)
    ring = KeyRing([new, old])
    assert ring.primary_id == kek_id(new)
    assert ring.unwrap(kid, wrapped, b"ctx") == b"k" * 32
    with pytest.raises(DecryptionError):
        ring.unwrap(kid, wrapped, b"other")
    with pytest.raises(KeyError_) as exc:
        KeyRing([new]).unwrap(kid, wrapped, b"ctx")
    assert kid in str(exc.value)


def test_keyring_rejects_bad_keys_at_construction():
    with pytest.raises(KeyError_):
        KeyRing([b"short"])
    with pytest.raises(KeyError_):
        KeyRing.from_setting("not base64!!")
    with pytest.raises(KeyError_) as exc:
        parse_keys(base64.b64encode(os.urandom(32)).decode() + "," + base64.b64encode(b"x" * 16).decode())
    assert "#2" in str(exc.value)
    assert len(parse_keys(" " + base64.b64encode(os.urandom(32)).decode() + "\n")) == 1


def test_key_file_created_0600_and_rotated(tmp_path):
    path = tmp_path / "d" / "master.key"
    value, created = load_or_create_key_file(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key_file(path) == (value, False)
    new_id = prepend_key_to_file(path)
    ring = KeyRing.from_setting(path.read_text())
    assert ring.primary_id == new_id and len(ring.key_ids) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tokens_are_prefixed_random_and_hashed():
    for role, prefix in PREFIXES.items():
        token_id, token, digest = new_token(role)
        assert token.startswith(prefix) and role_of(token) == role
        assert len(token) - len(prefix) >= 43  # 32 random bytes, base64url
        assert digest == hash_token(token) and len(digest) == 32
        assert token_id not in token
    assert role_of("tiadm_abc") == "admin"
    assert role_of("bearer") is None
    assert new_token("agent")[1] != new_token("agent")[1]


async def test_data_key_cache_loads_once_and_evicts():
    ring = KeyRing([os.urandom(32)])
    install = uuid.uuid4()
    kid, wrapped = ring.wrap(b"d" * 32, wrap_context(install, 1))
    calls = []

    async def load(i):
        calls.append(i)
        return [(1, kid, wrapped)] if i == install else []

    cache = DataKeyCache(ring, load, max_installations=1)
    k = await cache.current(install)
    assert k.key_id == 1 and (await cache.get(install, 1)) is k and len(calls) == 1
    cache.evict(install)
    await cache.current(install)
    assert len(calls) == 2
    with pytest.raises(DecryptionError):
        await cache.current(uuid.uuid4())
    # a wrapped key copied to another installation does not unwrap
    other = uuid.uuid4()

    async def load_moved(i):
        return [(1, kid, wrapped)]

    with pytest.raises(DecryptionError):
        await DataKeyCache(ring, load_moved).current(other)
