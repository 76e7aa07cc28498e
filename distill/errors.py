"""User-facing errors and the wrapper that turns them into one line and an exit code."""

from __future__ import annotations

import functools
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
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        return 0 if rc is None else rc

    return wrapper
