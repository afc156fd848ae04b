"""speechocean762 (real non-native speakers): the corpus recipe, Whisper targets in the model's own style,
the trimmed input window, and the do-no-harm rule of per-speaker adaptation."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording
from lhotse.audio import AudioSource

from conftest import SHARED, WHISPER
from pqm.errors import BadInput
from pqm.kaldi_table import read_table
from pqm.recipes.speechocean762 import prepare_speechocean762
from pqm.restyle import restyle, word_key

SO762 = SHARED / "corpora" / "speechocean762"


@pytest.fixture(scope="module")
def so762_dir() -> Path:
    if not (SO762 / "test" / "wav.scp").is_file():
        pytest.fail(f"{SO762} is absent: the speechocean762 copy in ../shared is needed")
    return SO762


@pytest.fixture(scope="module")
def so762_manifests(so762_dir, tmp_path_factory) -> Path:
    """Manifests of one training and one test speaker of the shared copy."""
    tmp = tmp_path_factory.mktemp("so762")
    prepare_speechocean762(make_subset(so762_dir, tmp / "so762", train=1, test=1, wav_speaker=False), tmp / "manifests")
    return tmp / "manifests"


def make_subset(src: Path, dst: Path, train: int = 2, test: int = 2, wav_speaker: bool = True) -> Path:
    """The first speakers of each part in the release layout; the first test speaker's audio as ``.WAV``
    (as in the release), the others as the shared copy's ``.flac``."""
    for part, count in (("train", train), ("test", test)):
        utt2spk = read_table(src / part / "utt2spk")
        speakers = sorted(set(utt2spk.values()))[:count]
        keep = sorted(u for u, s in utt2spk.items() if s in speakers)
        wav = read_table(src / part / "wav.scp")
        (dst / part).mkdir(parents=True)
        lines = {name: read_table(src / part / name) for name in ("text", "utt2spk")}
        wav_lines = []
        for u in keep:
            rel = Path(wav[u])
            if part == "test" and wav_speaker and utt2spk[u] == speakers[0]:
                rel = rel.with_suffix(".WAV")
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                audio, rate = sf.read(src / wav[u])
                sf.write(dst / rel, audio, rate, format="WAV", subtype="PCM_16")
            else:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / wav[u], dst / rel)
            wav_lines.append(f"{u} {rel}\n")
        (dst / part / "wav.scp").write_text("".join(wav_lines))
        for name, table in lines.items():
            (dst / part / name).write_text("".join(f"{u}\t{table[u]}\n" for u in keep))
        ages = read_table(src / part / "spk2age")
        (dst / part / "spk2age").write_text("".join(f"{s} {ages[s]}\n" for s in speakers))
    return dst


def test_recipe_split_audio_extensions_and_ages(so762_dir, tmp_path):
    corpus = make_subset(so762_dir, tmp_path / "so762")
    test_speakers = sorted(set(read_table(corpus / "test" / "utt2spk").values()))
    # a test speaker missing from spk2age is grouped as 'age unknown'
    (corpus / "test" / "spk2age").write_text(f"{test_speakers[0]} 9\n")
    groups = prepare_speechocean762(corpus, tmp_path / "manifests", adapt_per_speaker=10)
    assert groups == {"age unknown": [test_speakers[1]], "children (<= 12)": [test_speakers[0]]}
    adapt = CutSet.from_file(tmp_path / "manifests" / "speechocean762_cuts_adapt.jsonl.gz")
    evaluation = CutSet.from_file(tmp_path / "manifests" / "speechocean762_cuts_eval.jsonl.gz")
    for spk in test_speakers:
        ids = sorted(read_table(corpus / "test" / "utt2spk"))
        mine = [u for u in ids if read_table(corpus / "test" / "utt2spk")[u] == spk]
        assert sorted(c.id for c in adapt if c.supervisions[0].speaker == spk) == mine[:10]
        assert sorted(c.id for c in evaluation if c.supervisions[0].speaker == spk) == mine[10:]
    sources = {c.recording.sources[0].source.rsplit(".", 1)[1] for c in adapt}
    assert sources == {"WAV", "flac"}
    assert all(c.sampling_rate == 16000 and c.duration > 0.5 for c in adapt)
    first = next(iter(adapt))
    assert first.supervisions[0].text == read_table(corpus / "test" / "text")[first.id]  # tab-separated text
    speakers = json.loads((tmp_path / "manifests" / "speakers.json").read_text())
    assert len(speakers["train"]) == 2 and speakers["test"] == test_speakers


