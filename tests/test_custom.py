"""The custom-corpus recipe: Kaldi data dirs of real FSDD recordings (8 kHz), their bad inputs, Whisper end to end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD
from pqm.errors import BadInput
from pqm.recipes.custom import prepare_custom
from test_recipe import run_sh

WORDS = "zero one two three four five six seven eight nine".split()


def write_kaldi_dir(path: Path, speaker: str, digits: range, index: int) -> Path:
    """One utterance per FSDD recording ``<digit>_<speaker>_<index>.wav``."""
    path.mkdir(parents=True)
    utts = [(f"{speaker}-{d}-{index}", FSDD / "recordings" / f"{d}_{speaker}_{index}.wav", WORDS[d]) for d in digits]
    (path / "wav.scp").write_text("".join(f"{u} {w}\n" for u, w, _ in utts))
    (path / "text").write_text("".join(f"{u} {t}\n" for u, _, t in utts))
    (path / "utt2spk").write_text("".join(f"{u} {speaker}\n" for u, _, _ in utts))
    return path


@pytest.fixture
def dirs(fsdd_dir, tmp_path):
    return {
        "train": write_kaldi_dir(tmp_path / "train", "jackson", range(10), 0),
        "adapt": write_kaldi_dir(tmp_path / "adapt", "george", range(4), 0),
        "eval": write_kaldi_dir(tmp_path / "eval", "george", range(5), 45),
    }


def test_kaldi_dirs_become_the_recipe_manifests(dirs, tmp_path):
    from lhotse import CutSet

    speakers = prepare_custom(dirs["train"], dirs["adapt"], dirs["eval"], tmp_path / "m", valid_fraction=0.2)
    assert speakers["eval"] == ["george"] and speakers["train"] == ["jackson"]
    counts = {n: len(CutSet.from_file(tmp_path / "m" / f"custom_cuts_{n}.jsonl.gz")) for n in ("train", "valid", "adapt", "eval")}
    assert counts == {"train": 8, "valid": 2, "adapt": 4, "eval": 5}
    assert json.loads((tmp_path / "m" / "speakers.json").read_text())["test"] == ["george"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "text").write_text((d / "text").read_text().split("\n", 1)[1]), "have no line in text"),
    (lambda d: (d / "text").write_text("jackson-0-0\n" + (d / "text").read_text().split("\n", 1)[1]), "empty transcripts"),
    (lambda d: (d / "wav.scp").write_text("jackson-0-0 /nonexistent/a.wav\n"), "audio files do not exist: /nonexistent/a.wav"),
    (lambda d: (d / "wav.scp").write_text("jackson-0-0 sox a.wav -t wav - |\n"), "are commands, not plain file paths"),
    (lambda d: (d / "utt2spk").unlink(), "utt2spk is missing"),
    (lambda d: (d / "text").write_text("\ufeff" + (d / "text").read_text()), "starts with a UTF-8 byte-order mark"),
    (lambda d: (d / "text").write_text((d / "text").read_text() + "jackson-0-0 zero\n"), "jackson-0-0 appears twice"),
    (lambda d: (d / "wav.scp").write_text((d / "wav.scp").read_text().split("\n", 1)[1]),
     "1 utterances in utt2spk have no line in wav.scp: jackson-0-0"),
    (lambda d: _replace_audio(d, b""), "is not audio that libsndfile reads"),
    (lambda d: _replace_audio(d, b"not audio at all"), "is not audio that libsndfile reads"),
    (lambda d: _stereo(d), "recordings jackson-0-0 have more than one channel"),
    (lambda d: _segments(d, "jackson-0-0 -0.5 0.2"), "must satisfy 0 <= start < end"),
    (lambda d: _segments(d, "jackson-0-0 0.3 0.1"), "must satisfy 0 <= start < end"),
    (lambda d: _segments(d, "nowhere 0 0.2"), "recording nowhere has no line in wav.scp"),
    (lambda d: _segments(d, "jackson-0-0 0 99"), "ends at 99.0 s, after the end of"),
])
def test_bad_kaldi_dir_is_named(dirs, tmp_path, damage, message):
    damage(dirs["train"])
    with pytest.raises(BadInput, match="train") as err:
        prepare_custom(dirs["train"], dirs["adapt"], dirs["eval"], tmp_path / "m")
    assert message in str(err.value)
    assert not (tmp_path / "m").exists()  # nothing written


def _replace_audio(data: Path, content: bytes) -> None:
    """The first recording becomes ``content`` (a copy, the shared corpus is read-only)."""
    bad = data / "bad.wav"
    bad.write_bytes(content)
    lines = (data / "wav.scp").read_text().splitlines()
    (data / "wav.scp").write_text("\n".join([f"{lines[0].split()[0]} {bad}", *lines[1:]]) + "\n")


def _stereo(data: Path) -> None:
    first = (data / "wav.scp").read_text().split()[1]
    audio, rate = sf.read(first)
    sf.write(data / "stereo.wav", np.stack([audio, audio], axis=1), rate)
    lines = (data / "wav.scp").read_text().splitlines()
    (data / "wav.scp").write_text("\n".join([f"jackson-0-0 {data / 'stereo.wav'}", *lines[1:]]) + "\n")


def _segments(data: Path, first: str) -> None:
    """A segments file: the first utterance as ``first`` (recording, start, end), the others whole."""
    lines = [f"jackson-0-0 {first}"] + [f"{u} {u} 0 -1" for u in (data / "utt2spk").read_text().split()[2::2]]
    (data / "segments").write_text("\n".join(lines) + "\n")


def test_tables_in_any_whitespace_and_paths_with_spaces(dirs, tmp_path):
    """A tab between key and value (speechocean762's own tables) and an audio path with a space are read;
    a segments file with whole recordings (end -1) gives the same utterances."""
    train = dirs["train"]
    (train / "text").write_text((train / "text").read_text().replace(" ", "\t", 1))
    spaced = tmp_path / "with space.wav"
    spaced.write_bytes(Path((train / "wav.scp").read_text().split()[1]).read_bytes())
    lines = (train / "wav.scp").read_text().splitlines()
    (train / "wav.scp").write_text("\n".join([f"jackson-0-0 {spaced}", *lines[1:]]) + "\n")
    _segments(train, "jackson-0-0 0 -1")
    speakers = prepare_custom(train, dirs["adapt"], dirs["eval"], tmp_path / "m", valid_fraction=0.2)
    assert speakers["train"] == ["jackson"]
    from lhotse import CutSet

    cuts = CutSet.from_file(tmp_path / "m" / "custom_cuts_train.jsonl.gz").to_eager()
    cuts = cuts + CutSet.from_file(tmp_path / "m" / "custom_cuts_valid.jsonl.gz").to_eager()
    assert {c.supervisions[0].text for c in cuts} == set(WORDS)
    first = next(c for c in cuts if c.supervisions[0].id == "jackson-0-0")
    assert first.recording.sources[0].source == str(spaced)


def test_relative_audio_paths_are_read_from_the_current_folder_and_said(dirs, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(FSDD)
    for name in ("train", "adapt", "eval"):
        wav = dirs[name] / "wav.scp"
        wav.write_text(wav.read_text().replace(f"{FSDD}/", ""))
    with caplog.at_level("INFO"):
        prepare_custom(dirs["train"], dirs["adapt"], dirs["eval"], tmp_path / "m")
    assert f"relative paths such as recordings/0_jackson_0.wav are read from {Path.cwd()}" in caplog.text
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match=f"audio files do not exist: recordings/0_jackson_0.wav.*read from {tmp_path}"):
        prepare_custom(dirs["train"], dirs["adapt"], dirs["eval"], tmp_path / "m2")


def test_two_channel_cuts_are_refused(dirs, tmp_path):
    from lhotse import CutSet, MultiCut, Recording

    _stereo(dirs["adapt"])
    rec = Recording.from_file(dirs["adapt"] / "stereo.wav", recording_id="george-0-0")
    cut = MultiCut(id="george-0-0", start=0, duration=rec.duration, channel=[0, 1], recording=rec)
    CutSet.from_cuts([cut]).to_file(tmp_path / "stereo.jsonl.gz")
    with pytest.raises(BadInput, match="cuts george-0-0 have more than one channel"):
        prepare_custom(dirs["train"], tmp_path / "stereo.jsonl.gz", dirs["eval"], tmp_path / "m")


def test_evaluation_overlapping_adaptation_is_refused(dirs, tmp_path):
    """The same utterance ids, or other ids for the same audio files, in the adaptation and evaluation sets."""
    with pytest.raises(BadInput, match=r"overlaps the adaptation set .*utterances george-0-0, george-1-0, george-2-0"):
        prepare_custom(dirs["train"], dirs["adapt"], dirs["adapt"], tmp_path / "m")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in ("wav.scp", "text", "utt2spk"):
        (renamed / name).write_text((dirs["adapt"] / name).read_text().replace("george-", "g2-"))
    with pytest.raises(BadInput, match=r"overlaps the adaptation set .*audio files .*0_george_0.wav"):
        prepare_custom(dirs["train"], dirs["adapt"], renamed, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_test_speaker_in_training_is_refused(dirs, tmp_path):
    with pytest.raises(BadInput, match=r"speakers \['george'\] are in the training set"):
        prepare_custom(dirs["eval"], dirs["adapt"], dirs["eval"], tmp_path / "m")


def sets_opts(train: Path, adapt: Path, evaluation: Path) -> str:
    """``--corpus-opts`` naming the three data sets (quoted: the paths may hold spaces)."""
    return " ".join(f"--{name}-data {shlex.quote(str(path))}"
                    for name, path in (("train", train), ("adapt", adapt), ("eval", evaluation)))


@pytest.mark.e2e
def test_conformer_data_at_16khz_and_whisper_runs_end_to_end(dirs, whisper_dir, tmp_path):
    data = ["--corpus", "custom", "--corpus-opts", sets_opts(dirs["train"], dirs["adapt"], dirs["eval"]),
            "--datadir", str(tmp_path / "data")]
    train = write_kaldi_dir(tmp_path / "train2", "jackson", range(10), 1)  # each word twice: one can be held out
    for name in ("wav.scp", "text", "utt2spk"):
        (train / name).write_text((dirs["train"] / name).read_text() + (train / name).read_text())
    conformer = ["--corpus", "custom", "--corpus-opts", sets_opts(train, dirs["adapt"], dirs["eval"]),
                 "--datadir", str(tmp_path / "cdata"),
                 "--expdir", str(tmp_path / "conformer"), "--stop-stage", "3"]
    proc = run_sh(*conformer, check=False)  # BPE by default: 500 pieces from 10 words is too many
    assert proc.returncode != 0 and "choose a smaller --nbpe" in proc.stdout + proc.stderr
    run_sh(*conformer, "--token-type", "word")
    wav_scp = dict(line.split() for line in (tmp_path / "cdata" / "train" / "wav.scp").read_text().splitlines())
    utt, path = sorted(wav_scp.items())[0]  # the 8 kHz recording, written out at 16 kHz for ESPnet
    original = sf.info(str(FSDD / "recordings" / f"{utt.split('-')[1]}_jackson_{utt.split('-')[2]}.wav"))
    assert original.samplerate == 8000 and sf.info(path).samplerate == 16000
    assert sf.info(path).duration == pytest.approx(original.duration, abs=1e-3)

    exp = tmp_path / "whisper"
    run_sh(*data, "--expdir", str(exp), "--model", "whisper", "--pretrained", str(whisper_dir), "--sat-utts", "4",
           "--sat-epochs", "1", "--sa-epochs", "1", "--beam-size", "1", "--nj", "1", "--nf4-embeddings", "true",
           "--whisper-max-tokens-per-second", "8", "--unsup", "true", "--unsup-keep", "0.5", "--unsup-holdout", "1",
           "--whisper-window", "padded")  # trimmed, the default: test_whisper.py
    results = json.loads((exp / "results.json").read_text())
    assert results["corpus"] == "custom" and results["test_speakers"] == ["george"]
    assert set(results["systems"]) == {"fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "pqm_unsup"}
    assert all(r["words"] == 5 and "missing" not in r for r in results["systems"].values())
    assert (exp / "adapters" / "pqm" / "george" / "adapter_model.safetensors").exists()
    unsup = exp / "adapters" / "pqm_unsup" / "george"  # trained on SAT's own hypotheses, or fell back saying why
    meta = json.loads(((unsup / "pqm_adapter.json") if (unsup / "pqm_adapter.json").exists()
                       else (unsup / "fallback.json")).read_text())
    assert len(meta["pseudo_labels"]) == 4 and "| pqm_unsup |" in (exp / "RESULTS.md").read_text()
    held = meta["held_out"]  # judged on SAT's hypothesis of its held-out utterance, no transcript read
    assert held["hypotheses"] == 1 and len(held["pseudo_label_loss_per_epoch"]) == 2
    assert "resampling to 16000 Hz" in (exp / "log" / "stage6.log").read_text()


@pytest.mark.e2e
def test_edited_data_set_redoes_stage_2(dirs, tmp_path):
    """The done marker of stage 2 records a digest of the data sets' tables: an edited transcript redoes it."""
    from lhotse import CutSet

    opts = ["--corpus", "custom", "--corpus-opts", sets_opts(dirs["train"], dirs["adapt"], dirs["eval"]),
            "--datadir", str(tmp_path / "data"), "--expdir", str(tmp_path / "exp"), "--stop-stage", "2"]
    run_sh(*opts)
    assert "already done" in run_sh(*opts).stdout
    text = dirs["eval"] / "text"
    text.write_text(text.read_text().replace("george-0-45 zero", "george-0-45 oh"))
    proc = run_sh(*opts)
    assert "Stage 1: options changed since it was done (was --corpus-inputs " in proc.stdout
    evaluation = CutSet.from_file(tmp_path / "data" / "manifests" / "custom_cuts_eval.jsonl.gz")
    assert {c.supervisions[0].text for c in evaluation} == {"oh", "one", "two", "three", "four"}
