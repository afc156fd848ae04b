"""Stages 1-2 for your own corpus: Kaldi data dirs (or lhotse cut manifests) into the recipe's manifests.

Three inputs, each a Kaldi data directory (``wav.scp`` with plain file paths,
``text``, ``utt2spk``, optionally ``segments``; keys end at a tab or a space)
made into lhotse manifests here, or a lhotse cuts manifest (``*.jsonl.gz``):

- ``--train-data``: training speakers (SAT, and Conformer training); a
  ``--valid-fraction`` of it (every n-th utterance by id) becomes the valid set;
- ``--adapt-data``: the test speakers' adaptation utterances;
- ``--eval-data``: the test speakers' evaluation utterances; its speakers are the
  test speakers.

Everything is checked before anything is written: utterances without text or
audio, empty transcripts, a key twice in a table, a byte-order mark, missing or
unreadable audio files, commands in ``wav.scp``, audio with more than one
channel, mixed sample rates, segments outside their recording, unsafe speaker
ids and a test speaker who is also a training speaker are errors that name the
file and the utterance. Relative audio paths are read from the current folder
(``run.sh`` runs in the repository root), and the log says so.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import soundfile as sf

from pqm.errors import BadInput, check_safe_id
from pqm.kaldi_table import read_table
from pqm.manifests import write_speakers, write_utterance_set

if TYPE_CHECKING:  # lhotse is imported where it is used: run.sh's `pqm.recipes check` needs none of it
    from lhotse import RecordingSet, SupervisionSet

CORPUS = "custom"


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _audio_info(path: str, data_dir: Path) -> sf._SoundFileInfo:
    try:
        return sf.info(path)
    except sf.LibsndfileError as err:
        raise BadInput(f"{data_dir}/wav.scp: {path} is not audio that libsndfile reads ({err}); "
                       "convert it to WAV or FLAC") from None


def _check_segments(data_dir: Path, wav: dict[str, str], durations: dict[str, float]) -> dict[str, tuple[str, float, float]]:
    """Check ``segments`` (``utt recording start end``); return ``{utt: (recording, start, end)}``."""
    segments = {}
    for utt, rest in read_table(data_dir / "segments", allow_bom=False).items():
        fields = rest.split()
        where = f"{data_dir}/segments: {utt}"
        if len(fields) != 3:
            raise BadInput(f"{where}: a line needs 4 fields (utterance, recording, start, end), not {len(fields) + 1}")
        recording, start, end = fields[0], *fields[1:]
        if recording not in wav:
            raise BadInput(f"{where}: recording {recording} has no line in wav.scp")
        try:
            start_s, end_s = float(start), float(end)
        except ValueError:
            raise BadInput(f"{where}: start and end must be seconds, not {start!r} {end!r}") from None
        end_s = durations[recording] if end_s == -1 else end_s  # Kaldi: -1 is the end of the recording
        if not 0 <= start_s < end_s:
            raise BadInput(f"{where}: start {start} and end {end} must satisfy 0 <= start < end")
        if end_s > durations[recording] + 0.01:
            raise BadInput(f"{where}: ends at {end_s} s, after the end of {wav[recording]} "
                           f"({durations[recording]:.2f} s)")
        segments[utt] = (recording, start_s, min(end_s, durations[recording]))
    return segments


def read_kaldi_dir(data_dir: Path) -> tuple[RecordingSet, SupervisionSet]:
    """Check a Kaldi data dir, then make its lhotse manifests (the utterances of ``utt2spk``)."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    needed = "a Kaldi data dir needs wav.scp, text and utt2spk"
    wav, text, utt2spk = (read_table(data_dir / name, needed, allow_bom=False) for name in ("wav.scp", "text", "utt2spk"))
    piped = [r for r, p in wav.items() if p.endswith("|")]
    if piped:
        raise BadInput(f"{data_dir}/wav.scp: recordings {_first(piped)} are commands, not plain file paths; "
                       "write the audio to files first")
    missing = [p for p in wav.values() if not Path(p).is_file()]
    if missing:
        raise BadInput(f"{data_dir}/wav.scp: {len(missing)} audio files do not exist: {_first(missing)}"
                       + (f" (relative paths are read from {Path.cwd()})" if not Path(missing[0]).is_absolute() else ""))
    relative = [p for p in wav.values() if not Path(p).is_absolute()]
    if relative:
        logging.info(f"{data_dir}/wav.scp: relative paths such as {relative[0]} are read from {Path.cwd()}")
    infos = {r: _audio_info(p, data_dir) for r, p in wav.items()}
    stereo = sorted(r for r, i in infos.items() if i.channels != 1)
    if stereo:
        raise BadInput(f"{data_dir}/wav.scp: recordings {_first(stereo)} have more than one channel: the recipe "
                       "reads mono audio; mix them down first (e.g. sox in.wav -c 1 out.wav)")
    rates = {i.samplerate for i in infos.values()}
    if len(rates) != 1:
        raise BadInput(f"{data_dir}/wav.scp: audio at several sample rates {sorted(rates)}: convert to one rate first")
    if (data_dir / "segments").exists():
        spans = _check_segments(data_dir, wav, {r: i.duration for r, i in infos.items()})
        where = "segments"
    else:
        spans = {r: (r, 0.0, i.duration) for r, i in infos.items()}
        where = "wav.scp"
    unknown = sorted(u for u in utt2spk if u not in spans)
    if unknown:
        raise BadInput(f"{data_dir}: {len(unknown)} utterances in utt2spk have no line in {where}: {_first(unknown)}")
    no_text = sorted(u for u in utt2spk if u not in text)
    if no_text:
        raise BadInput(f"{data_dir}: {len(no_text)} utterances in utt2spk have no line in text: {_first(no_text)}")
    empty = sorted(u for u, t in text.items() if u in utt2spk and not t)
    if empty:
        raise BadInput(f"{data_dir}/text: empty transcripts for {_first(empty)}: drop these utterances or give their text")
    for spk in set(utt2spk.values()):
        check_safe_id(spk, f"speaker id in {data_dir}/utt2spk")
    used = {spans[u][0] for u in utt2spk}
    recordings = RecordingSet.from_recordings(Recording.from_file(wav[r], recording_id=r) for r in sorted(used))
    supervisions = SupervisionSet.from_segments(
        SupervisionSegment(id=u, recording_id=spans[u][0], start=spans[u][1], duration=spans[u][2] - spans[u][1],
                           channel=0, text=text[u], speaker=spk)
        for u, spk in sorted(utt2spk.items()))
    return recordings, supervisions


