"""The README's main command, run as a new user runs it (issue 11).

A fresh tree (the repository's files as a clone has them: no model, no demo
key, no ``.rasa_tracker``), ``scripts/demo`` in a pseudo-terminal, the demo
script's messages typed in, the shell quit with ``/stop``, ``scripts/demo``
run again and "where were we?" answered with the remembered transfer.

The one shortcut: the fresh tree's ``.venv`` is a link to this checkout's
(``scripts/test`` has just created or checked it), so the test does not spend
two minutes and 2.7 GB on a second install of Rasa. ``scripts/bootstrap``
still runs, as for a user, and finds the venv up to date.

Slow (about two minutes: training plus two start-ups): runs in CI, or locally
with ``RPT_PROCESS_TESTS=1``.
"""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.conftest import IN_CI
from tests.servers import free_port

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parent.parent
RUN = IN_CI or os.environ.get("RPT_PROCESS_TESTS") == "1"
pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not RUN, reason="slow process tests: set RPT_PROCESS_TESTS=1 (CI runs "
                                       "them)"),
]
PROMPT = "Your input ->"
START_TIMEOUT_S = 420  # first run: training (~30 s on 2 cores) and Rasa's start-up
REPLY_TIMEOUT_S = 60
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x08\r]")
# Noise that must not reach a user before the chat starts.
NOISE = re.compile(r"(DeprecationWarning|MovedIn20Warning|UserWarning|FutureWarning|"
                   r"Traceback)")


def fresh_tree(destination: Path) -> None:
    """The files a clone of this checkout would have (tracked, plus new files
    that are not ignored), without anything generated."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / ".venv").symlink_to(REPO / ".venv")


def demo_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "RPT_ENCRYPTION_KEYS", "PYTHONWARNINGS",
                        "CONVERSATION_ID", "CI")}
    env.update({"TERM": "dumb", "RASA_TELEMETRY_ENABLED": "false", "COLUMNS": "200"})
    return env


class Shell:
    """``scripts/demo`` in a pseudo-terminal."""

    def __init__(self, tree: Path, log: Path) -> None:
        self.log = open(log, "a", encoding="utf-8")
        self.child = pexpect.spawn(
            str(tree / "scripts" / "demo"), ["--port", str(free_port())], cwd=str(tree),
            env=demo_env(), encoding="utf-8", timeout=REPLY_TIMEOUT_S, dimensions=(50, 200),
            codec_errors="replace")
        self.child.logfile_read = self.log

    def started(self) -> str:
        """Everything printed up to the first prompt."""
        self.child.expect_exact(PROMPT, timeout=START_TIMEOUT_S)
        return self.child.before

    def say(self, text: str) -> str:
        """Type ``text``; return what the bot answered before the next prompt."""
        self.child.sendline(text)
        # The prompt is drawn again with the accepted input first, then the
        # bot's messages follow, then the next prompt.
        self.child.expect_exact(PROMPT)
        self.child.expect_exact(PROMPT)
        return " ".join(ANSI.sub("", self.child.before).split())

    def quit(self) -> None:
        self.child.sendline("/stop")
        self.child.expect(pexpect.EOF, timeout=120)
        self.child.close()
        self.log.close()


def expect_in(answer: str, *parts: str) -> None:
    for part in parts:
        assert part in answer, f"expected {part!r} in the bot's answer: {answer!r}"


def test_demo_from_a_fresh_clone_remembers_the_transfer(tmp_path):
    stamp = (REPO / ".venv" / ".rpt-installed")
    wanted = hashlib.sha256((REPO / "setup.cfg").read_bytes()).hexdigest()[:16]
    assert stamp.is_file() and stamp.read_text().strip() == wanted, (
        "the venv is not installed for this setup.cfg: run scripts/bootstrap (scripts/test "
        "does) first")
    tree = tmp_path / "clone"
    fresh_tree(tree)
    for generated in ("example_bot/models", "example_bot/.demo_key",
                      "example_bot/.rasa_tracker"):
        assert not (tree / generated).exists()
    log = tmp_path / "demo-session.log"
    try:
        first = Shell(tree, log)
        banner = first.started()
        assert "generated an encryption key" in banner
        assert "using the embedded default" in banner
        noise: List[str] = [line for line in banner.splitlines() if NOISE.search(line)]
        assert not noise, f"start-up noise before the chat: {noise[:5]}"
        expect_in(first.say("hi"), "Pennywise")
        expect_in(first.say("I want to send money"), "account number")
        expect_in(first.say("12345678"), "PIN")
        expect_in(first.say("1234"), "Thanks Alice", "Who would you like to send money to?")
        expect_in(first.say("Bob"), "How much would you like to send to Bob Smith?")
        first.quit()
        key = tree / "example_bot" / ".demo_key"
        assert key.stat().st_mode & 0o077 == 0, "the demo key is readable by others"

        second = Shell(tree, log)
        second.started()
        expect_in(second.say("where were we?"), "recipient Bob Smith",
                  "How much would you like to send to Bob Smith?")
        expect_in(second.say("$50"), "Please confirm", "$50.00", "Bob Smith")
        # Changing the amount at the confirmation step asks to confirm the new one.
        expect_in(second.say("make it 35 dollars"), "Please confirm", "$35.00", "Bob Smith")
        expect_in(second.say("yes"), "Done! I sent $35.00 to Bob Smith")
        expect_in(second.say("what's my balance?"), "$2,465.00")  # still logged in
        expect_in(second.say("log out"), "You're logged out")
        expect_in(second.say("what's my balance?"), "account number")  # a new login
        second.quit()
    except (pexpect.TIMEOUT, pexpect.EOF, AssertionError) as exc:
        output = log.read_text(errors="replace")[-4000:] if log.exists() else "(no output)"
        pytest.fail(f"{type(exc).__name__}: {exc}\n--- the session's last output ---\n{output}")
