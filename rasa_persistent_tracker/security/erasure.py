"""What an erased conversation's tombstone is named by: a digest of its id.

A tombstone outlives the conversation it stands for, so it must not hold
the id itself (often a phone number or an e-mail address). It is named by
HMAC-SHA256 of the id under a key derived from each configured encryption
key (a tombstone written before a key rotation is still found), or, without
encryption, by a plain SHA-256 of the id (docs/operations.md: a guessable
id can then be tested against it, as against any unkeyed hash). The purpose
string differs from the log-line hash's (``logids``), so a tombstone's name
never equals what a log line shows.
"""
import hashlib
import hmac
from typing import Iterable, List

PURPOSE = b"rpt-erasure"
_DIGEST_HEX = 32  # 128 bits: collisions between ids are out of reach


class ErasureIds:
    """Conversation id -> the digests its tombstone is named by (current key first).

    Args:
        keys: keys derived for ``PURPOSE`` (``Keyring.derived(PURPOSE)``);
            none: the unkeyed SHA-256.
    """

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: List[bytes] = list(keys)

    def __repr__(self) -> str:
        return f"ErasureIds(keyed={bool(self._keys)})"

    def __call__(self, conversation_id: str) -> List[str]:
        data = conversation_id.encode("utf-8", "surrogatepass")
        if not self._keys:
            return [hashlib.sha256(PURPOSE + b"\x00" + data).hexdigest()[:_DIGEST_HEX]]
        return [hmac.new(key, data, hashlib.sha256).hexdigest()[:_DIGEST_HEX]
                for key in self._keys]
