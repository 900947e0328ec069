"""Encryption keys: where they come from, how they are named and checked.

Keys come from the environment variable named by ``encryption_keys_env``
(default ``RPT_ENCRYPTION_KEYS``) or the file ``encryption_key_file`` (which
must not be readable by group or others): entries ``<key id>:<base64 of 32
random bytes>``, comma- or newline-separated. Generate one with
``rasa-persistent-tracker new-key``. The first key encrypts, every key
decrypts (``crypto.py``). Key material never appears in errors, logs or reprs.
"""
import base64
import binascii
import hashlib
import hmac
import os
import re
import stat
from typing import List, Mapping, Optional, Tuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import ConfigError

_CHECK_MESSAGE = b"rasa_persistent_tracker key check v1"
# A key id: what value prefixes and errors name.
# \Z, not $: "$" also matches before a final newline ("k1\n" is no key id).
KEY_ID = re.compile(r"[A-Za-z0-9_\-]{1,32}\Z")


class Keyring:
    """Named AES keys; the first one encrypts. Reprs show key ids only."""

    def __init__(self, keys: List[Tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("Encryption is configured but no key was given.")
        self.primary = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        # A separate key per purpose: the MAC key is derived, never the AES key itself.
        self._mac_keys = {kid: hmac.new(key, b"rpt-mac:2", hashlib.sha256).digest()
                          for kid, key in keys}
        self._material = [key for _, key in keys]
        # A key check value (as banks use in key ceremonies): tells whether a
        # key is the one data was written with, without revealing the key.
        self._checks = {kid: hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]
                        for kid, key in keys}

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary!r}, ids={sorted(self._ciphers)!r})"

    def cipher(self, kid: str) -> Optional[AESGCM]:
        return self._ciphers.get(kid)

    def mac_key(self, kid: str) -> Optional[bytes]:
        return self._mac_keys.get(kid)

    def derived(self, purpose: bytes) -> List[bytes]:
        """A key per configured key (primary first) for another ``purpose``."""
        return [hmac.new(key, purpose, hashlib.sha256).digest() for key in self._material]

    @property
    def ids(self) -> List[str]:
        return list(self._ciphers)

    def check_value(self, kid: str) -> str:
        """The key check value of key ``kid`` (safe to store and to show)."""
        return self._checks[kid]


def parse_keys(text: str, source: str) -> Keyring:
    """Parse ``kid:base64key`` entries. Errors name the entry, never the key."""
    keys: List[Tuple[str, bytes]] = []
    entries = [e.strip() for e in re.split(r"[,\n]", text)]
    for position, entry in enumerate((e for e in entries if e and not e.startswith("#")), 1):
        kid, sep, material = entry.partition(":")
        if not sep or not KEY_ID.fullmatch(kid):
            raise ConfigError(f"Encryption key #{position} in {source} must look like "
                              f"'<key id>:<base64 key>' with a key id of letters, digits, "
                              f"'_' or '-'.")
        material = material.strip()
        try:
            # validate=True: stray characters are an error, not silently dropped.
            key = base64.b64decode(material.replace("-", "+").replace("_", "/")
                                   + "=" * (-len(material) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"Encryption key '{kid}' in {source} is not valid base64.") from None
        if len(key) != 32:
            raise ConfigError(f"Encryption key '{kid}' in {source} is {len(key)} bytes; "
                              f"AES-256 needs 32 (generate one with "
                              f"'rasa-persistent-tracker new-key').")
        if any(kid == k for k, _ in keys):
            raise ConfigError(f"Encryption key id '{kid}' appears twice in {source}.")
        keys.append((kid, key))
    return Keyring(keys)


def new_key_entry(kid: str) -> str:
    """A fresh ``kid:base64key`` entry."""
    if not KEY_ID.fullmatch(kid):
        raise ConfigError(f"Key id {kid!r} must be 1-32 letters, digits, '_' or '-'.")
    return f"{kid}:{base64.urlsafe_b64encode(os.urandom(32)).decode('ascii')}"


def load_keyring(config: StoreConfig, environ: Optional[Mapping[str, str]] = None) -> Optional[Keyring]:
    """The keyring from the environment or key file; None if neither is set."""
    env = os.environ if environ is None else environ
    name = config.encryption_keys_env
    text = env.get(name)
    if text is not None:
        if not text.strip():
            # Set but empty (a template left unfilled): never silently unencrypted.
            raise ConfigError(f"Environment variable {name} is set but empty: give it the "
                              f"encryption keys ('<key id>:<base64 key>'), or unset it to "
                              f"store without encryption.")
        return parse_keys(text, f"environment variable {name}")
    if config.encryption_key_file:
        return parse_keys(_read_key_file(config.encryption_key_file),
                          f"key file {config.encryption_key_file}")
    return None


def _read_key_file(path: str) -> str:
    """The key file's text; refused (as ssh refuses a private key) if group or
    others may read or write it."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"Config key 'encryption_key_file' ({path}) is accessible by group or "
                    f"others (mode {stat.S_IMODE(mode):04o}): restrict it with "
                    f"'chmod 600 {path}'.")
            text = handle.read()
            if not text.strip():
                raise ConfigError(f"Config key 'encryption_key_file' ({path}) is empty.")
            return text
    except OSError as exc:
        raise ConfigError(f"Config key 'encryption_key_file' ({path}) "
                          f"cannot be read: {exc.strerror}.") from None
