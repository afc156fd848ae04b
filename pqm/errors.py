"""Errors a user can fix, the checks that raise them, and how a stage's command line reports them."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable


class UserError(Exception):
    """A problem with the user's input or run order, reported without a traceback."""


class MissingInput(UserError, FileNotFoundError):
    """A stage's input does not exist yet."""


class BadInput(UserError, ValueError):
    """Input data or an option that cannot be used."""


def cli(main: Callable[[], Any]) -> None:
    """Run a stage's ``main``; a :class:`UserError` becomes one ``ERROR:`` line and exit code 2."""
    try:
        main()
    except UserError as exc:
        logging.getLogger().handlers or setup_logging()
        logging.error(str(exc))
        sys.exit(2)


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_safe_id(value: str, what: str = "speaker id") -> str:
    """Return ``value`` if it can be used as a file name and shell word, else raise."""
    if not SAFE_ID.match(value) or ".." in value:
        raise BadInput(
            f"unsafe {what} {value!r}: use only letters, digits, '_', '-', '.' "
            f"(at most 64 characters, not starting with '.' or '-'); rename it in your data"
        )
    return value


def require(path: str | os.PathLike, made_by: str = "") -> Path:
    """Return ``path`` if it exists, else exit with a message naming the stage that makes it."""
    path = Path(path)
    if not path.exists():
        hint = f"; it is made by {made_by}" if made_by else ""
        raise MissingInput(f"missing input {path}{hint}")
    return path


def setup_logging(verbose: bool = False) -> None:
    """Log ``time level message`` lines to stderr, the way ESPnet tools do."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
