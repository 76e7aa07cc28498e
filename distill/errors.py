"""User-facing errors and the wrapper that turns them into one line and an exit code."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix (a bad flag, a missing file, a mismatched vocabulary).

    Command-line entry points wrapped in :func:`cli_entry` print the message as one sentence
    and exit with status 2, without a traceback.
    """


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a ``main(argv=None)`` so that a :class:`UserError` ends the process cleanly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:
            # What the machine refused (a read-only folder, a full disk, a missing permission) is the
            # user's to fix; a specific check says more where a command can foresee it.
            if e.strerror is None:
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror.lower()}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        return 0 if rc is None else rc

    return wrapper


def note(msg: str) -> None:
    """A ``note:`` line on stderr, once per run (the main process of a distributed run only)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {msg}", file=sys.stderr, flush=True)


def say(msg: str) -> None:
    """A line on stdout, once per run (the main process of a distributed run only)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError: one sentence and exit 2, no usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")
