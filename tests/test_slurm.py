"""The slurm backend against a real single-node Slurm cluster, and its config checks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import write_cluster_config
from pqm.errors import BadInput
from pqm.launch import main
from pqm.slurm import SlurmUnavailable, check_reachable, load_config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"partition": None}, "partition"),
        ({"time": "an hour"}, "time: 'an hour'"),
        ({"mem": "lots"}, "mem: 'lots'"),
        ({"cpus_per_task": 0}, "cpus_per_task: 0"),
        ({"gpus": -1}, "gpus: -1"),
        ({"walltime": "01:00:00"}, "unknown field(s) ['walltime']"),
    ],
)
def test_bad_cluster_config_is_refused(tmp_path, fields, message):
    write_cluster_config(tmp_path / "c.yaml", **fields)
    with pytest.raises(BadInput, match=r"c\.yaml") as err:
        load_config(tmp_path / "c.yaml")
    assert message in str(err.value)


def test_missing_field_is_named_and_nothing_is_submitted(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("partition: debug\ntime: '1:00:00'\n")
    code = main(["--backend", "slurm", "--config", str(tmp_path / "c.yaml"), "JOB=1:2", str(tmp_path / "t.JOB.log"), "true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing field(s) ['mem', 'cpus_per_task']" in err
    assert not (tmp_path / "q").exists()


def test_config_of_the_repo_is_valid():
    from conftest import ROOT

    cfg = load_config(ROOT / "conf" / "slurm.yaml")
    assert cfg.cpus_per_task >= 1 and "--partition=debug" in cfg.sbatch_args()


def test_unreachable_controller_says_how_to_check(slurm_cluster, tmp_path, monkeypatch):
    bad = tmp_path / "slurm.conf"
    bad.write_text(slurm_cluster.read_text() + "SlurmctldPort=7999\n")
    monkeypatch.setenv("SLURM_CONF", str(bad))
    with pytest.raises(SlurmUnavailable, match="scontrol ping"):
        check_reachable()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SlurmUnavailable, match="not on PATH"):
        check_reachable()


SCRIPT = ("import os, sys, time; i = int(sys.argv[1]); print('task', i, 'threads', os.environ['OMP_NUM_THREADS']);"
          "time.sleep(600 if i == 3 else 0); sys.exit(3 if i == 2 else 0)")


@pytest.fixture(scope="session")
def time_limited_array(slurm_cluster, tmp_path_factory):
    """``python -m pqm.launch`` with a 4-task array whose task 3 runs past its 1-minute limit. Slurm stops it
    only 60-90 s after its start, so the Slurm group's first test starts it (conftest orders the tests) and
    the recipe tests run meanwhile; its last test reads how the array ended."""
    tmp = tmp_path_factory.mktemp("time_limit")
    config = write_cluster_config(tmp / "c.yaml", time="1")
    (tmp / "names.txt").write_text("a\nb\nc\nd\n")
    (tmp / "log").mkdir()
    (tmp / "log" / "t.3.log").write_text("# Ended (code 0)\n")  # stale: must not count
    with open(tmp / "launch.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pqm.launch", "--backend", "slurm", "--config", str(config),
                                 "--task-names", str(tmp / "names.txt"), "JOB=1:4", str(tmp / "log" / "t.JOB.log"),
                                 sys.executable, "-c", SCRIPT, "JOB"], stdout=subprocess.DEVNULL, stderr=err)
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()


def test_time_limited_array_is_submitted(time_limited_array):
    proc, tmp = time_limited_array
    deadline = time.time() + 60
    while time.time() < deadline and "as Slurm job array" not in (tmp / "launch.err").read_text() and proc.poll() is None:
        time.sleep(0.2)
    assert "submitted 4 tasks as Slurm job array" in (tmp / "launch.err").read_text()


def test_array_exit_codes_failures_and_time_limit(time_limited_array, slurm_cluster):
    """Task 2 fails, task 3 runs past the 1-minute limit: both reported, the others succeed."""
    proc, tmp = time_limited_array
    assert proc.wait(timeout=300) == 1
    err = (tmp / "launch.err").read_text()
    assert "2 of 4 tasks failed" in err
    assert "task 2 (b): exit code 3" in err
    assert "task 3 (c)" in err and "TIMEOUT" in err
    for i in (1, 4):
        text = (tmp / "log" / f"t.{i}.log").read_text()
        assert f"task {i} threads 1" in text and "# Ended (code 0)" in text
    # rerun task 3 alone, with time enough: it succeeds
    code = main(["--backend", "slurm", "--config", str(write_cluster_config(tmp / "c2.yaml")), "JOB=3:3",
                 str(tmp / "log" / "t.JOB.log"), sys.executable, "-c", SCRIPT.replace("600 if", "0 if"), "JOB"])
    assert code == 0 and "# Ended (code 0)" in (tmp / "log" / "t.3.log").read_text()
