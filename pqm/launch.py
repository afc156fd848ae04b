"""Kaldi-style job launcher: ``python -m pqm.launch [opts] JOB=1:N log/name.JOB.log command ...``.

Every ``JOB`` word in the log path and the command is replaced by the task
number. Each task's output goes to its own log, which starts with the command
and ends with ``# Ended (code N)``, as with Kaldi's ``run.pl``. A failed task
does not stop the others; the launcher exits non-zero and names the failed
tasks (with ``--task-names``: their speakers) and their logs.

It takes the options of Kaldi's ``run.pl``/``queue.pl``/``slurm.pl``
(``--max-jobs-run N``, ``--num-threads N``, ``--mem X``, ``--gpu N``), and
``run.sh`` passes only those, so a site's own Kaldi script can stand in for it
(``cmd`` in ``cmd.sh``). Its one extra, the task names, comes from the
environment (``PQM_TASK_NAMES``, a file whose line N names task N: its speakers), which other
scripts ignore.

Backends, chosen with ``--backend`` (``cmd_backend`` in ``cmd.sh``):

- ``local``: parallel processes on this machine, at most ``--max-jobs-run`` at
  a time, with jobs x threads (``--num-threads``) never more than the cores;
  ``--mem`` and ``--gpu`` are not enforced;
- ``slurm``: one Slurm job array, resources from ``--config``
  (``conf/slurm.yaml``), where ``--num-threads``, ``--mem`` and ``--gpu``
  override its ``cpus_per_task``, ``mem`` and ``gpus``; see ``pqm.slurm``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pqm.errors import UserError, require
from pqm.jobs import Result, Task, expand, run_task
from pqm.slurm import run_slurm


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroups, a test worker's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_slots(max_jobs: int, threads: int, cores: int) -> tuple[int, int]:
    """(jobs at once, threads per job) for this machine: jobs x threads <= cores."""
    if threads <= 0:
        return max_jobs, max(1, cores // max_jobs)
    return max(1, min(max_jobs, cores // threads)), threads


def run_local(tasks: list[Task], max_jobs: int, threads: int) -> list[Result]:
    """Run tasks as local processes, bounded by ``max_jobs`` and the cores."""
    jobs, threads = local_slots(min(max_jobs, len(tasks)), threads, usable_cores())
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [Result(code) for code in pool.map(lambda t: run_task(t, threads), tasks)]


BACKENDS = ("local", "slurm")


def array_name(log_pattern: str) -> str:
    """A job name from the log pattern: ``exp/log/decode.JOB.log`` -> ``decode``."""
    name = re.sub(r"\bJOB\b", "", re.sub(r"\.log$", "", Path(log_pattern).name)).strip(".")
    name = re.sub(r"\.{2,}", ".", name)
    return re.sub(r"[^\w.-]", "_", name) or "job"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [options] JOB=1:N LOG COMMAND...",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="local", choices=BACKENDS)
    p.add_argument("--config", type=Path, default=Path("conf/slurm.yaml"), help="cluster config (slurm backend)")
    p.add_argument("--max-jobs-run", type=int, default=usable_cores(), help="local: tasks running at once")
    p.add_argument("--num-threads", type=int, default=0, help="threads per task (local, 0: cores / running tasks)")
    p.add_argument("--mem", default=None, help="slurm: memory per task, e.g. 4G (local: not enforced)")
    p.add_argument("--gpu", type=int, default=None, help="slurm: GPUs per task (local: not enforced)")
    p.add_argument("--task-names", type=Path, default=os.environ.get("PQM_TASK_NAMES") or None,
                   help="file whose line N names task N, e.g. speakers (default: $PQM_TASK_NAMES)")
    p.add_argument("job_range")
    p.add_argument("log")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if not a.command:
        p.error("no command given")
    try:
        tasks = expand(a.job_range, a.log, a.command)
    except ValueError as exc:
        p.error(str(exc))
    names = [line.strip() for line in require(a.task_names).read_text(encoding="utf-8").splitlines()] \
        if a.task_names else []
    try:
        if a.backend == "slurm":
            overrides = {"cpus_per_task": a.num_threads or None, "mem": a.mem, "gpus": a.gpu}
            results = run_slurm(tasks, array_name(a.log), a.config,
                                overrides={k: v for k, v in overrides.items() if v is not None})
        else:
            results = run_local(tasks, max(1, a.max_jobs_run), a.num_threads)
    except UserError as exc:
        print(f"pqm.launch: ERROR: {exc}", file=sys.stderr)
        return 2
    failed = [(t, r) for t, r in zip(tasks, results) if r.code != 0]
    if failed:
        print(f"pqm.launch: {len(failed)} of {len(tasks)} tasks failed:", file=sys.stderr)
        for t, r in failed:
            who = f" ({names[t.index - 1]})" if t.index <= len(names) and names[t.index - 1] else ""
            print(f"  task {t.index}{who}: exit code {r.code}, see {t.log}" + (f"; {r.note}" if r.note else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
