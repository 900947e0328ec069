"""Encryption at rest: AES-256-GCM, bound to where each value belongs.

``EncryptedSerializer`` works on the text a serialiser produced (as langgraph's
``EncryptedSerializer`` wraps its serde). Two stored forms, both naming the
key id:

* ``rpt-enc:2:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`` (encrypted);
* ``rpt-mac:2:<key id>:<base64url(tag)>:<JSON text>`` (authenticated only:
  log rows the config does not call sensitive stay readable in SQL);
* ``rpt-enc:3:<key id>:<nonce ‖ ciphertext ‖ tag>``, raw bytes: hot records,
  whose content is compressed bytes (``compressed.py``), so base64 would
  only add a third. Only where binary values can be stored (the hot state).

Both authenticate, besides the text, the format version, the key id and a
*binding*: the kind of value (hot record, snapshot, log row, outbox entry,
quarantine copy), its conversation id and, for log rows, the sequence number
(for outbox entries, their header). A value copied to another conversation,
another kind or another seq fails to open, like a flipped bit. The legacy
form ``rpt-enc:1:`` (no binding) still opens where the caller allows it.

The first key encrypts, every key decrypts: put a new key first to rotate,
run ``rasa-persistent-tracker rotate-keys``, then drop the old one.

Where keys come from is ``keys.py``. Key material never appears in errors,
logs or reprs. See docs/security.md.
"""
import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import ConfigError, CorruptRecordError, EncryptionKeyMissing
from rasa_persistent_tracker.security.keys import KEY_ID, Keyring, load_keyring
from rasa_persistent_tracker.security.serde import JsonSerializer, Serializer

PREFIX = "rpt-enc:2:"
BINARY_PREFIX = "rpt-enc:3:"
_BINARY_PREFIX = BINARY_PREFIX.encode("ascii")
MAC_PREFIX = "rpt-mac:2:"
LEGACY_PREFIX = "rpt-enc:1:"
_CIPHERTEXT_MARK = "rpt-enc:"
# Kinds of stored value a binding names.
HOT, SNAPSHOT, ROW, OUTBOX, QUARANTINE = "hot", "snapshot", "row", "outbox", "quarantine"
# Events whose content is never user data; everything else is encrypted.
_PLAIN_EVENT_TYPES = frozenset({
    "action", "active_loop", "followup", "restart", "pause", "resume", "rewind", "undo",
    "reset_slots", "user_featurization", "loop_interrupted", "action_execution_rejected",
})
_PLAIN_SLOTS = frozenset({"requested_slot"})


def binding(kid: str, kind: str, conversation_id: Optional[str], extra: Any,
            version: int = 2) -> bytes:
    """The associated data of a v2/v3 value: version, key id, kind, conversation, extra."""
    return json.dumps([version, kid, kind, conversation_id, extra],
                      separators=(",", ":")).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii"))


