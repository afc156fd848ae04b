"""run.sh end to end on a tiny configuration, plus its error handling and resumption.

Real components throughout: FSDD recordings, lhotse manifests, ESPnet's trainer
and beam search, bitsandbytes NF4, peft LoRA, jiwer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import pytest
import torch
from lhotse import CutSet
from safetensors.torch import load_file

from conftest import ROOT, make_fsdd_subset, write_cluster_config
from pqm.errors import MissingInput
from pqm.kaldi_table import read_table

pytestmark = pytest.mark.e2e

TINY_DIGITS = ("--train-speakers jackson theo --test-speakers george nicolas --train-per-speaker 100 "
               "--adapt-per-digit 45 --adapt-per-speaker 20 --max-digits 2")
TINY = [
    "--train-config", "conf/tuning/train_conformer_tiny.yaml", "--max-epoch", "15",
    "--sat-epochs", "1", "--sat-utts", "48", "--sa-epochs", "3", "--sa-lr", "0.003", "--beam-size", "2",
]


def run_sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["./run.sh", *args], cwd=ROOT, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def recipe(fsdd_dir, tmp_path_factory):
    """Run all nine stages, with saml (an expert for each of the two training speakers); george has no
    adaptation recordings (indices < 45 removed)."""
    tmp = tmp_path_factory.mktemp("recipe")
    corpus = make_fsdd_subset(tmp / "fsdd", ["jackson", "theo", "george", "nicolas"])
    for f in (corpus / "recordings").glob("*_george_*.wav"):
        if int(f.stem.split("_")[2]) < 45:
            f.unlink()
    exp, data = tmp / "exp", tmp / "data"
    opts = [*TINY, "--corpus-opts", f"{TINY_DIGITS} --corpus-dir '{corpus}'", "--expdir", str(exp), "--datadir", str(data), "--nj", "2",
            "--saml-experts", "4", "--saml-epochs", "1"]
    proc = run_sh(*opts)
    return {"exp": exp, "data": data, "opts": opts, "stdout": proc.stdout}


def test_results_schema_and_consistency(recipe):
    exp = recipe["exp"]
    results = json.loads((exp / "results.json").read_text())
    assert results["corpus"] == "fsdd" and results["model"] == "conformer"
    assert results["test_speakers"] == ["george", "nicolas"]
    assert set(results["systems"]) == {"fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "saml", "saml_sa"}
    eval_cuts = CutSet.from_file(recipe["data"] / "manifests" / "fsdd_cuts_eval.jsonl.gz")
    n_words = sum(len(c.supervisions[0].text.split()) for c in eval_cuts)
    refs = {c.id: c.supervisions[0].text for c in eval_cuts}
    for name, r in results["systems"].items():
        assert r["words"] == n_words
        assert set(r["per_speaker"]) == {"george", "nicolas"}
        for speaker, row in r["per_speaker"].items():  # the errors of each speaker's hypotheses, counted apart
            hyps = dict(line.split(maxsplit=1) if " " in line else (line, "")
                        for line in (exp / "decode" / name / speaker / "text").read_text().splitlines())
            utts = sorted(u for u in refs if u in hyps)
            counted = jiwer.process_words([refs[u] for u in utts], [hyps[u] for u in utts])
            assert len(utts) == sum(1 for c in eval_cuts if c.supervisions[0].speaker == speaker)
            assert row["errors"] == counted.substitutions + counted.deletions + counted.insertions, (name, speaker)
        assert sum(s["errors"] for s in r["per_speaker"].values()) == r["errors"]
    assert results["size_bytes"]["fp32"] > 4 * results["size_bytes"]["nf4"]
    size = results["size_bytes"]  # the NF4 file by kind adds up to it; the adapter is one speaker's file
    assert sum(size["nf4_by_kind"].values()) == size["nf4"] == (exp / "nf4" / "model.safetensors").stat().st_size
    assert size["adapter"] == (exp / "adapters" / "pqm" / "nicolas" / "adapter_model.safetensors").stat().st_size
    merged = (exp / "adapters" / "saml_sa" / "nicolas" / "adapter_model.safetensors").stat().st_size
    assert size["saml_sa_adapter"] == merged and 1.8 * size["adapter"] < merged < 2.2 * size["adapter"]  # 2 experts
    assert 0 < results["params"]["lora_per_speaker"] < results["params"]["base"]
    experts = [exp / "saml" / "experts" / e / "adapter_model.safetensors" for e in ("expert01", "expert02")]
    assert size["saml"] == sum(f.stat().st_size for f in [*experts, exp / "saml" / "router.safetensors"])
    assert results["saml"] == {"experts": 2, "router_params": 2 * (64 + 1)}  # the tiny encoder's 64 outputs
    assert "- `saml`: 2 LoRA experts and a router of 130 parameters" in (exp / "RESULTS.md").read_text()
    assert set(results["stage_seconds"]) == {str(i) for i in range(1, 10)}
    machine = results["fp_made_on"]  # stage 4 trained the model here
    assert machine["cores"] == os.cpu_count() and machine["cpu"] and machine["torch"] == torch.__version__
    assert "| pqm |" in (exp / "RESULTS.md").read_text()
    assert f"made (trained, or converted from --pretrained) on: {machine['cpu']}" in (exp / "RESULTS.md").read_text()
    assert (exp / "wer_per_speaker.png").read_bytes()[:4] == b"\x89PNG"
    assert "RESULTS.md" in recipe["stdout"]


def test_saml_mixes_an_expert_of_each_training_speaker(recipe):
    """Stage 6's saml: one expert a training speaker (2 speakers, --saml-experts 4), each started from SAT and
    trained on its speaker's utterances only; stage 8 routes every test utterance (weights summing to 1) and
    reads no adaptation data (george has none and is decoded all the same)."""
    exp, saml = recipe["exp"], recipe["exp"] / "saml"
    groups = json.loads((saml / "groups.json").read_text())
    assert groups["experts"] == {"expert01": ["jackson"], "expert02": ["theo"]}
    for expert, speaker in (("expert01", "jackson"), ("expert02", "theo")):
        meta = json.loads((saml / "experts" / expert / "pqm_adapter.json").read_text())
        assert meta["init"] == str(exp / "sat") and meta["epochs"] == 1
        assert meta["speed_perturb"] == [0.9, 1.0, 1.1]  # the Conformer family's default (--sat-speed-perturb family)
        cuts = CutSet.from_file(saml / "cuts" / f"{expert}.jsonl.gz")
        assert {c.supervisions[0].speaker for c in cuts} == {speaker} and meta["utterances"] == len(cuts) == 100
    router = json.loads((saml / "router.json").read_text())
    assert router["experts"] == ["expert01", "expert02"] and len(router["loss_per_epoch"]) == 1
    assert router["run_key"]["speed_perturb"] == [0.9, 1.0, 1.1]
    assert json.loads((exp / "sat" / "pqm_adapter.json").read_text())["speed_perturb"] == [0.9, 1.0, 1.1]
    assert "--sat-speed-perturb 0.9 1.0 1.1" in (exp / ".done" / "stage6").read_text()
    assert load_file(saml / "router.safetensors")["weight"].abs().sum() > 0  # trained away from equal weights
    for speaker in ("george", "nicolas"):
        info = json.loads((exp / "decode" / "saml" / speaker / "info.json").read_text())
        assert abs(sum(info["mean_weights"].values()) - 1) < 1e-3 and "fallback" not in info


def test_saml_router_can_hold_out_each_speakers_own_expert(recipe, tmp_path):
    """--saml-router-holdout: SAT becomes the expert 'sat' (a copy, of no group) and the router learns each
    training utterance without its own speaker's expert: jackson's batches mix theo's expert and SAT."""
    from pqm.mixture import Mixture
    from pqm.saml import main

    exp, saml = recipe["exp"], tmp_path / "saml"
    shutil.copytree(exp / "saml" / "experts", saml / "experts")
    common = ["--fp-dir", str(exp / "fp"), "--nf4-dir", str(exp / "nf4"), "--saml-dir", str(saml),
              "--cuts", str(recipe["data"] / "manifests" / "fsdd_cuts_train.jsonl.gz")]
    main(["groups", *common, "--sat-expert", str(exp / "sat")])
    groups = json.loads((saml / "groups.json").read_text())
    assert groups["experts"] == {"expert01": ["jackson"], "expert02": ["theo"], "sat": []}
    sat = (exp / "sat" / "adapter_model.safetensors").read_bytes()
    assert (saml / "experts" / "sat" / "adapter_model.safetensors").read_bytes() == sat
    main(["router", *common, "--hold-out-own-expert"])
    router = json.loads((saml / "router.json").read_text())
    assert router["experts"] == ["expert01", "expert02", "sat"] and router["run_key"]["hold_out_own_expert"]
    assert load_file(saml / "router.safetensors")["weight"].shape == (3, 64)
    assert router["bytes"] == Mixture.size(saml) and Mixture.size(saml) > Mixture.size(exp / "saml") + len(sat)


