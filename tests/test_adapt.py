"""LoRA training jobs (stages 6-7): resume after SIGKILL, skip finished work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_fsdd_subset
from pqm.families.espnet import build_model, omitted_keys
from pqm.nf4 import NF4Config, quantize_model, save_nf4
from pqm.recipes.connected_digits import DigitTaskConfig, make_connected_digits
from pqm.recipes.fsdd import prepare_fsdd


@pytest.fixture(scope="module")
def setup(fsdd_dir, tiny_fp_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    corpus = prepare_fsdd(make_fsdd_subset(tmp / "fsdd", ["george", "jackson"], per_digit=4))
    cfg = DigitTaskConfig(train_speakers=["jackson"], test_speakers=["george"], train_per_speaker=8,
                          valid_per_digit=47, adapt_per_digit=2, adapt_per_speaker=12, max_digits=2)
    make_connected_digits(corpus["recordings"], corpus["supervisions"], cfg, tmp / "wav", tmp / "manifests")
    model = build_model(tiny_fp_dir)
    rebuilt = omitted_keys(tiny_fp_dir, model)
    save_nf4(model, NF4Config(), quantize_model(model), tmp / "nf4", rebuilt)
    return tmp, tiny_fp_dir


def _cmd(setup, out, epochs=6, *extra: str):
    tmp, fp_dir = setup
    return [sys.executable, "-m", "pqm.adapt", "--fp-dir", str(fp_dir), "--nf4-dir", str(tmp / "nf4"),
            "--cuts", str(tmp / "manifests" / "fsdd_cuts_adapt.jsonl.gz"),
            "--speaker", "george", "--epochs", str(epochs), "--batch-size", "4", "--lr", "0.01", "--out", str(out),
            *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def adapt(setup, out, epochs=6, *extra: str) -> None:
    """``python -m pqm.adapt`` in this process (its imports are paid once per test run, not once per call)."""
    from pqm.adapt import main

    main(_cmd(setup, out, epochs, *extra)[3:])


def test_learning_rate_schedules():
    """constant: the rate every step; linear: warm-up over 10% of the steps (at least one), then decay to 0."""
    from pqm.adapt import learning_rate_schedule

    def rates(schedule):
        optim = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        lr_schedule = learning_rate_schedule(optim, schedule, 0.1, 10)
        out = []
        for _ in range(10):
            out.append(optim.param_groups[0]["lr"])
            optim.step()
            lr_schedule.step()
        return out

    assert rates("constant") == [1.0] * 10
    assert rates("linear") == pytest.approx([0.0] + [(10 - s) / 9 for s in range(1, 10)])


@pytest.mark.e2e
def test_killed_job_resumes_to_the_same_adapter(setup, tmp_path):
    """With a linear schedule, so that the resumed job must also restore the schedule's step."""
    linear = ("--lr-schedule", "linear", "--warmup-ratio", "0.3")
    subprocess.run(_cmd(setup, tmp_path / "a", 6, *linear), cwd=ROOT, env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(setup, tmp_path / "b", 6, *linear), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / ".b.checkpoint" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp_path / "b").exists(), "the job was not killed between epochs 1 and 6"
    again = subprocess.run(_cmd(setup, tmp_path / "b", 6, *linear), cwd=ROOT, env=ENV, check=True, capture_output=True,
                           text=True)
    assert "resuming from" in again.stderr
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".b.checkpoint").exists()  # removed once the adapter is written


@pytest.mark.e2e
def test_finished_adapter_is_not_retrained(setup, tmp_path, caplog):
    adapt(setup, tmp_path / "a", 1)
    before = (tmp_path / "a" / "adapter_model.safetensors").stat().st_mtime_ns
    meta = json.loads((tmp_path / "a" / "pqm_adapter.json").read_text())  # where the job's time and memory went
    assert list(meta["seconds_by_step"]) == ["load the model", "quantise, add LoRA", "train"]
    assert sum(meta["seconds_by_step"].values()) <= meta["seconds"] + 0.2 and meta["peak_memory_mb"] > 100
    caplog.clear()
    with caplog.at_level("INFO"):
        adapt(setup, tmp_path / "a", 1)
    assert "nothing to do" in caplog.text
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_mtime_ns == before
    caplog.clear()
    with caplog.at_level("INFO"):
        adapt(setup, tmp_path / "a", 2)
    assert "nothing to do" not in caplog.text  # other settings: trained again
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_mtime_ns != before


