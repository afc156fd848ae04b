"""Files the stages write and read: atomic writes (a killed stage leaves no half-written output), JSON, digests."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pqm.errors import require


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
