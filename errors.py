"""The error a user can fix, and the exit codes the commands end with."""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the output's reader went away


class UserError(Exception):
    """Something the user can fix (a flag, a file, a config); the message says what and how."""

