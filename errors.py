"""User-facing errors: one clear line and exit status 2, a traceback only with --debug."""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable, NoReturn, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class UserError(Exception):
    """Something the user can fix (a flag, a file, a config); the message says what and how."""


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one-line UserErrors with a suggestion."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()[0]
            flags = [f for action in self._actions for f in action.option_strings]
            close = difflib.get_close_matches(unknown.split("=")[0], flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags"
            raise UserError(f"unknown flag {unknown}{hint}")
        raise UserError(f"{message}; see --help")


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main(argv) and turn a UserError into one line on stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