def test_bad_corpus_is_refused_before_writing(so762_dir, tmp_path):
    corpus = make_subset(so762_dir, tmp_path / "a", wav_speaker=False)
    with open(corpus / "test" / "utt2spk", "a") as f:
        f.write("999999999 0001\n")
    with pytest.raises(BadInput, match="999999999 of utt2spk have no line in wav.scp or text"):
        prepare_speechocean762(corpus, tmp_path / "m")
    corpus = make_subset(so762_dir, tmp_path / "b", wav_speaker=False)
    victim = next((corpus / "WAVE").rglob("*.flac"))
    victim.unlink()
    with pytest.raises(BadInput, match=f"{victim.stem}.flac.*is missing"):
        prepare_speechocean762(corpus, tmp_path / "m")
    corpus = make_subset(so762_dir, tmp_path / "c", wav_speaker=False)
    for name in ("wav.scp", "text", "utt2spk"):  # a training speaker among the test speakers
        with open(corpus / "test" / name, "a") as f:
            f.write((corpus / "train" / name).read_text())
    with pytest.raises(BadInput, match="also in train: a test speaker must be unseen"):
        prepare_speechocean762(corpus, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_restyle_keeps_the_words():
    ref = "LOOK AT TOM'S JEANS"
    assert restyle(ref, "Look at Tom's jeans.", "model") == "Look at Tom's jeans."
    assert restyle(ref, "Who cares, Tom's jets?", "model") == "Look at Tom's jeans?"
    assert restyle(ref, None, "sentence") == "Look at tom's jeans."
    assert restyle(ref, "anything", "corpus") == ref
    assert restyle("I WANT TO BE A NURSE", "", "sentence") == "I want to be a nurse."
    with pytest.raises(ValueError, match="target style"):
        restyle(ref, ref, "fancy")


@pytest.mark.e2e
def test_restyle_on_real_tiny_en_hypotheses(so762_manifests, whisper_dir):
    """Real hypotheses of whisper-tiny.en (30 s window, greedy) lend their spelling; the words stay the reference's."""
    from pqm.families.whisper import WhisperRecognizer

    cuts = CutSet.from_file(so762_manifests / "speechocean762_cuts_adapt.jsonl.gz").subset(first=6)
    rec = WhisperRecognizer(whisper_dir, beam_size=1)
    hyps = rec.transcribe(cuts, "fp")
    agreeing = 0
    for cut in cuts:
        ref = cut.supervisions[0].text
        target = restyle(ref, hyps[cut.id], "model")
        assert [word_key(w) for w in target.split()] == [word_key(w) for w in ref.split()], (ref, hyps[cut.id], target)
        assert target != ref and target[0].isupper() and not target[1:].isupper()
        spellings = {word_key(w): w for w in hyps[cut.id].split()}
        agreeing += sum(w == spellings.get(word_key(w)) for w in target.split())
    assert agreeing >= 6  # tiny.en gets several words right: those keep its spelling


def test_trimmed_window_equals_padded_for_a_full_window(whisper_dir):
    """A clip that fills the 30 s window: trimmed input is the padded input, and the logits are the same."""
    from pqm.families.whisper import build_model, features, load_processor

    audio = torch.randn(16000 * 30).numpy() * 0.01
    cut = _array_cut(audio)
    processor = load_processor(whisper_dir)
    padded, trimmed = features(processor, [cut], "padded"), features(processor, [cut], "trimmed")
    assert padded.shape == trimmed.shape == (1, 80, 3000) and torch.allclose(padded, trimmed)
    model = build_model(whisper_dir)
    labels = torch.tensor([[50257, 50362, 440, 2068]])
    with torch.no_grad():
        a = model(input_features=padded, decoder_input_ids=labels).logits
        short = features(processor, [_array_cut(audio[: 16000 * 3])], "trimmed")
        assert short.shape[-1] == 300
        model(input_features=short, decoder_input_ids=labels)  # the encoder takes 300 frames
        b = model(input_features=trimmed, decoder_input_ids=labels).logits  # and 3000 again
    assert torch.equal(a, b)


def test_audio_over_30_s_is_refused_in_either_window(whisper_dir):
    from pqm.families.whisper import features, load_processor

    processor = load_processor(whisper_dir)
    long = _array_cut(torch.zeros(16000 * 31).numpy())
    for window in ("padded", "trimmed"):
        with pytest.raises(BadInput, match="utterances x are longer than Whisper's 30 s window"):
            features(processor, [long], window)


def _array_cut(audio) -> MonoCut:
    """A cut of in-memory audio (16 kHz WAVE bytes)."""
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV")
    rec = Recording(id="x", sources=[AudioSource(type="memory", channels=[0], source=buf.getvalue())],
                    sampling_rate=16000, num_samples=len(audio), duration=len(audio) / 16000)
    return MonoCut(id="x", start=0, duration=rec.duration, channel=0, recording=rec)


@pytest.mark.e2e
def test_harmful_adaptation_keeps_the_starting_point(so762_manifests, whisper_fp_dir, tmp_path, caplog):
    """A learning rate that wrecks the adapter: the held-out utterances get worse, so the job keeps the
    starting point (no adapter, fallback.json with the errors of every epoch) and decoding falls back."""
    from pqm.adapt import main as adapt
    from pqm.quantize import main as quantize

    quantize(["--fp-dir", str(whisper_fp_dir), "--out", str(tmp_path / "nf4")])
    speaker = json.loads((so762_manifests / "speakers.json").read_text())["test"][0]
    out = tmp_path / "nf4_sa" / speaker
    args = ["--fp-dir", str(whisper_fp_dir), "--nf4-dir", str(tmp_path / "nf4"),
            "--cuts", str(so762_manifests / "speechocean762_cuts_adapt.jsonl.gz"), "--speaker", speaker,
            "--max-utts", "4", "--holdout", "2", "--epochs", "2", "--lr", "0.05", "--batch-size", "2",
            "--window", "padded", "--target-style", "sentence", "--out", str(out)]
    adapt(args)  # in this process: the job's imports are already paid
    fallback = json.loads((out / "fallback.json").read_text())
    errors = fallback["held_out"]["errors_per_epoch"]
    assert len(errors) == 3 and min(errors[1:]) > errors[0], errors
    assert fallback["kept_epoch"] == 0 and not (out / "adapter_model.safetensors").exists()
    with caplog.at_level("INFO"):
        adapt(args)
    assert "nothing to do" in caplog.text


def test_selection_keeps_the_best_epoch_and_ties_go_later():
    from peft import LoraConfig, get_peft_model

    from pqm.adapt import Selection

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(r=1, target_modules=["0"]))
    errors = iter([(5, 20), (7, 20), (5, 20), (6, 20)])
    selection = Selection(lambda epoch: next(errors))
    for _ in range(4):
        selection.after_epoch(model)
    assert selection.scores == [5, 7, 5, 6] and selection.best_epoch == 2
    assert selection.best_state is not None and any("lora_A" in k for k in selection.best_state)
    worse = iter([(5, 20), (7, 20), (9, 20)])
    selection = Selection(lambda epoch: next(worse))
    for _ in range(3):
        selection.after_epoch(model)
    assert selection.best_epoch == 0


