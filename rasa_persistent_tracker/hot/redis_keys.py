"""Names of a conversation's Redis keys, and the hash tag that keeps them in one slot.

Every key of a conversation carries the hash tag ``{<tag>}``, so the Lua scripts
touch one Redis Cluster slot. Redis hashes the text between the first ``{`` and
the next ``}``, so the tag must hold neither brace and must not be empty. Ids
that satisfy this (and are UTF-8 text not starting with ``=``) are their own
tag, so keys written by earlier versions stay where they are. Any other id -
``}alice``, ``}x{``, ``""``, a lone surrogate, or one starting with ``=`` - is
tagged ``=<hex of its UTF-8 bytes>``, which is injective and brace-free.
(Before this scheme, such ids were keyed verbatim; their old hot records are
not found under the new keys and are restored from the SQL snapshot.)
"""
import binascii
import functools
from typing import Dict, Optional

_ENCODED = "="
_SLOTS = 16384


def key_tag(conversation_id: str) -> str:
    """The hash tag's content for ``conversation_id`` (see the module docstring)."""
    if (conversation_id and not conversation_id.startswith(_ENCODED)
            and "{" not in conversation_id and "}" not in conversation_id):
        try:
            conversation_id.encode("utf-8")
            return conversation_id
        except UnicodeEncodeError:
            pass  # a lone surrogate: Redis keys are bytes
    return _ENCODED + conversation_id.encode("utf-8", "surrogatepass").hex()


def tag_id(tag: str) -> Optional[str]:
    """Inverse of ``key_tag``; None if ``tag`` is not one it produces."""
    if not tag.startswith(_ENCODED):
        return tag or None
    try:
        return bytes.fromhex(tag[len(_ENCODED):]).decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        return None


def slot_of(tag: str) -> int:
    """The Redis Cluster slot of a key whose hash tag is ``tag`` (CRC16/XMODEM)."""
    return binascii.crc_hqx(tag.encode("utf-8"), 0) % _SLOTS


@functools.lru_cache(maxsize=1)
def _suffixes() -> Dict[int, str]:
    """Low 14 CRC bits -> a 4-hex-digit suffix with them (about 13,000 of 16,384)."""
    table: Dict[int, str] = {}
    for value in range(1 << 16):
        suffix = f"{value:04x}"
        table.setdefault(binascii.crc_hqx(suffix.encode(), 0) & (_SLOTS - 1), suffix)
    return table


def tag_in_slot(digest: str, slot: int) -> str:
    """``digest`` (hex) extended by a few characters so its slot is ``slot``.

    CRC16 is linear: crc(P + S) = crc(P + "\\0" * len(S)) ^ crc(S), so the
    suffix S is looked up, not searched for. A slot the table lacks is reached
    after a marker letter (not a hex digit) changes P."""
    table = _suffixes()
    for marker in [""] + [chr(c) for c in range(ord("g"), ord("z") + 1)]:
        head = (digest + marker).encode()
        wanted = (binascii.crc_hqx(head + b"\0\0\0\0", 0) ^ slot) & (_SLOTS - 1)
        if wanted in table:
            return digest + marker + table[wanted]
    raise ValueError(f"no tag in slot {slot}")  # unreachable: 20 markers, ~80% each


class KeyNames:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def record(self, conversation_id: str) -> str:
        """The record hash ``<prefix>:h:{tag}``."""
        return f"{self.prefix}:h:{{{key_tag(conversation_id)}}}"

    def outbox(self, conversation_id: str) -> str:
        """The outbox list ``<prefix>:o:{tag}``."""
        return f"{self.prefix}:o:{{{key_tag(conversation_id)}}}"

    def quarantine(self, conversation_id: str, stamp: str) -> str:
        """A quarantined copy ``<prefix>:q:{tag}:<stamp>``."""
        return f"{self.prefix}:q:{{{key_tag(conversation_id)}}}:{stamp}"

    def tombstone(self, conversation_id: str, digest: str) -> str:
        """An erased conversation's tombstone ``<prefix>:e:{<digest><suffix>}``:
        named by a digest of the id (``security.erasure``), never the id, yet in
        the record's cluster slot, so the commit script can read it."""
        tag = tag_in_slot(digest, slot_of(key_tag(conversation_id)))
        return f"{self.prefix}:e:{{{tag}}}"

    def pattern(self, kind: str) -> str:
        """SCAN pattern of all keys of ``kind`` (``h`` or ``o``)."""
        return f"{self.prefix}:{kind}:{{*"

    def conversation_of(self, kind: str, key: str) -> Optional[str]:
        """The conversation id of a scanned key name, or None if not ours."""
        head = f"{self.prefix}:{kind}:{{"
        if not (key.startswith(head) and key.endswith("}")):
            return None
        return tag_id(key[len(head):-1])
