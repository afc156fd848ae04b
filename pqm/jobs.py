"""Tasks of a Kaldi-style job array: ``JOB=a:b`` expansion and running one task into its log.

Every backend of ``pqm.launch`` runs each task through :func:`run_task`, so a
task's log looks the same wherever it ran: the command, then its output, then
``# Ended (code N)`` as with Kaldi's ``run.pl``. Stages 7 and 8 split the test
speakers into such tasks (:func:`write_test_speakers`, as Kaldi's ``split_data.sh``):
each task adapts or decodes its speakers one after another.
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
    """``--speaker NAME``, or ``--speaker-list FILE --job N`` (the speakers on line N, as task N of a job array)."""
    p.add_argument("--speaker", default=None, help=f"{what} this speaker's cuts only")
    p.add_argument("--speaker-list", type=Path, default=None,
                   help="with --job N: the speakers on line N of this file, one after another (stages 7-8)")
    p.add_argument("--job", type=int, default=None, help="task number of the job array (1-based)")


def job_speakers(a: argparse.Namespace) -> list[str | None]:
    """The speakers that :func:`add_speaker_options`' options name (each checked to be a safe file name);
    ``[None]`` when they name none (every utterance at once)."""
    if a.speaker_list is None:
        return [None if a.speaker is None else check_safe_id(a.speaker)]
    if a.job is None:
        raise BadInput("--speaker-list needs --job")
    lines = require(a.speaker_list).read_text(encoding="utf-8").splitlines()
    if not 1 <= a.job <= len(lines) or not lines[a.job - 1].split():
        raise BadInput(f"--job {a.job}: {a.speaker_list} has {len(lines)} lines of speakers (one a job)")
    return [check_safe_id(s) for s in lines[a.job - 1].split()]


def split_speakers(speakers: list[str], num_jobs: int) -> list[list[str]]:
    """``speakers`` in at most ``num_jobs`` runs of consecutive speakers, as even in number as can be
    (Kaldi's ``split_data.sh``): a job then pays the start-up and model loading once for all of its speakers."""
    jobs = max(1, min(num_jobs, len(speakers)))
    size, extra = divmod(len(speakers), jobs)
    bounds = [n * size + min(n, extra) for n in range(jobs + 1)]
    return [speakers[bounds[n]:bounds[n + 1]] for n in range(jobs)]


def write_test_speakers(manifest_dir: Path, out: Path, num_jobs: int) -> int:
    """Stages 7-8: stage 2's test speakers split into at most ``num_jobs`` jobs, line N of ``out`` the
    speakers of job N (task N of a job array); the number of jobs."""
    speakers = read_json(require(manifest_dir / "speakers.json", "stage 2 (manifests)"))["test"]
    if not speakers:
        raise BadInput(f"{manifest_dir / 'speakers.json'} names no test speakers: rerun stage 2 (manifests)")
    jobs = split_speakers([check_safe_id(s) for s in speakers], num_jobs)
    write_text(out, "".join(" ".join(job) + "\n" for job in jobs))
    return len(jobs)


def main(argv: list[str] | None = None) -> None:
    """``python -m pqm.jobs --manifests DIR --out FILE --num-jobs J``: write the test speakers, split into at
    most J jobs (a line each), and print the number of jobs."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--manifests", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-jobs", type=int, required=True, help="at most this many jobs (Kaldi's --nj)")
    a = p.parse_args(argv)
    if a.num_jobs < 1:
        p.error(f"--num-jobs {a.num_jobs}: a positive number is needed")
    print(write_test_speakers(a.manifests, a.out, a.num_jobs))


if __name__ == "__main__":
    cli(main)