@pytest.mark.e2e
def test_speed_perturbed_training_is_a_run_of_its_own(setup, tmp_path):
    """``--speed-perturb``: recorded in the adapter's metadata and run key, trained on other audio than the
    same run without it; a factor outside [0.5, 2] is refused before anything is written."""
    adapt(setup, tmp_path / "plain", 1)
    adapt(setup, tmp_path / "sp", 1, "--speed-perturb", "0.9", "1.0", "1.1")
    meta = json.loads((tmp_path / "sp" / "pqm_adapter.json").read_text())
    assert meta["speed_perturb"] == meta["run_key"]["speed_perturb"] == [0.9, 1.0, 1.1]
    assert "speed_perturb" not in json.loads((tmp_path / "plain" / "pqm_adapter.json").read_text())["run_key"]
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    sp = load_file(str(tmp_path / "sp" / "adapter_model.safetensors"))
    assert plain.keys() == sp.keys() and any(not torch.equal(plain[k], sp[k]) for k in plain)
    with pytest.raises(SystemExit):
        adapt(setup, tmp_path / "bad", 1, "--speed-perturb", "0.3")
    assert not (tmp_path / "bad").exists()


@pytest.mark.e2e
def test_distributed_sat_on_two_gloo_processes(setup, tmp_path):
    """torchrun with two CPU processes (gloo): DDP over the LoRA parameters trains the same adapter shape
    as one process, and the loss goes down."""
    adapt(setup, tmp_path / "one", 1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = _cmd(setup, tmp_path / "ddp", epochs=4)
    proc = subprocess.run([*torchrun, *cmd[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2 (gloo)" in proc.stderr
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in ddp.items()}
    meta = json.loads((tmp_path / "ddp" / "pqm_adapter.json").read_text())
    assert meta["world_size"] == 2
    losses = meta["loss_per_epoch"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.e2e
def test_pseudo_labels_never_read_the_transcripts(setup, tmp_path, capsys):
    """pqm_unsup: the targets are the starting adapter's own hypotheses, the most confident half kept, and the
    held-out judge scores each epoch on its hypotheses of the 2 held-out utterances; with every transcript
    replaced the outcome (adapter, or fallback with its held-out scores) is the same, bit for bit. With
    --pseudo-rounds 2 the first round is that run (its labels and losses) and the second, labelled by the
    first's adapter, reads no transcript either."""
    from lhotse import CutSet

    from pqm.pseudo_labels import with_text

    tmp, _ = setup
    adapt(setup, tmp_path / "init", 1)
    scrambled = tmp_path / "scrambled.jsonl.gz"
    CutSet.from_cuts(with_text(c, "nine nine nine") for c in CutSet.from_file(
        tmp / "manifests" / "fsdd_cuts_adapt.jsonl.gz")).to_file(scrambled)
    pseudo = ("--init", str(tmp_path / "init"), "--targets", "pseudo", "--pseudo-keep", "0.5", "--holdout", "2")
    rounds = ("--pseudo-rounds", "2")
    for out, extra in (("a", ()), ("b", ("--cuts", str(scrambled))), ("a2", rounds),
                       ("b2", (*rounds, "--cuts", str(scrambled)))):
        adapt(setup, tmp_path / out, 2, *pseudo, *extra)
    for plain, other_run in (("a", "b"), ("a2", "b2")):
        done = [f for f in ("pqm_adapter.json", "fallback.json") if (tmp_path / plain / f).exists()]
        assert len(done) == 1 and (tmp_path / other_run / done[0]).exists()
        meta, other = (json.loads((tmp_path / run / done[0]).read_text()) for run in (plain, other_run))
        assert meta["held_out"] == other["held_out"] and meta["pseudo_labels"] == other["pseudo_labels"]
        assert meta.get("earlier_rounds") == other.get("earlier_rounds")
        if done == ["pqm_adapter.json"]:
            a = load_file(str(tmp_path / plain / "adapter_model.safetensors"))
            b = load_file(str(tmp_path / other_run / "adapter_model.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = json.loads((tmp_path / "a2" / done[0]).read_text())
    assert first["pseudo_rounds"] == 2 and first["run_key"]["pseudo_rounds"] == 2
    done = [f for f in ("pqm_adapter.json", "fallback.json") if (tmp_path / "a" / f).exists()]
    meta = json.loads((tmp_path / "a" / done[0]).read_text())
    [round1] = first["earlier_rounds"]  # round 1 is the one-round run, trained to its last epoch
    assert round1["pseudo_labels"] == meta["pseudo_labels"] and round1["loss_per_epoch"] == meta["loss_per_epoch"]
    assert {u for u, r in first["pseudo_labels"].items() if r.get("held_out")} == \
        {u for u, r in meta["pseudo_labels"].items() if r.get("held_out")}
    assert sum(r["kept"] for r in first["pseudo_labels"].values()) == 5
    report = meta["pseudo_labels"]
    held = {u for u, r in report.items() if r.get("held_out")}
    kept = [r for r in report.values() if r["kept"]]
    assert len(report) == 12 and len(held) == 2 and not any(report[u]["kept"] for u in held)
    assert meta["targets"] == "pseudo" and meta["utterances"] == len(kept) == 5  # half of the other 10
    trained = [r for u, r in report.items() if u not in held]
    assert max(r["loss"] for r in kept) <= min(r["loss"] for r in trained if not r["kept"] and r["loss"])
    scores = meta["held_out"]["pseudo_label_loss_per_epoch"]
    assert meta["held_out"]["hypotheses"] == 2 and len(scores) == 3 and all(s > 0 for s in scores)
    assert meta["kept_epoch"] == max(i for i, s in enumerate(scores) if s == min(scores))
    assert (done == ["fallback.json"]) == (meta["kept_epoch"] == 0)
    with pytest.raises(SystemExit):
        adapt(setup, tmp_path / "c", 1, "--targets", "pseudo")
    assert "--targets pseudo needs --init" in capsys.readouterr().err

    # token masking: the same hypotheses, each token scored; a kept one's tokens below the floor are masked
    # (the floor: amid the probabilities of the kept tokens at a floor that masks next to nothing)
    adapt(setup, tmp_path / "m0", 1, *pseudo[:-2], "--pseudo-token-floor", "1e-9")
    probs = sorted(p for r in json.loads((tmp_path / "m0" / "pqm_adapter.json").read_text())["pseudo_labels"].values()
                   if r["kept"] for p in r["token_probs"])
    floor = next(round((a + b) / 2, 6) for a, b in zip(probs[len(probs) // 2:], probs[len(probs) // 2 + 1:]) if b > a)
    adapt(setup, tmp_path / "m", 1, *pseudo[:-2], "--pseudo-token-floor", str(floor))
    masked = json.loads((tmp_path / "m" / "pqm_adapter.json").read_text())
    assert masked["run_key"]["pseudo_token_floor"] == floor and "pseudo_token_floor" not in meta["run_key"]
    rows = masked["pseudo_labels"]
    assert {u: r["hypothesis"] for u, r in rows.items()} == {u: r["hypothesis"] for u, r in report.items()}
    for row in rows.values():
        assert len(row["token_probs"]) == len(row["hypothesis"].split())
        if row["kept"]:
            assert row["token_mask"] == [int(p >= floor) for p in row["token_probs"]] and any(row["token_mask"])
    assert 0 < sum(r["token_mask"].count(0) for r in rows.values() if r["kept"]) < len(probs)
    with pytest.raises(SystemExit):
        adapt(setup, tmp_path / "c", 1, *pseudo, "--pseudo-token-floor", "1")
    assert "--pseudo-token-floor 1.0: a probability in [0, 1) is needed" in capsys.readouterr().err


@pytest.mark.e2e
def test_pseudo_labels_under_the_training_token_prior(setup, tmp_path, capsys):
    """--pseudo-prior-iters: ESPnet's own beam search takes the token bias (a large one on one word makes every
    hypothesis that word alone; none gives the plain hypotheses back); each iteration of the bias adds half the
    log ratio of the training transcripts' token prior to the frequency of the tokens in the hypotheses decoded
    under the bias so far; pqm_unsup's labels are decoded under it, and it is reported and in the run key; the
    trained adapter's own bias (for decoding) is the same estimate from its hypotheses."""
    import math
    from collections import Counter

    from lhotse import CutSet

    from pqm.families import family
    from pqm.lora import load_adapter
    from pqm.nf4 import to_nf4
    from pqm.pseudo_labels import PRIOR_STEP, prior_bias, token_counts

    tmp, fp_dir = setup
    cuts = CutSet.from_file(tmp / "manifests" / "fsdd_cuts_adapt.jsonl.gz").subset(first=4)
    train = tmp / "manifests" / "fsdd_cuts_train.jsonl.gz"
    rec = family(fp_dir).recognizer(fp_dir, "cpu", beam_size=1, ctc_weight=0.5)
    plain = rec.transcribe(cuts, desc="plain")
    rec.set_token_bias({"five": 10.0})
    fives = rec.transcribe(cuts, desc="five")
    assert all(h and set(h.split()) == {"five"} for h in fives.values()), fives
    rec.set_token_bias({})
    assert rec.transcribe(cuts, desc="plain again") == plain

    prior = token_counts((c.supervisions[0].text for c in CutSet.from_file(train)), rec.tokens)
    assert set(prior) <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}

    def step(bias: dict, hyps: dict) -> dict:
        counts = Counter(w for h in hyps.values() for w in h.split())
        seen, total = sum(counts[t] for t in prior), sum(prior.values())
        return {t: bias.get(t, 0.0) + PRIOR_STEP * (math.log(n / total) - math.log((counts[t] + 1) / (seen + len(prior))))
                for t, n in prior.items()}

    first = prior_bias(rec, cuts, prior, 1)
    assert first == pytest.approx(step({}, plain))
    rec.set_token_bias(first)
    expected = step(first, rec.transcribe(cuts, desc="under the first"))
    rec.set_token_bias({})
    assert prior_bias(rec, cuts, prior, 2) == pytest.approx(expected)
    assert rec.transcribe(cuts, desc="left without a bias") == plain

    adapt(setup, tmp_path / "init", 1)
    pseudo = ("--init", str(tmp_path / "init"), "--targets", "pseudo", "--pseudo-keep", "0.5")
    adapt(setup, tmp_path / "p", 1, *pseudo, "--pseudo-prior-iters", "2", "--pseudo-prior-cuts", str(train))
    meta = json.loads((tmp_path / "p" / "pqm_adapter.json").read_text())
    assert set(meta["pseudo_token_bias"]) == set(prior) and meta["run_key"]["pseudo_prior_iters"] == 2
    assert len(meta["run_key"]["pseudo_prior"]) > 8 and len(meta["pseudo_labels"]) == 12
    # the adapter's own bias for decoding: the same estimate, from its hypotheses of the speaker's audio
    tuned = family(fp_dir).recognizer(fp_dir, "cpu", beam_size=1, ctc_weight=0.5)
    load_adapter(tuned.model, tmp_path / "p", to_nf4(tuned.model, tmp / "nf4"))
    george = CutSet.from_file(tmp / "manifests" / "fsdd_cuts_adapt.jsonl.gz").filter(
        lambda c: c.supervisions[0].speaker == "george").to_eager()
    assert meta["decode_token_bias"] == pytest.approx(prior_bias(tuned, george, prior, 2))
    with pytest.raises(SystemExit):
        adapt(setup, tmp_path / "c", 1, *pseudo, "--pseudo-prior-iters", "2")
    assert "--pseudo-prior-iters needs --pseudo-prior-cuts" in capsys.readouterr().err


def test_fp_hypotheses_are_read_from_a_cache_that_holds_them(tmp_path):
    """saml's experts train on subsets of SAT's utterances: their model-style targets' fp hypotheses are read
    from SAT's cache where it holds every one of them from the same fp model, else decoded (and cached)."""
    from lhotse import CutSet, MonoCut

    from pqm.adapt import fp_hypotheses
    from pqm.files import write_json

    class Recognizer:
        decoded: list[str] = []

        def transcribe(self, cuts, desc):
            self.decoded += [c.id for c in cuts]
            return {c.id: f"new {c.id}" for c in cuts}

    cuts = CutSet.from_cuts([MonoCut(id=i, start=0, duration=1, channel=0) for i in ("a", "b")])
    sat = tmp_path / ".sat.fp_hyps.json"
    write_json(sat, {"key": {"fp": "F", "utterances": "all"}, "hyps": {"a": "A", "b": "B", "c": "C"}})
    rec = Recognizer()
    assert fp_hypotheses(rec, cuts, tmp_path / "own.json", {"fp": "F", "utterances": "ab"}, also=sat) == {"a": "A", "b": "B"}
    assert rec.decoded == [] and not (tmp_path / "own.json").exists()
    assert fp_hypotheses(rec, cuts, tmp_path / "own.json", {"fp": "G", "utterances": "ab"}, also=sat)["a"] == "new a"
    assert rec.decoded == ["a", "b"] and (tmp_path / "own.json").exists()  # another fp model: decoded again
