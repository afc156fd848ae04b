"""The LibriSpeech recipe on a small corpus in the real release layout, through lhotse's prepare_librispeech."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from lhotse import CutSet, Recording

from conftest import FSDD
from pqm.errors import BadInput
from pqm.recipes.librispeech import prepare_librispeech_split
from test_recipe import run_sh

WORDS = "zero one two three four five six seven eight nine".split()
READERS = {"train-clean-100": ("jackson", "19", "198"), "test-clean": ("george", "1089", "134686"),
           "test-other": ("nicolas", "4294", "9934")}


def write_librispeech(root: Path, per_reader: int = 6, readers: dict = READERS) -> Path:
    """``LibriSpeech/<split>/<reader>/<chapter>/<reader>-<chapter>-NNNN.flac`` (16 kHz) plus ``*.trans.txt``."""
    for split, (fsdd_speaker, reader, chapter) in readers.items():
        folder = root / "LibriSpeech" / split / reader / chapter
        folder.mkdir(parents=True)
        lines = []
        for i in range(per_reader):
            utt = f"{reader}-{chapter}-{i:04d}"
            rec = Recording.from_file(FSDD / "recordings" / f"{i % 10}_{fsdd_speaker}_{i // 10}.wav").resample(16000)
            sf.write(folder / f"{utt}.flac", rec.load_audio()[0], 16000)
            lines.append(f"{utt} {WORDS[i % 10].upper()}")
        (folder / f"{reader}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


def test_split_rule_and_readers(fsdd_dir, tmp_path):
    corpus = write_librispeech(tmp_path)
    test_sets = prepare_librispeech_split(corpus, tmp_path / "m", "train-clean-100", ["test-clean", "test-other"], 0, 2)
    assert test_sets == {"test-clean": ["1089"], "test-other": ["4294"]}
    adapt = sorted(c.supervisions[0].id for c in CutSet.from_file(tmp_path / "m" / "librispeech_cuts_adapt.jsonl.gz"))
    evaluation = sorted(c.supervisions[0].id for c in CutSet.from_file(tmp_path / "m" / "librispeech_cuts_eval.jsonl.gz"))
    assert adapt == ["1089-134686-0000", "1089-134686-0001", "4294-9934-0000", "4294-9934-0001"]
    assert len(evaluation) == 8 and not set(adapt) & set(evaluation)
    assert json.loads((tmp_path / "m" / "speakers.json").read_text())["train"] == ["19"]


def test_reader_in_training_and_test_is_refused(fsdd_dir, tmp_path):
    readers = {**READERS, "test-other": ("nicolas", "19", "9934")}
    corpus = write_librispeech(tmp_path, readers=readers)
    with pytest.raises(BadInput, match="reader 19 of test-other is also in train-clean-100"):
        prepare_librispeech_split(corpus, tmp_path / "m", "train-clean-100", ["test-clean", "test-other"], 0, 2)


@pytest.mark.e2e
def test_librispeech_recipe_stages_1_and_2(fsdd_dir, tmp_path):
    """run.sh's stages 1-2 with --corpus librispeech: the sets, and each test reader's part, which stage 9
    scores apart (pqm.score.add_per_set: tests/test_score.py). Stages 3-9 read only the manifests, as for
    any corpus (all nine with Whisper: tests/test_whisper.py, tests/test_custom.py)."""
    corpus = write_librispeech(tmp_path, per_reader=5)
    data = tmp_path / "data"
    run_sh("--corpus", "librispeech", "--corpus-opts", f"--corpus-dir {corpus} --adapt-per-speaker 2",
           "--datadir", str(data), "--expdir", str(tmp_path / "exp"), "--stop-stage", "2")
    speakers = json.loads((data / "manifests" / "speakers.json").read_text())
    assert speakers["test"] == ["1089", "4294"]
    assert speakers["test_sets"] == {"test-clean": ["1089"], "test-other": ["4294"]}
    for name, per_reader in (("adapt", 2), ("eval", 3)):
        cuts = CutSet.from_file(data / "manifests" / f"librispeech_cuts_{name}.jsonl.gz")
        assert sorted(c.supervisions[0].speaker for c in cuts) == ["1089"] * per_reader + ["4294"] * per_reader
