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
import logging
from pathlib import Path

from lhotse.recipes import download_librispeech, prepare_librispeech

from pqm.fsutil import BadInput, check_safe_id, cli, setup_logging
from pqm.manifests import write_speakers, write_utterance_set

CORPUS = "librispeech"


def split_test_speaker(sups: list, adapt_per_speaker: int) -> tuple[list, list]:
    """First ``adapt_per_speaker`` utterances by id to adaptation, the rest to evaluation."""
    ordered = sorted(sups, key=lambda s: s.id)
    return ordered[:adapt_per_speaker], ordered[adapt_per_speaker:]


def prepare(corpus_dir: Path, manifest_dir: Path, train_part: str, test_parts: list[str], train_utts: int,
            adapt_per_speaker: int) -> dict:
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
        by_speaker: dict[str, list] = {}
        for s in parts[part]["supervisions"]:
            by_speaker.setdefault(check_safe_id(s.speaker), []).append(s)
        test_sets[part] = []
        for spk, sups in sorted(by_speaker.items()):
            if spk in train_speakers:
                raise BadInput(f"reader {spk} of {part} is also in {train_part}: a test speaker must be unseen")
            adapt, evaluation = split_test_speaker(sups, adapt_per_speaker)
            if not evaluation:
                logging.warning(f"{part}: reader {spk} has only {len(sups)} utterances, none left to evaluate: left out")
                continue
            sets["adapt"] += adapt
            sets["eval"] += evaluation
            test_sets[part].append(spk)
        test_recs += list(parts[part]["recordings"])
    recs["adapt"] = recs["eval"] = test_recs
    for name, sups in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs[name], sups)
    test_speakers = sorted(spk for spks in test_sets.values() for spk in spks)
    write_speakers(manifest_dir, train_speakers, test_speakers, test_sets=test_sets,
                   rule=f"first {adapt_per_speaker} utterances by id to adaptation, the rest to evaluation")
    return test_sets


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, required=True, help="the LibriSpeech folder (with train-clean-100/, ...)")
    p.add_argument("--download-dir", type=Path, default=None, help="download the parts here when --corpus-dir is absent")
    p.add_argument("--datadir", type=Path, required=True, help="output: <datadir>/manifests")
    p.add_argument("--train-part", default="train-clean-100")
    p.add_argument("--test-parts", nargs="+", default=["test-clean", "test-other"])
    p.add_argument("--train-utts", type=int, default=0, help="SAT on the first N training utterances (0: all)")
    p.add_argument("--adapt-per-speaker", type=int, default=20)
    a = p.parse_args(argv)
    setup_logging()
    corpus_dir = a.corpus_dir
    if not corpus_dir.is_dir():
        if a.download_dir is None:
            raise BadInput(f"--corpus-dir {corpus_dir} does not exist; give --download-dir to download LibriSpeech")
        download_librispeech(a.download_dir, dataset_parts=[a.train_part, *a.test_parts])
        corpus_dir = a.download_dir / "LibriSpeech"
    prepare(corpus_dir, a.datadir / "manifests", a.train_part, a.test_parts, a.train_utts, a.adapt_per_speaker)


if __name__ == "__main__":
    cli(main)
