"""Stage 2: lhotse manifests of the corpus and of the connected-digit task."""

from __future__ import annotations

import argparse
from pathlib import Path

from pqm.connected_digits import DigitTaskConfig, make_connected_digits
from pqm.fsutil import cli, setup_logging
from pqm.recipes.fsdd import prepare_fsdd


def main(argv: list[str] | None = None) -> None:
    default = DigitTaskConfig()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus-dir", type=Path, required=True, help="FSDD folder with recordings/")
    p.add_argument("--datadir", type=Path, required=True, help="output: <datadir>/manifests, <datadir>/wav")
    p.add_argument("--train-speakers", nargs="+", default=default.train_speakers)
    p.add_argument("--test-speakers", nargs="+", default=default.test_speakers)
    p.add_argument("--train-per-speaker", type=int, default=default.train_per_speaker)
    p.add_argument("--valid-per-digit", type=int, default=default.valid_per_digit)
    p.add_argument("--adapt-per-digit", type=int, default=default.adapt_per_digit)
    p.add_argument("--adapt-per-speaker", type=int, default=default.adapt_per_speaker)
    p.add_argument("--max-digits", type=int, default=default.max_digits)
    p.add_argument("--seed", type=int, default=default.seed)
    a = p.parse_args(argv)
    setup_logging()
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
    corpus = prepare_fsdd(a.corpus_dir, manifests)
    make_connected_digits(corpus["recordings"], corpus["supervisions"], cfg, a.datadir / "wav", manifests)


if __name__ == "__main__":
    cli(main)
