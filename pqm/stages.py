"""run.sh's done markers: each records the options its stage was run with, so that a rerun skips what is done.

The marker ``<expdir>/.done/stageN`` holds the options of stages 1..N (one ``--name value`` line each) as
they were when stage N finished. A stage whose marker records other options than this run's is redone, and
the later stages with it; a stage before ``--stage`` that was done with other options stops the run. An
empty marker (written by an older pqm) records nothing and counts as done.

    python -m pqm.stages --expdir E --options OPTS check FIRST   # stages before FIRST: done with OPTS?
    python -m pqm.stages --expdir E --options OPTS begin N TITLE # exit 0: run it (markers N..9 cleared); 3: done
    python -m pqm.stages --expdir E --options OPTS done N SECONDS

OPTS has one ``N --name value`` line per option that stage N's outputs depend on (run.sh's ``stage_inputs``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pqm.errors import BadInput, cli
from pqm.files import write_text

LAST_STAGE = 9
ALREADY_DONE = 3  # exit code of ``begin`` for a stage that is done with this run's options
log = logging.getLogger("run.sh")


def parse_options(text: str) -> dict[int, list[str]]:
    """``N --name value`` lines -> the ``--name value`` lines of each stage."""
    by_stage: dict[int, list[str]] = {n: [] for n in range(1, LAST_STAGE + 1)}
    for line in text.splitlines():
        number, _, option = line.partition(" ")
        if not number.isdigit() or int(number) not in by_stage or not option.startswith("--"):
            raise BadInput(f"--options: expected 'N --name value' lines with N in 1..{LAST_STAGE}, got {line!r}")
        by_stage[int(number)].append(option)
    return by_stage


class Markers:
    """The done markers of one experiment folder, against this run's options."""

    def __init__(self, expdir: Path, options: dict[int, list[str]]):
        self.folder = expdir / ".done"
        self.options = options

    def marker(self, n: int) -> Path:
        return self.folder / f"stage{n}"

    def expected(self, n: int) -> list[str]:
        """The lines stage ``n``'s marker holds when it was done with this run's options."""
        return [line for m in range(1, n + 1) for line in self.options[m]]

    def changed(self, n: int) -> str:
        """Empty if stage ``n``'s marker records this run's options (or nothing), else ``was ...; now ...``."""
        marker = self.marker(n)
        if not marker.exists() or marker.stat().st_size == 0:
            return ""
        was, now = marker.read_text(encoding="utf-8").splitlines(), self.expected(n)
        gone, new = [x for x in was if x not in now], [x for x in now if x not in was]
        if not gone and not new:
            return ""
        return f"was {' '.join(gone) or '(unset)'}; now {' '.join(new) or '(unset)'}"

    def check(self, first: int) -> None:
        """Raise if a stage before ``first`` was done with other options than this run's."""
        for n in range(1, first):
            if changed := self.changed(n):
                raise BadInput(f"stage {n} was done with other options ({changed}): rerun from there (./run.sh "
                               f"--stage {n} with these options), or give the options it was run with "
                               f"({self.folder.parent}/run.cmd)")

    def begin(self, n: int, title: str) -> bool:
        """Whether stage ``n`` must run; if so, its marker and the later ones are removed."""
        changed = self.changed(n)
        if self.marker(n).exists() and not changed:
            log.info(f"Stage {n}: {title}: already done (remove {self.marker(n)} to redo)")
            return False
        if changed:
            log.info(f"Stage {n}: options changed since it was done ({changed}): redoing it and the later stages")
        log.info(f"Stage {n}: {title}")
        for later in range(n, LAST_STAGE + 1):
            self.marker(later).unlink(missing_ok=True)
        return True

    def done(self, n: int, seconds: int) -> None:
        """Record stage ``n`` as done with this run's options, and its wall time."""
        write_text(self.folder.parent / "timing" / f"stage{n}.seconds", f"{seconds}\n")
        write_text(self.marker(n), "".join(f"{line}\n" for line in self.expected(n)))
        log.info(f"Stage {n} done in {seconds} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expdir", type=Path, required=True)
    p.add_argument("--options", required=True, help="one 'N --name value' line per option of stage N")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check").add_argument("first", type=int)
    begin = sub.add_parser("begin")
    begin.add_argument("stage", type=int)
    begin.add_argument("title")
    done = sub.add_parser("done")
    done.add_argument("stage", type=int)
    done.add_argument("seconds", type=int)
    a = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)  # beside run.sh's own lines; errors go to stderr (cli)
    handler.setFormatter(logging.Formatter("%(asctime)s (%(name)s) %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    markers = Markers(a.expdir, parse_options(a.options))
    if a.command == "check":
        markers.check(a.first)
    elif a.command == "begin":
        if not markers.begin(a.stage, a.title):
            sys.exit(ALREADY_DONE)
    else:
        markers.done(a.stage, a.seconds)


if __name__ == "__main__":
    cli(main)
