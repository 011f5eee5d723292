"""Run commands under a time limit each and record what came of them: gpu_check.py's engine.

A command runs in a session of its own, so when its limit passes the whole process group
(torchrun's workers, pytest's children) is stopped, and the next item starts on time.
Outcomes become one JSON line each and a markdown table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

STATUSES = ("ok", "failed", "timeout", "skipped")
KILL_GRACE_S = 3.0  # after SIGTERM; a process compiling has been seen to ignore it for minutes
TAIL_CHARS = 2000  # of a failed command's stderr, kept in its JSON line
LOG_CHARS = 200_000  # of each stream, kept in the item's log file


@dataclass
class Finished:
    """A command that ran: how it ended and what it printed."""

    argv: list[str]
    returncode: Optional[int]  # None when it was stopped at its limit
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_error_line(self) -> str:
        """The last non-empty line of stderr (a UserError's one line), else of stdout."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.returncode}"


@dataclass
class Outcome:
    """One item's result: a JSON line of gpu_check.jsonl and a row of its table."""

    item: str
    status: str  # one of STATUSES
    seconds: float
    limit_s: float
    result: str  # the headline figure, or why it failed or was skipped
    figures: dict = field(default_factory=dict)
    reason: str = ""  # for failed, timeout and skipped
    stderr_tail: str = ""  # for failed and timeout
    command: str = ""

    def json_line(self) -> str:
        return json.dumps(asdict(self))


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):  # the whole group has exited already
        pass


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group; SIGKILL whatever of it is left after KILL_GRACE_S."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)  # the leader, if it is still there, and any straggler
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass


def run_command(argv: Sequence[str], limit_s: float, cwd: Path, env: dict) -> Finished:
    """Run argv until it exits or limit_s passes (then its process group is stopped)."""
    started = time.perf_counter()
    process = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(limit_s, 0.1))
        returncode: Optional[int] = process.returncode
    except subprocess.TimeoutExpired:
        _stop_group(process)
        try:  # a grandchild that left the group may still hold the pipes open: do not wait for it
            stdout, stderr = process.communicate(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = "", "(output lost: a child process kept the pipes open)"
        returncode = None
    return Finished(list(argv), returncode, stdout, stderr, time.perf_counter() - started)


def write_log(path: Path, finished: Sequence[Finished]) -> None:
    """Keep every command's output of an item in one file (the ends of long outputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for done in finished:
        ending = "stopped at its time limit" if done.timed_out else f"exit status {done.returncode}"
        parts.append(f"$ {' '.join(done.argv)}\n# {ending} after {done.seconds:.1f} s\n"
                     f"## stdout\n{done.stdout[-LOG_CHARS:]}\n## stderr\n{done.stderr[-LOG_CHARS:]}\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def failure(item: str, limit_s: float, finished: Sequence[Finished]) -> Optional[Outcome]:
    """The outcome of an item whose last command timed out or failed; None if all succeeded."""
    last = finished[-1]
    if not last.timed_out and last.returncode == 0:
        return None
    seconds = sum(done.seconds for done in finished)
    command = " ".join(last.argv)
    if last.timed_out:
        reason = f"stopped at its limit of {limit_s:.0f} s"
        return Outcome(item, "timeout", seconds, limit_s, reason, reason=reason,
                       stderr_tail=last.stderr[-TAIL_CHARS:], command=command)
    reason = last.last_error_line()
    return Outcome(item, "failed", seconds, limit_s, reason, reason=reason,
                   stderr_tail=last.stderr[-TAIL_CHARS:], command=command)


def markdown_table(title: str, outcomes: Sequence[Outcome], footer: str) -> str:
    """Return the outcomes as a markdown table under a heading, with a closing line."""
    rows = [f"# {title}", "", "| item | status | seconds (limit) | result |", "|---|---|---|---|"]
    for o in outcomes:
        result = o.result.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {o.item} | {o.status} | {o.seconds:.1f} ({o.limit_s:.0f}) | {result} |")
    return "\n".join([*rows, "", footer, ""])
