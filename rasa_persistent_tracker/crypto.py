"""Encryption at rest: AES-256-GCM with a key id in every ciphertext.

``EncryptedSerializer`` wraps another serialiser (as langgraph's
``EncryptedSerializer`` wraps its serde): ``rpt-enc:1:<key id>:<base64url(nonce
‖ ciphertext ‖ tag)>``. The key id and format version are authenticated (AAD),
so tampering with any part fails decryption. The first key encrypts, every key
decrypts: put a new key first to rotate, run ``rasa-persistent-tracker
rotate-keys``, then drop the old one.

Keys come from the environment variable named by ``encryption_keys_env``
(default ``RPT_ENCRYPTION_KEYS``) or the file ``encryption_key_file``: entries
``<key id>:<base64 of 32 random bytes>``, comma- or newline-separated. Generate
one with ``rasa-persistent-tracker new-key``. Key material never appears in
errors, logs or reprs.
"""
import base64
import binascii
import hashlib
import hmac
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rasa_persistent_tracker.codec import Serializer
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import ConfigError, CorruptRecordError, EncryptionKeyMissing

PREFIX = "rpt-enc:1:"
_KID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
# Events whose content is never user data; everything else is encrypted.
_PLAIN_EVENT_TYPES = frozenset({
    "action", "active_loop", "followup", "restart", "pause", "resume", "rewind", "undo",
    "reset_slots", "user_featurization", "loop_interrupted", "action_execution_rejected",
})
_PLAIN_SLOTS = frozenset({"requested_slot"})
_CHECK_MESSAGE = b"rasa_persistent_tracker key check v1"


class Keyring:
    """Named AES keys; the first one encrypts. Reprs show key ids only."""

    def __init__(self, keys: List[Tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("Encryption is configured but no key was given.")
        self.primary = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        # A key check value (as banks use for key ceremonies): tells whether a
        # key is the one data was written with, without revealing the key.
        self._checks = {kid: hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]
                        for kid, key in keys}

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary!r}, ids={sorted(self._ciphers)!r})"

    def cipher(self, kid: str) -> Optional[AESGCM]:
        return self._ciphers.get(kid)

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
        if not sep or not _KID_RE.match(kid):
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
    if not _KID_RE.match(kid):
        raise ConfigError(f"Key id {kid!r} must be 1-32 letters, digits, '_' or '-'.")
    return f"{kid}:{base64.urlsafe_b64encode(os.urandom(32)).decode('ascii')}"


def load_keyring(config: StoreConfig, environ: Optional[Mapping[str, str]] = None) -> Optional[Keyring]:
    """The keyring from the environment or key file; None if neither is set."""
    env = os.environ if environ is None else environ
    text = env.get(config.encryption_keys_env)
    if text:
        return parse_keys(text, f"environment variable {config.encryption_keys_env}")
    if config.encryption_key_file:
        try:
            with open(config.encryption_key_file, encoding="utf-8") as handle:
                return parse_keys(handle.read(), f"key file {config.encryption_key_file}")
        except OSError as exc:
            raise ConfigError(f"Config key 'encryption_key_file' ({config.encryption_key_file}) "
                              f"cannot be read: {exc.strerror}.") from None
    return None


class EncryptedSerializer:
    """Wraps a serialiser with AES-256-GCM. See the module docstring."""

    def __init__(self, inner: Serializer, keyring: Keyring) -> None:
        self._inner = inner
        self.keyring = keyring

    def __repr__(self) -> str:
        return f"EncryptedSerializer({self.keyring!r})"

    def dumps(self, value: Any) -> str:
        return self.seal(self._inner.dumps(value))

    def seal(self, text: str) -> str:
        """Encrypt text the inner serialiser produced (pre-serialised parts)."""
        kid = self.keyring.primary
        nonce = os.urandom(12)
        sealed = self.keyring.cipher(kid).encrypt(
            nonce, text.encode("utf-8"), (PREFIX + kid).encode("ascii"))
        return f"{PREFIX}{kid}:{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"

    def loads(self, text: str) -> Any:
        if not text.startswith(PREFIX):
            if text[:1] in ("{", "["):
                return self._inner.loads(text)  # written before encryption was on
            raise CorruptRecordError("payload is neither JSON nor ciphertext")
        kid, _, body = text[len(PREFIX):].partition(":")
        cipher = self.keyring.cipher(kid)
        if cipher is None:
            if _KID_RE.match(kid):
                raise EncryptionKeyMissing(
                    f"stored data is encrypted with key id '{kid}', which this process was not "
                    f"given (configured: {', '.join(self.keyring.ids)}); nothing was changed")
            raise CorruptRecordError("ciphertext names no valid key id")
        try:
            blob = base64.urlsafe_b64decode(body.encode("ascii"))
            plain = cipher.decrypt(blob[:12], blob[12:], (PREFIX + kid).encode("ascii"))
        except (InvalidTag, binascii.Error, ValueError, UnicodeEncodeError):
            raise CorruptRecordError("decryption failed (tampered data or wrong key)") from None
        return self._inner.loads(plain.decode("utf-8", errors="strict"))


def key_id_of(text: str) -> Optional[str]:
    """The key id a payload was encrypted with (None: plaintext)."""
    if not text.startswith(PREFIX):
        return None
    return text[len(PREFIX):].partition(":")[0]


def sensitivity(config: StoreConfig) -> Callable[[Dict[str, Any]], bool]:
    """Which events to encrypt in the log, per the config."""
    user_text = True if config.encrypt_user_text is None else config.encrypt_user_text
    chosen = set(config.sensitive_slots)

    def is_sensitive(event: Dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind in _PLAIN_EVENT_TYPES:
            return False
        if kind == "user":
            return user_text
        if kind == "slot":
            name = event.get("name")
            if name in _PLAIN_SLOTS:
                return False
            return not chosen or name in chosen
        return True
    return is_sensitive


def build_protected(config: StoreConfig, environ: Optional[Mapping[str, str]] = None
                    ) -> Tuple[Optional[Serializer], Callable[[Dict[str, Any]], bool]]:
    """(encrypting serialiser or None, sensitivity predicate) for ``Codec``."""
    from rasa_persistent_tracker.codec import JsonSerializer

    keyring = load_keyring(config, environ)
    if keyring is None:
        if config.sensitive_slots or config.encrypt_user_text:
            raise ConfigError(
                f"Config keys 'sensitive_slots' / 'encrypt_user_text' need encryption keys: "
                f"set {config.encryption_keys_env} or 'encryption_key_file'.")
        return None, sensitivity(config)
    return EncryptedSerializer(JsonSerializer(), keyring), sensitivity(config)
