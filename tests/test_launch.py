"""The Kaldi-style job launcher: task expansion, the local backend, failure reports; the test speakers'
split into tasks."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from pqm.errors import BadInput
from pqm.jobs import expand, job_speakers, split_speakers, write_test_speakers
from pqm.launch import array_name, local_slots, main


def test_expand_replaces_job_word_only():
    tasks = expand("JOB=2:3", "log/x.JOB.log", ["echo", "JOB", "--jobs", "JOBS"])
    assert [t.index for t in tasks] == [2, 3]
    assert tasks[0].argv == ["echo", "2", "--jobs", "JOBS"]
    assert str(tasks[1].log) == "log/x.3.log"


@pytest.mark.parametrize("bad", ["JOB=0:2", "JOB=3:1", "JOB=a:b", "1:2"])
def test_bad_range_is_refused(bad):
    with pytest.raises(ValueError):
        expand(bad, "x.JOB.log", ["true"])


def test_tasks_run_in_parallel_and_log(tmp_path):
    code = main(["--max-jobs-run", "3", "JOB=1:3", str(tmp_path / "t.JOB.log"),
                 sys.executable, "-c", "import os,sys; print('task', sys.argv[1], os.environ['OMP_NUM_THREADS'])", "JOB"])
    assert code == 0
    for i in (1, 2, 3):
        text = (tmp_path / f"t.{i}.log").read_text()
        assert f"task {i} 1" in text  # threads per task: at least 1
        assert "# Ended (code 0)" in text


def test_failed_task_does_not_stop_others(tmp_path, capsys):
    script = "import sys; sys.exit(3 if sys.argv[1] == '2' else 0)"
    names = tmp_path / "speakers.txt"
    names.write_text("alice\nbob dave\ncarol\n")  # line N: the speakers of task N
    code = main(["--max-jobs-run", "1", "--task-names", str(names), "JOB=1:3", str(tmp_path / "t.JOB.log"),
                 sys.executable, "-c", script, "JOB"])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 3 tasks failed" in err and "task 2 (bob dave): exit code 3" in err and "t.2.log" in err
    assert "alice" not in err and "carol" not in err
    assert "# Ended (code 0)" in (tmp_path / "t.3.log").read_text()
    assert "# Ended (code 3)" in (tmp_path / "t.2.log").read_text()


def test_jobs_times_threads_never_exceed_cores():
    assert local_slots(4, 0, 2) == (4, 1)
    assert local_slots(2, 0, 8) == (2, 4)
    assert local_slots(8, 2, 8) == (4, 2)  # 8 jobs x 2 threads would need 16 cores
    assert local_slots(3, 4, 2) == (1, 4)  # one job at a time if a single job asks for more


def test_array_name():
    assert array_name("exp/log/adapt_pqm.JOB.log") == "adapt_pqm"
    assert array_name("log/JOB.log") == "job"


def test_unknown_backend_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--backend", "nope", "JOB=1:1", str(tmp_path / "x.JOB.log"), "true"])


def test_speakers_split_into_runs_of_nearly_equal_size():
    speakers = [f"s{i}" for i in range(7)]
    assert split_speakers(speakers, 3) == [["s0", "s1", "s2"], ["s3", "s4"], ["s5", "s6"]]
    assert split_speakers(speakers, 10) == [[s] for s in speakers]  # never an empty task
    assert split_speakers(speakers, 1) == [speakers]


def test_a_task_gets_the_speakers_of_its_line(tmp_path):
    (tmp_path / "speakers.json").write_text(json.dumps({"train": ["t"], "test": ["a", "b", "c", "d", "e"]}))
    out = tmp_path / "test_speakers.txt"
    assert write_test_speakers(tmp_path, out, 2) == 2
    assert out.read_text() == "a b c\nd e\n"
    job = lambda n: argparse.Namespace(speaker=None, speaker_list=out, job=n)  # noqa: E731
    assert job_speakers(job(1)) == ["a", "b", "c"] and job_speakers(job(2)) == ["d", "e"]
    with pytest.raises(BadInput, match="--job 3"):
        job_speakers(job(3))
    assert job_speakers(argparse.Namespace(speaker=None, speaker_list=None, job=None)) == [None]
    (tmp_path / "speakers.json").write_text(json.dumps({"train": ["t"], "test": ["a", "../b"]}))
    with pytest.raises(BadInput):
        write_test_speakers(tmp_path, out, 2)
