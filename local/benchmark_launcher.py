#!/usr/bin/env python3
"""Launcher overhead: run N trivial tasks (``true``) through each backend of ``pqm.launch``.

    python local/benchmark_launcher.py --tasks 1000 --backends local slurm [--config conf/slurm.yaml]

Prints, per backend, the wall time of the whole array, the overhead per task
(wall time / tasks, and wall time x task slots / tasks), and the ratio to a
bare baseline measured in the same run: the same N ``true`` processes started
one after another by Python, with no launcher. Every task's log is checked.
For slurm, start a cluster first (``tools/slurm_localhost.sh start``) or run
on a cluster's login node.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pqm.jobs import logged_exit_code
from pqm.slurm import load_config


def bare_baseline(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["true"], check=True)
    return time.perf_counter() - start


def run_backend(backend: str, n: int, workdir: Path, config: Path, max_jobs: int) -> float:
    log = workdir / backend / "t.JOB.log"
    argv = [sys.executable, "-m", "pqm.launch", "--backend", backend, "--config", str(config),
            "--max-jobs-run", str(max_jobs), "--num-threads", "1", f"JOB=1:{n}", str(log), "true"]
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    wall = time.perf_counter() - start
    bad = [i for i in range(1, n + 1) if logged_exit_code(workdir / backend / f"t.{i}.log") != 0]
    if bad:
        raise SystemExit(f"{backend}: {len(bad)} tasks did not end with code 0, e.g. task {bad[0]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--backends", nargs="+", default=["local", "slurm"], choices=["local", "slurm"])
    p.add_argument("--config", type=Path, default=Path("conf/slurm.yaml"), help="cluster config (slurm)")
    p.add_argument("--max-jobs", type=int, default=os.cpu_count() or 1, help="local: tasks at once")
    a = p.parse_args()
    slots = {"local": a.max_jobs}
    if "slurm" in a.backends:
        slots["slurm"] = max(1, (os.cpu_count() or 1) // load_config(a.config).cpus_per_task)
    base = bare_baseline(a.tasks)
    rows = [("bare loop (no launcher)", base, 1)]
    with tempfile.TemporaryDirectory(prefix="pqm-bench-", dir=".") as tmp:
        for backend in a.backends:
            rows.append((backend, run_backend(backend, a.tasks, Path(tmp), a.config, a.max_jobs), slots[backend]))
    print(f"\n{a.tasks} trivial tasks on {os.cpu_count()} cores ({os.uname().nodename})")
    print("| backend | wall s | ms per task | slot-ms per task | x bare loop |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, n_slots in rows:
        print(f"| {name} | {wall:.1f} | {1000 * wall / a.tasks:.1f} | {1000 * wall * n_slots / a.tasks:.1f} | {wall / base:.1f} |")


if __name__ == "__main__":
    main()
