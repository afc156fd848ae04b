"""Kaldi-style job launcher: ``python -m pqm.launch [opts] JOB=1:N log/name.JOB.log command ...``.

Every ``JOB`` word in the log path and the command is replaced by the task
number. Each task's output goes to its own log, which starts with the command
and ends with ``# Ended (code N)``, as with Kaldi's ``run.pl``. A failed task
does not stop the others; the launcher exits non-zero and names the failed
tasks and their logs. Backends are looked up by name in ``BACKENDS``: the
local one runs tasks as parallel processes; a cluster backend only has to
turn a list of tasks into exit codes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_RANGE = re.compile(r"^JOB=(\d+):(\d+)$")


@dataclass
class Task:
    """One task of an array: its number, command line and log file."""

    index: int
    argv: list[str]
    log: Path


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


def run_local_task(task: Task, threads: int) -> int:
    """Run one task, its output into its log; return its exit code."""
    task.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(task.log, "w", encoding="utf-8") as log:
        log.write(f"# {shlex.join(task.argv)}\n# Started at {time.ctime()}\n")
        log.flush()
        try:
            code = subprocess.run(task.argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        except OSError as exc:
            log.write(f"cannot start the command: {exc}\n")
            code = 127
        log.write(f"# Accounting: time={time.time() - start:.0f} threads={threads}\n# Ended (code {code}) at {time.ctime()}\n")
    return code


def run_local(tasks: list[Task], max_jobs: int, threads: int) -> list[int]:
    """Run tasks as local processes, at most ``max_jobs`` at a time."""
    with ThreadPoolExecutor(max_workers=max_jobs) as pool:
        return list(pool.map(lambda t: run_local_task(t, threads), tasks))


BACKENDS: dict[str, Callable[[list[Task], int, int], list[int]]] = {"local": run_local}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [options] JOB=1:N LOG COMMAND...")
    p.add_argument("--backend", default="local", help=f"one of {sorted(BACKENDS)}")
    p.add_argument("--max-jobs", type=int, default=os.cpu_count() or 1, help="tasks running at once")
    p.add_argument("--threads", type=int, default=0, help="threads per task (0: cores / running tasks)")
    p.add_argument("job_range")
    p.add_argument("log")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.backend not in BACKENDS:
        p.error(f"unknown backend {a.backend!r}; available: {sorted(BACKENDS)}")
    if not a.command:
        p.error("no command given")
    tasks = expand(a.job_range, a.log, a.command)
    max_jobs = max(1, min(a.max_jobs, len(tasks)))
    threads = a.threads or max(1, (os.cpu_count() or 1) // max_jobs)
    codes = BACKENDS[a.backend](tasks, max_jobs, threads)
    failed = [t for t, c in zip(tasks, codes) if c != 0]
    if failed:
        print(f"pqm.launch: {len(failed)} of {len(tasks)} tasks failed:", file=sys.stderr)
        for t in failed:
            print(f"  task {t.index}: see {t.log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
