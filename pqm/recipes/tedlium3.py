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
import os
from pathlib import Path

from pqm.errors import BadInput
from pqm.manifests import write_speakers, write_utterance_set
from pqm.recipes.speakers import add_split_options, corpus_or_download, split_test_speakers

CORPUS = "tedlium3"
PARTS = ("train", "dev", "test")


def _with_text(sups, part: str) -> list:
    kept = [s for s in sups if (s.text or "").strip()]
    if len(kept) < len(sups):
        logging.info(f"{part}: dropped {len(sups) - len(kept)} segments whose normalised transcript is empty")
    return kept


def prepare_tedlium3_split(corpus_dir: Path, manifest_dir: Path, train_utts: int, adapt_per_speaker: int) -> list[str]:
    """lhotse's TED-LIUM 3 manifests, split into our sets; write them and ``speakers.json``; return the test talks."""
    from lhotse.recipes import prepare_tedlium

    missing = [p for p in PARTS if not (corpus_dir / "legacy" / p / "stm").is_dir()]
    if missing:
        raise BadInput(f"{corpus_dir}: no TED-LIUM 3 part(s) {missing} (expected legacy/<part>/sph/*.sph "
                       "and legacy/<part>/stm/*.stm)")
    parts = prepare_tedlium(corpus_dir, dataset_parts=PARTS, normalize_text="kaldi")
    train = sorted(_with_text(parts["train"]["supervisions"], "train"), key=lambda s: s.id)
    train = train[:train_utts] if train_utts else train
    train_talks = {s.speaker for s in train}
    adapt, evaluation, test_talks = split_test_speakers(
        _with_text(parts["test"]["supervisions"], "test"), train_talks, adapt_per_speaker,
        order=lambda s: (s.start, s.id), what="talk", part="the test part", train_part="the train part")
    sets = {"train": train, "valid": _with_text(parts["dev"]["supervisions"], "dev"), "adapt": adapt, "eval": evaluation}
    recs = {"train": parts["train"]["recordings"], "valid": parts["dev"]["recordings"],
            "adapt": parts["test"]["recordings"], "eval": parts["test"]["recordings"]}
    for name, sups in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs[name], sups)
    write_speakers(manifest_dir, sorted(train_talks), test_talks, test_sets={"test": test_talks},
                   rule=f"first {adapt_per_speaker} segments of each test talk in time order to adaptation, "
                        "the rest to evaluation")
    return test_talks


TOKEN_TYPE = "bpe"
SPLIT_DIGITS = False  # Whisper's English normaliser alone, as in published Whisper results


def add_options(p: argparse.ArgumentParser) -> None:
    """``--corpus tedlium3``'s options."""
    add_split_options(p, Path("downloads/TEDLIUM_release-3"), "the TEDLIUM_release-3 folder (with legacy/)",
                      adapt_default=50)


def download(a: argparse.Namespace) -> Path:
    """Stage 1: ``--corpus-dir``, or lhotse's download into ``--download-dir``."""
    from lhotse.recipes import download_tedlium

    if os.environ.get("LHOTSE_AUDIO_BACKEND"):
        logging.info(f"reading .sph with {os.environ['LHOTSE_AUDIO_BACKEND']} (no sph2pipe on PATH)")
    return corpus_or_download(a, "TED-LIUM 3", download_tedlium)


def prepare(a: argparse.Namespace, corpus_dir: Path) -> None:
    """Stage 2."""
    prepare_tedlium3_split(corpus_dir, a.datadir / "manifests", a.train_utts, a.adapt_per_speaker)
