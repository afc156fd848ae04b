"""Kaldi tables (``wav.scp``, ``text``, ``utt2spk``, ``segments``...): one reader for the whole recipe."""

from __future__ import annotations

from pathlib import Path

from pqm.errors import BadInput

BOM = "\ufeff"


def read_table(path: Path, needed_by: str = "", allow_bom: bool = True) -> dict[str, str]:
    """``{key: rest of the line}``: the key ends at the first whitespace (a tab or spaces), as in Kaldi.

    A missing file, a key that appears twice and (with ``allow_bom=False``, for
    files that other readers open as well) a UTF-8 byte-order mark are errors
    naming the file; ``needed_by`` says who needs the file.
    """
    if not path.is_file():
        raise BadInput(f"{path} is missing" + (f": {needed_by}" if needed_by else ""))
    content = path.read_text(encoding="utf-8")
    if content.startswith(BOM):
        if not allow_bom:
            raise BadInput(f"{path} starts with a UTF-8 byte-order mark: save it without one "
                           f"(sed -i '1s/^\\xEF\\xBB\\xBF//' {path})")
        content = content[len(BOM):]
    table: dict[str, str] = {}
    for number, line in enumerate(content.splitlines(), 1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if fields[0] in table:
            raise BadInput(f"{path}:{number}: {fields[0]} appears twice")
        table[fields[0]] = fields[1].strip() if len(fields) > 1 else ""
    return table
