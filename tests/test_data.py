"""The FSDD lhotse recipe, the connected-digit task and the token list."""

from __future__ import annotations

import pytest
from lhotse import CutSet

from conftest import make_fsdd_subset
from pqm.errors import BadInput, MissingInput, check_safe_id
from pqm.recipes.connected_digits import DigitTaskConfig, make_connected_digits, plan_utterances
from pqm.recipes.fsdd import prepare_fsdd
from pqm.tokens import TokenEncoder, build_token_list, check_word_transcripts, train_bpe


@pytest.fixture(scope="module")
def corpus(fsdd_dir, tmp_path_factory):
    return prepare_fsdd(make_fsdd_subset(tmp_path_factory.mktemp("fsdd"), ["george", "jackson", "theo"], per_digit=10))


def test_prepare_fsdd_real_files(corpus):
    recs, sups = corpus["recordings"], corpus["supervisions"]
    assert len(recs) == len(sups) == 300
    sup = sups["3_theo_7"]
    assert sup.text == "three" and sup.speaker == "theo"
    assert recs["3_theo_7"].sampling_rate == 8000


def _cfg(**kw):
    base = dict(train_speakers=["jackson", "theo"], test_speakers=["george"], train_per_speaker=20,
                valid_per_digit=2, adapt_per_digit=4, adapt_per_speaker=10, seed=3)
    base.update(kw)
    return DigitTaskConfig(**base)


def test_plan_keeps_sets_apart(corpus):
    plan = plan_utterances(corpus["supervisions"], _cfg(valid_per_digit=42))  # indices >= 8 are valid
    used = {name: {r for _, _, g in items for r in g} for name, items in plan.items()}
    assert not used["adapt"] & used["eval"]
    assert not used["train"] & used["valid"]
    assert all("george" not in r for r in used["train"] | used["valid"])
    assert all(int(r.split("_")[2]) < 4 for r in used["adapt"])
    assert all(int(r.split("_")[2]) >= 4 for r in used["eval"])
    eval_recs = [r for _, _, g in plan["eval"] for r in g]
    assert len(eval_recs) == len(set(eval_recs)) == 60  # each evaluation recording once
    assert all(1 <= len(g) <= 7 for items in plan.values() for _, _, g in items)
    assert plan == plan_utterances(corpus["supervisions"], _cfg(valid_per_digit=42))  # deterministic
    assert plan != plan_utterances(corpus["supervisions"], _cfg(valid_per_digit=42, seed=4))


def test_plan_refuses_bad_splits(corpus):
    with pytest.raises(BadInput, match="both"):
        plan_utterances(corpus["supervisions"], _cfg(test_speakers=["theo"]))
    with pytest.raises(BadInput, match="not in the corpus"):
        plan_utterances(corpus["supervisions"], _cfg(test_speakers=["nobody"]))
    with pytest.raises(BadInput, match="unsafe"):
        plan_utterances(corpus["supervisions"], _cfg(test_speakers=["../etc"]))


def test_connected_digits_written(corpus, tmp_path):
    cuts = make_connected_digits(corpus["recordings"], corpus["supervisions"], _cfg(valid_per_digit=42),
                                 tmp_path / "wav", tmp_path / "manifests")
    adapt = CutSet.from_file(tmp_path / "manifests" / "fsdd_cuts_adapt.jsonl.gz")
    assert len(adapt) == 10
    cut = cuts["eval"][0]
    audio = cut.load_audio()
    assert cut.sampling_rate == 16000 and audio.shape[1] > 0
    words = cut.supervisions[0].text.split()
    assert len(words) == len(cut.supervisions[0].custom["sources"])
    assert (tmp_path / "manifests" / "fsdd_recordings_train.jsonl.gz").exists()


