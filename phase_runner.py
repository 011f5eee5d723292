"""Run one phase's command as a child process: its output to the terminal and to its log, and
Ctrl+C or SIGTERM passed on to it once, so it saves a checkpoint and stops as it does alone.

The child runs in a session of its own, so a terminal's Ctrl+C reaches only the pipeline,
which hands it on: the child hears each signal exactly once (train.py takes a second Ctrl+C
as "quit without saving"). On a terminal the child writes to a pseudo-terminal, so it shows
its own progress bar; elsewhere (a pipe, a test) to a pipe, and it logs lines instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Optional

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def _open_output(use_terminal: bool) -> tuple[Optional[int], Optional[int]]:
    """Return (the child's end, our end) of a pseudo-terminal, or (None, None) for a pipe."""
    if not use_terminal:
        return None, None
    try:
        import pty
        ours, child = pty.openpty()
    except (ImportError, OSError):  # not POSIX, or no ptys left: a pipe does
        return None, None
    return child, ours


def _copy(source: int, log: BinaryIO, echo: BinaryIO) -> None:
    """Copy what the child writes to its log and our stdout until it closes its end."""
    while True:
        try:
            chunk = os.read(source, 1 << 16)
        except OSError:  # a pseudo-terminal reports the child's exit as EIO
            return
        if not chunk:
            return
        log.write(chunk)
        log.flush()
        echo.write(chunk)
        echo.flush()


def run_logged(command: list[str], log_path: Path, env: Optional[dict] = None) -> int:
    """Run `command`, its output echoed and appended to log_path; return its exit status
    (128 + N when it ends by signal N, as a shell reports it)."""
    child_end, our_end = _open_output(sys.stdout.isatty())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            stdout=child_end if child_end is not None else subprocess.PIPE, stderr=subprocess.STDOUT)
        if child_end is not None:
            os.close(child_end)
        source = our_end if our_end is not None else process.stdout.fileno()
        previous = {sig: signal.signal(sig, lambda number, _frame: process.send_signal(number))
                    for sig in FORWARDED}
        try:
            _copy(source, log, sys.stdout.buffer)
            code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if our_end is not None:
                os.close(our_end)
            elif process.stdout is not None:
                process.stdout.close()
    return 128 - code if code < 0 else code