def test_held_out_epoch_0_is_decoded_as_its_fallback():
    """A new LoRA's epoch 0 is the bare model: its held-out errors are those of Whisper's 30 s window, as stage 8
    decodes the fallback ``nf4``, not of the trimmed input the adapter trains on (where the bare model loops)."""
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut, dummy_supervision

    from pqm.adapt import held_out_errors

    class Recogniser:
        window, seen = "trimmed", []
        model = torch.nn.Linear(1, 1)

        def set_window(self, window):
            self.window = window

        def transcribe(self, cuts, desc, max_new_tokens=None):
            self.seen.append(self.window)
            return {c.id: "one two" if self.window == "padded" else "one one one one" for c in cuts}

    cuts = CutSet.from_cuts([dummy_cut(i, supervisions=[dummy_supervision(i, text="one two")]) for i in range(2)])
    rec = Recogniser()
    evaluate = held_out_errors(rec, cuts, str.lower, ("padded", "trimmed"))
    assert [evaluate(epoch) for epoch in range(3)] == [(0, 4), (6, 4), (6, 4)]
    assert rec.seen == ["padded", "trimmed", "trimmed"]


@pytest.mark.e2e
def test_run_sh_stages_1_to_3(so762_dir, tmp_path):
    """run.sh --corpus speechocean762 through stages 1-3 on a few speakers of the shared copy."""
    from test_recipe import run_sh

    corpus = make_subset(so762_dir, tmp_path / "so762")
    data, exp = tmp_path / "data", tmp_path / "exp"
    proc = run_sh("--corpus", "speechocean762", "--corpus-opts", f"--corpus-dir {corpus} --adapt-per-speaker 12",
                  "--datadir", str(data), "--expdir", str(exp), "--model", "whisper", "--pretrained", str(WHISPER),
                  "--stop-stage", "3")
    assert f"corpus: {corpus}" in proc.stdout and "nothing to prepare" in proc.stdout
    speakers = json.loads((data / "manifests" / "speakers.json").read_text())
    assert len(speakers["train"]) == 2 and len(speakers["test"]) == 2
    assert "first 12 utterances by id" in speakers["rule"]
    evaluation = CutSet.from_file(data / "manifests" / "speechocean762_cuts_eval.jsonl.gz")
    assert len(evaluation) == 2 * 8
    bad = run_sh("--corpus", "speechocean762", "--corpus-opts", f"--corpus-dir {tmp_path / 'nowhere'}", "--datadir",
                 str(tmp_path / "d2"), "--expdir", str(tmp_path / "e2"), "--model", "whisper", "--pretrained",
                 str(WHISPER), "--stop-stage", "2", check=False)
    assert bad.returncode != 0 and "nowhere does not exist" in bad.stdout + bad.stderr


