"""The ``slurm`` backend of ``pqm.launch``: one Slurm job array per ``JOB=a:b`` line.

Settings come from a cluster config (``conf/slurm.yaml``), checked before
anything is submitted. Each array task runs ``python -m pqm.slurm TABLE ID``,
which runs task ``ID`` of the task table through :func:`pqm.jobs.run_task`, so
its log is the same as with the local backend. The launcher waits for the
array, reads each task's exit code from its log and, for a task that did not
finish (time limit, memory, cancelled), asks Slurm for its state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pqm.errors import BadInput, UserError
from pqm.files import write_json, write_text
from pqm.jobs import Result, Task, logged_exit_code, run_task

_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_MEM = re.compile(r"^\d+[KMGT]?$")


class SlurmUnavailable(UserError):
    """Slurm's commands are missing or its controller does not answer."""


@dataclass
class SlurmConfig:
    """Per-task resources of a job array (``sbatch`` options)."""

    partition: str
    time: str
    mem: str
    cpus_per_task: int
    gpus: int = 0
    array_throttle: int = 0
    extra_args: list[str] = field(default_factory=list)

    def sbatch_args(self) -> list[str]:
        args = [f"--partition={self.partition}", f"--time={self.time}", f"--mem={self.mem}",
                f"--cpus-per-task={self.cpus_per_task}"]
        if self.gpus:
            args.append(f"--gres=gpu:{self.gpus}")
        return args + self.extra_args


_REQUIRED = ("partition", "time", "mem", "cpus_per_task")
_CHECKS = {
    "partition": (lambda v: isinstance(v, str) and re.fullmatch(r"[\w.,-]+", v), "a partition name"),
    "time": (lambda v: isinstance(v, str) and _TIME.match(v), "a Slurm time such as '01:30:00' or '2-00:00:00' (quote it)"),
    "mem": (lambda v: isinstance(v, (str, int)) and _MEM.match(str(v)), "a memory size such as 4G or 500M"),
    "cpus_per_task": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "gpus": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "array_throttle": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0 (0: no limit)"),
    "extra_args": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of sbatch options"),
}