class EncryptedSerializer:
    """Seals serialised text with AES-256-GCM (or a MAC). See the module docstring."""

    def __init__(self, inner: Serializer, keyring: Keyring) -> None:
        self._inner = inner
        self.keyring = keyring

    def __repr__(self) -> str:
        return f"EncryptedSerializer({self.keyring!r})"

    def seal(self, text: str, kind: str, conversation_id: Optional[str],
             extra: Any = None) -> str:
        """Encrypt ``text`` bound to (kind, conversation, extra)."""
        kid = self.keyring.primary
        nonce = os.urandom(12)
        # surrogateescape: a quarantine copy of binary bytes is sealed as it was.
        sealed = self.keyring.cipher(kid).encrypt(
            nonce, text.encode("utf-8", "surrogateescape"),
            binding(kid, kind, conversation_id, extra))
        return f"{PREFIX}{kid}:{_b64(nonce + sealed)}"

    def seal_bytes(self, data: bytes, kind: str, conversation_id: Optional[str]) -> bytes:
        """Encrypt ``data`` bound to (kind, conversation): the binary form."""
        kid = self.keyring.primary
        nonce = os.urandom(12)
        sealed = self.keyring.cipher(kid).encrypt(
            nonce, data, binding(kid, kind, conversation_id, None, 3))
        return b"".join((_BINARY_PREFIX, kid.encode("ascii"), b":", nonce, sealed))

    def open_bytes(self, data: bytes, kind: str, conversation_id: Optional[str]) -> bytes:
        """The bytes ``seal_bytes`` sealed. Raises CorruptRecordError (tampered,
        moved, truncated, unknown key id) or EncryptionKeyMissing."""
        head, colon, blob = data[len(_BINARY_PREFIX):].partition(b":")
        kid = head.decode("ascii", "replace")
        if not colon or self.keyring.cipher(kid) is None:
            if colon and KEY_ID.fullmatch(kid):
                raise EncryptionKeyMissing(
                    f"stored data is encrypted with key id '{kid}', which this process was "
                    f"not given (configured: {', '.join(self.keyring.ids)}); nothing was "
                    f"changed")
            raise CorruptRecordError("ciphertext names no valid key id")
        try:
            return self.keyring.cipher(kid).decrypt(
                blob[:12], blob[12:], binding(kid, kind, conversation_id, None, 3))
        except (InvalidTag, ValueError):
            raise CorruptRecordError("decryption failed (tampered or moved data, or wrong "
                                     "key)") from None

    def mac(self, text: str, kind: str, conversation_id: Optional[str],
            extra: Any = None) -> str:
        """``text`` in clear, authenticated and bound like ``seal``."""
        kid = self.keyring.primary
        tag = self._tag(kid, text, kind, conversation_id, extra)
        return f"{MAC_PREFIX}{kid}:{_b64(tag)}:{text}"

    def _tag(self, kid: str, text: str, kind: str, conversation_id: Optional[str],
             extra: Any) -> bytes:
        message = binding(kid, kind, conversation_id, extra) + b"\n" + text.encode("utf-8")
        return hmac.new(self.keyring.mac_key(kid), message, hashlib.sha256).digest()[:16]

    def open(self, text: str, kind: str, conversation_id: Optional[str], extra: Any = None,
             legacy: bool = False) -> str:
        """The text ``seal``/``mac`` (or, if ``legacy``, the v1 format) wrote.

        Raises CorruptRecordError: tampered, moved, unknown key id, or a form
        not accepted here.
        """
        version = PREFIX if text.startswith(PREFIX) else MAC_PREFIX if text.startswith(
            MAC_PREFIX) else LEGACY_PREFIX if text.startswith(LEGACY_PREFIX) else None
        if version is None:
            raise CorruptRecordError("payload is neither JSON nor ciphertext")
        kid, _, body = text[len(version):].partition(":")
        if self.keyring.cipher(kid) is None:
            if KEY_ID.fullmatch(kid):  # a key this process lacks: configuration, not corruption
                raise EncryptionKeyMissing(
                    f"stored data is encrypted with key id '{kid}', which this process was not "
                    f"given (configured: {', '.join(self.keyring.ids)}); nothing was changed")
            raise CorruptRecordError("ciphertext names no valid key id")
        if version == MAC_PREFIX:
            tag, _, clear = body.partition(":")
            try:
                good = hmac.compare_digest(
                    _unb64(tag), self._tag(kid, clear, kind, conversation_id, extra))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                good = False
            if not good:
                raise CorruptRecordError("authentication failed (tampered or moved data, "
                                         "or wrong key)")
            return clear
        if version == LEGACY_PREFIX and not legacy:
            raise CorruptRecordError("legacy ciphertext (rpt-enc:1, not bound to its place) "
                                     "refused here; see accept_plaintext")
        aad = (LEGACY_PREFIX + kid).encode("ascii") if version == LEGACY_PREFIX else binding(
            kid, kind, conversation_id, extra)
        try:
            blob = _unb64(body)
            plain = self.keyring.cipher(kid).decrypt(blob[:12], blob[12:], aad)
            return plain.decode("utf-8", "surrogateescape")
        except (InvalidTag, binascii.Error, ValueError, UnicodeEncodeError):
            raise CorruptRecordError("decryption failed (tampered or moved data, or wrong "
                                     "key)") from None


def is_ciphertext(text: str) -> bool:
    """Whether ``text`` is encrypted (any format version); MAC'd plaintext is not."""
    return text.startswith(_CIPHERTEXT_MARK)


def key_id_of(text: str) -> Optional[str]:
    """The key id a payload was encrypted or authenticated with (None: plaintext)."""
    for prefix in (PREFIX, MAC_PREFIX, LEGACY_PREFIX, BINARY_PREFIX):
        if text.startswith(prefix):
            return text[len(prefix):].partition(":")[0]
    return None


def is_encrypted(text: str) -> bool:
    """True for ciphertext; False for plaintext and authenticated-only text."""
    return text.startswith((PREFIX, LEGACY_PREFIX, BINARY_PREFIX))


def strip_mac(text: str) -> Optional[str]:
    """The clear text of an authenticated-only value, unverified (no key); None
    if ``text`` is not one."""
    if not text.startswith(MAC_PREFIX):
        return None
    parts = text[len(MAC_PREFIX):].split(":", 2)
    return parts[2] if len(parts) == 3 else None


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
                    ) -> Tuple[Optional[EncryptedSerializer], Callable[[Dict[str, Any]], bool]]:
    """(encrypting serialiser or None, sensitivity predicate) for ``Codec``."""
    keyring = load_keyring(config, environ)
    if keyring is None:
        if config.sensitive_slots or config.encrypt_user_text:
            raise ConfigError(
                f"Config keys 'sensitive_slots' / 'encrypt_user_text' need encryption keys: "
                f"set {config.encryption_keys_env} or 'encryption_key_file'.")
        return None, sensitivity(config)
    return EncryptedSerializer(JsonSerializer(), keyring), sensitivity(config)
