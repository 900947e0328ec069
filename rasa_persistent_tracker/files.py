"""Private local files: the embedded hot state and the default SQLite log.

Without a key they hold account numbers and messages in clear, so they are
readable by their owner only: folders this package creates are 0700, files
0600 (SQLite gives its -wal and -shm files the database file's mode). The
default folder (``.rasa_tracker``) and the files in it are tightened even if
an older version created them wider; folders named in the config that exist
already are the operator's, and left as they are.
"""
import os
import stat

from rasa_persistent_tracker.config import DEFAULT_DIR


def private_file(path: str) -> None:
    """Create ``path`` (and its folder) readable by the owner only.

    Raises OSError if the folder or file cannot be created.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
    elif os.path.basename(directory) == DEFAULT_DIR:
        _tighten(directory, 0o700)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        if os.path.basename(directory) == DEFAULT_DIR:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    _tighten(path + suffix, 0o600)


def _tighten(path: str, mode: int) -> None:
    if os.name == "posix" and stat.S_IMODE(os.stat(path).st_mode) & ~mode:
        os.chmod(path, mode)