def test_saml_sa_starts_from_the_merged_experts(recipe):
    """Stage 7's saml_sa: nicolas's adapter starts from both experts merged (rank 2 x 8) at his mean routing
    weights and trains on his speech; george (no adaptation data) falls back to saml, decoded as saml."""
    exp = recipe["exp"]
    adapter = exp / "adapters" / "saml_sa" / "nicolas"
    meta = json.loads((adapter / "pqm_adapter.json").read_text())
    assert meta["init"] == f"saml {exp / 'saml'}" and set(meta["mixture_weights"]) == {"expert01", "expert02"}
    assert abs(sum(meta["mixture_weights"].values()) - 1) < 1e-3 and len(meta["loss_per_epoch"]) == 3
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16
    pqm = json.loads((exp / "adapters" / "pqm" / "nicolas" / "pqm_adapter.json").read_text())
    assert meta["lora_params"] == 2 * pqm["lora_params"] and meta["utterances"] == pqm["utterances"]
    assert (exp / "adapters" / "saml_sa" / "george" / "fallback.json").exists()
    info = json.loads((exp / "decode" / "saml_sa" / "george" / "info.json").read_text())
    assert info["fallback"] == "saml" and abs(sum(info["mean_weights"].values()) - 1) < 1e-3
    assert (exp / "decode" / "saml_sa" / "george" / "text").read_text() == (exp / "decode" / "saml" / "george" / "text").read_text()
    results = json.loads((exp / "results.json").read_text())
    assert results["systems"]["saml_sa"]["per_speaker"]["george"]["fallback"] == "saml"


