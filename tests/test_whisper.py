"""The Whisper family: the real whisper-tiny.en through every stage of run.sh, and its bad inputs."""

from __future__ import annotations

import json
import math

import pytest
from lhotse import CutSet

from conftest import FSDD, WHISPER, make_fsdd_subset
from pqm.errors import BadInput
from test_recipe import run_sh



def test_normaliser_counts_digits_alike():
    from pqm.families.whisper import text_normaliser

    norm = text_normaliser(WHISPER if WHISPER.is_dir() else None)
    assert norm("one two three") == norm("1, 2, 3.") == norm("One-two, three!") == "1 2 3"
    assert norm("oh five") == "0 5"


def test_not_a_whisper_folder_is_refused(tmp_path):
    from pqm.families.whisper import export_pretrained

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BadInput, match="not a Whisper model folder"):
        export_pretrained(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_model_folders_are_named(tmp_path):
    """A Whisper folder whose config.json is damaged is named as such; a model folder without the family
    that stage 4 records is refused with the stage to rerun."""
    from pqm.families import family_of
    from pqm.families.whisper import export_pretrained

    (tmp_path / "config.json").write_text('{"model_type": "whisper", ')
    with pytest.raises(BadInput, match="config.json is not valid JSON"):
        export_pretrained(str(tmp_path), tmp_path / "out")
    with pytest.raises(BadInput, match="family.json is missing.*rerun stage 4"):
        family_of(tmp_path)


@pytest.fixture(scope="module")
def whisper_run(whisper_dir, fsdd_dir, tmp_path_factory):
    """All nine stages with --model whisper on a few utterances: SAT on jackson, adaptation on george;
    NF4 includes the token embedding and the output projection tied to it; LoRA on trimmed input,
    targets restyled by the model's hypotheses, one held-out utterance per speaker."""
    tmp = tmp_path_factory.mktemp("whisper")
    corpus = make_fsdd_subset(tmp / "fsdd", ["jackson", "george"], per_digit=7)
    exp = tmp / "exp"
    digits = (f"--corpus-dir {corpus} --train-speakers jackson --test-speakers george --train-per-speaker 4 "
              "--adapt-per-digit 6 --adapt-per-speaker 4 --max-digits 3")
    opts = ["--model", "whisper", "--pretrained", str(whisper_dir), "--corpus-opts", digits,
            "--expdir", str(exp), "--datadir", str(tmp / "data"), "--sat-epochs", "1", "--sa-epochs", "2",
            "--sat-lr", "0.0005", "--sa-lr", "0.0005", "--beam-size", "1", "--nj", "1", "--nf4-embeddings", "true",
            "--whisper-window", "trimmed", "--target-style", "model", "--sa-holdout", "1",
            "--whisper-max-tokens-per-second", "8"]
    proc = run_sh(*opts)
    return {"exp": exp, "data": tmp / "data", "opts": opts, "stdout": proc.stdout}


@pytest.mark.e2e
def test_whisper_recipe_end_to_end(whisper_run):
    exp = whisper_run["exp"]
    results = json.loads((exp / "results.json").read_text())
    assert results["model"] == "whisper" and set(results["systems"]) == {"fp", "nf4", "nf4_sat", "nf4_sa", "pqm"}
    cuts = CutSet.from_file(whisper_run["data"] / "manifests" / "fsdd_cuts_eval.jsonl.gz")
    digits = sum(len(c.supervisions[0].text.split()) for c in cuts)
    for r in results["systems"].values():
        assert r["words"] == digits  # the normaliser keeps one word per digit
    # the pretrained model recognises spoken digits; NF4 keeps it working (a broken NF4 model
    # repeats tokens without end: WER far above 100%)
    assert results["systems"]["fp"]["wer"] < 60
    assert results["systems"]["nf4"]["wer"] < 100
    size = results["size_bytes"]
    assert size["nf4"] < size["fp32"]
    sat = json.loads((exp / "sat" / "pqm_adapter.json").read_text())
    assert sat["window"] == "trimmed" and sat["target_style"] == "model"
    assert "speed_perturb" not in sat["run_key"]  # Whisper's family default: no speed perturbation
    for system in ("pqm", "nf4_sa"):  # an adapter kept by held-out WER, or the starting point
        adapter = exp / "adapters" / system / "george"
        meta = json.loads(next(adapter / f for f in ("pqm_adapter.json", "fallback.json")
                               if (adapter / f).exists()).read_text())
        errors = meta["held_out"]["errors_per_epoch"]
        assert len(errors) == 3 and meta["kept_epoch"] == max(i for i, e in enumerate(errors) if e == min(errors))
        kept = (adapter / "pqm_adapter.json").exists()
        assert kept == (meta["kept_epoch"] > 0) and meta["utterances"] == 3
        info = json.loads((exp / "decode" / system / "george" / "info.json").read_text())
        assert info["window"] == ("trimmed" if kept or system == "pqm" else "padded")
        assert ("fallback" in info) == (not kept)
    for system in ("fp", "nf4"):
        assert json.loads((exp / "decode" / system / "george" / "info.json").read_text())["window"] == "padded"
    # the fp hypotheses behind the restyled targets: decoded for the speaker's first system, read by the second
    cached = json.loads((exp / "adapters" / ".fp_hyps" / "george.json").read_text())["hyps"]
    assert len(cached) == 4 and not list((exp / "adapters" / "pqm").glob(".*fp_hyps*"))
    pqm_part, nf4_sa_part = (exp / "log" / "adapt.1.log").read_text().split("nf4_sa/george: adapting")
    assert "fp hypotheses for the targets" in pqm_part and "fp hypotheses for the targets" not in nf4_sa_part
    meta = json.loads((exp / "sat" / "pqm_adapter.json").read_text())
    assert meta["lora_params"] == results["params"]["lora_per_speaker"]
    config = json.loads((exp / "sat" / "adapter_config.json").read_text())
    assert "fc1" in config["target_modules"] and "q_proj" in config["target_modules"]
    nf4 = json.loads((exp / "nf4" / "nf4.json").read_text())
    assert nf4["config"]["embeddings"] == ["model.decoder.embed_tokens"]
    assert {"proj_out", "model.decoder.embed_tokens", "model.decoder.layers.0.fc1"} <= set(nf4["modules"])


@pytest.mark.e2e
def test_embedding_quantisation_is_most_of_the_saving(whisper_run, tmp_path):
    """Without --embeddings the float32 embedding (tied to proj_out) stays: the file is much larger."""
    import subprocess
    import sys

    from conftest import ROOT

    exp = whisper_run["exp"]
    subprocess.run([sys.executable, "-m", "pqm.quantize", "--fp-dir", str(exp / "fp"), "--out", str(tmp_path / "nf4")],
                   cwd=ROOT, check=True, capture_output=True)
    without = json.loads((tmp_path / "nf4" / "size.json").read_text())
    with_emb = json.loads((exp / "nf4" / "size.json").read_text())
    assert not without["embeddings_quantised"] and with_emb["embeddings_quantised"]
    assert without["ratio"] < 2 < 5 < with_emb["ratio"]
    assert "proj_out" in json.loads((tmp_path / "nf4" / "nf4.json").read_text())["config"]["keep_fp"]


@pytest.mark.e2e
def test_decoding_benchmark_decodes_as_transcribe_does(whisper_run, tmp_path, monkeypatch):
    """local/benchmark_decode.py, each configuration in its own process, gives the hypotheses of
    pqm.transcribe's Transcriber (one clip at a time, as a user's files), and reports speed, memory and WER.
    (Stage 8 decodes 8 clips at a time: the fallback's sampling then draws for the batch, so a clip that
    falls back can differ from decoding it alone.)"""
    import subprocess
    import sys

    from conftest import ROOT
    from pqm.transcribe import Transcriber

    exp, out = whisper_run["exp"], tmp_path / "bench"
    cuts = whisper_run["data"] / "manifests" / "fsdd_cuts_eval.jsonl.gz"
    proc = subprocess.run([sys.executable, "local/benchmark_decode.py", "--expdir", str(exp), "--cuts", str(cuts),
                           "--max-utts", "2", "--configs", "fp", "nf4", "nf4_lora", "--threads", "1", "--beams", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads((out / "benchmark.json").read_text())}
    assert set(rows) == {"fp", "nf4", "nf4_lora"} and rows["nf4_lora"]["window"] == "trimmed"
    clips = sorted(CutSet.from_file(cuts), key=lambda c: c.id)[:2]
    for config in ("fp", "nf4"):
        model = Transcriber(exp, beam_size=1, quantise=config == "nf4")
        assert rows[config]["hyps"] == {c.id: model.transcribe([c], None)[c.id] for c in clips}
    for r in rows.values():
        assert r["clips"] == 2 and r["rtf"] > 0 and r["peak_rss_mb"] > 100 and r["words"] > 0
    assert "| fsdd | nf4_lora | 1 | 1 | 1 | trimmed |" in (out / "benchmark.md").read_text()
    # two clips in one mixed-speaker batch, at temperature 0: what Transcriber.transcribe_mixed gives them
    proc = subprocess.run([sys.executable, "local/benchmark_decode.py", "--expdir", str(exp), "--cuts", str(cuts),
                           "--max-utts", "2", "--configs", "nf4_lora", "--threads", "1", "--beams", "1",
                           "--batch-sizes", "2", "--out", str(tmp_path / "batched")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "batched" / "benchmark.json").read_text())
    assert row["batch"] == 2 and row["clips"] == 2 and row["words"] > 0
    import pqm.families.whisper as whisper

    monkeypatch.setattr(whisper, "DECODING", {**whisper.DECODING, "temperature": [0.0]})
    model = Transcriber(exp, beam_size=1)
    assert row["hyps"] == model.transcribe_mixed(clips, [model.adapter_of(c.supervisions[0].speaker)[0] for c in clips])


def test_token_limit_follows_the_audio(whisper_dir, monkeypatch):
    """--whisper-max-tokens-per-second: generate is told ceil(rate x the batch's longest clip) + 8 tokens,
    never more than DECODING's 128."""
    import torch

    from pqm.families.whisper import DECODING, WhisperRecognizer
    from pqm.transcribe import read_inputs

    rec = WhisperRecognizer(whisper_dir, beam_size=1)
    cuts = read_inputs([FSDD / "recordings" / "3_george_7.wav"])
    told = []

    def generate(**kwargs):
        told.append(kwargs["max_new_tokens"])
        return torch.tensor([[50257, 50362, 50256]])

    monkeypatch.setattr(rec.model, "generate", generate)
    rec.transcribe(cuts, desc="x", tokens_per_second=8)
    rec.transcribe(cuts, desc="x", tokens_per_second=1000)
    rec.transcribe(cuts, desc="x")
    assert told == [math.ceil(8 * cuts[0].duration) + 8, DECODING["max_new_tokens"], DECODING["max_new_tokens"]]


def test_whisper_needs_a_pretrained_model(tmp_path):
    proc = run_sh("--model", "whisper", check=False)
    assert proc.returncode != 0 and "--model whisper needs --pretrained" in proc.stderr
    proc = run_sh("--model", "whisper", "--pretrained", "/nonexistent", "--expdir", str(tmp_path / "e"), check=False)
    assert proc.returncode != 0 and "--pretrained /nonexistent: no such folder" in proc.stderr
    assert not (tmp_path / "e").exists()  # refused before any stage ran


def test_decoding_leaves_the_callers_random_state(whisper_dir):
    """Held-out decoding between epochs must not reset training's dropout: the fallback's sampling is seeded in
    a fork of the random state, and a clip's hypothesis does not depend on the state before."""
    import torch

    from pqm.families.whisper import WhisperRecognizer
    from pqm.transcribe import read_inputs

    rec = WhisperRecognizer(whisper_dir, beam_size=1)
    cuts = read_inputs([FSDD / "recordings" / "3_george_7.wav"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = rec.transcribe(cuts, desc="x")
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    assert rec.transcribe(cuts, desc="x") == first