def load_input(path: Path) -> tuple[RecordingSet, SupervisionSet]:
    """Load a Kaldi data dir or a lhotse cuts manifest, after checking it."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    if path.is_dir():
        return read_kaldi_dir(path)
    if not path.is_file():
        raise BadInput(f"{path}: neither a Kaldi data dir nor a lhotse cuts manifest")
    cuts = CutSet.from_file(path).to_eager()
    ids = sorted(s.id for c in cuts for s in c.supervisions)
    twice = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    if twice:
        raise BadInput(f"{path}: utterances {_first(twice)} appear more than once")
    sups = SupervisionSet.from_segments([s for c in cuts for s in c.supervisions])
    recs = RecordingSet.from_recordings({c.recording.id: c.recording for c in cuts}.values())
    empty = [s.id for s in sups if not (s.text or "").strip()]
    if empty:
        raise BadInput(f"{path}: empty transcripts for {_first(empty)}")
    stereo = sorted(c.id for c in cuts if c.num_channels != 1)
    if stereo:
        raise BadInput(f"{path}: cuts {_first(stereo)} have more than one channel: the recipe reads mono audio; "
                       "mix them down first")
    missing = [src.source for r in recs for src in r.sources if src.type == "file" and not Path(src.source).is_file()]
    if missing:
        raise BadInput(f"{path}: {len(missing)} audio files do not exist: {_first(missing)}")
    for s in sups:
        check_safe_id(s.speaker or "", f"speaker id of {s.id} in {path}")
    return recs, sups


def split_valid(sups: SupervisionSet, fraction: float) -> tuple[SupervisionSet, SupervisionSet]:
    """Every n-th utterance (by id) for validation, at least one; the rest for training."""
    from lhotse import SupervisionSet

    ordered = sorted(sups, key=lambda s: s.id)
    step = max(1, round(1 / fraction)) if fraction > 0 else len(ordered) + 1
    valid = [s for i, s in enumerate(ordered) if i % step == step - 1] or ordered[-1:]
    valid_ids = {s.id for s in valid}
    return (SupervisionSet.from_segments([s for s in ordered if s.id not in valid_ids]),
            SupervisionSet.from_segments(valid))


def prepare_custom(train: Path, adapt: Path, evaluation: Path, manifest_dir: Path, valid_fraction: float = 0.05) -> dict:
    """Write the four sets' manifests and ``speakers.json``; return the speakers."""
    inputs = {"train": load_input(train), "adapt": load_input(adapt), "eval": load_input(evaluation)}
    speakers = {name: sorted({s.speaker for s in sups}) for name, (_, sups) in inputs.items()}
    both = sorted(set(speakers["train"]) & (set(speakers["adapt"]) | set(speakers["eval"])))
    if both:
        raise BadInput(f"speakers {both} are in the training set ({train}) and in a test set ({adapt}, {evaluation}): "
                       "a test speaker must be unseen in training")
    shared_ids = sorted({s.id for s in inputs["adapt"][1]} & {s.id for s in inputs["eval"][1]})
    sources = lambda recs: {src.source for r in recs for src in r.sources if src.type == "file"}  # noqa: E731
    shared_audio = sorted(sources(inputs["adapt"][0]) & sources(inputs["eval"][0]))
    if shared_ids or shared_audio:
        raise BadInput(f"the evaluation set ({evaluation}) overlaps the adaptation set ({adapt}): "
                       + (f"utterances {_first(shared_ids)}" if shared_ids else f"audio files {_first(shared_audio)}")
                       + " are in both; evaluation speech must be unseen in adaptation")
    extra = sorted(set(speakers["adapt"]) - set(speakers["eval"]))
    if extra:
        logging.warning(f"{adapt}: speakers {extra} have no evaluation utterances in {evaluation}: not test speakers")
    recs, sups = inputs["train"]
    train_sups, valid_sups = split_valid(sups, valid_fraction)
    sets = {"train": (recs, train_sups), "valid": (recs, valid_sups), "adapt": inputs["adapt"], "eval": inputs["eval"]}
    for name, (recs, sups) in sets.items():
        write_utterance_set(manifest_dir, CORPUS, name, recs, sups)
    write_speakers(manifest_dir, speakers["train"], speakers["eval"])
    return speakers


