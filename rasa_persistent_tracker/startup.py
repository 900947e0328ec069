"""Start-up checks: refuse what would destroy data, warn about what would surprise.

* ``check_encryption`` (refuses to start): a process without the key must not
  read an encrypted store, since every value would look corrupt and be set
  aside; a key under a known id but with other material is the wrong key.
  The event log records that it holds ciphertext, and each key's check value,
  in ``rpt_facts``.
* ``rasa_store_keys`` (warns): the Redis database still holds Rasa's own
  ``RedisTrackerStore`` trackers, whose history this store does not see.
* ``domain_warnings`` / ``policy_warnings`` (warn): a ``record_exp`` shorter
  than the domain's session expiry, or a policy looking back further than the
  store's ``max_history``.

Each warning is one line naming the config keys involved.
"""
import logging
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

from rasa_persistent_tracker.errors import ConfigError, EncryptionKeyMissing
from rasa_persistent_tracker.log.event_log import SQLEventLog
from rasa_persistent_tracker.security.crypto import is_ciphertext

logger = logging.getLogger("rasa_persistent_tracker.store")

ENCRYPTED_FACT = "encrypted"
_CHECK_FACT = "key_check:"
# Snapshots looked at when a log written before ``rpt_facts`` existed is opened
# without a key: enough to find ciphertext in any log that holds some, bounded
# so start-up stays fast on a large log.
_SAMPLE = 50
# Keys of Rasa's RedisTrackerStore: ``tracker:<id>`` or ``<prefix>:tracker:<id>``.
_RASA_REDIS_PATTERN = "*tracker:*"
_SCAN_BUDGET = 20


def check_encryption(log: SQLEventLog, keyring: Any, where: str) -> None:
    """Refuse to start on an encrypted log without its keys (see module docstring).

    Args:
        log: the migrated event log.
        keyring: ``keys.Keyring`` of this process, or None (no encryption).
        where: the log's URL, masked, for messages.

    Raises:
        EncryptionKeyMissing: the log holds ciphertext and no key is configured.
        ConfigError: a configured key id is known with other key material.
    """
    encrypted = log.fact(ENCRYPTED_FACT) == "yes"
    if keyring is None:
        if not encrypted:
            encrypted = any(is_ciphertext(p)
                            for p in log.sample_snapshot_payloads(_SAMPLE))
            if encrypted:
                log.record_fact(ENCRYPTED_FACT, "yes")
        if encrypted:
            raise EncryptionKeyMissing(
                f"The event log at {where} holds data encrypted at rest, but no encryption "
                f"key is configured. Start this process with the same keys as the others "
                f"(the environment variable named by 'encryption_keys_env', by default "
                f"RPT_ENCRYPTION_KEYS, or 'encryption_key_file'). Without them every stored "
                f"conversation would look corrupt; nothing was read or changed.")
        return
    for kid in keyring.ids:
        known = log.fact(_CHECK_FACT + kid)
        if known is None:
            log.record_fact(_CHECK_FACT + kid, keyring.check_value(kid))
        elif known != keyring.check_value(kid):
            raise ConfigError(
                f"Encryption key '{kid}' is not the key the stored data under id '{kid}' was "
                f"written with (its check value differs from the one recorded in the event "
                f"log at {where}). Configure the original key, or give a new key a new id.")
    if not encrypted:
        log.record_fact(ENCRYPTED_FACT, "yes")


async def rasa_store_keys(client: Any, prefix: str) -> int:
    """How many keys of Rasa's ``RedisTrackerStore`` a bounded SCAN finds."""
    found, cursor = 0, 0
    for _ in range(_SCAN_BUDGET):
        cursor, keys = await client.scan(cursor, match=_RASA_REDIS_PATTERN, count=1000)
        found += sum(1 for k in keys if not _ours(k, prefix))
        if not cursor:
            break
    return found


def _ours(key: Any, prefix: str) -> bool:
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    return text.startswith(f"{prefix}:")


def rasa_store_warning(count: int, where: str) -> Optional[str]:
    """The start-up warning for ``count`` keys of Rasa's own Redis store."""
    if not count:
        return None
    return (f"The Redis database at {where} holds {count}{'+' if count >= 1000 else ''} "
            f"tracker key(s) of Rasa's own RedisTrackerStore (type: redis). Their history is "
            f"not visible to rasa_persistent_tracker: conversations continue from scratch "
            f"here. Copy them first with `rasa-persistent-tracker import --from "
            f"<old endpoints.yml>` (see docs/operations.md).")


def domain_warnings(domain: Any, record_exp: float) -> List[str]:
    """Warnings about a domain that does not fit the store's configuration."""
    config = getattr(domain, "session_config", None)
    minutes = getattr(config, "session_expiration_time", 0) or 0
    if minutes and record_exp < minutes * 60:
        return [f"Config key 'record_exp' ({record_exp:.0f} s) is shorter than the domain's "
                f"session_config.session_expiration_time ({minutes:g} min = {minutes * 60:.0f} "
                f"s): conversations idle longer than {record_exp:.0f} s start afresh instead "
                f"of resuming as the domain says. Raise record_exp to at least "
                f"{minutes * 60:.0f}."]
    return []


def policy_warnings(policies: Iterable[Any], max_history: int) -> List[str]:
    """Warnings for policies that look back further than the hot record keeps.

    ``policies``: (name, config dict) pairs of the model's policies.
    """
    warnings = []
    for name, config in policies:
        if "max_history" not in config or name == "RulePolicy":
            continue  # rules are matched on the latest states only
        wanted = config["max_history"]
        if wanted is None or (isinstance(wanted, int) and wanted > max_history):
            looks_back = "the whole session" if wanted is None else f"{wanted} states"
            warnings.append(
                f"Policy {name} has max_history {wanted!r} ({looks_back}), more than the "
                f"store's config key 'max_history' ({max_history}): it will see only the "
                f"last {max_history} states after a retrieve. Set the store's max_history to "
                f"at least the policy's, or set the policy's explicitly.")
    return warnings


def policies_of_loading_agent(depth: int = 6) -> List[Tuple[str, Dict[str, Any]]]:
    """(name, effective config) of the policies of the model Rasa is loading.

    Rasa gives a tracker store no handle on the model. The one moment a store
    can see it is when ``Agent.load_model`` sets ``tracker_store.domain``, so
    this looks a few frames up for that agent's processor. Empty if it is not
    there (tests, other callers): the check is advice, never required.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            break
        metadata = getattr(getattr(frame.f_locals.get("self"), "processor", None),
                           "model_metadata", None)
        schema = getattr(metadata, "predict_schema", None)
        if schema is None:
            continue
        policies = []
        for node in schema.nodes.values():
            uses = node.uses
            if not uses.__name__.endswith("Policy"):
                continue
            try:
                defaults = dict(uses.get_default_config())
            except Exception:  # a custom policy's defaults are not ours to debug
                defaults = {}
            policies.append((uses.__name__, {**defaults, **node.config}))
        return policies
    return []
