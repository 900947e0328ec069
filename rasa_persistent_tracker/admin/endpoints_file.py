"""The store an endpoints file configures, opened as ``rasa run`` would open it.

The CLI's commands work on the bot's own storage: they read the
``tracker_store`` block of its ``endpoints.yml`` and resolve relative paths
from that file's folder.
"""
import os
import warnings
from typing import Any, Dict

import sqlalchemy as sa

from rasa_persistent_tracker.backends import Backends, open_backends
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.errors import ConfigError
from rasa_persistent_tracker.security.keys import load_keyring


def load_endpoint_backends(path: str, must_exist: bool = True) -> Backends:
    """Open the storage of the ``tracker_store`` block of ``path`` as Rasa would.

    Raises:
        ConfigError: the file is missing or unreadable, or names no tracker store.
        StorageUnavailable: a server is unreachable.
    """
    endpoint = tracker_store_block(path)
    if endpoint.type and not str(endpoint.type).startswith("rasa_persistent_tracker"):
        raise ConfigError(f"The 'tracker_store' in '{path}' has type {endpoint.type!r}, "
                          f"not rasa_persistent_tracker.PersistentTrackerStore.")
    kwargs = {"host": endpoint.url, **endpoint.kwargs}
    folder = os.path.dirname(os.path.abspath(path))
    return open_backends({**kwargs, **_paths_beside(kwargs, folder, must_exist)})


def tracker_store_block(path: str) -> Any:
    """The ``tracker_store`` EndpointConfig of an endpoints file."""
    with warnings.catch_warnings():  # Rasa's imports warn about its own dependencies
        warnings.simplefilter("ignore")
        from rasa.core.utils import read_endpoints_from_path
        from rasa.shared.exceptions import RasaException

    if not os.path.isfile(path):
        raise ConfigError(f"Endpoints file '{path}' does not exist.")
    try:
        endpoint = read_endpoints_from_path(path).tracker_store
    except (RasaException, OSError, ValueError) as exc:
        raise ConfigError(f"Endpoints file '{path}' cannot be read: {exc}") from None
    if endpoint is None:
        raise ConfigError(f"Endpoints file '{path}' has no 'tracker_store' block.")
    return endpoint


def _paths_beside(kwargs: Dict[str, Any], folder: str, must_exist: bool) -> Dict[str, str]:
    """The embedded files as the bot finds them: ``rasa run`` is started in the
    project folder, so relative paths are read from the endpoints file's folder,
    not from wherever the CLI runs. Missing files are an error: the CLI must not
    create an empty store next to a typo."""
    config = parse_config(kwargs)
    load_keyring(config)  # a bad key is the first thing to say, before any path
    paths: Dict[str, str] = {}
    if config.embedded:
        paths["embedded_path"] = os.path.join(folder, config.embedded_path)
        if must_exist and not os.path.isfile(paths["embedded_path"]):
            raise ConfigError(
                f"No embedded hot state at {paths['embedded_path']}: the bot has not stored "
                f"anything there. Relative paths are read from the endpoints file's folder, "
                f"as `rasa run` started there reads them; is --endpoints the bot's file?")
    url = sa.engine.make_url(config.sql_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = os.path.join(folder, url.database)
        if must_exist and not os.path.isfile(database):
            raise ConfigError(
                f"No SQLite event log at {database}: relative paths are read from the "
                f"endpoints file's folder; is --endpoints the bot's file?")
        paths["sql_url"] = url.set(database=database).render_as_string(hide_password=False)
    return paths
