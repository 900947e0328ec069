"""Store configuration: parsed once, validated, frozen, secrets masked.

The keys arrive from the ``tracker_store`` block of Rasa's ``endpoints.yml``
(Rasa passes ``url`` as ``host``). Every key the built-in ``type: redis`` store
accepts is accepted here with the same meaning. Precedence for the two server
addresses: an explicit key in endpoints.yml, then the environment
(``REDIS_URL`` for the hot state, ``DATABASE_URL`` for the event log), then the
embedded SQLite default.
"""
import dataclasses
import difflib
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple
from urllib.parse import quote, unquote

from rasa_persistent_tracker.errors import ConfigError

EMBEDDED = "embedded"
DEFAULT_DIR = ".rasa_tracker"
DEFAULT_RECORD_EXP = 86400.0
DEFAULT_MAX_HISTORY = 10
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


# Query parameters that carry secrets in database and Redis URLs.
_SECRET_PARAMS = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)


def mask_url(url: Optional[str]) -> Optional[str]:
    """Return ``url`` with every secret replaced by ``***``: the password in the
    userinfo (of each host of a multi-host URL) and query parameters named like
    ``password``, ``sslpassword``, ``token`` or ``secret``. A value without a
    scheme is not parsed as a URL at all: it is replaced whole."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if url != EMBEDDED else url
    netloc_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
                     default=len(rest))
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hosts}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hashmark, fragment = query.partition("#")
        params = [p.partition("=") for p in query.split("&")]
        query = "&".join(f"{k}{eq}{'***' if eq and _SECRET_PARAMS.search(unquote(k)) else v}"
                         for k, eq, v in params) + hashmark + fragment
    return f"{scheme}://{netloc}{path}{qmark}{query}"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Validated settings of one ``PersistentTrackerStore``.

    See the README's configuration table for every key, its default and meaning.
    """

    redis_url: str = EMBEDDED
    sql_url: str = f"sqlite:///{DEFAULT_DIR}/events.sqlite3"
    embedded_path: str = f"{DEFAULT_DIR}/hot.sqlite3"
    record_exp: float = DEFAULT_RECORD_EXP
    key_prefix: str = "rpt"
    max_history: int = DEFAULT_MAX_HISTORY
    quarantine_ttl: float = 30 * 86400.0
    snapshot_resume_window: float = 0.0
    sync_log: bool = False
    sync_actions: Tuple[str, ...] = ()
    redis_max_connections: int = 50
    redis_socket_timeout: float = 5.0
    sql_pool_size: int = 5
    sql_workers: int = 2
    outbox_batch_size: int = 200
    outbox_scan_interval: float = 30.0
    outbox_linger: float = 0.2
    record_cache_size: int = 32
    sentinel_service: Optional[str] = None
    encryption_key_file: Optional[str] = None
    encryption_keys_env: str = "RPT_ENCRYPTION_KEYS"
    sensitive_slots: Tuple[str, ...] = ()
    encrypt_user_text: Optional[bool] = None
    accept_plaintext: bool = False
    compress_records: bool = True
    log_conversation_ids: str = "clear"
    metrics_port: Optional[int] = None
    metrics_address: str = "0.0.0.0"
    # Rasa's redis keys, kept so a TLS set-up copied from `type: redis` works.
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_ca_certs: Optional[str] = None

    @property
    def embedded(self) -> bool:
        """True when the hot state lives in the embedded SQLite file."""
        return self.redis_url == EMBEDDED

    def __repr__(self) -> str:
        fields = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("redis_url", "sql_url"):
                value = mask_url(value)
            fields.append(f"{f.name}={value!r}")
        return f"StoreConfig({', '.join(fields)})"

    __str__ = __repr__


# Keys of Rasa's RedisTrackerStore that combine into `redis_url`.
_REDIS_PARTS = ("port", "db", "username", "password", "use_ssl")
# Keys Rasa itself passes to every store; never configuration of ours.
_RASA_PASSED = ("domain", "event_broker", "type", "url")


# Largest number any key accepts (seconds: ~31 years; counts: far beyond use).
# Beyond it, TTLs in milliseconds overflow what Redis and SQL can hold.
_MAXIMUM = 1e9


def _show(value: Any) -> str:
    """``repr`` for error messages, bounded, and never failing itself (the repr
    of ``10**5000``, or of a container holding it, raises ValueError)."""
    try:
        text = repr(value)
    except Exception:  # any repr may fail; the message must still be made
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(key: str, value: Any, kind: type, minimum: float) -> Any:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"Config key '{key}' must be a finite {kind.__name__}, got {_show(value)}."
        ) from None
    if converted < minimum:
        raise ConfigError(f"Config key '{key}' must be >= {minimum}, got {_show(value)}.")
    if converted > _MAXIMUM:
        raise ConfigError(f"Config key '{key}' must be <= {_MAXIMUM:g}, got {_show(value)}.")
    return converted


