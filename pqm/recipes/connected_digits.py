"""Connected-digit utterances built from one speaker's own FSDD recordings.

Each utterance joins 1..N recordings of one speaker (resampled to 16 kHz) with
short pauses; its transcript is the digits as words ("four two nine"). Sets:

- ``train``: training speakers, recordings with index < 50 - valid_per_digit
  (sampled with replacement, ``train_per_speaker`` utterances each);
- ``valid``: training speakers, the last ``valid_per_digit`` indices, each
  recording used once;
- ``adapt``: test speakers, recordings with index < ``adapt_per_digit``
  (sampled with replacement, ``adapt_per_speaker`` utterances each);
- ``eval``: test speakers, the remaining indices, each recording used once.

No recording is in two sets, and no training utterance uses a test speaker.
Everything is deterministic for a seed. The default recipe's corpus
(``--corpus fsdd``): stage 1 finds or downloads FSDD (:mod:`pqm.recipes.fsdd`),
stage 2 builds the task.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
from tqdm import tqdm

from pqm.errors import BadInput, check_safe_id
from pqm.files import atomic_path
from pqm.manifests import SETS, write_set, write_speakers
from pqm.recipes.fsdd import download_fsdd, parse_name, prepare_fsdd

if TYPE_CHECKING:  # lhotse is imported where it is used: run.sh's `pqm.recipes check` needs none of it
    from lhotse import CutSet, RecordingSet, SupervisionSet

SAMPLE_RATE = 16000


@dataclass
class DigitTaskConfig:
    """How the connected-digit task is drawn from the corpus."""

    train_speakers: list[str] = field(default_factory=lambda: ["jackson", "theo", "yweweler", "lucas"])
    test_speakers: list[str] = field(default_factory=lambda: ["george", "nicolas"])
    train_per_speaker: int = 350
    valid_per_digit: int = 3
    adapt_per_digit: int = 20
    adapt_per_speaker: int = 100
    min_digits: int = 1
    max_digits: int = 7
    pause: tuple[float, float] = (0.05, 0.25)
    seed: int = 0

    def check(self, corpus_speakers: set[str]) -> None:
        """Raise a clear error for an impossible split."""
        for spk in self.train_speakers + self.test_speakers:
            check_safe_id(spk)
            if spk not in corpus_speakers:
                raise BadInput(f"speaker {spk!r} is not in the corpus (have: {sorted(corpus_speakers)})")
        both = set(self.train_speakers) & set(self.test_speakers)
        if both:
            raise BadInput(f"speakers in both training and test sets: {sorted(both)}")
        if not self.train_speakers or not self.test_speakers:
            raise BadInput("need at least one training speaker and one test speaker")
        if not 1 <= self.min_digits <= self.max_digits:
            raise BadInput(f"bad digit range {self.min_digits}..{self.max_digits}")


def _partition(items: list[str], rng: random.Random, cfg: DigitTaskConfig) -> list[list[str]]:
    """Cut a shuffled list into utterances of min..max items, each item used once."""
    items = list(items)
    rng.shuffle(items)
    groups, i = [], 0
    while i < len(items):
        n = rng.randint(cfg.min_digits, cfg.max_digits)
        groups.append(items[i : i + n])
        i += n
    return groups


def _sample(items: list[str], count: int, rng: random.Random, cfg: DigitTaskConfig) -> list[list[str]]:
    """Draw ``count`` utterances of min..max items (items may recur across utterances)."""
    if not items:
        return []
    return [rng.choices(items, k=rng.randint(cfg.min_digits, cfg.max_digits)) for _ in range(count)]


def plan_utterances(
    supervisions: SupervisionSet, cfg: DigitTaskConfig
) -> dict[str, list[tuple[str, str, list[str]]]]:
    """Return ``{set: [(utt_id, speaker, [recording ids])]}`` for the four sets."""
    by_speaker: dict[str, list[tuple[int, str]]] = {}
    for sup in supervisions:
        _, speaker, index = parse_name(sup.recording_id)
        by_speaker.setdefault(speaker, []).append((index, sup.recording_id))
    cfg.check(set(by_speaker))
    rng = random.Random(cfg.seed)
    plan: dict[str, list[tuple[str, str, list[str]]]] = {name: [] for name in SETS}
    last_train_index = 50 - cfg.valid_per_digit
    for spk in cfg.train_speakers:
        recs = sorted(by_speaker[spk])
        train = [r for i, r in recs if i < last_train_index]
        valid = [r for i, r in recs if i >= last_train_index]
        plan["train"] += [(spk, g) for g in _sample(train, cfg.train_per_speaker, rng, cfg)]
        plan["valid"] += [(spk, g) for g in _partition(valid, rng, cfg)]
    for spk in cfg.test_speakers:
        recs = sorted(by_speaker[spk])
        adapt = [r for i, r in recs if i < cfg.adapt_per_digit]
        evaluation = [r for i, r in recs if i >= cfg.adapt_per_digit]
        plan["adapt"] += [(spk, g) for g in _sample(adapt, cfg.adapt_per_speaker, rng, cfg)]
        plan["eval"] += [(spk, g) for g in _partition(evaluation, rng, cfg)]
    return {
        name: [(f"{spk}-{name}-{n:05d}", spk, group) for n, (spk, group) in enumerate(items)]
        for name, items in plan.items()
    }


def _load_16k(recordings: RecordingSet, ids: set[str]) -> dict[str, np.ndarray]:
    """Load and resample each needed recording once."""
    from lhotse.audio.utils import AudioLoadingError

    audio = {}
    for rec_id in tqdm(sorted(ids), desc="resample to 16 kHz", unit="rec"):
        rec = recordings[rec_id]
        try:
            audio[rec_id] = rec.resample(SAMPLE_RATE).load_audio()[0]
        except (sf.LibsndfileError, AudioLoadingError) as exc:  # the audio libraries' decoding errors only
            source = rec.sources[0].source
            raise BadInput(f"cannot read audio file {source}: {exc}; replace or delete it") from exc
    return audio


def make_connected_digits(
    recordings: RecordingSet,
    supervisions: SupervisionSet,
    cfg: DigitTaskConfig,
    wav_dir: Path,
    manifest_dir: Path,
) -> dict[str, CutSet]:
    """Write the utterances as 16 kHz WAV files plus lhotse manifests; return the cuts."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    plan = plan_utterances(supervisions, cfg)
    words = {s.recording_id: s.text for s in supervisions}
    needed = {r for items in plan.values() for _, _, group in items for r in group}
    audio = _load_16k(recordings, needed)
    rng = np.random.default_rng(cfg.seed)
    cuts = {}
    for name, items in plan.items():
        recs, sups = [], []
        with atomic_path(wav_dir / name) as tmp:
            tmp.mkdir()
            for utt_id, spk, group in tqdm(items, desc=f"write {name}", unit="utt"):
                pieces = [np.zeros(int(0.1 * SAMPLE_RATE), dtype=np.float32)]
                for rec_id in group:
                    pieces.append(audio[rec_id])
                    gap = rng.uniform(*cfg.pause)
                    pieces.append(np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32))
                sf.write(tmp / f"{utt_id}.wav", np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
        for utt_id, spk, group in items:
            rec = Recording.from_file(wav_dir / name / f"{utt_id}.wav", recording_id=utt_id)
            recs.append(rec)
            sups.append(
                SupervisionSegment(
                    id=utt_id,
                    recording_id=utt_id,
                    start=0.0,
                    duration=rec.duration,
                    text=" ".join(words[r] for r in group),
                    speaker=spk,
                    language="English",
                    custom={"sources": group},
                )
            )
        cuts[name] = write_set(manifest_dir, "fsdd", name, RecordingSet.from_recordings(recs),
                               SupervisionSet.from_segments(sups))
        logging.info(f"{name}: {len(items)} utterances, {sum(len(g) for _, _, g in items)} words")
    write_speakers(manifest_dir, cfg.train_speakers, cfg.test_speakers, config=asdict(cfg))
    return cuts


TOKEN_TYPE = "word"
SPLIT_DIGITS = True  # Whisper writes "four two" as "42": one word per digit keeps WER a per-digit count
FSDD_COPY = Path("../shared/corpora/fsdd")


def add_options(p: argparse.ArgumentParser) -> None:
    """``--corpus fsdd``'s options: where FSDD is, and how the connected-digit task is drawn."""
    default = DigitTaskConfig()
    p.add_argument("--corpus-dir", type=Path, default=FSDD_COPY, help="an FSDD copy (with recordings/)")
    p.add_argument("--download-dir", type=Path, default=Path("downloads"),
                   help="download the pinned FSDD release here when --corpus-dir has no recordings/")
    p.add_argument("--train-speakers", nargs="+", default=default.train_speakers)
    p.add_argument("--test-speakers", nargs="+", default=default.test_speakers)
    p.add_argument("--train-per-speaker", type=int, default=default.train_per_speaker,
                   help="training utterances drawn per training speaker")
    p.add_argument("--valid-per-digit", type=int, default=default.valid_per_digit)
    p.add_argument("--adapt-per-digit", type=int, default=default.adapt_per_digit,
                   help="test speakers: recordings with index < this are for adaptation, the rest for evaluation")
    p.add_argument("--adapt-per-speaker", type=int, default=default.adapt_per_speaker,
                   help="adaptation utterances drawn per test speaker")
    p.add_argument("--max-digits", type=int, default=default.max_digits, help="digits per utterance: 1..N")


def download(a: argparse.Namespace) -> Path:
    """Stage 1: the FSDD folder to use, downloading the pinned release if ``--corpus-dir`` has none."""
    if (a.corpus_dir / "recordings").is_dir():
        logging.info(f"using the FSDD copy in {a.corpus_dir}")
        return a.corpus_dir.resolve()
    logging.warning(f"{a.corpus_dir}/recordings not found: downloading FSDD into {a.download_dir}")
    return download_fsdd(a.download_dir).resolve()


def prepare(a: argparse.Namespace, corpus_dir: Path) -> None:
    """Stage 2: lhotse manifests of FSDD and of the connected-digit task."""
    cfg = DigitTaskConfig(
        train_speakers=a.train_speakers,
        test_speakers=a.test_speakers,
        train_per_speaker=a.train_per_speaker,
        valid_per_digit=a.valid_per_digit,
        adapt_per_digit=a.adapt_per_digit,
        adapt_per_speaker=a.adapt_per_speaker,
        max_digits=a.max_digits,
        seed=a.seed,
    )
    manifests = a.datadir / "manifests"
    fsdd = prepare_fsdd(corpus_dir, manifests)
    make_connected_digits(fsdd["recordings"], fsdd["supervisions"], cfg, a.datadir / "wav", manifests)
