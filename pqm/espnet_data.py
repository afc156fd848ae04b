"""Stage 3: Kaldi-style data dirs for ESPnet and the word token list.

Reads ``<datadir>/manifests/fsdd_{recordings,supervisions}_<set>.jsonl.gz`` and
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

from pqm.connected_digits import SETS
from pqm.fsutil import atomic_path, cli, require, setup_logging, write_text
from pqm.tokens import WordTokenizer, build_token_list


def load_set(manifest_dir: Path, name: str) -> tuple[RecordingSet, SupervisionSet]:
    """Load one set's recordings and supervisions, naming stage 2 if they are missing."""
    rec = require(manifest_dir / f"fsdd_recordings_{name}.jsonl.gz", "stage 2 (manifests)")
    sup = require(manifest_dir / f"fsdd_supervisions_{name}.jsonl.gz", "stage 2 (manifests)")
    return RecordingSet.from_file(rec), SupervisionSet.from_file(sup)


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
    a = p.parse_args(argv)
    setup_logging()
    manifests = a.datadir / "manifests"
    sets = {name: load_set(manifests, name) for name in SETS}
    tokens = build_token_list(s.text for s in sets["train"][1])
    tokenizer = WordTokenizer(tokens)
    for name, (recs, sups) in sets.items():
        where = manifests / f"fsdd_supervisions_{name}.jsonl.gz"
        for sup in sups:
            tokenizer.encode(sup.text or "", where=f"utterance {sup.id} in {where}")
        with atomic_path(a.datadir / name) as tmp:
            export_to_kaldi(recs, sups, tmp)
            write_spk2utt(tmp)
        logging.info(f"wrote Kaldi data dir {a.datadir / name} ({len(sups)} utterances)")
    write_text(a.datadir / "token_list" / "word" / "tokens.txt", "\n".join(tokens) + "\n")


if __name__ == "__main__":
    cli(main)
