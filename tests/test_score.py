"""Scoring with jiwer and the results table."""

from __future__ import annotations

import json

import pytest

from pqm.decode import write_hyps
from pqm.errors import BadInput
from pqm.families import made_on, record
from pqm.score import count_errors, markdown, score


def test_count_errors_matches_hand_count():
    # ref "one two three" vs hyp "one three three four": 1 substitution + 1 insertion
    r = count_errors(["one two three", "five"], ["one three three four", "five"])
    assert r == {"wer": 50.0, "errors": 2, "words": 4}


def test_score_per_speaker_and_fallback(tmp_path):
    refs = {"a-1": "one two", "a-2": "three", "b-1": "four four"}
    speakers = {"a-1": "a", "a-2": "a", "b-1": "b"}
    for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm"):
        write_hyps(tmp_path / system / "a", {"a-1": "one two", "a-2": "six"}, {"system": system})
        info = {"system": system, "fallback": "nf4_sat"} if system == "pqm" else {"system": system}
        write_hyps(tmp_path / system / "b", {"b-1": "four"}, info)
    systems = score(tmp_path, refs, speakers)
    assert systems["fp"]["per_speaker"]["a"] == {"wer": pytest.approx(33.33), "errors": 1, "words": 3}
    assert systems["fp"]["errors"] == 2 and systems["fp"]["words"] == 5
    assert systems["pqm"]["per_speaker"]["b"]["fallback"] == "nf4_sat"
    results = {"corpus": "c", "model": "m", "test_speakers": ["a", "b"], "systems": systems,
               "size_bytes": {"fp32": 800, "nf4": 100}, "params": {"base": 1000, "lora_per_speaker": 9}}
    table = markdown(results)
    assert "| pqm | 40.00 | 2 | 5 | +0.0 | +0.0 | 2/2 |" in table and "8.00x smaller" in table
    assert "| b | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 (fallback: nf4_sat) |" in table
    assert "**pqm** fell back to nf4_sat for 1 of 2 speakers" in table
    json.dumps(results)


def test_wer_per_test_set(tmp_path):
    """A corpus with several test sets (LibriSpeech's test-clean and test-other, speakers.json's test_sets):
    each system's WER per set from its speakers' counts, a table of them in RESULTS.md."""
    from pqm.score import add_per_set

    refs = {"a-1": "one two", "b-1": "three four", "c-1": "five"}
    speakers = {u: u[0] for u in refs}
    for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm"):
        write_hyps(tmp_path / system / "a", {"a-1": "one two"}, {"system": system})
        write_hyps(tmp_path / system / "b", {"b-1": "three"}, {"system": system})
        write_hyps(tmp_path / system / "c", {"c-1": "six" if system == "fp" else "five"}, {"system": system})
    systems = score(tmp_path, refs, speakers)
    test_sets = {"test-clean": ["a", "b"], "test-other": ["c"]}
    add_per_set(systems, test_sets)
    assert systems["fp"]["per_set"] == {"test-clean": {"wer": 25.0, "errors": 1, "words": 4},
                                        "test-other": {"wer": 100.0, "errors": 1, "words": 1}}
    assert systems["nf4"]["per_set"]["test-other"] == {"wer": 0.0, "errors": 0, "words": 1}
    results = {"corpus": "librispeech", "model": "m", "test_speakers": ["a", "b", "c"], "systems": systems,
               "test_sets": test_sets, "size_bytes": {"fp32": 800, "nf4": 100},
               "params": {"base": 1000, "lora_per_speaker": 9}}
    table = markdown(results)
    assert "| system | test-clean WER (%) | test-other WER (%) |" in table
    assert "| fp | 25.00 | 100.00 |" in table and "| nf4 | 25.00 | 0.00 |" in table


def test_the_machine_that_made_the_model_is_in_the_results(tmp_path):
    """Stage 4 records the machine in fp/family.json; RESULTS.md says it, and a folder without it says nothing."""
    assert made_on(tmp_path) is None
    record(tmp_path, "conformer")
    machine = made_on(tmp_path)
    assert json.loads((tmp_path / "family.json").read_text())["family"] == "conformer"
    assert isinstance(machine["cores"], int) and machine["cpu"] and machine["torch"]
    results = {"corpus": "c", "model": "m", "test_speakers": ["a"], "systems": {}, "size_bytes": {"fp32": 800, "nf4": 100},
               "params": {"base": 1000, "lora_per_speaker": 9}, "fp_made_on": {"cpu": "AMD EPYC", "cores": 2,
                                                                                 "torch": "2.13.0+cpu"}}
    for system in ("fp", "nf4"):
        results["systems"][system] = {"wer": 10.0, "errors": 1, "words": 10, "per_speaker": {"a": {"wer": 10.0}}}
    assert "made (trained, or converted from --pretrained) on: AMD EPYC, 2 cores, torch 2.13.0+cpu" in markdown(results)
    del results["fp_made_on"]
    assert "made (trained" not in markdown(results)


