"""Stages 1-2 for TED-LIUM 3: lhotse's own download and preparation, then the speaker split.

Speakers are talks (lhotse's ``prepare_tedlium`` gives each segment its talk
as speaker), not the 180-second pseudo-speakers some recipes make. The legacy
distribution's ``train`` part is for training and SAT (``--train-utts`` keeps
the first N segments by id, 0: all), its ``dev`` part is the valid set, and
the talks of its ``test`` part are the test speakers. Transcripts get
lhotse's Kaldi-style normalisation (``[NOISE]`` and ``<unk>`` removed,
``it 's`` joined to ``it's``); a segment left empty is dropped (logged).
Each test talk's segments, in time order, are split by this rule (ours: the
paper does not give one): the first ``--adapt-per-speaker`` are the adaptation
part, the rest the evaluation part, so no audio is in both.

Reading ``.sph``: lhotse uses the ``sph2pipe`` program when it is on PATH;
``run.sh`` otherwise sets ``LHOTSE_AUDIO_BACKEND=LibsndfileBackend``, which
reads the uncompressed NIST SPHERE files TED-LIUM 3 ships (not shorten).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lhotse.recipes import download_tedlium, prepare_tedlium

from pqm.fsutil import BadInput, check_safe_id, cli, setup_logging
from pqm.manifests import write_speakers, write_utterance_set

CORPUS = "tedlium3"
PARTS = ("train", "dev", "test")


def split_talk(sups: list, adapt_per_speaker: int) -> tuple[list, list]:
    """First ``adapt_per_speaker`` segments in time order to adaptation, the rest to evaluation."""
    ordered = sorted(sups, key=lambda s: (s.start, s.id))
    return ordered[:adapt_per_speaker], ordered[adapt_per_speaker:]


def _with_text(sups, part: str) -> list:
    kept = [s for s in sups if (s.text or "").strip()]
    if len(kept) < len(sups):
        logging.info(f"{part}: dropped {len(sups) - len(kept)} segments whose normalised transcript is empty")
    return kept


def prepare(corpus_dir: Path, manifest_dir: Path, train_utts: int, adapt_per_speaker: int) -> list[str]:
    missing = [p for p in PARTS if not (corpus_dir / "legacy" / p / "stm").is_dir()]
    if missing:
        raise BadInput(f"{corpus_dir}: no TED-LIUM 3 part(s) {missing} (expected legacy/<part>/sph/*.sph "
                       "and legacy/<part>/stm/*.stm)")
    parts = prepare_tedlium(corpus_dir, dataset_parts=PARTS, normalize_text="kaldi")
    train = sorted(_with_text(parts["train"]["supervisions"], "train"), key=lambda s: s.id)
    train = train[:train_utts] if train_utts else train
    train_talks = {s.speaker for s in train}
    by_talk: dict[str, list] = {}
    for s in _with_text(parts["test"]["supervisions"], "test"):
        by_talk.setdefault(check_safe_id(s.speaker, "talk id"), []).append(s)
    sets = {"train": train, "valid": _with_text(parts["dev"]["supervisions"], "dev"), "adapt": [], "eval": []}
    test_talks = []
    for talk, sups in sorted(by_talk.items()):
        if talk in train_talks:
            raise BadInput(f"talk {talk} of the test part is also in the train part: a test speaker must be unseen")
        adapt, evaluation = split_talk(sups, adapt_per_speaker)
        if not evaluation:
            logging.warning(f"test talk {talk} has only {len(sups)} segments, none left to evaluate: left out")
            continue
        sets["adapt"] += adapt
        sets["eval"] += evaluation
        test_talks.append(talk)
    recs = {"train": parts["train"]["recordings"], "valid": parts["dev"]["recordings"],
            "adapt": parts["test"]["recordings"], "eval": parts["test"]["recordings"]}
    for name, sups in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs[name], sups)
    write_speakers(manifest_dir, sorted(train_talks), test_talks, test_sets={"test": test_talks},
                   rule=f"first {adapt_per_speaker} segments of each test talk in time order to adaptation, "
                        "the rest to evaluation")
    return test_talks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, required=True, help="the TEDLIUM_release-3 folder (with legacy/)")
    p.add_argument("--download-dir", type=Path, default=None, help="download the corpus here when --corpus-dir is absent")
    p.add_argument("--datadir", type=Path, required=True, help="output: <datadir>/manifests")
    p.add_argument("--train-utts", type=int, default=0, help="train on the first N training segments by id (0: all)")
    p.add_argument("--adapt-per-speaker", type=int, default=50, help="adaptation segments per test talk")
    a = p.parse_args(argv)
    setup_logging()
    corpus_dir = a.corpus_dir
    if not corpus_dir.is_dir():
        if a.download_dir is None:
            raise BadInput(f"--corpus-dir {corpus_dir} does not exist; give --download-dir to download TED-LIUM 3")
        corpus_dir = download_tedlium(a.download_dir)
    prepare(corpus_dir, a.datadir / "manifests", a.train_utts, a.adapt_per_speaker)


if __name__ == "__main__":
    cli(main)