def test_corrupt_and_empty_audio_named(fsdd_dir, tmp_path):
    root = make_fsdd_subset(tmp_path / "c", ["george"], per_digit=1)
    (root / "recordings" / "4_george_0.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(BadInput, match="4_george_0.wav"):
        prepare_fsdd(root)
    (root / "recordings" / "4_george_0.wav").write_bytes(b"")
    with pytest.raises(BadInput, match="4_george_0.wav"):
        prepare_fsdd(root)
    assert (root / "recordings" / "4_george_0.wav").exists()  # nothing deleted


def test_a_bug_while_reading_audio_is_not_called_corrupt_audio(fsdd_dir, tmp_path, monkeypatch):
    """Only the audio libraries' decoding errors mean bad data; any other exception keeps its traceback."""
    from lhotse import Recording

    root = make_fsdd_subset(tmp_path / "c", ["george"], per_digit=1)

    def broken(*args, **kwargs):
        raise TypeError("a bug, not bad audio")

    monkeypatch.setattr(Recording, "from_file", broken)
    with pytest.raises(TypeError, match="a bug"):
        prepare_fsdd(root)


def test_missing_corpus(tmp_path):
    with pytest.raises(MissingInput, match="stage 1"):
        prepare_fsdd(tmp_path)


def test_tokenizer_refuses_unknown_and_empty():
    tokens = build_token_list(["one two", "three"])
    tok = TokenEncoder(tokens)
    assert tok.encode("two one") == [tokens.index("two"), tokens.index("one")]
    with pytest.raises(BadInput, match="eleven"):
        tok.encode("one eleven", where="utt1 in text")
    with pytest.raises(BadInput, match="empty"):
        tok.encode("  ")


def test_word_tokens_refuse_punctuation_and_mixed_casing():
    check_word_transcripts([("u1", "three four"), ("u2", "don't re-enter")])
    with pytest.raises(BadInput, match=r"punctuation in 'three\.' \(u2\)"):
        check_word_transcripts([("u1", "three four"), ("u2", "three.")])
    with pytest.raises(BadInput, match=r"several casings: 'three' \(u1\) and 'THREE' \(u3\)"):
        check_word_transcripts([("u1", "three four"), ("u2", "four"), ("u3", "THREE")])


def test_bpe_token_list_and_encoder(tmp_path):
    texts = ["one two three", "four five six", "seven eight nine zero", "two four six eight"] * 5
    tokens = train_bpe(texts, 25, tmp_path)
    assert tokens[:2] == ["<blank>", "<unk>"] and tokens[-1] == "<sos/eos>" and len(tokens) == 25
    assert (tmp_path / "bpe.model").is_file() and (tmp_path / "tokens.txt").read_text().split() == tokens
    tok = TokenEncoder(tokens, "bpe", tmp_path / "bpe.model")
    ids = tok.encode("nine one")
    assert ids and all(0 < i < len(tokens) - 1 for i in ids) and tokens.index("<unk>") not in ids
    assert "".join(tokens[i] for i in ids).replace("▁", " ").strip() == "nine one"
    assert tok.encode("net ruin")  # new words of the training characters have pieces
    with pytest.raises(BadInput, match=r"characters unseen in training outside the token list: \['q'\]"):
        tok.encode("one qux")
    with pytest.raises(BadInput, match=r"choose a smaller --nbpe \(at most 25\)"):
        train_bpe(texts, 500, tmp_path / "big")
    with pytest.raises(BadInput, match=r"choose a larger --nbpe \(at least 19"):
        train_bpe(texts, 10, tmp_path / "small")


def test_model_zoo_paths_are_found(tmp_path, monkeypatch):
    """An unpacked ESPnet model-zoo folder names its files relative to its root, two folders above config.yaml."""
    from pqm.families.espnet import _named_file

    config = tmp_path / "zoo" / "exp" / "asr_train" / "config.yaml"
    bpe = tmp_path / "zoo" / "data" / "token_list" / "bpe_unigram500" / "bpe.model"
    for f in (config, bpe):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    monkeypatch.chdir(tmp_path)
    assert _named_file(config, "data/token_list/bpe_unigram500/bpe.model", "stage 3") == bpe
    with pytest.raises(MissingInput, match="stage 3"):
        _named_file(config, "data/token_list/other/bpe.model", "stage 3")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-rf", "a b", "x;rm", "é"])
def test_unsafe_ids(bad):
    with pytest.raises(BadInput):
        check_safe_id(bad)


def test_safe_id():
    assert check_safe_id("speaker_1-a.b") == "speaker_1-a.b"


def test_stage3_refuses_words_outside_the_token_list(corpus, tmp_path):
    from lhotse import SupervisionSet
    from lhotse.utils import fastcopy

    from pqm.espnet_data import main as espnet_data

    make_connected_digits(corpus["recordings"], corpus["supervisions"], _cfg(valid_per_digit=42),
                          tmp_path / "wav", tmp_path / "manifests")
    path = tmp_path / "manifests" / "fsdd_supervisions_eval.jsonl.gz"
    sups = SupervisionSet.from_file(path)
    bad_id = next(iter(sups)).id
    SupervisionSet.from_segments(
        [fastcopy(s, text=s.text + " eleven") if s.id == bad_id else s for s in sups]
    ).to_file(path)
    with pytest.raises(BadInput, match=f"{bad_id}.*eleven"):
        espnet_data(["--datadir", str(tmp_path)])
    assert (tmp_path / "manifests" / "fsdd_cuts_eval.jsonl.gz").exists()  # nothing lost


def test_temporary_output_of_a_killed_writer_is_removed_by_the_next(tmp_path):
    """atomic_path: a process killed while writing leaves its temporary folder; the next writer removes it."""
    import subprocess
    import sys

    from pqm.files import atomic_path

    code = (f"import os\nfrom pqm.files import atomic_path\nwith atomic_path({str(tmp_path / 'out')!r}) as t:\n"
            "    t.write_text('half'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".out.pid")
    with atomic_path(tmp_path / "out") as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out").read_text() == "whole"


def test_batches_by_duration_hold_similar_lengths(fsdd_dir):
    """``max_duration``: lhotse's bucketing gives batches of similar-length recordings, each at most that
    many seconds, every cut once per epoch, and the same number of batches on each of two ranks."""
    from lhotse import Recording

    from pqm.batches import cut_batches

    files = sorted((fsdd_dir / "recordings").glob("*_jackson_*.wav"))[:120]
    cuts = CutSet.from_cuts(Recording.from_file(f).to_cut() for f in files).to_eager()

    def padding(batches) -> float:
        """The share of the batches' padded audio that is padding."""
        return 1 - sum(c.duration for b in batches for c in b) / sum(len(b) * max(c.duration for c in b) for b in batches)

    by_count = list(cut_batches(cuts, 16, epoch=1))
    by_time = list(cut_batches(cuts, 16, epoch=1, max_duration=8.0))
    assert sorted(c.id for b in by_time for c in b) == sorted(cuts.ids)
    assert all(sum(c.duration for c in b) <= 8.0 for b in by_time)
    assert padding(by_time) < padding(by_count) / 2
    ranks = [list(cut_batches(cuts, 16, epoch=1, rank=r, world_size=2, max_duration=8.0)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not {c.id for b in ranks[0] for c in b} & {c.id for b in ranks[1] for c in b}


def test_speed_perturbed_cuts_keep_their_transcripts_at_every_speed(corpus):
    """``--speed-perturb 0.9 1.0 1.1``: every cut once per factor (ids ``_sp<factor>``), its words and speaker
    kept, its audio really resampled (1/factor as long); no factors: the cuts as they are."""
    from pqm.batches import speed_perturbed

    cuts = CutSet.from_manifests(corpus["recordings"], corpus["supervisions"]).subset(first=6).to_eager()
    assert speed_perturbed(cuts, []) is cuts
    out = speed_perturbed(cuts, [0.9, 1.0, 1.1])
    assert len(out) == 18 and set(cuts.ids) <= set(out.ids)
    for c in cuts:
        for f in (0.9, 1.1):
            sp = out[f"{c.id}_sp{f}"]
            assert sp.supervisions[0].text == c.supervisions[0].text
            assert sp.supervisions[0].speaker == c.supervisions[0].speaker
            assert sp.duration == pytest.approx(c.duration / f, abs=0.01)
            audio, original = sp.load_audio(), c.load_audio()
            assert audio.shape[1] == pytest.approx(original.shape[1] / f, abs=2)
