"""run.sh's done markers (pqm.stages): skip what is done with these options, redo what is not, refuse a stale start."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pqm.errors import BadInput
from pqm.stages import ALREADY_DONE, STAGE_INPUTS, Markers, by_stage, parse_options, validate

VALUES = {**{name: "1" for names in STAGE_INPUTS.values() for name in names.split()},
          "corpus": "fsdd", "corpus_opts": "", "datadir": "data", "corpus_inputs": "-", "seed": "0"}


def options(**changed: str) -> str:
    """run.sh's ``--name value`` lines, with ``changed`` values."""
    return "".join(f"--{name.replace('_', '-')} {value}\n" for name, value in {**VALUES, **changed}.items())


OPTIONS = options()


def markers(tmp_path, **changed: str) -> Markers:
    return Markers(tmp_path, by_stage(parse_options(options(**changed))))


def test_a_done_stage_records_the_options_of_it_and_the_stages_before(tmp_path):
    first = markers(tmp_path)
    assert first.begin(2, "manifests")
    first.done(2, 7)
    assert (tmp_path / ".done" / "stage2").read_text() == "--corpus fsdd\n--corpus-opts \n--datadir data\n--corpus-inputs -\n--seed 0\n"
    assert (tmp_path / "timing" / "stage2.seconds").read_text() == "7\n"
    assert not markers(tmp_path).begin(2, "manifests")  # the same options: skipped


def test_a_changed_option_redoes_the_stage_and_clears_the_later_markers(tmp_path, caplog):
    done = markers(tmp_path)
    for n in (2, 5, 6):
        done.done(n, 1)
    again = markers(tmp_path, seed="1")
    assert again.changed(2) == "was --seed 0; now --seed 1"
    with caplog.at_level("INFO", logger="run.sh"):
        assert again.begin(2, "manifests")
    assert "Stage 2: options changed since it was done (was --seed 0; now --seed 1)" in caplog.text
    assert not any((tmp_path / ".done" / f"stage{n}").exists() for n in (2, 5, 6))


def test_a_stage_before_the_first_done_with_other_options_stops_the_run(tmp_path):
    markers(tmp_path).done(1, 1)
    markers(tmp_path).check(2)  # same options: nothing to say
    stale = markers(tmp_path, corpus="custom")
    with pytest.raises(BadInput, match=r"stage 1 was done with other options \(was --corpus fsdd; now --corpus custom\)"):
        stale.check(2)
    stale.check(1)  # a run that starts at stage 1 redoes it


def test_an_empty_marker_of_an_older_pqm_counts_as_done(tmp_path):
    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "stage1").write_text("")
    assert markers(tmp_path).changed(1) == ""
    assert not markers(tmp_path).begin(1, "corpus")


def test_malformed_or_missing_options_are_refused():
    with pytest.raises(BadInput, match="expected '--name value' lines"):
        parse_options("2 --seed 0")
    with pytest.raises(BadInput, match="expected '--name value' lines"):
        parse_options("seed 0")
    with pytest.raises(BadInput, match="lacks sat_init, which the stages depend on"):
        by_stage({k: v for k, v in VALUES.items() if k != "sat_init"})


@pytest.mark.parametrize("name, value, advice", [("stage", "10", "stages are 1..9"), ("nj", "0", "a positive integer"),
                                                  ("unsup_keep", "0", "a fraction in (0, 1]"),
                                                  ("nf4_unquantised_dtype", "bf16", "use float32 or float16"),
                                                  ("sat_speed_perturb", "0.9,1.1", "speed factors separated by spaces")])
def test_a_value_the_rules_do_not_allow_is_named(name, value, advice):
    validate({name: "1" if name != "nf4_unquantised_dtype" else "float16"})
    with pytest.raises(BadInput, match=fr"--{name.replace('_', '-')} {value}: {re.escape(advice)}"):
        validate({name: value})


def test_the_command_line_exits_3_for_a_done_stage(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "pqm.stages", "--expdir", str(tmp_path),  # noqa: E731
                                        "--options", OPTIONS, *args], capture_output=True, text=True)
    assert run("begin", "1", "get the corpus").returncode == 0
    assert run("done", "1", "3").returncode == 0
    skipped = run("begin", "1", "get the corpus")
    assert skipped.returncode == ALREADY_DONE and "Stage 1: get the corpus: already done" in skipped.stdout


def test_an_option_added_later_counts_as_its_old_behaviour(tmp_path):
    """A marker written before ``--sat-max-duration`` existed counts as done with 0 (fixed batch sizes)."""
    done = markers(tmp_path)
    done.done(6, 1)
    marker = tmp_path / ".done" / "stage6"
    marker.write_text("".join(x for x in marker.read_text().splitlines(keepends=True)
                              if not x.startswith("--sat-max-duration")))
    assert markers(tmp_path, sat_max_duration="0").changed(6) == ""
    assert markers(tmp_path, sat_max_duration="64").changed(6) == "was --sat-max-duration 0; now --sat-max-duration 64"


def test_stage4_resumes_only_the_training_that_wrote_the_checkpoint(tmp_path, caplog):
    """ESPnet's ``checkpoint.pth`` in ``asr/`` is resumed by the same options and file contents (another path
    to the same contents, or more epochs, still resume); another config, or no record, starts afresh."""
    from pqm.train_conformer import fresh_unless_same_training, training_key

    config, copy = tmp_path / "a.yaml", tmp_path / "copy.yaml"
    config.write_text("max_epoch: 12\n")
    copy.write_text("max_epoch: 12\n")
    key = training_key(["--config", str(config), "--max_epoch", "12", "--seed", "0"])
    assert key == training_key(["--config", str(copy), "--max_epoch", "17", "--seed", "0"])
    assert key != training_key(["--config", str(config), "--max_epoch", "12", "--seed", "1"])
    out = tmp_path / "asr"
    out.mkdir()
    (out / "checkpoint.pth").write_text("no record of its training")
    fresh_unless_same_training(out, key)
    assert not (out / "checkpoint.pth").exists() and "training from the start" in caplog.text
    (out / "checkpoint.pth").write_text("this training's")
    fresh_unless_same_training(out, key)
    assert (out / "checkpoint.pth").exists()
    config.write_text("max_epoch: 12\npreprocessor_conf: {fs: 16000}\n")
    fresh_unless_same_training(out, training_key(["--config", str(config), "--max_epoch", "12", "--seed", "0"]))
    assert not (out / "checkpoint.pth").exists()