def test_stage7_labels_pqm_unsup_under_the_training_token_prior(recipe, tmp_path):
    """run.sh --unsup true --unsup-prior 1, stages 7-8 on a copy of the experiment: pqm_unsup's labeller
    decodes under the token prior of stage 2's training transcripts (its digest in the run key), the adapter
    gets a bias of its own, and stage 8 decodes nicolas under it (another bias: decoded again); the other
    systems' adapters and hypotheses are kept (their run keys did not change); george, with no adaptation
    data, falls back."""
    from pqm.files import file_digest

    exp = tmp_path / "exp"
    shutil.copytree(recipe["exp"], exp)
    kept = (exp / "adapters" / "pqm" / "nicolas" / "adapter_model.safetensors").read_bytes()
    pqm_info = (exp / "decode" / "pqm" / "nicolas" / "info.json").read_text()
    opts = [str(exp) if o == str(recipe["exp"]) else o for o in recipe["opts"]] + ["--unsup", "true", "--unsup-prior", "1"]
    run_sh(*opts, "--stage", "7", "--stop-stage", "8")
    adapter = exp / "adapters" / "pqm_unsup" / "nicolas"
    meta = json.loads((adapter / "pqm_adapter.json").read_text())
    train = recipe["data"] / "manifests" / "fsdd_cuts_train.jsonl.gz"
    assert meta["run_key"]["pseudo_prior"] == file_digest(train) and meta["run_key"]["pseudo_prior_iters"] == 1
    digits = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert meta["pseudo_token_bias"] and set(meta["pseudo_token_bias"]) <= digits
    assert meta["decode_token_bias"] and set(meta["decode_token_bias"]) <= digits
    assert (exp / "adapters" / "pqm_unsup" / "george" / "fallback.json").exists()
    assert (exp / "adapters" / "pqm" / "nicolas" / "adapter_model.safetensors").read_bytes() == kept
    assert "token prior: bias" in "".join(f.read_text() for f in (exp / "log").glob("adapt.*.log"))
    decoded = exp / "decode" / "pqm_unsup" / "nicolas"
    info = json.loads((decoded / "info.json").read_text())
    assert info["token_bias"] == meta["decode_token_bias"]
    assert info["run_key"]["pqm_unsup"]["token_bias"] == meta["decode_token_bias"]
    assert (exp / "decode" / "pqm" / "nicolas" / "info.json").read_text() == pqm_info  # not decoded again
    assert "token_bias" not in json.loads((exp / "decode" / "pqm_unsup" / "george" / "info.json").read_text())

    def share_of_five() -> float:
        words = [w for line in (decoded / "text").read_text().splitlines() for w in line.split()[1:]]
        return words.count("five") / len(words)

    before = share_of_five()
    meta["decode_token_bias"] = {"five": 10.0}  # a bias the beam search follows (CTC may still end a hypothesis)
    (adapter / "pqm_adapter.json").write_text(json.dumps(meta))
    for marker in (exp / ".done").glob("stage8*"):
        marker.unlink()
    run_sh(*opts, "--stage", "8", "--stop-stage", "8")
    assert json.loads((decoded / "info.json").read_text())["token_bias"] == {"five": 10.0}
    assert share_of_five() > max(0.8, before + 0.3), (before, (decoded / "text").read_text())
    assert (exp / "decode" / "pqm" / "nicolas" / "info.json").read_text() == pqm_info