@pytest.mark.e2e
def test_changed_options_redo_a_done_stage(so762_dir, tmp_path):
    """A done marker records the options its stage ran with: the same options skip it, a changed one
    redoes it (and the later stages), and a changed option of a stage before --stage stops the run."""
    from test_recipe import run_sh

    corpus = make_subset(so762_dir, tmp_path / "so762", train=1, test=1)
    opts = ["--corpus", "speechocean762", "--datadir", str(tmp_path / "data"),
            "--expdir", str(tmp_path / "exp"), "--model", "whisper", "--pretrained", str(WHISPER)]
    evaluation = tmp_path / "data" / "manifests" / "speechocean762_cuts_eval.jsonl.gz"
    twelve, five = f"--corpus-dir {corpus} --adapt-per-speaker 12", f"--corpus-dir {corpus} --adapt-per-speaker 5"
    run_sh(*opts, "--corpus-opts", twelve, "--stop-stage", "3")
    again = run_sh(*opts, "--corpus-opts", twelve, "--stop-stage", "3")
    assert "Stage 2: lhotse manifests (and the speaker split): already done" in again.stdout
    changed = run_sh(*opts, "--corpus-opts", five, "--stop-stage", "2")
    assert (f"Stage 1: options changed since it was done (was --corpus-opts {twelve}; now --corpus-opts {five})"
            in changed.stdout)
    assert len(CutSet.from_file(evaluation)) == 15
    assert not (tmp_path / "exp" / ".done" / "stage3").exists()
    stale = run_sh(*opts, "--corpus-opts", twelve, "--stage", "3", "--stop-stage", "3", check=False)
    assert stale.returncode != 0
    assert f"stage 1 was done with other options (was --corpus-opts {five}; now --corpus-opts {twelve})" in stale.stderr
    assert len(CutSet.from_file(evaluation)) == 15  # nothing was redone
