"""The TED-LIUM 3 recipe on a small corpus in the real release layout, through lhotse's prepare_tedlium,
with an ESPnet Conformer on sentencepiece BPE tokens through all nine stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lhotse import CutSet, Recording
from safetensors.torch import load_file

from conftest import FSDD, ROOT, TINY_CONFIG
from pqm.batches import cut_batches, speed_perturbed
from pqm.errors import BadInput
from pqm.recipes.tedlium3 import prepare_tedlium3_split
from test_recipe import run_sh

WORDS = "zero one two three four five six seven eight nine".split()
# part -> talk id -> (FSDD speaker, first recording index, segments)
TALKS = {"train": {"JacksonTalk_2010": ("jackson", 0, 24), "TheoTalk_2011": ("theo", 0, 24)},
         "dev": {"LucasTalk_2012": ("lucas", 0, 4)},
         "test": {"GeorgeTalk_2013": ("george", 0, 8), "NicolasTalk_2014": ("nicolas", 0, 8)}}
GAP = np.zeros(1600, dtype=np.float32)  # 0.1 s between segments


def write_tedlium(root: Path, talks: dict = TALKS) -> Path:
    """``TEDLIUM_release-3/legacy/<part>/sph/<talk>.sph`` (16 kHz NIST SPHERE) plus ``stm/<talk>.stm``.

    Each segment is two FSDD digits; STM lines are in TED-LIUM's format
    (``talk 1 talk start end <o,f0,male> words``), with the release's noise,
    ``<unk>`` and ignored-segment markers mixed in.
    """
    corpus = root / "TEDLIUM_release-3"
    for part, part_talks in talks.items():
        for sub in ("sph", "stm"):
            (corpus / "legacy" / part / sub).mkdir(parents=True, exist_ok=True)
        for talk, (speaker, first, n) in part_talks.items():
            audio, lines, t = [GAP], [], len(GAP) / 16000
            for seg in range(n + 1):
                digits = [(seg * 2 + k) % 10 for k in range(2)]
                pieces = [Recording.from_file(FSDD / "recordings" / f"{d}_{speaker}_{first + seg}.wav")
                          .resample(16000).load_audio()[0] for d in digits]
                clip = np.concatenate(pieces)
                words = " ".join(WORDS[d] for d in digits)
                if seg == n:  # a last segment the release marks as not scored: lhotse skips it
                    words = "ignore_time_segment_in_scoring"
                elif seg == 1:
                    words = "{NOISE} " + words + " <unk>"
                lines.append(f"{talk} 1 {talk} {t:.2f} {t + len(clip) / 16000:.2f} <o,f0,male> {words}")
                audio += [clip, GAP]
                t += (len(clip) + len(GAP)) / 16000
            if part == "train":  # a segment that normalises to nothing
                lines.append(f"{talk} 1 {talk} {t:.2f} {t + 0.05:.2f} <o,f0,male> {{NOISE}}")
                audio.append(np.zeros(1600, dtype=np.float32))
            sf.write(corpus / "legacy" / part / "sph" / f"{talk}.sph", np.concatenate(audio), 16000,
                     format="NIST", subtype="PCM_16")
            (corpus / "legacy" / part / "stm" / f"{talk}.stm").write_text("\n".join(lines) + "\n")
    return corpus


@pytest.fixture
def sndfile_backend(monkeypatch):
    """Read .sph with libsndfile, as run.sh does when sph2pipe is not installed."""
    from lhotse.audio.backend import set_current_audio_backend

    monkeypatch.setenv("LHOTSE_AUDIO_BACKEND", "LibsndfileBackend")
    set_current_audio_backend("LibsndfileBackend")
    yield
    set_current_audio_backend("default")


def test_talks_are_speakers_and_split_in_time_order(fsdd_dir, sndfile_backend, tmp_path):
    corpus = write_tedlium(tmp_path)
    assert prepare_tedlium3_split(corpus, tmp_path / "m", 0, 3) == ["GeorgeTalk_2013", "NicolasTalk_2014"]
    m = tmp_path / "m"
    speakers = json.loads((m / "speakers.json").read_text())
    assert speakers["train"] == ["JacksonTalk_2010", "TheoTalk_2011"]
    adapt = CutSet.from_file(m / "tedlium3_cuts_adapt.jsonl.gz")
    evaluation = CutSet.from_file(m / "tedlium3_cuts_eval.jsonl.gz")
    for talk in speakers["test"]:
        a = sorted(c.start for c in adapt if c.supervisions[0].speaker == talk)
        e = sorted(c.start for c in evaluation if c.supervisions[0].speaker == talk)
        assert len(a) == 3 and len(e) == 5 and max(a) < min(e)  # first 3 in time to adaptation
    texts = {c.supervisions[0].text for c in CutSet.from_file(m / "tedlium3_cuts_train.jsonl.gz")}
    assert "two three" in texts and not any("NOISE" in t or "unk" in t or "ignore" in t for t in texts)
    assert len(texts) <= 10 and len(CutSet.from_file(m / "tedlium3_cuts_train.jsonl.gz")) == 48
    cut = next(iter(evaluation))
    assert cut.load_audio().shape[1] == pytest.approx(cut.duration * 16000, abs=2)  # a segment of the .sph


def test_test_talk_in_training_is_refused(fsdd_dir, sndfile_backend, tmp_path):
    talks = {**TALKS, "test": {"JacksonTalk_2010": ("jackson", 30, 4)}}
    with pytest.raises(BadInput, match="talk JacksonTalk_2010 of the test part is also in the train part"):
        prepare_tedlium3_split(write_tedlium(tmp_path, talks), tmp_path / "m", 0, 2)


def test_missing_part_is_named(tmp_path):
    (tmp_path / "legacy" / "train" / "stm").mkdir(parents=True)
    with pytest.raises(BadInput, match=r"\['dev', 'test'\].*legacy/<part>/sph"):
        prepare_tedlium3_split(tmp_path, tmp_path / "m", 0, 2)


def test_tedlium3_config_builds_the_papers_conformer():
    """conf/train_conformer_tedlium3.yaml through ESPnet's own model builder, with 500 BPE tokens."""
    from espnet2.tasks.asr import ASRTask

    args = ASRTask.get_parser().parse_args(["--config", str(ROOT / "conf" / "train_conformer_tedlium3.yaml"),
                                            "--token_list", "x", "--token_type", "word", "--frontend_conf", "fs=16k"])
    args.token_list = ["<blank>", "<unk>", *(f"p{i}" for i in range(497)), "<sos/eos>"]
    model = ASRTask.build_model(args)
    assert len(model.encoder.encoders) == 12 and len(model.decoder.decoders) == 6
    assert model.encoder.output_size() == 256 and model.decoder.output_layer.out_features == 500