def test_pqm_unsup_can_learn_saml_hypotheses(recipe, tmp_path):
    """Stage 7's pqm_unsup with --unsup-labeller saml: nicolas's adapter starts from SAT and learns the most
    confident half of saml's hypotheses of his 20 adaptation utterances; the run key names saml's mixture (a
    new router or expert retrains it); george, with no adaptation data, falls back."""
    from pqm.mixture import mixture_key

    exp, adapters = recipe["exp"], tmp_path / "adapters"
    (tmp_path / "speakers.txt").write_text("george nicolas\n")  # one job for both
    proc = subprocess.run(
        [sys.executable, "-m", "pqm.adapt_speakers", "--fp-dir", str(exp / "fp"),
         "--nf4-dir", str(exp / "nf4"), "--sat-dir", str(exp / "sat"), "--saml-dir", str(exp / "saml"),
         "--systems", "pqm_unsup", "--unsup-labeller", "saml", "--pseudo-keep", "0.5", "--epochs", "1",
         "--cuts", str(recipe["data"] / "manifests" / "fsdd_cuts_adapt.jsonl.gz"), "--adapters", str(adapters),
         "--speaker-list", str(tmp_path / "speakers.txt"), "--job", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((adapters / "pqm_unsup" / "nicolas" / "pqm_adapter.json").read_text())
    assert meta["init"] == str(exp / "sat") and meta["pseudo_labeller"] == f"saml {exp / 'saml'}"
    assert meta["run_key"]["pseudo_labeller"] == mixture_key(exp / "saml")
    assert len(meta["pseudo_labels"]) == 20 and meta["utterances"] == 10
    assert sum(r["kept"] for r in meta["pseudo_labels"].values()) == 10
    assert (adapters / "pqm_unsup" / "george" / "fallback.json").exists()


def test_speaker_without_adaptation_data_falls_back(recipe):
    exp = recipe["exp"]
    assert (exp / "adapters" / "pqm" / "george" / "fallback.json").exists()
    assert (exp / "adapters" / "pqm" / "nicolas" / "adapter_model.safetensors").exists()
    results = json.loads((exp / "results.json").read_text())
    assert results["systems"]["pqm"]["per_speaker"]["george"]["fallback"] == "nf4_sat"
    assert results["systems"]["nf4_sa"]["per_speaker"]["george"]["fallback"] == "nf4"
    assert "fallback" not in results["systems"]["pqm"]["per_speaker"]["nicolas"]
    # the fallback really decodes with the SAT adapter
    sat = (exp / "decode" / "nf4_sat" / "george" / "text").read_text()
    assert (exp / "decode" / "pqm" / "george" / "text").read_text() == sat
    assert "fallback: nf4_sat" in (exp / "RESULTS.md").read_text()


def test_slurm_backend_gives_the_local_results(recipe, slurm_cluster, tmp_path):
    """Stages 7 and 8 as Slurm job arrays, one task per speaker, give the local backend's hypotheses;
    a rerun of stage 8 then redoes only the speaker whose output is missing. The speaker-independent
    systems' hypotheses are copied from the local run (stage 8 keeps them by their run keys), so that the
    Slurm jobs decode the per-speaker systems only."""
    exp = recipe["exp"]
    sexp = tmp_path / "exp"
    shutil.copytree(exp, sexp, ignore=shutil.ignore_patterns("adapters", "decode*", "log", "results.json", "RESULTS.md"))
    for system in ("fp", "nf4", "nf4_sat", "saml"):
        shutil.copytree(exp / "decode" / system, sexp / "decode" / system)
    for n in (7, 8, 9):
        (sexp / ".done" / f"stage{n}").unlink(missing_ok=True)
    opts = [*recipe["opts"], "--expdir", str(sexp), "--stage", "7", "--stop-stage", "9"]
    config = write_cluster_config(tmp_path / "slurm.yaml")
    proc = run_sh(*opts, "--cmd-backend", "slurm", "--cluster-config", str(config))
    assert proc.stdout.count("as Slurm job array") == 2  # adapt (pqm, nf4_sa and saml_sa per speaker), decode
    decoded = (sexp / "log" / "decode.1.log").read_text()
    assert "pqm/george: decoded" in decoded and "nf4_sat/george: decoded" not in decoded
    for speaker in ("george", "nicolas"):
        for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "saml_sa"):
            local = (exp / "decode" / system / speaker / "text").read_text()
            assert (sexp / "decode" / system / speaker / "text").read_text() == local, (system, speaker)
    wer = lambda e: {s: {k: v["wer"] for k, v in r["per_speaker"].items()}  # noqa: E731
                     for s, r in json.loads((e / "results.json").read_text())["systems"].items()}
    assert wer(sexp) == wer(exp)
    assert "# Ended (code 0)" in (sexp / "log" / "decode.2.log").read_text()

    (sexp / "decode" / "pqm" / "nicolas" / "text").unlink()
    (sexp / ".done" / "stage8").unlink()
    run_sh(*opts[:-4], "--stage", "8", "--stop-stage", "8")
    george = (sexp / "log" / "decode.1.log").read_text()
    nicolas = (sexp / "log" / "decode.2.log").read_text()
    assert "already decoded" in george and "pqm/nicolas: decoded" in nicolas and "nf4/nicolas: decoded" not in nicolas
    assert (sexp / "decode" / "pqm" / "nicolas" / "text").read_text() == (exp / "decode" / "pqm" / "nicolas" / "text").read_text()


def test_a_kaldi_run_pl_runs_the_job_arrays(recipe, tmp_path):
    """cmd set to a minimal run.pl-style script (tests/run_pl.sh) instead of pqm.launch, and --nj 1: stage 8
    gets Kaldi's options only, decodes both speakers in one task (the model built once) and gives the
    hypotheses of the recipe's one task per speaker."""
    exp = recipe["exp"]
    kexp = tmp_path / "exp"
    shutil.copytree(exp, kexp, ignore=shutil.ignore_patterns("decode*", "log", "results.json", "RESULTS.md"))
    for n in (8, 9):
        (kexp / ".done" / f"stage{n}").unlink(missing_ok=True)
    seen = tmp_path / "seen.txt"
    env = dict(os.environ, PQM_CMD=f"bash {ROOT / 'tests' / 'run_pl.sh'}", RUN_PL_SEEN=str(seen))
    run_sh(*recipe["opts"], "--expdir", str(kexp), "--nj", "1", "--threads", "1", "--stage", "8", "--stop-stage", "9",
           env=env)
    assert seen.read_text().splitlines() == ["--max-jobs-run 1 --num-threads 1"]
    assert (kexp / "test_speakers.txt").read_text() == "george nicolas\n"
    log = (kexp / "log" / "decode.1.log").read_text()
    assert log.startswith("# python -m pqm.decode") and not (kexp / "log" / "decode.2.log").exists()
    assert log.count("quantised") == 1 and "pqm/george: decoded" in log and "pqm/nicolas: decoded" in log
    for speaker in ("george", "nicolas"):
        for system in ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "saml", "saml_sa"):
            local = (exp / "decode" / system / speaker / "text").read_text()
            assert (kexp / "decode" / system / speaker / "text").read_text() == local, (system, speaker)