def _text(key: str, value: Any, secret: bool = False) -> str:
    """A string key's value; a number (YAML reads ``password: 1234`` as one)
    becomes its text. Anything else is a ConfigError naming the key."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:
            pass  # an int too long for text
    shown = f"a {type(value).__name__}" if secret else _show(value)
    raise ConfigError(f"Config key '{key}' must be a string, got {shown}.")


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ConfigError(f"Config key '{key}' must be true or false, got {_show(value)}.")


def _redis_url(host: Optional[str], parts: Dict[str, Any]) -> Optional[str]:
    """Combine Rasa-style host/port/db/... keys into one redis URL."""
    if host is None:
        if parts:
            raise ConfigError(
                f"Config keys {sorted(parts)} need 'url' (or 'host') to be set."
            )
        return None
    if "://" in host or host == EMBEDDED:
        if parts:
            raise ConfigError(
                f"Config keys {sorted(parts)} cannot be combined with the full URL "
                f"{mask_url(host)!r}: put them into the URL."
            )
        return host
    if not re.match(r"^[A-Za-z0-9_.\-:\[\]]+$", host):
        # Not echoed: a URL written without its scheme may hold a password.
        raise ConfigError("Config key 'url' is neither a host name nor a URL with a scheme "
                          "(redis://, rediss://, unix://, redis+sentinel://, redis+cluster://) "
                          "nor 'embedded'.")
    scheme = "rediss" if _boolean("use_ssl", parts.get("use_ssl", False)) else "redis"
    port = _number("port", parts.get("port", 6379), int, 1)
    db = _number("db", parts.get("db", 0), int, 0)
    auth = ""
    if parts.get("username") or parts.get("password"):
        # Quoted: '@', '/', '#' or '?' in a password would otherwise end the userinfo.
        user = _text("username", parts.get("username") or "")
        password = _text("password", parts.get("password") or "", secret=True)
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return f"{scheme}://{auth}{host}:{port}/{db}"


def _sql_url(url: str) -> str:
    # Heroku-style DATABASE_URL values say postgres://, which SQLAlchemy 1.4 rejects.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if "://" not in url:
        # Not echoed: without a scheme, nothing tells where a password would be.
        raise ConfigError("Config key 'sql_url' (or DATABASE_URL) is not a database URL: it "
                          "has no scheme such as 'postgresql+psycopg2://'.")
    return url


def _unknown_keys_message(unknown: List[str], known: Set[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"'{close[0]}' for '{key}'")
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return (f"Unknown config key(s) {unknown} for rasa_persistent_tracker{hint}; "
            f"known keys: {sorted(known)}.")


def parse_config(
    kwargs: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None
) -> StoreConfig:
    """Parse the endpoint keys into a ``StoreConfig``.

    Args:
        kwargs: the ``tracker_store`` keys as Rasa passes them (``host`` is the
            endpoint's ``url``).
        environ: environment to read ``REDIS_URL`` / ``DATABASE_URL`` from
            (default ``os.environ``).

    Raises:
        ConfigError: a key is unknown or a value is invalid; the message names
            the key and the value (passwords masked).
    """
    env = os.environ if environ is None else environ
    odd = [k for k in kwargs if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"Config keys must be names (strings), got {_show(odd)}.")
    given = {k: v for k, v in kwargs.items() if k not in _RASA_PASSED and v is not None}
    host = given.pop("host", None)
    parts = {k: given.pop(k) for k in _REDIS_PARTS if k in given}
    if "encryption_keys" in given:
        raise ConfigError(
            "Config key 'encryption_keys' is not accepted inline: keys must not sit in "
            "endpoints.yml. Set them in the environment variable named by "
            "'encryption_keys_env' or in the file named by 'encryption_key_file'."
        )
    known = {f.name for f in dataclasses.fields(StoreConfig)} - {"redis_url"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(_unknown_keys_message(unknown, known | {"url", *_REDIS_PARTS}))
    if host is not None and not isinstance(host, str):
        raise ConfigError(f"Config key 'url' must be a URL or host name (a string), "
                          f"got a {type(host).__name__}: {_show(host)}.")

    values: Dict[str, Any] = {}
    values["redis_url"] = _redis_url(host, parts) or env.get("REDIS_URL") or EMBEDDED
    values["sql_url"] = _sql_url(_text(
        "sql_url", given.pop("sql_url", None) or env.get("DATABASE_URL") or StoreConfig.sql_url))
    floats = {"record_exp": 1.0, "quarantine_ttl": 1.0, "redis_socket_timeout": 0.01,
              "outbox_scan_interval": 0.05, "snapshot_resume_window": 0.0,
              "outbox_linger": 0.0}
    ints = {"max_history": 1, "redis_max_connections": 1, "sql_pool_size": 1,
            "sql_workers": 1, "outbox_batch_size": 1, "record_cache_size": 0,
            "metrics_port": 1}
    for key, value in given.items():
        if key in floats:
            values[key] = _number(key, value, float, floats[key])
        elif key in ints:
            values[key] = _number(key, value, int, ints[key])
            if key == "metrics_port" and values[key] > 65535:
                raise ConfigError(f"Config key 'metrics_port' must be a TCP port "
                                  f"(1-65535), got {_show(value)}.")
        elif key in ("encrypt_user_text", "sync_log", "accept_plaintext", "compress_records"):
            values[key] = _boolean(key, value)
        elif key in ("sensitive_slots", "sync_actions"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
                what = "slot" if key == "sensitive_slots" else "action"
                raise ConfigError(
                    f"Config key '{key}' must be a list of {what} names, got {_show(value)}."
                )
            values[key] = tuple(value)
        elif key == "log_conversation_ids":
            if value not in ("clear", "hashed"):
                raise ConfigError(f"Config key 'log_conversation_ids' must be 'clear' or "
                                  f"'hashed', got {_show(value)}.")
            values[key] = value
        elif key == "key_prefix":
            if not isinstance(value, str) or not _PREFIX_RE.match(value):
                raise ConfigError(
                    f"Config key 'key_prefix' must be letters, digits, '_', '.' or "
                    f"'-', got {_show(value)}."
                )
            values[key] = value
        else:
            if not isinstance(value, str):
                raise ConfigError(f"Config key '{key}' must be a string, got {_show(value)}.")
            values[key] = value
    return StoreConfig(**values)
