"""Small file-system helpers shared by every stage: atomic writes, safe ids, logging."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and folders, so a stage killed half-way never leaves a
    half-written output under the final name. The temporary folder's name holds
    the writer's process id: one left by a killed process is removed by the next
    writer of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.pid*.*"):
        pid = stale.name[len(path.name) + 5:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.pid{os.getpid()}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, made_by: str = "") -> Any:
    """Read JSON, with an error that names the file and the stage that makes it."""
    return json.loads(require(path, made_by).read_text(encoding="utf-8"))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ids_digest(ids) -> str:
    """SHA-256 of a set of ids (utterances, speakers), independent of their order."""
    return hashlib.sha256(" ".join(sorted(ids)).encode()).hexdigest()


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
