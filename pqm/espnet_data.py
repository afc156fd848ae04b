"""Stage 3: Kaldi-style data dirs for ESPnet and the word token list.

Reads ``<datadir>/manifests/<corpus>_{recordings,supervisions}_<set>.jsonl.gz`` and
writes ``<datadir>/<set>/{wav.scp,text,utt2spk,spk2utt}`` plus
``<datadir>/token_list/word/tokens.txt``. Every transcript is checked against
the token list here, so a bad one fails before any training starts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lhotse import RecordingSet, SupervisionSet
from lhotse.kaldi import export_to_kaldi

from pqm.fsutil import BadInput, atomic_path, cli, setup_logging, write_text
from pqm.manifests import SETS, load_set, manifest_path
from pqm.tokens import WordTokenizer, build_token_list

SAMPLE_RATE = 16000


def check_whole_16k(recs: RecordingSet, sups: SupervisionSet, where: Path) -> None:
    """ESPnet reads ``wav.scp`` whole: each utterance must be a whole 16 kHz recording."""
    by_id = {r.id: r for r in recs}
    for sup in sups:
        rec = by_id[sup.recording_id]
        if rec.sampling_rate != SAMPLE_RATE or abs(sup.duration - rec.duration) > 0.01 or sup.start > 0.01:
            raise BadInput(f"utterance {sup.id} in {where} is not a whole {SAMPLE_RATE} Hz recording "
                           f"({rec.sampling_rate} Hz, {sup.start:.2f}-{sup.end:.2f} s of {rec.duration:.2f} s): "
                           "the Conformer recipe needs one 16 kHz file per utterance; use --model whisper, "
                           "or convert the audio first")


def write_spk2utt(data_dir: Path) -> None:
    """Write Kaldi's ``spk2utt`` from ``utt2spk``."""
    spk2utt: dict[str, list[str]] = {}
    for line in (data_dir / "utt2spk").read_text(encoding="utf-8").splitlines():
        utt, spk = line.split()
        spk2utt.setdefault(spk, []).append(utt)
    lines = [f"{spk} {' '.join(utts)}" for spk, utts in sorted(spk2utt.items())]
    (data_dir / "spk2utt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datadir", type=Path, required=True)
    p.add_argument("--corpus", default="fsdd", help="manifest prefix (stage 2)")
    a = p.parse_args(argv)
    setup_logging()
    manifests = a.datadir / "manifests"
    sets = {name: load_set(manifests, a.corpus, name) for name in SETS}
    tokens = build_token_list(s.text for s in sets["train"][1])
    tokenizer = WordTokenizer(tokens)
    for name, (recs, sups) in sets.items():
        where = manifest_path(manifests, a.corpus, "supervisions", name)
        check_whole_16k(recs, sups, where)
        for sup in sups:
            tokenizer.encode(sup.text or "", where=f"utterance {sup.id} in {where}")
        with atomic_path(a.datadir / name) as tmp:
            export_to_kaldi(recs, sups, tmp)
            write_spk2utt(tmp)
        logging.info(f"wrote Kaldi data dir {a.datadir / name} ({len(sups)} utterances)")
    write_text(a.datadir / "token_list" / "word" / "tokens.txt", "\n".join(tokens) + "\n")


if __name__ == "__main__":
    cli(main)
