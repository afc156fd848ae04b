"""Stages 1-2 for speechocean762: real read English of non-native speakers, children and adults.

The corpus comes in Kaldi layout (``train/`` and ``test/``, each with
``wav.scp``, ``text``, ``utt2spk``, ``spk2age``; audio under ``WAVE/``, as
``.WAV`` in the release or ``.flac`` in the shared copy; a path in
``wav.scp`` whose file is absent is looked for with the other extension).
Paths in ``wav.scp`` are relative to the corpus folder, and ``text``
separates the utterance id from the words with a tab.

Speakers: the ``train`` part's are the training speakers (SAT; every 20th
utterance by id is the valid set); the ``test`` part's are the test
speakers. Each test speaker's utterances, sorted by id, are split by this
rule (ours): the first ``--adapt-per-speaker`` are the adaptation part, the
rest the evaluation part. Test speakers are grouped by age
(``spk2age``: children up to 12, teenagers 13-17, adults 18 and over; a speaker
missing from ``spk2age`` is grouped as ``age unknown`` and logged), and the
results report WER per group.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pqm.errors import BadInput
from pqm.kaldi_table import read_table
from pqm.manifests import write_speakers, write_utterance_set
from pqm.recipes.speakers import add_split_options, split_test_speakers

if TYPE_CHECKING:  # lhotse is imported where it is used: run.sh's `pqm.recipes check` needs none of it
    from lhotse import Recording, SupervisionSegment

CORPUS = "speechocean762"
AUDIO_EXTENSIONS = (".WAV", ".wav", ".flac")


def audio_path(corpus_dir: Path, relative: str) -> Path:
    """The audio file ``wav.scp`` names, or the same file with another of :data:`AUDIO_EXTENSIONS`."""
    named = corpus_dir / relative
    for candidate in [named, *(named.with_suffix(ext) for ext in AUDIO_EXTENSIONS)]:
        if candidate.is_file():
            return candidate
    raise BadInput(f"{corpus_dir}: audio {relative} (from wav.scp) is missing, also as "
                   f"{' or '.join(AUDIO_EXTENSIONS)}")


def age_group(age: str | None) -> str:
    if age is None or not age.isdigit():
        return "age unknown"
    years = int(age)
    return "children (<= 12)" if years <= 12 else "teenagers (13-17)" if years <= 17 else "adults (>= 18)"


def read_part(corpus_dir: Path, part: str) -> tuple[list[Recording], list[SupervisionSegment], dict[str, str]]:
    """Recordings, supervisions and ages (``spk2age``) of one part, checked before anything is written."""
    from lhotse import Recording, SupervisionSegment

    folder = corpus_dir / part
    needed = f"speechocean762's {folder.name}/ needs wav.scp, text, utt2spk and spk2age"
    wav, text, utt2spk = (read_table(folder / name, needed) for name in ("wav.scp", "text", "utt2spk"))
    ages = read_table(folder / "spk2age") if (folder / "spk2age").is_file() else {}
    lacking = sorted(u for u in utt2spk if u not in wav or u not in text)
    if lacking:
        raise BadInput(f"{folder}: utterances {', '.join(lacking[:3])} of utt2spk have no line in wav.scp or text")
    empty = sorted(u for u in utt2spk if not text[u])
    if empty:
        raise BadInput(f"{folder}/text: empty transcripts for {', '.join(empty[:3])}")
    recs = [Recording.from_file(audio_path(corpus_dir, wav[u]), recording_id=u) for u in sorted(utt2spk)]
    sups = [SupervisionSegment(id=r.id, recording_id=r.id, start=0.0, duration=r.duration, channel=0,
                               text=text[r.id], speaker=utt2spk[r.id], language="English") for r in recs]
    return recs, sups, ages


def prepare_speechocean762(corpus_dir: Path, manifest_dir: Path, adapt_per_speaker: int = 10,
                           train_utts: int = 0) -> dict:
    """Write the train/valid/adapt/eval manifests and ``speakers.json``; return the test speakers by age group."""
    train_recs, train_sups, _ = read_part(corpus_dir, "train")
    test_recs, test_sups, ages = read_part(corpus_dir, "test")
    train_sups = train_sups[:train_utts] if train_utts else train_sups
    valid = train_sups[19::20] or train_sups[-1:]
    valid_ids = {s.id for s in valid}
    train_speakers = sorted({s.speaker for s in train_sups})
    adapt, evaluation, test_speakers = split_test_speakers(
        test_sups, set(train_speakers), adapt_per_speaker, order=lambda s: s.id, what="speaker", part="test",
        train_part="train")
    unknown = [s for s in test_speakers if s not in ages]
    if unknown:
        logging.warning(f"{corpus_dir}/test/spk2age has no age for speakers {', '.join(unknown)}: grouped as 'age unknown'")
    groups: dict[str, list[str]] = {}
    for spk in test_speakers:
        groups.setdefault(age_group(ages.get(spk)), []).append(spk)
    sets = {"train": (train_recs, [s for s in train_sups if s.id not in valid_ids]), "valid": (train_recs, valid),
            "adapt": (test_recs, adapt), "eval": (test_recs, evaluation)}
    for name, (recs, sups) in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs, sups)
    write_speakers(manifest_dir, train_speakers, test_speakers, test_sets=dict(sorted(groups.items())),
                   rule=f"first {adapt_per_speaker} utterances by id to adaptation, the rest to evaluation")
    return groups


TOKEN_TYPE = "bpe"
SPLIT_DIGITS = True  # some sentences are spelled-out digit strings ("SEVEN NINE FOUR SIX") that Whisper writes as one number


def add_options(p: argparse.ArgumentParser) -> None:
    """``--corpus speechocean762``'s options."""
    add_split_options(p, Path("../shared/corpora/speechocean762"),
                      "the speechocean762 folder (with train/, test/, WAVE/): the shared copy or the unpacked release",
                      adapt_default=10, downloadable=False)


def download(a: argparse.Namespace) -> Path:
    """Stage 1: the corpus folder (no download: the shared copy or the unpacked release)."""
    if not a.corpus_dir.is_dir():
        raise BadInput(f"--corpus-dir {a.corpus_dir} does not exist: point it at speechocean762 "
                       "(../shared/corpora/speechocean762, or the unpacked release)")
    return a.corpus_dir


def prepare(a: argparse.Namespace, corpus_dir: Path) -> None:
    """Stage 2."""
    prepare_speechocean762(corpus_dir, a.datadir / "manifests", a.adapt_per_speaker, a.train_utts)