@pytest.mark.e2e
def test_tedlium3_recipe_with_a_bpe_conformer_end_to_end(fsdd_dir, tmp_path):
    corpus = write_tedlium(tmp_path)
    exp, data = tmp_path / "exp", tmp_path / "data"
    proc = run_sh("--corpus", "tedlium3", "--corpus-opts", f"--corpus-dir {corpus} --adapt-per-speaker 3",
                  "--datadir", str(data), "--expdir", str(exp), "--train-config", str(TINY_CONFIG), "--nbpe", "20",
                  "--max-epoch", "1", "--sat-max-duration", "12",
                  "--sat-epochs", "1", "--sa-epochs", "2", "--beam-size", "2", "--nj", "1")
    assert "reading .sph with LibsndfileBackend" in proc.stdout  # no sph2pipe here
    # stage 3: segments written as 16 kHz files ESPnet reads whole, a sentencepiece model and its token list
    wav_scp = dict(line.split(maxsplit=1) for line in (data / "train" / "wav.scp").read_text().splitlines())
    assert len(wav_scp) == 48 and all(p.endswith(".wav") and Path(p).is_file() for p in wav_scp.values())
    assert sf.info(next(iter(wav_scp.values()))).samplerate == 16000
    tokens = (data / "token_list" / "bpe_unigram20" / "tokens.txt").read_text().split()
    assert tokens[:2] == ["<blank>", "<unk>"] and tokens[-1] == "<sos/eos>" and any(t.startswith("▁") for t in tokens)
    # stage 4: the model folder carries its sentencepiece model
    config = yaml.safe_load((exp / "fp" / "config.yaml").read_text())
    assert config["token_type"] == "bpe" and config["bpemodel"] == "bpe.model" and (exp / "fp" / "bpe.model").is_file()
    assert config["token_list"] == tokens
    results = json.loads((exp / "results.json").read_text())
    assert results["corpus"] == "tedlium3" and results["test_speakers"] == ["GeorgeTalk_2013", "NicolasTalk_2014"]
    for r in results["systems"].values():
        assert r["words"] == 20 and set(r["per_speaker"]) == {"GeorgeTalk_2013", "NicolasTalk_2014"}
    sat = json.loads((exp / "sat" / "pqm_adapter.json").read_text())  # SAT on batches of at most 12 s
    train = CutSet.from_file(data / "manifests" / "tedlium3_cuts_train.jsonl.gz")
    assert sat["speed_perturb"] == [0.9, 1.0, 1.1]  # the Conformer family's default: SAT at three speeds
    n = sum(1 for _ in cut_batches(speed_perturbed(train, sat["speed_perturb"]), 16, max_duration=12))
    assert sat["run_key"]["max_duration"] == 12 and n > 48 / 16
    assert "mean loss" in (log := (exp / "log" / "stage6.log").read_text()) and f"over {n} batches" in log
    hyps = exp / "decode" / "pqm" / "GeorgeTalk_2013" / "text"
    assert hyps.is_file() and "▁" not in hyps.read_text()  # pieces joined back into words

    # the trained ESPnet folder as --pretrained: no stage 3, the same weights and tokens in the new model folder
    exp2 = tmp_path / "exp_pretrained"
    proc = run_sh("--corpus", "tedlium3", "--corpus-opts", f"--corpus-dir {corpus} --adapt-per-speaker 3",
                  "--datadir", str(data), "--expdir", str(exp2),
                  "--pretrained", str(exp / "asr"), "--stop-stage", "5")
    assert "brings its own tokens and feature statistics" in proc.stdout
    assert load_file(exp2 / "fp" / "model.safetensors").keys() == load_file(exp / "fp" / "model.safetensors").keys()
    assert all(torch.equal(v, load_file(exp / "fp" / "model.safetensors")[k])
               for k, v in load_file(exp2 / "fp" / "model.safetensors").items())
    assert (exp2 / "fp" / "bpe.model").read_bytes() == (exp / "fp" / "bpe.model").read_bytes()
    assert json.loads((exp2 / "nf4" / "size.json").read_text())["fingerprint"] == \
        json.loads((exp / "nf4" / "size.json").read_text())["fingerprint"]