def test_failed_speaker_is_reported_and_rerun_alone(recipe, tmp_path):
    """Both speakers in one stage-7 task (--nj 1); nicolas's pqm adapter fails (a file blocks its output folder):
    his nf4_sa adapter still trains, the stage fails naming the task, its speakers, its log and nicolas's
    system; once fixed, a rerun trains only nicolas's pqm adapter."""
    exp = tmp_path / "exp"
    shutil.copytree(recipe["exp"], exp, ignore=shutil.ignore_patterns("decode*", "log", "results.json", "RESULTS.md"))
    shutil.rmtree(exp / "adapters" / "pqm" / "nicolas")
    shutil.rmtree(exp / "adapters" / "nf4_sa" / "nicolas")
    (exp / "adapters" / "pqm" / "nicolas").write_text("in the way")
    for n in (7, 8, 9):
        (exp / ".done" / f"stage{n}").unlink(missing_ok=True)
    opts = [*recipe["opts"], "--expdir", str(exp), "--nj", "1", "--stage", "7", "--stop-stage", "7"]
    proc = run_sh(*opts, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "1 of 1 tasks failed" in out and "task 1 (george nicolas)" in out and "adapt.1.log" in out
    assert "rerun stage 7" in out
    log = (exp / "log" / "adapt.1.log").read_text()
    assert "no adapter for pqm/nicolas" in log and "# Ended (code 1)" in log
    assert (exp / "adapters" / "nf4_sa" / "nicolas" / "adapter_model.safetensors").exists()  # the other system ran
    assert not (exp / ".done" / "stage7").exists()

    (exp / "adapters" / "pqm" / "nicolas").unlink()
    run_sh(*opts)
    george, pqm_part, nf4_sa_part = re.split(r"pqm/nicolas: adapting|nf4_sa/nicolas: adapting",
                                             (exp / "log" / "adapt.1.log").read_text())
    assert "training" not in george and "training" in pqm_part and "nothing to do" in nf4_sa_part
    assert (exp / "adapters" / "pqm" / "nicolas" / "adapter_model.safetensors").exists()


def test_fp_model_really_learned_and_nf4_differs(recipe):
    """Decode the fp model on its own training utterances (real decoding, low WER); the NF4 model's
    encoder output differs from fp's on the same utterance, but stays close to it."""
    exp, data = recipe["exp"], recipe["data"]
    out = exp / "decode_train"
    from pqm.decode import main as decode  # in this process: its imports are already paid for
    decode(["--fp-dir", str(exp / "fp"), "--nf4-dir", str(exp / "nf4"), "--sat-dir", str(exp / "sat"),
            "--adapter-dir", str(exp / "adapters"), "--cuts", str(data / "manifests" / "fsdd_cuts_train.jsonl.gz"),
            "--speaker", "jackson", "--systems", "fp", "--beam-size", "2", "--out", str(out)])
    from pqm.families.espnet import build_model
    from pqm.nf4 import to_nf4
    from pqm.score import count_errors

    cuts = CutSet.from_file(data / "manifests" / "fsdd_cuts_train.jsonl.gz")
    refs = {c.id: c.supervisions[0].text for c in cuts if c.supervisions[0].speaker == "jackson"}
    fp_hyps = read_table(out / "fp" / "jackson" / "text")
    assert set(fp_hyps) == set(refs)
    utts = sorted(refs)
    fp = count_errors([refs[u] for u in utts], [fp_hyps[u] for u in utts])
    assert fp["wer"] < 25, f"fp WER on its own training utterances is {fp['wer']}%"

    model = build_model(exp / "fp").eval()
    speech = torch.from_numpy(next(iter(cuts)).load_audio()[0]).unsqueeze(0)
    lengths = torch.tensor([speech.shape[1]])
    with torch.no_grad():
        fp_out = model.encode(speech, lengths)[0]
        to_nf4(model, exp / "nf4")
        nf4_out = model.encode(speech, lengths)[0]
    assert not torch.allclose(fp_out, nf4_out, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(fp_out.flatten(), nf4_out.flatten(), dim=0) > 0.9


def test_transcribe_gives_stage_8s_hypotheses(recipe, tmp_path):
    """pqm.transcribe on a speaker's evaluation audio: nicolas's own adapter, george's fallback to SAT
    (said in the JSON lines) and fp give exactly what stage 8 decoded."""
    from pqm.transcribe import main as transcribe

    exp, data = recipe["exp"], recipe["data"]
    cuts = CutSet.from_file(data / "manifests" / "fsdd_cuts_eval.jsonl.gz").to_eager()
    for speaker, who, system in (("nicolas", ["--speaker", "nicolas"], "pqm"),
                                 ("george", ["--speaker", "george"], "nf4_sat"),
                                 ("george", ["--system", "fp"], "fp")):
        mine = tmp_path / f"{speaker}.jsonl.gz"
        cuts.filter(lambda c: c.supervisions[0].speaker == speaker).to_file(mine)
        out = tmp_path / f"{speaker}_{system}.jsonl"
        transcribe(["--expdir", str(exp), *who, "--beam-size", "2", "--format", "jsonl", "--out", str(out), str(mine)])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        decoded = read_table(exp / "decode" / system / speaker / "text")
        assert {r["utterance"]: r["hypothesis"] for r in rows} == decoded, (speaker, system)
        assert {r["system"] for r in rows} == {"nf4_sat (no pqm adapter)" if speaker == "george" and system != "fp"
                                               else system}


def test_data_amounts_rerun_stages_7_to_9_with_fewer_utterances(recipe):
    """local/data_amounts.sh: stages 7-9 again with each speaker's first 2 adaptation utterances (one held out,
    and both speakers in one job: options passed through to run.sh), on the same NF4 model and SAT adapter;
    fp, nf4 and nf4_sat are not decoded again; the table and plot cover both runs."""
    exp = recipe["exp"]
    proc = subprocess.run(["local/data_amounts.sh", str(exp), "2", "--", "--sa-holdout", "1", "--nj", "1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = exp / "amounts" / "sa_utts2"
    few, full = (json.loads((e / "results.json").read_text()) for e in (run, exp))
    assert few["adaptation"]["utterances_per_speaker"] == 2 and full["adaptation"]["utterances_per_speaker"] is None
    assert few["adaptation"]["held_out_per_speaker"] == 1 and full["adaptation"]["held_out_per_speaker"] == 0
    assert 0 < few["adaptation"]["minutes_per_speaker"] < full["adaptation"]["minutes_per_speaker"]
    adapter = run / "adapters" / "pqm" / "nicolas"  # kept, or dropped for doing harm on the held-out utterance
    meta = json.loads(next(f for f in (adapter / "pqm_adapter.json", adapter / "fallback.json") if f.exists()).read_text())
    assert meta["utterances"] == 1 and meta["held_out"]["utterances"] == 1
    log = (run / "log" / "decode.1.log").read_text()
    assert "pqm/nicolas: decoded" in log and not any(f"{s}/nicolas: decoded" in log for s in ("fp", "nf4", "nf4_sat"))
    for system in ("fp", "nf4", "nf4_sat"):
        assert few["systems"][system]["errors"] == full["systems"][system]["errors"]
    table = (exp / "RESULTS_data_amounts.md").read_text()
    assert "| 2 | 1 | " in table and "| all | 0 | " in table and "pqm" in table.splitlines()[2]
    assert (exp / "wer_vs_data.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["utterances_per_speaker"] for r in json.loads((exp / "data_amounts.json").read_text())] == [2, None]


def test_missing_speaker_adapter_is_refused(recipe, tmp_path):
    """A speaker whose stage-7 job failed is never decoded with another system's model: the job decodes its
    other speaker, then fails and marks the speaker as missing for that system (scoring then lists it; see
    test_score)."""
    from pqm.decode import main as decode

    exp, data = recipe["exp"], recipe["data"]
    both = tmp_path / "speakers.txt"
    both.write_text("george nicolas\n")
    (exp / "adapters" / "pqm" / "nicolas").rename(exp / "nicolas.saved")
    try:
        with pytest.raises(MissingInput, match="stage 7") as refused:  # python -m pqm.decode: exit code 2
            decode(["--fp-dir", str(exp / "fp"), "--nf4-dir", str(exp / "nf4"), "--sat-dir", str(exp / "sat"),
                    "--adapter-dir", str(exp / "adapters"), "--speaker-list", str(both), "--job", "1",
                    "--systems", "nf4_sat", "pqm", "--beam-size", "2",
                    "--cuts", str(data / "manifests" / "fsdd_cuts_eval.jsonl.gz"),
                    "--out", str(exp / "decode_missing")])
    finally:
        (exp / "nicolas.saved").rename(exp / "adapters" / "pqm" / "nicolas")
    assert "pqm/nicolas" in str(refused.value) and "george" not in str(refused.value)
    out = exp / "decode_missing" / "pqm" / "nicolas"
    assert not (out / "text").exists()  # no hypotheses from any other system
    assert "stage 7" in json.loads((out / "info.json").read_text())["missing"]
    george = exp / "decode_missing" / "pqm" / "george" / "text"  # george's fallback to SAT: nf4_sat's hypotheses
    assert george.read_text() == (exp / "decode_missing" / "nf4_sat" / "george" / "text").read_text()


def test_rerun_skips_done_stages(recipe):
    proc = run_sh(*recipe["opts"], "--stage", "5", "--stop-stage", "9")
    assert "Stage 5: NF4 quantisation: already done" in proc.stdout


def test_killed_stage_is_redone_cleanly(recipe):
    """SIGKILL during SAT (two torchrun processes) with a new learning rate, after its first checkpoint: the
    old adapter stays whole, the rerun resumes from the checkpoint and finishes. (saml is off here: stage 6
    would otherwise rebuild its experts and router after SAT, which test_saml_* cover.)"""
    exp = recipe["exp"]
    opts = [*recipe["opts"], "--saml-experts", "0", "--sat-lr", "0.002", "--sat-epochs", "4", "--sat-nproc", "2",
            "--stage", "6", "--stop-stage", "6"]
    (exp / ".done" / "stage6").unlink()
    adapter = exp / "sat" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    log = exp / "log" / "stage6.log"
    log.unlink()
    proc = subprocess.Popen(["./run.sh", *opts], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and "epoch 2: mean loss" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    assert "epoch 2: mean loss" in log.read_text(), "stage 6 did not finish 2 epochs within 300 s"
    os.killpg(proc.pid, signal.SIGKILL)  # the checkpoint of epoch 1 at least is on disk
    proc.wait()
    assert not (exp / ".done" / "stage6").exists()
    assert adapter.read_bytes() == before  # the old adapter was never half-overwritten
    assert not (exp / ".done" / "stage7").exists()  # later stages must be redone
    run_sh(*opts)
    assert (exp / ".done" / "stage6").exists()
    resumed = re.search(r"resuming from \S+ after epoch (\d+)", log.read_text())
    assert resumed and int(resumed.group(1)) >= 1, "the rerun did not resume from the killed run's checkpoint"
    meta = json.loads((exp / "sat" / "pqm_adapter.json").read_text())
    assert meta["lr"] == 0.002 and meta["epochs"] == 4 and meta["base_fingerprint"] and meta["world_size"] == 2
    assert not [p for p in exp.iterdir() if p.name.startswith(".sat.")]  # no temporary left


def test_killed_training_resumes_to_the_same_model(recipe, tmp_path):
    """Stage 4 (ESPnet's trainer) killed with SIGKILL resumes from its last checkpoint to the same model.

    Both runs continue the fixture's 15-epoch training to 17 epochs; one is
    killed after its 16th epoch and rerun.
    """
    def copy(name: str) -> Path:
        exp = tmp_path / name
        shutil.copytree(recipe["exp"], exp, ignore=shutil.ignore_patterns(
            "adapters", "decode*", "sat", "nf4", "fp", "log", ".sat.*", "results.json", "RESULTS.md"))
        for n in range(4, 10):
            (exp / ".done" / f"stage{n}").unlink(missing_ok=True)
        return exp

    opts = [*recipe["opts"], "--max-epoch", "17", "--stage", "4", "--stop-stage", "4"]
    straight, killed = copy("straight"), copy("killed")
    run_sh(*opts, "--expdir", str(straight))
    log = killed / "log" / "stage4.log"
    proc = subprocess.Popen(["./run.sh", *opts, "--expdir", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and "16epoch results" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "16epoch results" in log.read_text() and "17epoch results" not in log.read_text()
    assert not (killed / ".done" / "stage4").exists()
    run_sh(*opts, "--expdir", str(killed))
    assert "The training was resumed using" in log.read_text()
    a = load_file(str(straight / "fp" / "model.safetensors"))
    b = load_file(str(killed / "fp" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_options_and_missing_inputs(tmp_path):
    proc = run_sh("--bogus-option", "1", check=False)
    assert proc.returncode != 0 and "unknown option --bogus-option" in proc.stderr
    proc = run_sh("--nj", "zero", check=False)
    assert proc.returncode != 0 and "--nj zero" in proc.stderr
    proc = run_sh("--stage", "5", "--stop-stage", "5", "--expdir", str(tmp_path / "e"), check=False)
    assert proc.returncode != 0
    assert f"missing {tmp_path / 'e' / 'fp'}: it is made by stage 4" in proc.stdout
    proc = run_sh("--model", "rnn", check=False)
    assert proc.returncode != 0 and "--model rnn" in proc.stderr
    for option, value, message in (("--sa-epochs", "-1", "a positive integer is needed"),
                                   ("--lora-r", "0", "a positive integer is needed"),
                                   ("--beam-size", "0", "a positive integer is needed"),
                                   ("--sa-holdout", "x", "a number >= 0 is needed"),
                                   ("--nf4-embeddings", "maybe", "use true or false"),
                                   ("--nf4-double-quant", "yes", "use true or false"),
                                   ("--unsup-labeller", "fp", "use nf4_sat or saml"),
                                   ("--unsup-prior", "-1", "a number >= 0 is needed")):
        proc = run_sh(option, value, "--expdir", str(tmp_path / "refused"), check=False)
        assert proc.returncode != 0 and f"{option} {value}: {message}" in proc.stderr, option
    proc = run_sh("--unsup-labeller", "saml", "--expdir", str(tmp_path / "refused"), check=False)
    assert proc.returncode != 0 and "saml decodes only with --saml-experts K > 0" in proc.stderr
    proc = run_sh("--model", "whisper", "--unsup-prior", "2", "--expdir", str(tmp_path / "refused"), check=False)
    assert proc.returncode != 0 and "--unsup-prior 2: Whisper's decoding takes no token bias" in proc.stderr
    assert not (tmp_path / "refused").exists()  # refused before anything was written
