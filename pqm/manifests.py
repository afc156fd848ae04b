"""The manifest files stage 2 writes and later stages read: ``<dir>/<corpus>_<kind>_<set>.jsonl.gz``.

Every corpus recipe (``pqm.recipes.*``) ends by writing, for each set (train,
valid, adapt, eval), lhotse recordings, supervisions and cuts, plus
``speakers.json`` with the training and test speakers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from pqm.errors import require
from pqm.files import atomic_path, write_json

if TYPE_CHECKING:
    from lhotse import CutSet, RecordingSet, SupervisionSet

SETS = ("train", "valid", "adapt", "eval")
KINDS = ("recordings", "supervisions", "cuts")


def manifest_path(manifest_dir: Path, corpus: str, kind: str, name: str) -> Path:
    return manifest_dir / f"{corpus}_{kind}_{name}.jsonl.gz"


def write_set(manifest_dir: Path, corpus: str, name: str, recs: RecordingSet, sups: SupervisionSet,
              cuts: CutSet | None = None) -> CutSet:
    """Write one set's manifests atomically; the cuts default to one per recording."""
    from lhotse import CutSet

    cuts = cuts if cuts is not None else CutSet.from_manifests(recordings=recs, supervisions=sups)
    for kind, manifest in zip(KINDS, (recs, sups, cuts)):
        with atomic_path(manifest_path(manifest_dir, corpus, kind, name)) as tmp:
            manifest.to_file(tmp)
    return cuts


def write_utterance_set(manifest_dir: Path, corpus: str, name: str, recs: Iterable, sups: Iterable) -> CutSet:
    """Write one set of a corpus whose utterances are supervisions (whole files or segments): one cut each."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    sup_set = SupervisionSet.from_segments(sups)
    used = {s.recording_id for s in sup_set}
    rec_set = RecordingSet.from_recordings(r for r in recs if r.id in used)
    cuts = CutSet.from_manifests(recordings=rec_set, supervisions=sup_set).trim_to_supervisions(keep_overlapping=False)
    logging.info(f"{name}: {len(sup_set)} utterances of {len({s.speaker for s in sup_set})} speakers")
    return write_set(manifest_dir, corpus, name, rec_set, sup_set, cuts)


def write_speakers(manifest_dir: Path, train: list[str], test: list[str], **extra) -> None:
    write_json(manifest_dir / "speakers.json", {"train": train, "test": test, **extra})


def load_set(manifest_dir: Path, corpus: str, name: str) -> tuple[RecordingSet, SupervisionSet]:
    """Load one set's recordings and supervisions, naming stage 2 if they are missing."""
    from lhotse import RecordingSet, SupervisionSet

    rec = require(manifest_path(manifest_dir, corpus, "recordings", name), "stage 2 (manifests)")
    sup = require(manifest_path(manifest_dir, corpus, "supervisions", name), "stage 2 (manifests)")
    return RecordingSet.from_file(rec), SupervisionSet.from_file(sup)
