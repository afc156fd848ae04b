"""Stage 2 for your own corpus: Kaldi data dirs (or lhotse cut manifests) into the recipe's manifests.

Three inputs, each a Kaldi data directory (``wav.scp`` with plain file paths,
``text``, ``utt2spk``, optionally ``segments``), read with lhotse's
``load_kaldi_data_dir``, or a lhotse cuts manifest (``*.jsonl.gz``):

- ``--train``: training speakers (SAT, and Conformer training); a
  ``--valid-fraction`` of it (every n-th utterance by id) becomes the valid set;
- ``--adapt``: the test speakers' adaptation utterances;
- ``--eval``: the test speakers' evaluation utterances; its speakers are the
  test speakers.

Everything is checked before anything is written: utterances without text,
empty transcripts, missing audio files, commands in ``wav.scp``, mixed sample
rates, unsafe speaker ids and a test speaker who is also a training speaker are
errors that name the file and the utterance.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import soundfile as sf
from lhotse import CutSet, RecordingSet, SupervisionSet
from lhotse.kaldi import load_kaldi_data_dir

from pqm.fsutil import BadInput, check_safe_id, cli, setup_logging
from pqm.manifests import write_speakers, write_utterance_set

CORPUS = "custom"


def _read_table(path: Path) -> dict[str, str]:
    """A Kaldi table (``id rest-of-line``); a missing file is an error naming it."""
    if not path.is_file():
        raise BadInput(f"{path} is missing: a Kaldi data dir needs wav.scp, text and utt2spk")
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, _, rest = line.strip().partition(" ")
            table[key] = rest.strip()
    return table


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_kaldi_dir(data_dir: Path) -> int:
    """Check a Kaldi data dir before loading it; return its sample rate."""
    wav = _read_table(data_dir / "wav.scp")
    text = _read_table(data_dir / "text")
    utt2spk = _read_table(data_dir / "utt2spk")
    piped = [r for r, p in wav.items() if p.endswith("|") or " " in p]
    if piped:
        raise BadInput(f"{data_dir}/wav.scp: recordings {_first(piped)} are commands, not plain file paths; "
                       "write the audio to files first")
    missing = [p for p in wav.values() if not Path(p).is_file()]
    if missing:
        raise BadInput(f"{data_dir}/wav.scp: {len(missing)} audio files do not exist: {_first(missing)}")
    no_text = sorted(u for u in utt2spk if u not in text)
    if no_text:
        raise BadInput(f"{data_dir}: {len(no_text)} utterances in utt2spk have no line in text: {_first(no_text)}")
    empty = sorted(u for u, t in text.items() if u in utt2spk and not t)
    if empty:
        raise BadInput(f"{data_dir}/text: empty transcripts for {_first(empty)}: drop these utterances or give their text")
    for spk in set(utt2spk.values()):
        check_safe_id(spk, f"speaker id in {data_dir}/utt2spk")
    rates = {sf.info(p).samplerate for p in wav.values()}
    if len(rates) != 1:
        raise BadInput(f"{data_dir}/wav.scp: audio at several sample rates {sorted(rates)}: convert to one rate first")
    return rates.pop()


def load_input(path: Path) -> tuple[RecordingSet, SupervisionSet]:
    """Load a Kaldi data dir or a lhotse cuts manifest, after checking it."""
    if path.is_dir():
        recs, sups, _ = load_kaldi_data_dir(path, sampling_rate=check_kaldi_dir(path))
        if sups is None:
            raise BadInput(f"{path}: no supervisions (text and utt2spk) could be read")
        return recs, sups
    if not path.is_file():
        raise BadInput(f"{path}: neither a Kaldi data dir nor a lhotse cuts manifest")
    cuts = CutSet.from_file(path).to_eager()
    sups = SupervisionSet.from_segments([s for c in cuts for s in c.supervisions])
    recs = RecordingSet.from_recordings({c.recording.id: c.recording for c in cuts}.values())
    empty = [s.id for s in sups if not (s.text or "").strip()]
    if empty:
        raise BadInput(f"{path}: empty transcripts for {_first(empty)}")
    missing = [src.source for r in recs for src in r.sources if src.type == "file" and not Path(src.source).is_file()]
    if missing:
        raise BadInput(f"{path}: {len(missing)} audio files do not exist: {_first(missing)}")
    for s in sups:
        check_safe_id(s.speaker or "", f"speaker id of {s.id} in {path}")
    return recs, sups


def split_valid(sups: SupervisionSet, fraction: float) -> tuple[SupervisionSet, SupervisionSet]:
    """Every n-th utterance (by id) for validation, at least one; the rest for training."""
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="training set: Kaldi data dir or lhotse cuts")
    p.add_argument("--adapt", type=Path, required=True, help="test speakers' adaptation set")
    p.add_argument("--eval", type=Path, required=True, help="test speakers' evaluation set")
    p.add_argument("--datadir", type=Path, required=True, help="output: <datadir>/manifests")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    a = p.parse_args(argv)
    setup_logging()
    prepare_custom(a.train, a.adapt, a.eval, a.datadir / "manifests", a.valid_fraction)


if __name__ == "__main__":
    cli(main)
