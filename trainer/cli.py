"""What the command-line entry points (train.py, eval.py, study.py) share: a user error (a bad flag, a
missing or malformed file, a config that does not fit, a full disk) ends the program with one line on
stderr, `error: ...`, and exit status 2, no traceback. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

USER_ERRORS = (ValueError, OSError)  # OSError: FileNotFoundError, PermissionError, a full disk, ...


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises ValueError instead of printing the usage and exiting."""

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message} (see --help)")


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """main(argv); 0 when it returns, 2 with the one-line message when it raises a user error."""
    try:
        main(argv)
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