def test_relative_change_against_a_perfect_fp_is_na(tmp_path):
    """fp with no errors: every relative change against it is n/a, not +0.0."""
    refs, speakers = {"a-1": "one two"}, {"a-1": "a"}
    for system, hyp in (("fp", "one two"), ("nf4", "one"), ("nf4_sat", "one two"), ("nf4_sa", "one"), ("pqm", "one two")):
        write_hyps(tmp_path / system / "a", {"a-1": hyp}, {"system": system})
    results = {"corpus": "c", "model": "m", "test_speakers": ["a"], "systems": score(tmp_path, refs, speakers),
               "size_bytes": {"fp32": 800, "nf4": 100}, "params": {"base": 1000, "lora_per_speaker": 9}}
    table = markdown(results)
    assert "| fp | 0.00 | 0 | 2 | n/a | -100.0 |" in table and "| nf4 | 50.00 | 1 | 2 | n/a | +0.0 |" in table


def test_missing_hypotheses_named(tmp_path):
    write_hyps(tmp_path / "fp" / "a", {"a-1": "one"}, {})
    with pytest.raises(BadInput, match=r"fp/a/text lacks 1 utterances \(e.g. a-2\): rerun stage 8"):
        score(tmp_path, {"a-1": "one", "a-2": "two"}, {"a-1": "a", "a-2": "a"})


def test_decode_names_missing_cuts(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "pqm.decode", "--fp-dir", str(tmp_path / "fp"), "--nf4-dir", str(tmp_path / "nf4"),
           "--sat-dir", str(tmp_path / "sat"), "--adapter-dir", str(tmp_path / "adapters"),
           "--cuts", str(tmp_path / "none.jsonl.gz"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "none.jsonl.gz" in proc.stderr and "stage 2" in proc.stderr


def test_speaker_without_adapter_is_marked_not_filled_in(tmp_path):
    """pqm has no adapter for b: b is listed as missing, pqm's WER covers a only, nothing is copied."""
    refs = {"a-1": "one two", "b-1": "four four"}
    speakers = {"a-1": "a", "b-1": "b"}
    for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm"):
        write_hyps(tmp_path / system / "a", {"a-1": "one two"}, {"system": system})
        if system == "pqm":
            write_hyps(tmp_path / system / "b", None, {"system": system, "missing": "no adapter (stage 7)"})
        else:
            write_hyps(tmp_path / system / "b", {"b-1": "four"}, {"system": system})
    systems = score(tmp_path, refs, speakers)
    assert systems["pqm"]["per_speaker"]["b"] == {"missing": "no adapter (stage 7)"}
    assert systems["pqm"]["missing"] == {"b": "no adapter (stage 7)"}
    assert systems["pqm"]["words"] == 2 and systems["pqm"]["wer"] == 0.0
    assert systems["fp"]["words"] == 4 and "missing" not in systems["fp"]
    results = {"corpus": "c", "model": "m", "test_speakers": ["a", "b"], "systems": systems,
               "size_bytes": {"fp32": 800, "nf4": 100}, "params": {"base": 1000, "lora_per_speaker": 9}}
    table = markdown(results)
    assert "missing (no adapter)" in table and "**pqm** is scored without speaker(s) b" in table
    from pqm.score import plot

    plot(results, tmp_path / "wer.png")
    assert (tmp_path / "wer.png").read_bytes()[:4] == b"\x89PNG"


def test_nf4_file_by_kind_in_results(tmp_path):
    """Stage 5's breakdown, summed by kind, and the adapter's share of the NF4 file, in RESULTS.md."""
    from pqm.score import nf4_by_kind

    breakdown = {"4-bit weights": 60, "4-bit quantisation state (absmax, code tables)": 10,
                 "full precision: LayerNorm.weight": 12, "full precision: Linear4bit.bias": 8,
                 "safetensors header (names, shapes)": 10}
    kinds = nf4_by_kind(breakdown)["nf4_by_kind"]
    assert kinds == {"4-bit weights": 60, "4-bit quantisation state": 10, "full precision": 20, "safetensors header": 10}
    assert nf4_by_kind(None) == {}
    for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm"):
        write_hyps(tmp_path / system / "a", {"a-1": "one"}, {"system": system})
    results = {"corpus": "c", "model": "m", "test_speakers": ["a"],
               "systems": score(tmp_path, {"a-1": "one"}, {"a-1": "a"}),
               "size_bytes": {"fp32": 800, "nf4": 100, "nf4_by_kind": kinds, "adapter": 3},
               "params": {"base": 1000, "lora_per_speaker": 9}}
    table = markdown(results)
    assert "full precision 20 bytes (20.0%)" in table and "one speaker's adapter file: 3 bytes (3.00% of" in table