TOKEN_TYPE = "bpe"
SPLIT_DIGITS = False  # Whisper's English normaliser alone
SETS = ("train", "adapt", "eval")
TABLES = ("wav.scp", "text", "utt2spk", "segments")


def add_options(p: argparse.ArgumentParser) -> None:
    """``--corpus custom``'s options: the three data sets (each required)."""
    p.add_argument("--train-data", type=Path, help="training set: a Kaldi data dir or lhotse cuts")
    p.add_argument("--adapt-data", type=Path, help="the test speakers' adaptation set")
    p.add_argument("--eval-data", type=Path, help="the test speakers' evaluation set (its speakers are the test speakers)")
    p.add_argument("--valid-fraction", type=float, default=0.05,
                   help="share of the training utterances held out for validation")


def _data_sets(a: argparse.Namespace) -> list[Path]:
    for name in SETS:
        path = getattr(a, f"{name}_data")
        if path is None or not path.exists():
            raise BadInput(f"--corpus custom needs --{name}-data (a Kaldi data dir or lhotse cuts) in --corpus-opts; "
                           f"got {str(path) if path else 'nothing'}")
    return [getattr(a, f"{name}_data") for name in SETS]


def inputs_digest(a: argparse.Namespace) -> str:
    """A digest of the data sets' tables (or cuts files): an edited table counts as a changed option."""
    digest = hashlib.sha256()
    for path in _data_sets(a):
        for f in [path] if path.is_file() else [path / t for t in TABLES if (path / t).is_file()]:
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def download(a: argparse.Namespace) -> None:
    """Stage 1: nothing to download; the data sets must exist."""
    train, adapt, evaluation = _data_sets(a)
    logging.info(f"corpus: train {train}, adapt {adapt}, eval {evaluation}")


def prepare(a: argparse.Namespace, corpus_dir: None) -> None:
    """Stage 2."""
    prepare_custom(*_data_sets(a), a.datadir / "manifests", a.valid_fraction)