def load_config(path: Path) -> SlurmConfig:
    """Read and check a cluster config; every problem names the file and the field."""
    if not path.is_file():
        raise BadInput(f"cluster config {path} not found: copy conf/slurm.yaml and set your partition")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BadInput(f"cluster config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadInput(f"cluster config {path}: expected a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_CHECKS))
    if unknown:
        raise BadInput(f"cluster config {path}: unknown field(s) {unknown}; known: {sorted(_CHECKS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise BadInput(f"cluster config {path}: missing field(s) {missing}")
    for key, value in raw.items():
        ok, want = _CHECKS[key]
        if not ok(value):
            raise BadInput(f"cluster config {path}: {key}: {value!r} is not {want}")
    return SlurmConfig(**{**raw, "mem": str(raw["mem"])})


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def check_reachable() -> None:
    """Fail with a clear message unless Slurm's commands exist and the controller answers."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailable(f"Slurm's commands {missing} are not on PATH: use --cmd-backend local, "
                               "or run on a machine of the cluster (e.g. after `module load slurm`)")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SlurmUnavailable(f"SLURM_CONF={conf} does not exist: fix or unset it")
    try:
        ping = _run(["scontrol", "ping"], timeout=30)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("Slurm is not reachable: `scontrol ping` did not answer in 30 s; "
                               "check with `scontrol ping` and `sinfo`") from None
    if ping.returncode != 0 or " UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        raise SlurmUnavailable(f"Slurm is not reachable: `scontrol ping` said {said[0] if said else 'nothing'!r}; "
                               "check that slurmctld runs (`scontrol ping`, `sinfo`)"
                               + (f" and the config SLURM_CONF={conf}" if conf else ""))


def _wait(job_id: str, poll: float) -> None:
    """Wait until no task of the array is pending or running."""
    delay = 0.2
    while True:
        q = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"])
        if q.returncode != 0 and "Invalid job id" not in q.stderr:
            raise SlurmUnavailable(f"squeue failed while waiting for job {job_id}: {q.stderr.strip()}")
        if q.returncode != 0 or not q.stdout.split():
            return
        time.sleep(delay)
        delay = min(poll, delay * 2)


def task_states(job_id: str) -> dict[int, str]:
    """Slurm's final state per array task (TIMEOUT, OUT_OF_MEMORY, ...), where it still knows the job."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    states = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("ArrayTaskId", "").isdigit():
            states[int(fields["ArrayTaskId"])] = fields.get("JobState", "UNKNOWN")
    return states


def run_slurm(tasks: list[Task], name: str, config: Path, poll: float = 5.0, overrides: dict | None = None) -> list[Result]:
    """Submit ``tasks`` as one job array, wait for it and return each task's result.

    ``overrides`` replaces fields of the config (Kaldi's ``--num-threads``, ``--mem``, ``--gpu``).
    """
    cfg = dataclasses.replace(load_config(config), **(overrides or {}))
    check_reachable()
    qdir = tasks[0].log.parent.resolve() / "q"
    table = qdir / f"{name}.tasks.json"
    write_json(table, {str(t.index): {"argv": t.argv, "log": str(t.log.resolve())} for t in tasks})
    script = qdir / f"{name}.sh"
    write_text(script, f"#!/bin/bash\nexec {shlex.quote(sys.executable)} -m pqm.slurm "
                       f"{shlex.quote(str(table))} \"$SLURM_ARRAY_TASK_ID\" {cfg.cpus_per_task}\n")
    for t in tasks:  # a stale log must not pass for this run's result
        t.log.unlink(missing_ok=True)
    array = f"{tasks[0].index}-{tasks[-1].index}" + (f"%{cfg.array_throttle}" if cfg.array_throttle else "")
    argv = ["sbatch", "--parsable", f"--job-name=pqm.{name}", f"--array={array}",
            f"--output={qdir / name}.%a.out", *cfg.sbatch_args(), str(script)]
    sub = _run(argv)
    if sub.returncode != 0:
        raise SlurmUnavailable(f"sbatch refused the job array: {sub.stderr.strip()}\ncommand: {shlex.join(argv)}")
    job_id = sub.stdout.strip().split(";")[0]
    print(f"pqm.launch: submitted {len(tasks)} tasks as Slurm job array {job_id} ({shlex.join(cfg.sbatch_args())})",
          file=sys.stderr, flush=True)
    try:
        _wait(job_id, poll)
    except BaseException:
        _run(["scancel", job_id])
        raise
    results, states = [], None
    for t in tasks:
        code = logged_exit_code(t.log)
        if code == 0:
            results.append(Result(0))
            continue
        states = task_states(job_id) if states is None else states
        state = states.get(t.index, "UNKNOWN (Slurm no longer knows the job)")
        if code is None:
            note = f"Slurm job {job_id}_{t.index} ended as {state} before the task finished; see {qdir / name}.{t.index}.out"
            results.append(Result(1, note))
        else:  # a task Slurm stopped (time limit: SIGTERM) may still log its own exit code: say why it ended
            stopped = state.split()[0] in ("TIMEOUT", "OUT_OF_MEMORY", "CANCELLED", "PREEMPTED", "NODE_FAIL")
            results.append(Result(code, f"Slurm job {job_id}_{t.index} ended as {state}" if stopped else ""))
    return results


def main(argv: list[str]) -> int:
    """``python -m pqm.slurm TABLE TASK_ID THREADS`` (an array task) or ``--check CONFIG``."""
    if argv[:1] == ["--check"]:
        try:
            load_config(Path(argv[1]))
            check_reachable()
        except UserError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 2
        return 0
    table, index, threads = Path(argv[0]), argv[1], int(argv[2])
    entry = json.loads(table.read_text(encoding="utf-8"))[index]
    return run_task(Task(int(index), entry["argv"], Path(entry["log"])), threads)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
