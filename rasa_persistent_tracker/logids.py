"""How conversation ids appear in the store's log lines.

Conversation ids are often phone numbers (WhatsApp, Twilio) or e-mail
addresses. With ``log_conversation_ids: hashed`` every log line of the store
names a conversation by a short keyed hash instead, ``h:<12 hex digits>``:
HMAC-SHA256 under a key derived from the encryption key, so nobody without
the key can test a guessed phone number against a log line. An operator finds
the conversation again with ``rasa-persistent-tracker inspect h:<hash>``,
which hashes the stored conversation ids under every configured key (so a
hash logged before a key rotation still resolves).
"""
import hashlib
import hmac
from typing import AsyncIterator, Iterable, List, Optional

from rasa_persistent_tracker.errors import ConfigError

CLEAR, HASHED = "clear", "hashed"
MODES = (CLEAR, HASHED)
PREFIX = "h:"
PURPOSE = b"rpt-log-id"  # what the hashing keys are derived for


class ConversationIds:
    """Turns conversation ids into what a log line shows.

    Args:
        mode: ``clear`` or ``hashed``.
        keys: keys to hash under, the first one for new lines
            (``Keyring.derived(PURPOSE)``); required when hashed.
    """

    def __init__(self, mode: str = CLEAR, keys: Iterable[bytes] = ()) -> None:
        self._keys: List[bytes] = list(keys)
        if mode == HASHED and not self._keys:
            raise ConfigError("Config key 'log_conversation_ids' is 'hashed', which needs an "
                              "encryption key (an unkeyed hash of a phone number is "
                              "reversed by trying them all).")
        self.hashed = mode == HASHED

    def __repr__(self) -> str:
        return f"ConversationIds({HASHED if self.hashed else CLEAR!r})"

    def __call__(self, conversation_id: str) -> str:
        """What log lines show for ``conversation_id``."""
        if not self.hashed:
            return conversation_id
        return self._hash(self._keys[0], conversation_id)

    def in_text(self, text: str, conversation_id: str) -> str:
        """``text`` (e.g. a quarantine key name) with the id replaced."""
        if not self.hashed:
            return text
        return text.replace(conversation_id, self(conversation_id))

    @staticmethod
    def _hash(key: bytes, conversation_id: str) -> str:
        digest = hmac.new(key, conversation_id.encode("utf-8", "surrogatepass"),
                          hashlib.sha256).hexdigest()
        return PREFIX + digest[:12]

    def matches(self, shown: str, conversation_id: str) -> bool:
        """Whether a log line's ``shown`` id is ``conversation_id`` (any key)."""
        return any(hmac.compare_digest(self._hash(k, conversation_id), shown)
                   for k in self._keys)


async def resolve(ids: ConversationIds, shown: str,
                  candidates: AsyncIterator[str]) -> Optional[str]:
    """The conversation id a hashed log line names, among ``candidates``."""
    async for conversation_id in candidates:
        if ids.matches(shown, conversation_id):
            return conversation_id
    return None
