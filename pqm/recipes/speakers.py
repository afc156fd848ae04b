"""What the corpus recipes share: the protocol's test-speaker split and its options.

Each test speaker (unseen in training) has its utterances split into an
adaptation part (the first ``adapt_per_speaker`` in the recipe's order) and an
evaluation part (the rest), so no utterance is in both.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from pqm.errors import BadInput, check_safe_id


def split_test_speakers(sups: Iterable, train_speakers: set[str], adapt_per_speaker: int, order: Callable[[Any], Any],
                        what: str, part: str, train_part: str) -> tuple[list, list, list[str]]:
    """Return ``(adaptation, evaluation, speakers)`` for the test supervisions ``sups`` of ``part``.

    A speaker also in ``train_speakers`` is refused; one with no utterance
    left to evaluate is left out (logged).
    """
    by_speaker: dict[str, list] = {}
    for s in sups:
        by_speaker.setdefault(check_safe_id(s.speaker, f"{what} id"), []).append(s)
    adapt, evaluation, speakers = [], [], []
    for spk, spk_sups in sorted(by_speaker.items()):
        if spk in train_speakers:
            raise BadInput(f"{what} {spk} of {part} is also in {train_part}: a test speaker must be unseen")
        ordered = sorted(spk_sups, key=order)
        if len(ordered) <= adapt_per_speaker:
            logging.warning(f"{part}: {what} {spk} has only {len(ordered)} utterances, none left to evaluate: left out")
            continue
        adapt += ordered[:adapt_per_speaker]
        evaluation += ordered[adapt_per_speaker:]
        speakers.append(spk)
    return adapt, evaluation, speakers


def add_split_options(p: argparse.ArgumentParser, corpus_dir: Path, corpus_help: str, adapt_default: int,
                      downloadable: bool = True) -> None:
    """The options of every corpus whose test speakers' utterances are split by :func:`split_test_speakers`."""
    p.add_argument("--corpus-dir", type=Path, default=corpus_dir, help=corpus_help)
    if downloadable:
        p.add_argument("--download-dir", type=Path, default=Path("downloads"),
                       help="download the corpus here when --corpus-dir is absent")
    p.add_argument("--train-utts", type=int, default=0, help="train on the first N training utterances by id (0: all)")
    p.add_argument("--adapt-per-speaker", type=int, default=adapt_default, help="adaptation utterances per test speaker")


def corpus_or_download(a: argparse.Namespace, name: str, download: Callable[[Path], Path]) -> Path:
    """``--corpus-dir`` if it exists, else the folder ``download(--download-dir)`` returns."""
    if a.corpus_dir.is_dir():
        return a.corpus_dir
    logging.info(f"--corpus-dir {a.corpus_dir} does not exist: downloading {name} into {a.download_dir}")
    return download(a.download_dir)
