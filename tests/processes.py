"""The demo bot as separate processes: training, the action server, ``rasa run``.

Used by ``test_demo_processes.py``. Every process is started in its own
process group with its output in a log file; ``stop`` (SIGTERM, then SIGKILL)
and ``kill9`` act on that group only. An ``atexit`` hook stops whatever a
crashed test left running.
"""
import atexit
import fcntl
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BOT_DIR = REPO / "example_bot"
BIN = Path(os.environ.get("RPT_VENV_BIN", REPO / ".venv" / "bin"))
RASA = str(BIN / "rasa")
TRAIN_TIMEOUT_S = 600
START_TIMEOUT_S = 180

_LIVE: Dict[int, "BotProcess"] = {}


class ProcessError(RuntimeError):
    """A bot process did not start, or exited when it should not have."""


def process_env(**extra: str) -> Dict[str, str]:
    """The environment for the bot's processes: quiet warnings, no telemetry."""
    env = dict(os.environ)
    env.update({"PYTHONWARNINGS": "ignore", "RASA_TELEMETRY_ENABLED": "false",
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------- the model

def _newest_mtime(paths: Sequence[Path]) -> float:
    return max((p.stat().st_mtime for p in paths), default=0.0)


def _sources() -> List[Path]:
    files = [BOT_DIR / "config.yml", BOT_DIR / "domain.yml"]
    return files + sorted(p for p in (BOT_DIR / "data").rglob("*") if p.is_file())


def _fresh_model() -> Optional[Path]:
    models = sorted((BOT_DIR / "models").glob("*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if models and models[-1].stat().st_mtime > _newest_mtime(_sources()):
        return models[-1]
    return None


def trained_model(log_path: Path) -> Path:
    """The newest model in ``example_bot/models/``, trained first if stale.

    A lock file serialises concurrent test sessions, so the bot is trained once.
    """
    models = BOT_DIR / "models"
    models.mkdir(exist_ok=True)
    with open(models / ".train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = _fresh_model()
        if model is not None:
            return model
        with open(log_path, "wb") as log:
            result = subprocess.run(
                [RASA, "train", "--quiet"], cwd=BOT_DIR, env=process_env(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=TRAIN_TIMEOUT_S)
        model = _fresh_model()
        if result.returncode != 0 or model is None:
            raise ProcessError(f"rasa train failed (exit {result.returncode}):\n{tail(log_path)}")
        return model


# ------------------------------------------------------------------ processes

class BotProcess:
    """One long-running process (action server or ``rasa run``).

    Args:
        name: label for messages and the log file name.
        argv: the command.
        port: the port it listens on.
        ready_url: polled until it answers 200 after a start.
        log_dir: where ``<name>.log`` is written (appended across restarts).
        env: the process environment.
    """

    def __init__(self, name: str, argv: List[str], port: int, ready_url: str, log_dir: Path,
                 env: Dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.ready_url = ready_url
        self.log = log_dir / f"{name}.log"
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        self.start_seconds: List[float] = []

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"BotProcess({self.name}, pid={pid})"

    def start(self) -> "BotProcess":
        """Start the process and wait until ``ready_url`` answers."""
        if self.process is not None and self.process.poll() is None:
            raise ProcessError(f"{self.name} is already running")
        began = time.monotonic()
        with open(self.log, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv, cwd=BOT_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        _LIVE[id(self)] = self
        self.starts += 1
        deadline = began + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise ProcessError(f"{self.name} exited with {self.process.returncode} while "
                                   f"starting:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"{self.name} not ready after {START_TIMEOUT_S}s:\n"
                                   f"{tail(self.log)}")
            time.sleep(0.25)
        self.start_seconds.append(time.monotonic() - began)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the process group: no shutdown hooks, nothing flushed."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._reap_group()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._reap_group()
        _LIVE.pop(id(self), None)

    def _reap_group(self) -> None:
        # Children left in the group (e.g. worker processes) go too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE.values()):
        try:
            proc.stop(grace=5)
        except Exception:  # best effort at interpreter exit
            pass


def action_server(port: int, log_dir: Path, ledger_state: Path) -> BotProcess:
    """The demo's rasa_sdk action server, with its ledger state in ``ledger_state``."""
    return BotProcess(
        "actions", [RASA, "run", "actions", "--actions", "actions", "--port", str(port)],
        port, f"http://127.0.0.1:{port}/health", log_dir,
        process_env(LEDGER_STATE_PATH=str(ledger_state)))


def rasa_server(name: str, port: int, model: Path, endpoints: Path, credentials: Path,
                log_dir: Path) -> BotProcess:
    """``rasa run`` with the HTTP API and the REST channel."""
    return BotProcess(
        name, [RASA, "run", "--enable-api", "-p", str(port), "-i", "127.0.0.1",
               "--endpoints", str(endpoints), "--credentials", str(credentials),
               "-m", str(model)],
        port, f"http://127.0.0.1:{port}/status", log_dir, process_env())


# ---------------------------------------------------------------- HTTP client

def http_json(method: str, url: str, body: Any = None, timeout: float = 60) -> Any:
    """One JSON request; raises AssertionError with the body on a non-2xx answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url} -> {exc.code}: {exc.read()[:2000]!r}") from None


class Client:
    """A user talking to one Rasa server over the REST channel."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def say(self, sender: str, text: str) -> List[str]:
        """Send ``text``; return the texts of the bot's replies."""
        replies = http_json("POST", f"{self.base}/webhooks/rest/webhook",
                            {"sender": sender, "message": text})
        return [r.get("text") for r in replies if r.get("text") is not None]

    def tracker(self, sender: str, events: str = "ALL") -> Dict[str, Any]:
        return http_json("GET", f"{self.base}/conversations/{sender}/tracker"
                                f"?include_events={events}")

    def append_events(self, sender: str, events: List[Dict[str, Any]]) -> Dict[str, Any]:
        return http_json("POST", f"{self.base}/conversations/{sender}/tracker/events", events)
