"""Stages 1-2 for LibriSpeech: lhotse's own download and preparation, then the speaker split.

Speakers are readers. SAT uses a training part (``--train-part``, default
train-clean-100; ``--train-utts`` keeps the first N utterances by id, 0: all;
every 20th of them is the valid set). The test speakers are the readers of the
test parts (default test-clean and test-other). Each test speaker's utterances,
sorted by id (reader-chapter-utterance), are split by this rule (ours: the
paper does not give one): the first ``--adapt-per-speaker`` are the adaptation
part, the rest the evaluation part, so no recording is in both. A reader with
no more utterances than that is left out of the test speakers (logged).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pqm.errors import BadInput
from pqm.manifests import write_speakers, write_utterance_set
from pqm.recipes.speakers import add_split_options, corpus_or_download, split_test_speakers

CORPUS = "librispeech"


def prepare_librispeech_split(corpus_dir: Path, manifest_dir: Path, train_part: str, test_parts: list[str], train_utts: int,
            adapt_per_speaker: int) -> dict:
    """lhotse's LibriSpeech manifests, split into our sets; write them and ``speakers.json``; return the test
    readers by part."""
    from lhotse.recipes import prepare_librispeech

    parts = prepare_librispeech(corpus_dir, dataset_parts=[train_part, *test_parts])
    missing = [p for p in [train_part, *test_parts] if p not in parts]
    if missing:
        raise BadInput(f"{corpus_dir}: no LibriSpeech part(s) {missing} (expected <split>/<reader>/<chapter>/*.flac "
                       "and *.trans.txt)")
    train = sorted(parts[train_part]["supervisions"], key=lambda s: s.id)
    train = train[:train_utts] if train_utts else train
    valid = train[19::20] or train[-1:]
    valid_ids = {s.id for s in valid}
    sets = {"train": [s for s in train if s.id not in valid_ids], "valid": valid, "adapt": [], "eval": []}
    recs = {"train": parts[train_part]["recordings"], "valid": parts[train_part]["recordings"]}
    train_speakers = sorted({s.speaker for s in train})
    test_sets: dict[str, list[str]] = {}
    test_recs = []
    for part in test_parts:
        adapt, evaluation, test_sets[part] = split_test_speakers(
            parts[part]["supervisions"], set(train_speakers), adapt_per_speaker, order=lambda s: s.id,
            what="reader", part=part, train_part=train_part)
        sets["adapt"] += adapt
        sets["eval"] += evaluation
        test_recs += list(parts[part]["recordings"])
    recs["adapt"] = recs["eval"] = test_recs
    for name, sups in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs[name], sups)
    test_speakers = sorted(spk for spks in test_sets.values() for spk in spks)
    write_speakers(manifest_dir, train_speakers, test_speakers, test_sets=test_sets,
                   rule=f"first {adapt_per_speaker} utterances by id to adaptation, the rest to evaluation")
    return test_sets


TOKEN_TYPE = "bpe"
SPLIT_DIGITS = False  # Whisper's English normaliser alone: "1990" is one word, as in published Whisper results


def add_options(p: argparse.ArgumentParser) -> None:
    """``--corpus librispeech``'s options."""
    add_split_options(p, Path("downloads/LibriSpeech"), "the LibriSpeech folder (with train-clean-100/, ...)",
                      adapt_default=20)
    p.add_argument("--train-part", default="train-clean-100", help="SAT (and Conformer training) part")
    p.add_argument("--test-parts", nargs="+", default=["test-clean", "test-other"],
                   help="parts whose readers are the test speakers")


def download(a: argparse.Namespace) -> Path:
    """Stage 1: ``--corpus-dir``, or lhotse's download of the parts into ``--download-dir``."""
    from lhotse.recipes import download_librispeech

    return corpus_or_download(a, "LibriSpeech",
                              lambda d: download_librispeech(d, dataset_parts=[a.train_part, *a.test_parts]))


def prepare(a: argparse.Namespace, corpus_dir: Path) -> None:
    """Stage 2."""
    prepare_librispeech_split(corpus_dir, a.datadir / "manifests", a.train_part, a.test_parts, a.train_utts,
                              a.adapt_per_speaker)
