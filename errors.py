"""The error a user can fix, and the exit codes the commands end with."""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the output's reader went away


class UserError(Exception):
    """Something the user can fix (a flag, a file, a config); the message says what and how."""


class StoppedAtOnce(KeyboardInterrupt):
    """A signal that ends a command at once: the message (empty: say nothing) and the exit
    status the shell gives a process the signal ended, 128 + its number (143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum
