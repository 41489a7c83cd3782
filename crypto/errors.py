"""Errors of the crypto package. Decryption fails opaquely."""


class CryptoError(Exception):
    """Base of every crypto failure."""


class DecryptionError(CryptoError):
    """A ciphertext could not be opened. Deliberately says nothing more."""

    def __init__(self) -> None:
        super().__init__("Decryption failed.")


class KeyError_(CryptoError):
    """A key is malformed, missing or unknown (safe to show: names key ids, never key bytes)."""
