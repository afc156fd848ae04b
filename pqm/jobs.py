"""Tasks of a Kaldi-style job array: ``JOB=a:b`` expansion and running one task into its log.

Every backend of ``pqm.launch`` runs each task through :func:`run_task`, so a
task's log looks the same wherever it ran: the command, then its output, then
``# Ended (code N)`` as with Kaldi's ``run.pl``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pqm.errors import BadInput, check_safe_id, cli, require
from pqm.files import read_json, write_text

_RANGE = re.compile(r"^JOB=(\d+):(\d+)$")
_ENDED = re.compile(r"^# Ended \(code (-?\d+)\)", re.MULTILINE)


@dataclass
class Task:
    """One task of an array: its number, command line and log file."""

    index: int
    argv: list[str]
    log: Path


@dataclass
class Result:
    """How a task ended: its exit code and, where the code alone does not say, why."""

    code: int
    note: str = ""


def expand(job_range: str, log_pattern: str, command: list[str]) -> list[Task]:
    """Turn ``JOB=a:b``, a log pattern and a command into one Task per index."""
    match = _RANGE.match(job_range)
    if match is None:
        raise ValueError(f"expected JOB=first:last, got {job_range!r}")
    first, last = int(match[1]), int(match[2])
    if first < 1 or last < first:
        raise ValueError(f"bad job range {job_range!r}")
    sub = lambda s, i: re.sub(r"\bJOB\b", str(i), s)  # noqa: E731
    return [Task(i, [sub(arg, i) for arg in command], Path(sub(log_pattern, i))) for i in range(first, last + 1)]


def run_task(task: Task, threads: int) -> int:
    """Run one task, its output into its log, with ``threads`` math threads; return its exit code."""
    task.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(task.log, "w", encoding="utf-8") as log:
        log.write(f"# {shlex.join(task.argv)}\n# Started at {time.ctime()} on {os.uname().nodename}\n")
        log.flush()
        try:
            code = subprocess.run(task.argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        except OSError as exc:
            log.write(f"cannot start the command: {exc}\n")
            code = 127
        log.write(f"# Accounting: time={time.time() - start:.0f} threads={threads}\n# Ended (code {code}) at {time.ctime()}\n")
    return code


def logged_exit_code(log: Path) -> int | None:
    """The exit code a finished task wrote into its log, or None if it did not finish."""
    try:
        found = _ENDED.findall(log.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return None
    return int(found[-1]) if found else None


def add_speaker_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--speaker NAME``, or ``--speaker-list FILE --job N`` (line N, as a job array's task N gives it)."""
    p.add_argument("--speaker", default=None, help=f"{what} this speaker's cuts only")
    p.add_argument("--speaker-list", type=Path, default=None, help="with --job N: line N of this file is --speaker")
    p.add_argument("--job", type=int, default=None, help="task number of the job array (1-based)")


def job_speaker(a: argparse.Namespace) -> str | None:
    """The speaker that :func:`add_speaker_options`' options name (checked to be a safe file name), or None."""
    if a.speaker_list is None:
        return None if a.speaker is None else check_safe_id(a.speaker)
    if a.job is None:
        raise BadInput("--speaker-list needs --job")
    speakers = require(a.speaker_list).read_text(encoding="utf-8").split()
    if not 1 <= a.job <= len(speakers):
        raise BadInput(f"--job {a.job}: {a.speaker_list} names {len(speakers)} speakers")
    return check_safe_id(speakers[a.job - 1])


def write_test_speakers(manifest_dir: Path, out: Path) -> int:
    """Stages 7-8: stage 2's test speakers, one a line in ``out`` (task N of a job array is line N); their number."""
    speakers = read_json(require(manifest_dir / "speakers.json", "stage 2 (manifests)"))["test"]
    write_text(out, "".join(f"{check_safe_id(s)}\n" for s in speakers))
    return len(speakers)


def main(argv: list[str] | None = None) -> None:
    """``python -m pqm.jobs --manifests DIR --out FILE``: write the test-speaker list and print its length."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--manifests", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    print(write_test_speakers(a.manifests, a.out))


if __name__ == "__main__":
    cli(main)
