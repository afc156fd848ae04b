"""The Free Spoken Digit Dataset (FSDD) as a lhotse recipe.

FSDD: 6 English speakers, 50 recordings of each digit 0-9 per speaker, mono
8 kHz WAV, file names ``{digit}_{speaker}_{index}.wav``. Creative Commons
Attribution-ShareAlike 4.0 (Jakobovski/free-spoken-digit-dataset,
DOI 10.5281/zenodo.1342401); code building on it keeps this attribution.

``download_fsdd`` fetches the pinned release; ``prepare_fsdd`` returns one
Recording and one SupervisionSegment (the digit as an English word) per file.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import soundfile as sf

from pqm.errors import BadInput, MissingInput, check_safe_id

if TYPE_CHECKING:  # lhotse is imported where it is used: run.sh's `pqm.recipes check` needs none of it
    from lhotse import Recording, RecordingSet, SupervisionSet
    from lhotse.utils import Pathlike

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_URL = (
    "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/"
    f"{FSDD_COMMIT}.zip"
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NAME = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[^_]+)_(?P<index>[0-9]+)$")


def download_fsdd(target_dir: Pathlike = "downloads", force_download: bool = False) -> Path:
    """Download and unpack the pinned FSDD release; return the corpus folder.

    The corpus folder holds ``recordings/*.wav`` as in the upstream repository.
    """
    from lhotse.utils import resumable_download

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = target_dir / "fsdd"
    done = corpus_dir / ".completed"
    if done.is_file() and not force_download:
        logging.info(f"FSDD already unpacked in {corpus_dir}")
        return corpus_dir
    archive = target_dir / f"fsdd-{FSDD_COMMIT}.zip"
    resumable_download(FSDD_URL, filename=archive, force_download=force_download)
    unpack = target_dir / ".fsdd-unpack"
    shutil.rmtree(unpack, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if "/recordings/" in m and m.endswith(".wav")]
        for member in members:
            if ".." in member or member.startswith("/"):
                raise BadInput(f"refusing unsafe path {member!r} in {archive}")
        zf.extractall(unpack, members)
    (src,) = list(unpack.glob("*/recordings"))
    shutil.rmtree(corpus_dir, ignore_errors=True)
    corpus_dir.mkdir(parents=True)
    shutil.move(str(src), corpus_dir / "recordings")
    shutil.rmtree(unpack, ignore_errors=True)
    done.touch()
    return corpus_dir


def parse_name(stem: str) -> tuple[int, str, int]:
    """Split an FSDD file stem ``{digit}_{speaker}_{index}`` into its three parts."""
    match = _NAME.match(stem)
    if match is None:
        raise BadInput(f"not an FSDD file name: {stem!r} (expected digit_speaker_index.wav)")
    return int(match["digit"]), match["speaker"], int(match["index"])


def _recording(path: Path) -> Recording:
    """Build a Recording, turning unreadable audio into an error that names the file."""
    from lhotse import Recording

    fix = "Restore it from the FSDD release (./run.sh --stage 1 with --fsdd-dir pointing at a good copy) or delete it."
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as exc:
        raise BadInput(f"corrupt audio file {path}: {exc}. {fix}") from exc
    if info.frames == 0:
        raise BadInput(f"empty audio file {path}: it holds no audio samples. {fix}")
    return Recording.from_file(path, recording_id=path.stem)


def prepare_fsdd(
    corpus_dir: Pathlike, output_dir: Pathlike | None = None
) -> dict[str, RecordingSet | SupervisionSet]:
    """Make lhotse manifests for every FSDD recording.

    :return: ``{"recordings": RecordingSet, "supervisions": SupervisionSet}``;
        written as ``fsdd_{recordings,supervisions}_all.jsonl.gz`` when
        ``output_dir`` is given.
    """
    from lhotse import RecordingSet, SupervisionSegment, SupervisionSet, validate_recordings_and_supervisions

    wav_dir = Path(corpus_dir) / "recordings"
    files = sorted(wav_dir.glob("*.wav"))
    if not files:
        raise MissingInput(f"no FSDD recordings in {wav_dir}: run stage 1 or check --fsdd-dir")
    recordings, supervisions = [], []
    for path in files:
        digit, speaker, _ = parse_name(path.stem)
        check_safe_id(speaker)
        rec = _recording(path)
        recordings.append(rec)
        supervisions.append(
            SupervisionSegment(
                id=rec.id,
                recording_id=rec.id,
                start=0.0,
                duration=rec.duration,
                channel=0,
                text=DIGIT_WORDS[digit],
                speaker=speaker,
                language="English",
            )
        )
    recording_set = RecordingSet.from_recordings(recordings)
    supervision_set = SupervisionSet.from_segments(supervisions)
    validate_recordings_and_supervisions(recording_set, supervision_set)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        recording_set.to_file(output_dir / "fsdd_recordings_all.jsonl.gz")
        supervision_set.to_file(output_dir / "fsdd_supervisions_all.jsonl.gz")
    return {"recordings": recording_set, "supervisions": supervision_set}
