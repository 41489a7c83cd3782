"""Envelope encryption: key-encryption keys, per-installation data keys, sealed records."""
